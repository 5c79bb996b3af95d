"""Fused CPU attention kernel against XLA's attention, side by side in one run.

1. The attention op alone at the step's shape (B, T, the model's heads and head dim, causal mask):
   forward, and forward + backward (vjp of a sum of squares), FLOP/s counted over the full T x S
   scores (4 B H T S hd forward, 3x that with the backward), as `common.train_step_flops` counts.
2. The whole training step (`common.single_client_step`, as bench_flops runs it) traced once with
   `FEDROUTER_FUSED_ATTENTION=0` and once with the kernel; the two are alternated.

  python experiments/bench/bench_attention.py            # 34M, B 16, T 128
  python experiments/bench/bench_attention.py --small
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax.kernels import attention as fused  # noqa: E402
from fedrouter_jax.models import layers  # noqa: E402


def _traced_with(mode: str, make):
    """`make()` traced and compiled under FEDROUTER_FUSED_ATTENTION=mode (the choice is made at trace time)."""
    old = os.environ.get("FEDROUTER_FUSED_ATTENTION")
    os.environ["FEDROUTER_FUSED_ATTENTION"] = mode
    try:
        fn, args = make()
        jax.block_until_ready(fn(*args))
        return lambda: fn(*args)
    finally:
        if old is None:
            del os.environ["FEDROUTER_FUSED_ATTENTION"]
        else:
            os.environ["FEDROUTER_FUSED_ATTENTION"] = old


def op_alone(cfg, batch: int, seq: int, repeats: int) -> dict:
    r = np.random.default_rng(0)
    h, k, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = jnp.asarray(r.normal(size=(batch, seq, h, hd)), jnp.float32)
    kk, v = (jnp.asarray(r.normal(size=(batch, seq, k, hd)), jnp.float32) for _ in range(2))
    bias = layers.attention_bias(jnp.asarray(np.tril(np.ones((seq, seq), bool)))[None].repeat(batch, 0))
    impls = {"xla": lambda a, b, c: layers.xla_attention(a, b, c, bias),
             "fused": lambda a, b, c: fused.fused_attention(a, b, c, bias[:, 0, 0])}
    fns = {}
    for name, f in impls.items():
        fwd = jax.jit(f)
        fwd_bwd = jax.jit(jax.grad(lambda a, b, c, f=f: jnp.sum(f(a, b, c) ** 2), argnums=(0, 1, 2)))
        fns[f"{name} fwd"] = lambda fn=fwd: fn(q, kk, v)
        fns[f"{name} fwd+bwd"] = lambda fn=fwd_bwd: fn(q, kk, v)
    times = common.alternate(fns, repeats=repeats, warmup=2)
    flops_fwd = 4.0 * batch * h * seq * seq * hd
    out = {}
    for name, t in times.items():
        flops = flops_fwd * (3 if "bwd" in name else 1)
        out[name] = {"ms": t["median"] * 1e3, "gflops": flops / t["median"] / 1e9}
    for kind in ("fwd", "fwd+bwd"):
        out[f"ratio {kind}"] = times[f"xla {kind}"]["median"] / times[f"fused {kind}"]["median"]
    return out


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=5)
    common.add_shape_args(p, model="34m", steps=3)
    args = p.parse_args(argv)
    if args.small:
        args.model, args.batch, args.seq, args.steps, args.repeats = "small", 2, 16, 1, 1
    info = common.header("Fused CPU attention vs XLA attention", args)
    cfg = common.CONFIGS[args.model]
    op = op_alone(cfg, args.batch, args.seq, args.repeats * 4)
    print(f"\nattention alone, B {args.batch} T {args.seq} H {cfg.num_attention_heads} "
          f"K {cfg.num_key_value_heads} hd {cfg.head_dim} (median ms, GFLOP/s over full T x S):")
    for name in ("xla fwd", "fused fwd", "xla fwd+bwd", "fused fwd+bwd"):
        print(f"  {name:14s} {op[name]['ms']:8.2f} ms  {op[name]['gflops']:6.1f} GFLOP/s")
    print(f"  fused / xla speed-up: fwd {op['ratio fwd']:.2f}x, fwd+bwd {op['ratio fwd+bwd']:.2f}x")

    make = lambda: common.single_client_step(cfg, args.steps, args.batch, args.seq)[:2]  # noqa: E731
    steps = {"xla": _traced_with("0", make), "fused": _traced_with("1", make)}
    t = common.alternate(steps, repeats=args.repeats, warmup=0)
    per_step = {n: t[n]["median"] / args.steps for n in steps}
    ratio = per_step["xla"] / per_step["fused"]
    print(f"\ntraining step ({args.steps} steps per call, {args.repeats} alternated calls): "
          f"xla {per_step['xla']:.3f} s/step, fused {per_step['fused']:.3f} s/step, speed-up {ratio:.2f}x")
    results = {"op": op, "step_s": per_step, "step_ratio": ratio,
               "step_wall": {n: t[n]["wall"] for n in steps}}
    common.footer(info, results, args)
    return results


if __name__ == "__main__":
    main()
