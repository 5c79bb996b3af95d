"""Llama architecture config, read from / written to an HF `config.json`."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Mapping, Optional

_ROPE_KEYS = ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "max_position_embeddings")
_FLOAT_KEYS = ("rms_norm_eps", "rope_theta")


def _check_types(d: Mapping[str, Any], source: str) -> None:
    """config.json values as HF writes them: positive ints (not "4" or 4.0), finite numbers,
    rope_scaling / rope_parameters a mapping or null. Raises ValueError naming the file and key."""
    for k in _INT_KEYS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{source}: {k}: expected a positive integer, got {v!r} ({type(v).__name__})")
    for k in _FLOAT_KEYS:
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{source}: {k}: expected a positive finite number, got {v!r} ({type(v).__name__})")
    for k in ("rope_scaling", "rope_parameters"):
        v = d.get(k)
        if v is not None and not isinstance(v, Mapping):
            raise ValueError(f"{source}: {k}: expected a mapping (or null), got {v!r:.60} ({type(v).__name__})")
        for rk, rv in (v or {}).items():
            if rk not in ("rope_type", "type") and rk in _ROPE_KEYS + ("rope_theta",) and (
                    isinstance(rv, bool) or not isinstance(rv, (int, float)) or not math.isfinite(rv)):
                raise ValueError(f"{source}: {k}.{rk}: expected a finite number, got {rv!r} ({type(rv).__name__})")
    for k in ("bos_token_id", "pad_token_id"):
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{source}: {k}: expected an integer or null, got {v!r} ({type(v).__name__})")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hashable (usable as a static jit argument). `rope_scaling` is a sorted tuple of items."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None  # int or tuple of ints (Llama-3 instruct lists several)
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, (tuple, list)):
            return tuple(int(e) for e in self.eos_token_id)
        return (int(self.eos_token_id),)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Both layouts: `rope_theta` + `rope_scaling` (Llama-3.2 files, transformers 4.x) and
        `rope_parameters` (transformers 5.x)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"{source}: model_type={d.get('model_type')!r}, expected 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"{source}: {flag}=true is not supported (Llama-3 has no biases)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={d['hidden_act']!r}, expected 'silu'")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}")
        _check_types(d, source)
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = {k: rope[k] for k in _ROPE_KEYS if k in rope}
        if "type" in rope and "rope_type" not in scaling:
            scaling["rope_type"] = rope["type"]
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=d.get("pad_token_id"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json (expected an HF Llama directory)") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object of config keys, got {type(d).__name__}")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        d = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, k)
            if v is not None:
                d[k] = list(v) if isinstance(v, tuple) else v
        return d
