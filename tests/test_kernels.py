"""The fused CPU attention kernel computes `layers.xla_attention`: values and gradients, under
vmap, with GQA, odd head sizes, T != S, left and right padding, fully masked query rows.

The compiled-kernel tests need a C++ compiler; the fallback tests (no compiler, a failing
build, XLA's attention against a numpy reference) run everywhere."""
import functools
import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.kernels import attention as fused
from fedrouter_jax.kernels import build
from fedrouter_jax.models import layers, llama

from helpers import random_batch, random_lora, tiny_model

def _have_compiler() -> bool:
    try:
        build.compiler()
        return True
    except build.KernelBuildError:
        return False


needs_compiler = pytest.mark.skipif(not _have_compiler(), reason="no C++ compiler: the fused kernel cannot be built")


def _operands(b, t, s, h, k, d, padding, seed=0):
    """q, k, v and the `attention_bias` of a causal mask over the last t of s keys plus padding."""
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    kk = jnp.asarray(r.normal(size=(b, s, k, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(b, s, k, d)), jnp.float32)
    lens = r.integers(1, s + 1, size=b)
    keys = np.arange(s)[None]
    kmask = keys < lens[:, None] if padding == "right" else keys >= (s - lens)[:, None]
    allowed = (keys[:, None, :] <= np.arange(t)[None, :, None] + (s - t)) & kmask[:, None, :]
    return q, kk, v, layers.attention_bias(jnp.asarray(allowed))


def _value_and_grads(attn, q, k, v, do):
    """(attn(q, k, v), dq, dk, dv) for the cotangent `do`."""
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(do))


@needs_compiler
@pytest.mark.parametrize("shape", [(2, 8, 8, 2, 1, 16), (3, 37, 37, 4, 2, 24), (2, 128, 128, 8, 8, 64),
                                   (1, 70, 100, 4, 4, 64), (2, 33, 33, 2, 2, 7)])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_fused_attention_equals_xla_in_value_and_gradient(shape, padding):
    q, k, v, bias = _operands(*shape, padding)
    do = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    want = _value_and_grads(lambda a, b, c: layers.xla_attention(a, b, c, bias), q, k, v, do)
    got = _value_and_grads(lambda a, b, c: fused.fused_attention(a, b, c, bias[:, 0, 0]), q, k, v, do)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        scale = float(jnp.abs(y).max())
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=3e-6 * scale, rtol=0, err_msg=name)


@needs_compiler
def test_fully_masked_query_rows_match_the_reference():
    """A left-pad query sees no key: the reference's softmax is uniform over all keys."""
    q, k, v, _ = _operands(2, 16, 16, 2, 2, 16, "right")
    allowed = np.ones((2, 16, 16), bool)
    allowed[0, :5] = False  # rows with no key at all
    allowed[1, :, 7:] = False
    bias = layers.attention_bias(jnp.asarray(allowed))
    want = layers.xla_attention(q, k, v, bias)
    got = fused.fused_attention(q, k, v, bias[:, 0, 0])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)
    np.testing.assert_allclose(np.asarray(got[0, :5]), np.broadcast_to(np.asarray(v[0].mean(0)), (5, 2, 16)),
                               atol=2e-6)


@needs_compiler
def test_fused_attention_under_vmap_equals_each_client():
    """The client vmap folds into the kernel's batch: every client's output and gradient as alone."""
    ops = [_operands(2, 24, 24, 4, 2, 16, "right", seed=s) for s in range(3)]
    q, k, v, bias = (jnp.stack(x) for x in zip(*ops))

    def loss(a, b, c, m):
        return jnp.sum(jnp.sin(fused.fused_attention(a, b, c, m[:, 0, 0])))

    grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(q, k, v, bias)
    for i, (qi, ki, vi, bi) in enumerate(ops):
        alone = jax.grad(lambda a, b, c: jnp.sum(jnp.sin(layers.xla_attention(a, b, c, bi))), argnums=(0, 1, 2))(
            qi, ki, vi)
        for x, y in zip(grads, alone):
            np.testing.assert_allclose(np.asarray(x[i]), np.asarray(y), atol=3e-6)


@needs_compiler
def test_nan_input_propagates():
    q, k, v, bias = _operands(1, 16, 16, 2, 2, 16, "right")
    out = fused.fused_attention(q.at[0, 3, 1, 0].set(jnp.nan), k, v, bias[:, 0, 0])
    assert np.isnan(np.asarray(out[0, 3, 1])).all()
    assert np.isfinite(np.asarray(out[0, :3])).all()


@needs_compiler
def test_model_uses_the_kernel_on_cpu_and_trains_the_same(monkeypatch):
    """Training gradients of the whole model, fused attention against XLA's."""
    cfg, params = tiny_model()
    lora = random_lora(cfg, 1)
    tokens, mask, _ = random_batch((3, 20), cfg.vocab_size, seed=2)

    def grads():
        def loss(lo):
            return jnp.mean(llama.apply(params, tokens, mask, cfg=cfg, lora=lo, adapter_ids=jnp.zeros(3, int)) ** 2)
        return jax.grad(loss)(lora)

    def hlo():
        return jax.jit(lambda: llama.apply(params, tokens, mask, cfg=cfg)).lower().as_text()

    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "1")
    assert fused._FWD in hlo()
    got = grads()
    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "0")
    assert fused._FWD not in hlo()
    want = grads()
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6 * float(jnp.abs(y).max()))


def test_bad_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "sometimes")
    with pytest.raises(ValueError, match="FEDROUTER_FUSED_ATTENTION"):
        fused.mode()


@needs_compiler
def test_build_is_cached_and_failures_are_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDROUTER_CACHE", str(tmp_path))
    first = build.build(fused.SOURCE)
    mtime = first.stat().st_mtime_ns
    assert build.build(fused.SOURCE) == first and first.stat().st_mtime_ns == mtime
    bad = tmp_path / "broken.cc"
    bad.write_text("this is not C++\n")
    with pytest.raises(build.KernelBuildError, match="broken.cc"):
        build.build(bad)
    assert not list((tmp_path / "kernels").glob("broken*"))  # no half-written library left


@needs_compiler
def test_kernel_applies_only_to_float32_multi_query_attention(monkeypatch):
    q, k, v, _ = _operands(1, 8, 8, 2, 2, 16, "right")
    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "auto")
    assert fused.applies(q, k, v)
    assert not fused.applies(q[:, :1], k, v)  # decoding: one query token
    assert not fused.applies(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "0")
    assert not fused.applies(q, k, v)


_OTHER_ISA = """
import sys
sys.path.insert(0, sys.argv[1])
import jax.numpy as jnp
from fedrouter_jax.kernels import attention as fused
from fedrouter_jax.models import layers
from test_kernels import _operands, _value_and_grads
q, k, v, bias = _operands(2, 37, 37, 4, 2, 24, "left")
do = jnp.ones_like(q)
got = _value_and_grads(lambda a, b, c: fused.fused_attention(a, b, c, bias[:, 0, 0]), q, k, v, do)
want = _value_and_grads(lambda a, b, c: layers.xla_attention(a, b, c, bias), q, k, v, do)
errs = [float(jnp.abs(x - y).max() / jnp.abs(y).max()) for x, y in zip(got, want)]
print("MAXERR", max(errs))
"""


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 ISA levels")
def test_avx2_build_equals_xla(tmp_path):
    """The 8-wide (AVX2) path, which machines without AVX-512 compile, built and checked here."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "FEDROUTER_KERNEL_MARCH": "x86-64-v3", "FEDROUTER_CACHE": str(tmp_path),
           "FEDROUTER_FUSED_ATTENTION": "1", "PYTHONPATH": os.path.dirname(tests) + os.pathsep + tests}
    r = subprocess.run([sys.executable, "-c", _OTHER_ISA, tests], capture_output=True, text=True, env=env,
                       timeout=300)
    assert "MAXERR" in r.stdout, r.stderr[-3000:]
    assert float(r.stdout.split("MAXERR")[1]) < 3e-6


# --------------------------------------------------------------------------- the XLA fallback


@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """A machine without a C++ compiler (nothing on PATH, no CXX) and a fresh per-process
    registration, so the fallback is decided again; the real registration is restored after."""
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    monkeypatch.setenv("FEDROUTER_CACHE", str(tmp_path))
    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "auto")
    monkeypatch.setattr(fused, "_registered", functools.cache(fused._registered.__wrapped__))


def _numpy_attention(q, k, v, allowed):
    """Reference GQA softmax attention in float64: q [B, T, H, d], k, v [B, S, K, d], allowed [B, T, S]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(allowed[:, None], scores, -1e30)  # a row with no key: uniform, as in `attention_bias`
    scores -= scores.max(-1, keepdims=True)
    p = np.exp(scores)
    return np.einsum("bhts,bshd->bthd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("shape,padding", [((2, 8, 8, 2, 1, 16), "right"), ((2, 33, 33, 4, 2, 7), "left"),
                                           ((1, 20, 30, 4, 4, 8), "left")])
def test_xla_attention_equals_a_numpy_reference(shape, padding):
    """The fallback path itself: GQA, odd head size, T != S, both paddings."""
    q, k, v, bias = _operands(*shape, padding, seed=3)
    got = np.asarray(layers.xla_attention(q, k, v, bias))
    want = _numpy_attention(q, k, v, np.asarray(bias[:, 0, 0]) == 0)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


def test_without_a_compiler_the_model_runs_xla_attention_and_says_so_once(no_compiler, capfd, monkeypatch):
    """`auto` on a machine with no compiler: no custom call in the program, the same logits and
    gradients as with the kernel switched off, and ONE line on stderr for any number of traces."""
    cfg, params = tiny_model()
    lora = random_lora(cfg, 1)
    tokens, mask, _ = random_batch((3, 20), cfg.vocab_size, seed=2)

    def loss(lo, t, m):
        return jnp.mean(llama.apply(params, t, m, cfg=cfg, lora=lo, adapter_ids=jnp.zeros(t.shape[0], int)) ** 2)

    hlo = jax.jit(loss).lower(lora, tokens, mask).as_text()
    assert fused._FWD not in hlo
    got = jax.grad(loss)(lora, tokens, mask)
    jax.jit(loss).lower(lora, tokens[:, :12], mask[:, :12])  # another trace: no second report
    err = capfd.readouterr().err
    reports = [ln for ln in err.splitlines() if "fused CPU attention unavailable" in ln]
    assert len(reports) == 1 and "no C++ compiler found" in reports[0], err

    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "0")
    want = jax.grad(loss)(lora, tokens, mask)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_required_kernel_without_a_compiler_raises(no_compiler, monkeypatch):
    monkeypatch.setenv("FEDROUTER_FUSED_ATTENTION", "1")
    q, k, v, _ = _operands(1, 8, 8, 2, 2, 16, "right")
    with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler found"):
        fused.applies(q, k, v)


def test_a_failed_build_is_one_line_naming_the_source(tmp_path, monkeypatch):
    """A compiler that fails (a script, so no real compiler is needed): one line naming the
    compiler, the source and the first error, the full output in `.detail`, no library left."""
    cxx = tmp_path / "cxx"
    cxx.write_text("#!/bin/sh\necho 'note: in file' >&2\necho 'k.cc:3:1: error: boom' >&2\necho done >&2\nexit 1\n")
    cxx.chmod(0o755)
    monkeypatch.setenv("FEDROUTER_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(cxx))
    with pytest.raises(build.KernelBuildError) as info:
        build.build(fused.SOURCE)
    assert str(info.value) == f"{cxx} failed on {fused.SOURCE} (exit 1): k.cc:3:1: error: boom"
    assert "note: in file" in info.value.detail and "cpu_attention.cc" in info.value.detail
    assert not list((tmp_path / "kernels").glob("*.so"))
