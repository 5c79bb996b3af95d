"""Sample embeddings from the frozen base: padding-aware mean of the final-normed last hidden state.

Computed once per run in fixed-size jitted batches and cached on disk under a key of
(model fingerprint, tokenizer, texts, max tokens), so reruns and resumed runs skip the work.
"""
from __future__ import annotations

import functools
import hashlib
import os
import struct
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from fedrouter_jax.models import llama
from fedrouter_jax.models.config import LlamaConfig


@partial(jax.jit, static_argnames=("cfg",))
def _embed_batch(params, tokens, mask, *, cfg):
    return llama.mean_pooled_embedding(params, tokens, mask, cfg=cfg)


def embed_tokens(params: dict, cfg: LlamaConfig, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """tokens, mask: [N, T] -> embeddings [N, D] float32 (last batch padded, so one compile)."""
    n = tokens.shape[0]
    out = np.zeros((n, cfg.hidden_size), np.float32)
    for s in range(0, n, batch_size):
        tb, mb = tokens[s:s + batch_size], mask[s:s + batch_size]
        k = tb.shape[0]
        if k < batch_size:
            tb = np.pad(tb, ((0, batch_size - k), (0, 0)))
            mb = np.pad(mb, ((0, batch_size - k), (0, 0)))
        out[s:s + k] = np.asarray(_embed_batch(params, tb, mb, cfg=cfg))[:k]
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache" / "fedrouter-jax")) / "embeddings"


def cache_key(model_fingerprint: str, texts: Sequence[str], max_tokens: int, tokenizer_fingerprint: str) -> str:
    h = hashlib.sha256()
    for part in (model_fingerprint, tokenizer_fingerprint, str(max_tokens)):
        h.update(part.encode() + b"\0")
    for t in texts:
        h.update(t.encode() + b"\0")
    return h.hexdigest()[:32]


def file_fingerprint(paths: Sequence[Path]) -> str:
    """Content hash of small files (the tokenizer); weights: `model_fingerprint`."""
    h = hashlib.sha256()
    for p in sorted(map(Path, paths)):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


# Bytes of each weight file hashed by `model_fingerprint`, besides its size and header.
_SAMPLES, _SAMPLE_BYTES = 32, 4096


def model_fingerprint(model_dir: str | Path) -> str:
    """Cache key of an HF model directory without reading its weights in full.

    Hashes config.json and the shard index whole, and for each `*.safetensors` file its name,
    size, safetensors header (names, dtypes, shapes, offsets) and `_SAMPLES` evenly spaced
    `_SAMPLE_BYTES`-byte samples of its data (about 128 KiB per file). Copies of a model share a
    fingerprint (no mtimes); retrained weights change every sample. Memoised per process on the
    files' (name, size, mtime), so a run computes it once.
    """
    model_dir = Path(model_dir).resolve()
    files = sorted(model_dir.glob("*.safetensors")) + [p for p in (model_dir / "config.json",
                                                                    model_dir / "model.safetensors.index.json")
                                                       if p.exists()]
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _fingerprint(model_dir, stats)


@functools.lru_cache(maxsize=8)
def _fingerprint(model_dir: Path, stats: tuple) -> str:
    h = hashlib.sha256()
    for name, size, _ in stats:
        h.update(f"{name}\0{size}\0".encode())
        with open(model_dir / name, "rb") as f:
            if not name.endswith(".safetensors"):
                h.update(f.read())
                continue
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(head + f.read(min(n, size)))
            for i in range(_SAMPLES):
                f.seek(i * max(size - _SAMPLE_BYTES, 0) // max(_SAMPLES - 1, 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def cached_embeddings(key: str, compute, directory: Optional[Path] = None) -> np.ndarray:
    """Load `key` from the cache or `compute()` and store it (atomically: temp file + rename)."""
    directory = Path(directory) if directory else cache_dir()
    path = directory / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path)
        except (ValueError, OSError):
            path.unlink(missing_ok=True)  # a torn file from a crash: recompute
    emb = compute()
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{key}.{os.getpid()}.tmp.npy"
    np.save(tmp, emb)
    os.replace(tmp, path)
    return emb
