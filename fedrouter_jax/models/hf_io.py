"""HF checkpoint I/O kept next to the model: safetensors <-> params, and PEFT adapter export.

Tensors are read with the `safetensors` package one at a time (`safe_open(framework="np")`,
bf16 as `ml_dtypes.bfloat16`, no torch), file by file for sharded checkpoints, and copied
straight into preallocated arrays of the target dtype in our stacked layout: the host holds the
weights once plus a bounded window of the file being read, never an fp32 copy of the model.
Every error names the file and the tensor.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import jax
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, which safetensors' np framework needs
import numpy as np
import safetensors
import safetensors.numpy
from safetensors import safe_open

from fedrouter_jax.lora import LoraStack
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.models.llama import param_shapes

# our layer key -> HF module path inside `model.layers.{i}.`
_HF_LAYER = {
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_INDEX, _SINGLE = "model.safetensors.index.json", "model.safetensors"
# A safetensors mapping keeps every page it has read resident until the file is closed, so the
# reader reopens a file after this many bytes: the host then holds the loaded weights plus at
# most this window, not the weights plus the whole file.
READ_WINDOW_BYTES = 64 << 20
CHUNK_ELEMENTS = 4 << 20  # rows read at a time: the only transient copy besides the window


class CheckpointFormatError(ValueError):
    """A checkpoint whose tensors do not match the config (names the tensor, file and shapes)."""


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Write numpy tensors (bf16 included) as a `.safetensors` file (`format: pt` so torch loads it)."""
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def _hf_name_map(cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (our path, transpose?) for every expected tensor."""
    names = {"model.embed_tokens.weight": (("embed",), False), "model.norm.weight": (("final_norm",), False)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), True)
    for i in range(cfg.num_hidden_layers):
        for ours, hf in _HF_LAYER.items():
            names[f"model.layers.{i}.{hf}.weight"] = (("layers", ours, i), "proj" in ours)
    return names


def _ignored(name: str, cfg: LlamaConfig) -> bool:
    """Tensors some checkpoints store that the model does not use."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    return cfg.tie_word_embeddings and name == "lm_head.weight"  # a tied checkpoint's copy of the embedding


def _weight_map(directory: Path) -> Optional[dict[str, Path]]:
    """Tensor name -> shard file from `model.safetensors.index.json`; None for a single file."""
    index = directory / _INDEX
    if index.exists():
        return {name: directory / fname for name, fname in json.loads(index.read_text())["weight_map"].items()}
    if (directory / _SINGLE).exists():
        return None
    raise FileNotFoundError(
        f"{directory}: no {_SINGLE} or {_INDEX} (expected an HF Llama checkpoint saved with safe_serialization)"
    )


def _check_names(names: dict[str, Path], expected: dict, cfg: LlamaConfig, where: Path) -> None:
    extra = sorted(n for n in set(names) - set(expected) if not _ignored(n, cfg))
    if extra:
        raise CheckpointFormatError(
            f"{names[extra[0]]}: unexpected tensor {extra[0]!r} (not part of a Llama with this config.json); "
            f"{len(extra)} unexpected in total"
        )
    missing = [n for n in expected if n not in names]
    if missing:
        raise CheckpointFormatError(f"{where}: missing tensor {missing[0]!r}")


class _FileReader:
    """Lazily opened tensors of one `.safetensors` file, read in row chunks and bounded windows.

    The header is parsed when first needed (`names` or `tensors`) and that open file serves the
    first window; the file is reopened only to release a window of `READ_WINDOW_BYTES` (also
    inside a tensor larger than that, e.g. a 128k-token embedding).
    """

    def __init__(self, path: Path):
        self.path, self._file, self._read = path, None, 0

    def _reopen(self):
        self.close()
        try:
            self._file = safe_open(str(self.path), framework="np")
        except safetensors.SafetensorError as err:
            raise CheckpointFormatError(f"{self.path}: not a readable safetensors file ({err})") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: file does not exist") from None
        self._read = 0
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.__exit__(None, None, None)
            self._file = None

    def names(self) -> list[str]:
        return list((self._file or self._reopen()).keys())

    def _slice(self, name: str):
        try:
            return self._file.get_slice(name)
        except safetensors.SafetensorError as err:
            if name not in self._file.keys():
                raise CheckpointFormatError(f"{self.path}: missing tensor {name!r}") from None
            raise CheckpointFormatError(f"{self.path}: tensor {name!r} is unreadable ({err})") from None

    def tensors(self, names) -> Iterator[tuple[str, tuple, Iterator[tuple[int, np.ndarray]]]]:
        """(name, shape, chunks) for each of `names`, in order; `chunks` yields (first row, rows)
        of at most `CHUNK_ELEMENTS` and must be consumed before the next name. Closes the file."""
        if self._file is None:
            self._reopen()
        try:
            for name in names:
                part = self._slice(name)
                yield name, tuple(part.get_shape()), self._chunks(name, part)
        finally:
            self.close()

    def _chunks(self, name: str, part) -> Iterator[tuple[int, np.ndarray]]:
        shape = part.get_shape()
        n_rows = shape[0] if shape else 1
        step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(shape[1:]))))
        for start in range(0, n_rows, step):
            if self._read >= READ_WINDOW_BYTES:
                self._reopen()
                part = self._slice(name)
            rows = part[start:min(start + step, n_rows)] if shape else part[...]
            self._read += rows.nbytes
            yield start, rows


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as numpy arrays (small files: tests, adapters)."""
    reader = _FileReader(Path(path))
    return {name: np.concatenate([rows for _, rows in chunks]) if shape else next(chunks)[1]
            for name, shape, chunks in reader.tensors(reader.names())}


def _check_finite(rows: np.ndarray, start: int, path: Path, name: str, block_elems: int = 1 << 20) -> None:
    """Raise naming the file, tensor and position of the first NaN/Inf in `rows` (rows
    start..start+len of the HF tensor), a block at a time so the check adds little memory."""
    if not (rows.dtype.kind == "f" or rows.dtype.name == "bfloat16") or rows.size == 0:
        return
    step = max(1, block_elems // max(1, rows[0].size))
    for i in range(0, len(rows), step):
        bad = ~np.isfinite(rows[i:i + step])
        if bad.any():
            r, *c = (int(j[0]) for j in np.nonzero(bad))
            raise CheckpointFormatError(f"{path}: tensor {name!r} holds NaN/Inf (first at "
                                        f"[{', '.join(str(x) for x in [start + i + r, *c])}]); the model file is damaged")


def load_params(directory: str | Path, cfg: LlamaConfig, dtype=None) -> dict:
    """Load HF safetensors weights into our stacked layout (layer leaves `[L, ...]`).

    `dtype=None` keeps the file's dtype. Each tensor is cast and transposed into its place in a
    preallocated array of the target dtype, a few rows at a time, file by file, so peak host
    memory is the weights in that dtype plus one read window (`READ_WINDOW_BYTES`); on CPU the
    arrays become `jax.Array`s without a further copy.
    """
    directory = Path(directory)
    expected = _hf_name_map(cfg)
    weight_map = _weight_map(directory)
    readers: dict[Path, _FileReader] = {}
    if weight_map is None:  # a single file: its header lists the tensors (and stays open for the read)
        single = readers[directory / _SINGLE] = _FileReader(directory / _SINGLE)
        weight_map, where = dict.fromkeys(single.names(), single.path), single.path
    else:
        where = directory / _INDEX
    try:
        _check_names(weight_map, expected, cfg, where)
    except CheckpointFormatError:
        for r in readers.values():
            r.close()
        raise
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(weight_map[name], []).append(name)

    shapes = param_shapes(cfg)
    out: dict = {"layers": {}}
    for path, names in by_file.items():
        reader = readers.get(path) or _FileReader(path)
        for name, hf_shape, chunks in reader.tensors(names):
            key, transpose = expected[name]
            want = shapes[key[0]] if len(key) == 1 else shapes["layers"][key[1]][1:]
            if tuple(hf_shape[::-1] if transpose else hf_shape) != tuple(want):
                hf_want = tuple(want[::-1]) if transpose else tuple(want)
                raise CheckpointFormatError(
                    f"{path}: tensor {name!r} has shape {hf_shape}, expected {hf_want} from config.json"
                )
            group, leaf = (out, key[0]) if len(key) == 1 else (out["layers"], key[1])
            for start, rows in chunks:
                _check_finite(rows, start, path, name)
                if leaf not in group:  # pages cost no memory until written
                    group[leaf] = _aligned_empty(shapes[leaf] if len(key) == 1 else shapes["layers"][leaf],
                                                 dtype or rows.dtype)
                place = group[leaf] if len(key) == 1 else group[leaf][key[2]]
                if transpose:  # HF [out, in] rows are our [in, out] columns
                    place[:, start:start + len(rows)] = rows.T
                else:
                    place[start:start + len(rows)] = rows
    return _to_jax(out)


def _aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """`np.empty` on a 64-byte boundary, which XLA's CPU client can adopt without a copy."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start:start + n].view(dtype).reshape(shape)


def _to_jax(tree: dict) -> dict:
    """numpy leaves -> jax.Arrays: adopted in place on CPU (`may_alias`; nothing writes them
    afterwards), copied to the device elsewhere, each numpy array dropped once converted."""
    return {k: _to_jax(tree.pop(k)) if isinstance(tree[k], dict) else jax.device_put(tree.pop(k), may_alias=True)
            for k in list(tree)}


def load_pretrained(path: str | Path, dtype=None) -> tuple[LlamaConfig, dict]:
    """`(config, params)` from a local HF Llama directory (config.json + safetensors)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: model directory does not exist")
    cfg = LlamaConfig.from_json(path / "config.json")
    return cfg, load_params(path, cfg, dtype)


def save_pretrained(directory: str | Path, cfg: LlamaConfig, params: dict) -> None:
    """Write config.json + model.safetensors in HF names (loadable by transformers too)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (path, transpose) in _hf_name_map(cfg).items():
        arr = params[path[0]] if len(path) == 1 else params["layers"][path[1]][path[2]]
        arr = np.asarray(arr)
        tensors[name] = np.ascontiguousarray(arr.T if transpose else arr)
    write_safetensors(directory / "model.safetensors", tensors)
    d = cfg.to_hf_dict()
    d["torch_dtype"] = str(np.asarray(params["embed"]).dtype)
    (directory / "config.json").write_text(json.dumps(d, indent=2))


def export_peft(
    directory: str | Path,
    adapter: LoraStack,
    *,
    base_model_path: str = "",
) -> None:
    """Save one adapter (leaves `[L, d_in, R]`) as a PEFT LoRA (`adapter_config.json` +
    `adapter_model.safetensors`), loadable by `peft.PeftModel.from_pretrained`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target, ab in adapter.params.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        if a.ndim != 3:
            raise ValueError(f"export_peft expects a single adapter [L, d_in, R]; got {target}.a shape {a.shape}")
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{_HF_LAYER[target]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)  # [R, d_in]
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)  # [d_out, R]
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "target_modules": sorted(adapter.targets), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": base_model_path,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_peft(directory: str | Path) -> LoraStack:
    """One PEFT LoRA adapter (`export_peft`'s output, or PEFT's own `save_pretrained` of a Llama)
    as a single adapter with leaves `a: [L, d_in, R]`, `b: [L, R, d_out]` (float32)."""
    directory = Path(directory)
    config_path = directory / "adapter_config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path}: no PEFT adapter here")
    config = json.loads(config_path.read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise CheckpointFormatError(f"{config_path}: rsLoRA / DoRA adapters are not supported")
    module_to_target = {hf: ours for ours, hf in _HF_LAYER.items()}
    factors: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    file = directory / "adapter_model.safetensors"
    for name, arr in read_safetensors(file).items():
        # base_model.model.model.layers.{i}.{module}.lora_{A|B}[.default].weight
        parts = name.split(".")
        if "layers" not in parts or not any(p in ("lora_A", "lora_B") for p in parts):
            raise CheckpointFormatError(f"{file}: unexpected tensor {name!r} (not a LoRA factor of a Llama layer)")
        i = parts.index("layers")
        which = next(p for p in parts if p in ("lora_A", "lora_B"))
        module = ".".join(parts[i + 2:parts.index(which)])
        if module not in module_to_target:
            raise CheckpointFormatError(f"{file}: tensor {name!r} adapts {module!r}, not a Llama projection")
        side = "a" if which == "lora_A" else "b"
        factors.setdefault(module_to_target[module], {"a": {}, "b": {}})[side][int(parts[i + 1])] = \
            np.asarray(arr, np.float32).T  # PEFT [R, d_in] / [d_out, R] -> ours [d_in, R] / [R, d_out]
    params = {}
    for target, ab in factors.items():
        layers = sorted(ab["a"])
        if layers != list(range(len(layers))) or sorted(ab["b"]) != layers:
            raise CheckpointFormatError(f"{file}: {target} has factors for layers {layers} / {sorted(ab['b'])}")
        params[target] = {side: jax.device_put(np.stack([ab[side][i] for i in layers])) for side in ("a", "b")}
    return LoraStack(params=params, alpha=float(config["lora_alpha"]))
