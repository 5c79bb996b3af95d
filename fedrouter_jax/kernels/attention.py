"""Fused float32 attention on CPU through XLA FFI (`cpu_attention.cc`), with its own backward.

`FEDROUTER_FUSED_ATTENTION` chooses: `auto` (default) uses the kernel on the CPU backend when it
builds and falls back to XLA's attention with one line on stderr when it does not; `0` never uses
it; `1` requires it (a failed build raises). Both paths compute the same function
(`layers.xla_attention`); tests/test_kernels.py holds them equal in value and gradient.
"""
from __future__ import annotations

import functools
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.kernels import build

SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FWD, _BWD = "fedrouter_attention_fwd", "fedrouter_attention_bwd"
_MODES = {"auto": "auto", "0": "off", "off": "off", "false": "off", "1": "on", "on": "on", "true": "on"}


def mode() -> str:
    raw = os.environ.get("FEDROUTER_FUSED_ATTENTION", "auto").strip().lower()
    if raw not in _MODES:
        raise ValueError(f"FEDROUTER_FUSED_ATTENTION={raw!r}: expected auto, 0 or 1")
    return _MODES[raw]


@functools.cache
def _registered() -> bool:
    """Build, load and register the kernel once per process; False (with one line on stderr) if
    it fails under `auto`."""
    try:
        lib = build.load(SOURCE)
    except (build.KernelBuildError, OSError) as err:
        if mode() == "on":
            raise
        # one line, once per process (this function is cached), however many traces follow
        print(f"fedrouter-jax: fused CPU attention unavailable, using XLA's attention ({err})", file=sys.stderr)
        return False
    jax.ffi.register_ffi_target(_FWD, jax.ffi.pycapsule(lib.FedrouterAttentionFwd), platform="cpu")
    jax.ffi.register_ffi_target(_BWD, jax.ffi.pycapsule(lib.FedrouterAttentionBwd), platform="cpu")
    return True


def applies(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether `attention` should take the fused path for these operands (decided at trace time).

    CPU backend with one device, float32 and more than one query token (decoding's single query
    is a matvec with nothing to fuse). With several CPU devices (a test mesh) XLA's partitioner
    has no rule to split the custom call across the client axis, so XLA's attention stays.
    """
    if mode() == "off" or jax.default_backend() != "cpu" or jax.device_count() > 1:
        return False
    if not all(x.dtype == jnp.float32 for x in (q, k, v)) or q.shape[-3] < 2 or k.shape[-3] < 1:
        return False
    return _registered()


def _require() -> None:
    if not _registered():
        raise RuntimeError("fused CPU attention is unavailable (see the line above on stderr)")


def _scale(q) -> np.float32:
    return np.float32(1.0 / math.sqrt(q.shape[-1]))


def _forward(q, k, v, bias):
    _require()
    lead = q.shape[:-3]
    t, h = q.shape[-3], q.shape[-2]
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct((*lead, h, t), jnp.float32),
                 jax.ShapeDtypeStruct((*lead, h, t), jnp.float32))
    call = jax.ffi.ffi_call(_FWD, out_types, vmap_method="broadcast_all")
    return call(q, k, v, bias, scale=_scale(q))


@jax.custom_vjp
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
    """q: [B, T, H, hd], k, v: [B, S, K, hd], bias: [B, T, S] additive float32 -> [B, T, H, hd]."""
    return _forward(q, k, v, bias)[0]


def _fused_fwd(q, k, v, bias):
    o, row_max, row_sum = _forward(q, k, v, bias)
    return o, (q, k, v, bias, o, row_max, row_sum)


def _fused_bwd(res, do):
    q, k, v, bias, o, row_max, row_sum = res
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call(_BWD, out_types, vmap_method="broadcast_all")
    dq, dk, dv = call(q, k, v, bias, o, row_max, row_sum, do.astype(jnp.float32), scale=_scale(q))
    return dq, dk, dv, jnp.zeros_like(bias)  # the bias is built from the mask: no gradient


fused_attention.defvjp(_fused_fwd, _fused_bwd)
