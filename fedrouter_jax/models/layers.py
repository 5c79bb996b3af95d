"""Llama building blocks as pure functions: RMSNorm, RoPE (incl. llama3 scaling), GQA attention, SwiGLU.

Shape alphabet: B batch, T query tokens, S key tokens, D width, H heads, K kv heads, hd head dim.
Numerics follow `transformers`' Llama: norms and softmax in float32, results cast back to the
activation dtype.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.kernels import attention as fused


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """`x: [..., D]`, `weight: [D]` -> `[..., D]` (variance in float32, as HF does)."""
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[Mapping] = None) -> np.ndarray:
    """Inverse frequencies `[hd // 2]` (float32), with Llama-3's piecewise `llama3` rescaling.

    `scaling` is the HF `rope_scaling` / `rope_parameters` dict; `None`, `default` or a missing
    `rope_type` mean plain RoPE. The llama3 rule keeps high frequencies, divides low frequencies
    by `factor` and interpolates smoothly between the two wavelength thresholds.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv_freq.astype(np.float32)
    if rope_type != "llama3":
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported (expected 'default' or 'llama3')"
        )
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """`positions: [B, T]` -> `cos, sin: [B, T, hd]` in float32 (halves duplicated, HF layout)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`x: [B, T, n, hd]` rotated by `cos, sin: [B, T, hd]` (HF's rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)


def attention_bias(allowed: jax.Array) -> jax.Array:
    """`allowed: [B, T, S]` bool -> additive float32 score bias `[B, 1, 1, T, S]` (0 or the float32
    minimum, not -inf, so a fully masked row (a left-pad query) stays finite). Built once per
    forward and shared by every layer: a per-layer `where` re-broadcast the mask each layer."""
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q: [B, T, H, hd], k, v: [B, S, K, hd], bias: [B, 1, 1, T, S] (`attention_bias`) -> [B, T, H, hd].
    Each group of H // K query heads shares one kv head. On CPU in float32 this runs the fused
    kernel (`kernels.attention`), elsewhere `xla_attention`; both compute the same function.
    """
    if fused.applies(q, k, v):
        return fused.fused_attention(q, k, v, bias[:, 0, 0])
    return xla_attention(q, k, v, bias)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """`attention` as plain XLA ops: batched dots and a softmax over `[B, K, G, T, S]`."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * (1.0 / math.sqrt(hd)) + bias, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, hd)


# `FEDROUTER_ATTENTION` (or `transformer(..., attention=...)`) picks the attention of a forward:
#   auto             cuDNN flash attention for bf16/fp16 on a GPU, `dense` everywhere else
#   dense            the bias-masked path (`attention`: the fused CPU kernel where it applies,
#                    else `xla_attention`; FEDROUTER_FUSED_ATTENTION still chooses between them)
#   cudnn            `jax.nn.dot_product_attention(implementation="cudnn")` (fails where cuDNN cannot)
#   dot_product_xla  the same call and masking with implementation="xla" (how the CPU tests it)
ATTENTION_IMPLS = ("auto", "dense", "cudnn", "dot_product_xla")
SEQ_LENGTH_IMPLS = {"cudnn": "cudnn", "dot_product_xla": "xla"}  # name -> dot_product_attention's


def attention_impl(setting: Optional[str], dtype, head_dim: int, decoding: bool) -> str:
    """The attention a forward runs: "dense", "cudnn" or "dot_product_xla" (decided at trace time).

    setting: one of ATTENTION_IMPLS, None reads `FEDROUTER_ATTENTION` (default auto). Decoding
    (a kv cache; T new tokens, usually 1) always runs `dense`: the cache's key mask is not a
    prefix, and a single query's scores are linear in S anyway. `auto` takes cuDNN only where it
    is known to work: GPU, bf16 or fp16 activations, head dim a multiple of 8 up to 128.
    """
    if setting is None:
        setting = os.environ.get("FEDROUTER_ATTENTION", "auto").strip().lower() or "auto"
    if setting not in ATTENTION_IMPLS:
        raise ValueError(f"FEDROUTER_ATTENTION / attention={setting!r}: expected one of {ATTENTION_IMPLS}")
    if decoding or setting == "dense":
        return "dense"
    if setting != "auto":
        return setting
    flash_ok = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128)
    return "cudnn" if flash_ok else "dense"


def real_tokens_first(mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A per-row permutation that moves each row's real tokens, in order, before its padding.

    mask: [B, T] bool -> (order [B, T]: source index of each sorted slot; dest [B, T]: sorted
    slot of each source token (the inverse); lengths [B] int32: real tokens per row). Causal
    attention over real tokens is the same function before and after (their order is kept and
    every padding key ends up behind every real query), so any mask becomes "the first
    `lengths` tokens", which `jax.nn.dot_product_attention` takes as sequence lengths: no
    [T, S] mask or bias, memory linear in T. Right-padded rows get the identity.
    """
    m = mask.astype(bool)
    n_real = m.sum(axis=-1, dtype=jnp.int32)
    dest = jnp.where(m, jnp.cumsum(m, axis=-1, dtype=jnp.int32) - 1,
                     n_real[:, None] + jnp.cumsum(~m, axis=-1, dtype=jnp.int32) - 1)
    rows = jnp.arange(m.shape[0])[:, None]
    order = jnp.zeros_like(dest).at[rows, dest].set(jnp.arange(m.shape[1], dtype=jnp.int32)[None, :])
    return order, dest, n_real


def attention_by_lengths(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                         implementation: str) -> jax.Array:
    """Causal GQA over each row's first `lengths` tokens (`real_tokens_first` order).

    q: [B, T, H, hd], k, v: [B, T, K, hd], lengths: [B] -> [B, T, H, hd]; queries past a row's
    length get 0 (padding: unspecified in every path). `implementation`: "cudnn" (flash
    attention: scores never materialised, softmax in float32 inside the kernel) or "xla".
    A row of padding only is given length 1, so no row is empty.
    """
    n = jnp.maximum(lengths, 1).astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=n, key_value_seq_lengths=n,
                                        implementation=implementation)


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU-gated MLP activation: `silu(gate) * up`."""
    return jax.nn.silu(gate) * up
