"""Llama building blocks as pure functions: RMSNorm, RoPE (incl. llama3 scaling), GQA attention, SwiGLU.

Shape alphabet: B batch, T query tokens, S key tokens, D width, H heads, K kv heads, hd head dim.
Numerics follow `transformers`' Llama: norms and softmax in float32, results cast back to the
activation dtype.
"""
from __future__ import annotations

import math
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


def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """SiLU-gated MLP activation: `silu(gate) * up`."""
    return jax.nn.silu(gate) * up
