"""HF checkpoint I/O kept next to the model: safetensors <-> params, and PEFT adapter export.

The safetensors format is read directly (an 8-byte header length, a JSON header, raw
little-endian buffers), so bf16 checkpoints load without torch (`ml_dtypes.bfloat16`) and every
error can name the tensor, the file and the shapes involved.
"""
from __future__ import annotations

import json
import struct as _struct
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from fedrouter_jax.lora import LoraStack
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.models.llama import param_shapes

_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}

# our layer key -> HF module path inside `model.layers.{i}.`
_HF_LAYER = {
    "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


class CheckpointFormatError(ValueError):
    """A checkpoint whose tensors do not match the config (names the tensor, file and shapes)."""


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as numpy arrays (memory-mapped, zero-copy)."""
    path = Path(path)
    with open(path, "rb") as f:
        (n,) = _struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        out[name] = buf[start:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: Optional[dict] = None) -> None:
    """Write tensors in the safetensors format (any dtype in `_DTYPES`, bf16 included)."""
    header, offset, blobs = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.tobytes()
        header[name] = {"dtype": _CODES[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = metadata or {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep buffers 8-byte aligned
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(_struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def _hf_name_map(cfg: LlamaConfig) -> dict[str, tuple[tuple, bool]]:
    """HF tensor name -> (our path, transpose?) for every expected tensor."""
    names = {"model.embed_tokens.weight": (("embed",), False), "model.norm.weight": (("final_norm",), False)}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = (("lm_head",), True)
    for i in range(cfg.num_hidden_layers):
        for ours, hf in _HF_LAYER.items():
            names[f"model.layers.{i}.{hf}.weight"] = (("layers", ours, i), "proj" in ours)
    return names


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> file, from `model.safetensors` or a sharded `model.safetensors.index.json`."""
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / fname for name, fname in weight_map.items()}
    if single.exists():
        return {name: single for name in read_safetensors(single)}
    raise FileNotFoundError(
        f"{directory}: no model.safetensors or model.safetensors.index.json "
        "(expected an HF Llama checkpoint saved with safe_serialization)"
    )


def load_params(directory: str | Path, cfg: LlamaConfig, dtype=None) -> dict:
    """Load HF safetensors weights into our stacked layout. `dtype=None` keeps the file's dtype."""
    directory = Path(directory)
    files = _tensor_files(directory)
    expected = _hf_name_map(cfg)
    shapes = param_shapes(cfg)
    extra = sorted(set(files) - set(expected))
    if cfg.tie_word_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")  # some tied checkpoints still store the (identical) head
    extra = [n for n in extra if not n.endswith("rotary_emb.inv_freq")]
    if extra:
        n = extra[0]
        raise CheckpointFormatError(
            f"{files[n]}: unexpected tensor {n!r} (not part of a Llama with this config.json); "
            f"{len(extra)} unexpected in total"
        )
    loaded: dict[Path, dict] = {}
    per_layer: dict[str, list] = {k: [None] * cfg.num_hidden_layers for k in _HF_LAYER}
    params: dict = {"layers": {}}
    for name, (path, transpose) in expected.items():
        if name not in files:
            where = directory / ("model.safetensors.index.json" if (directory / "model.safetensors.index.json").exists() else "model.safetensors")
            raise CheckpointFormatError(f"{where}: missing tensor {name!r}")
        f = files[name]
        if f not in loaded:
            if not f.exists():
                raise FileNotFoundError(f"{f}: shard listed in the index for {name!r} does not exist")
            loaded[f] = read_safetensors(f)
        if name not in loaded[f]:
            raise CheckpointFormatError(f"{f}: missing tensor {name!r} (the index says it is here)")
        arr = loaded[f][name]
        want = shapes[path[0]] if len(path) == 1 else shapes["layers"][path[1]][1:]
        got = arr.shape[::-1] if transpose else arr.shape
        if tuple(got) != tuple(want):
            hf_want = tuple(want[::-1]) if transpose else tuple(want)
            raise CheckpointFormatError(
                f"{f}: tensor {name!r} has shape {tuple(arr.shape)}, expected {hf_want} from config.json"
            )
        arr = arr.T if transpose else arr
        if len(path) == 1:
            params[path[0]] = arr
        else:
            per_layer[path[1]][path[2]] = arr
    for k, arrs in per_layer.items():
        params["layers"][k] = np.stack(arrs)
    cast = (lambda a: jnp.asarray(a, dtype)) if dtype is not None else jnp.asarray
    return {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in params.items()}


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
    d["torch_dtype"] = str(np.asarray(params["embed"]).dtype).replace("bfloat16", "bfloat16")
    (directory / "config.json").write_text(json.dumps(d, indent=2))


def export_peft(
    directory: str | Path,
    adapter: LoraStack,
    *,
    base_model_path: str = "",
    extra_config: Optional[dict] = None,
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
    config.update(extra_config or {})
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
