"""The stable public entry points (kept small; everything else may evolve)."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp

from fedrouter_jax.lora import LoraStack
from fedrouter_jax.models import hf_io, llama
from fedrouter_jax.models.config import LlamaConfig


def load_pretrained(path: str | Path, dtype=None) -> tuple[LlamaConfig, dict]:
    """Load `(config, params)` from a local HF Llama directory (config.json + model.safetensors
    or a sharded model.safetensors.index.json; fp32 or bf16). `path="embedded"` loads the tiny
    Llama shipped with the package. No torch needed."""
    if str(path) == "embedded":
        from fedrouter_jax.assets import embedded_model_dir

        path = embedded_model_dir()
    return hf_io.load_pretrained(path, dtype)


@partial(jax.jit, static_argnames=("config",))
def _forward(config, params, tokens, mask, lora, adapter_ids):
    return llama.apply(params, tokens, mask, cfg=config, lora=lora, adapter_ids=adapter_ids)


def forward(
    config: LlamaConfig,
    params: dict,
    tokens,
    mask,
    lora: Optional[LoraStack] = None,
    adapter_ids=None,
) -> jax.Array:
    """Float32 logits `[B, T, V]` for `tokens, mask: [B, T]` (jitted).

    `lora`: a `LoraStack` (leaves `[A, L, ...]`); `adapter_ids: [B]` picks adapter
    `adapter_ids[b]` for example b (-1 = base model); with A == 1 it may be omitted.
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask, bool)
    ids = None if adapter_ids is None else jnp.asarray(adapter_ids, jnp.int32)
    return _forward(config, params, tokens, mask, lora, ids)
