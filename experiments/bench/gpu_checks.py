"""The GPU checks of issue 17 §3 in one process: attention, bf16 training, client groups from memory.

1. attention  cuDNN flash attention (`jax.nn.dot_product_attention`, the path `auto` takes for
   bf16 on a GPU) against the bias-masked XLA attention at Llama-3.2-1B's heads (32 on 8 kv
   heads of 64), right-padded bf16 batches: agreement of values and gradients on real
   positions, forward + backward time (alternated) and the compiled call's temporary bytes
   for T = 512 ... 4096 (flash: linear in T; XLA: the [B, H, T, S] scores, quadratic).
   Then one training step of the 34M model (bf16, B 16 x T 512) with each attention.
2. bf16       20 AdamW steps overfitting one batch with a bf16 base (cuDNN attention) against
   float32 (`highest` matmul precision, XLA attention): largest relative loss difference.
3. memory     `memory.auto_client_chunk` for the embedded-size model (C 128; `memory_1b`: the
   1B model, C 16): the chosen group, then that round run: the device's peak bytes against the
   estimate (`CallMemory.added_bounds`); and (C 128) with a budget a quarter of the way from the
   smallest group's peak to the all-at-once round's, the group chosen and its peak.

On CPU (`--small`) the same code runs at tiny shapes with implementation "xla" standing in for
cuDNN and no device memory stats (the dry run of gpu.sh).

  python experiments/bench/gpu_checks.py --json results/bench/gpu_checks.json
  python experiments/bench/gpu_checks.py --small
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax import lora as lora_lib  # noqa: E402
from fedrouter_jax import memory  # noqa: E402
from fedrouter_jax.models import layers  # noqa: E402
from fedrouter_jax.training import (clients_local_steps, init_opt_states, local_steps, make_optimizer,  # noqa: E402
                                    set_learning_rate)


def _flash_impl() -> str:
    return "cudnn" if jax.default_backend() == "gpu" else "xla"


def _rel(a, b, where) -> float:
    a, b = np.asarray(a, np.float32)[where], np.asarray(b, np.float32)[where]
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def attention_op(cfg, batch: int, seqs, repeats: int, dtype) -> dict:
    """Flash (by sequence lengths) vs bias-masked XLA attention: agreement, time, temp bytes."""
    impl = _flash_impl()
    h, k, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = {"implementation": impl, "B": batch, "H": h, "K": k, "hd": hd, "dtype": str(jnp.dtype(dtype)), "by_T": []}
    for t in seqs:
        r = np.random.default_rng(t)
        q = jnp.asarray(r.normal(size=(batch, t, h, hd)), dtype)
        kk, v = (jnp.asarray(r.normal(size=(batch, t, k, hd)), dtype) for _ in range(2))
        lengths = jnp.asarray(r.integers(t // 2, t + 1, size=batch), jnp.int32)
        real = np.arange(t)[None, :] < np.asarray(lengths)[:, None]
        allowed = np.tril(np.ones((t, t), bool))[None] & real[:, None, :]
        bias = layers.attention_bias(jnp.asarray(allowed))
        w = jnp.asarray(real, dtype)[:, :, None, None]
        fns = {"flash": lambda q, k, v: layers.attention_by_lengths(q, k, v, lengths, impl),
               "xla": lambda q, k, v: layers.xla_attention(q, k, v, bias)}
        row = {"T": t}
        runs, vals = {}, {}
        for name, f in fns.items():
            def out_and_grads(q, k, v, f=f):  # the output and the gradient of a loss on real queries
                o, vjp = jax.vjp(f, q, k, v)
                return o, vjp((w * w * 2 * o).astype(o.dtype))
            compiled = jax.jit(out_and_grads).lower(q, kk, v).compile()
            row[f"{name}_temp_bytes"] = memory.call_memory(compiled).temp
            vals[name] = compiled(q, kk, v)
            runs[name] = lambda c=compiled: c(q, kk, v)
        times = common.alternate(runs, repeats=repeats, warmup=1)
        for name in fns:
            row[f"{name}_fwd_bwd_ms"] = times[name]["median"] * 1e3
        row["speedup"] = times["xla"]["median"] / times["flash"]["median"]
        row["out_rel_err"] = _rel(vals["flash"][0], vals["xla"][0], real)
        row["grad_rel_err"] = max(_rel(a, b, slice(None)) for a, b in zip(vals["flash"][1], vals["xla"][1]))
        out["by_T"].append(row)
        print(f"attention T {t:5d}: flash {row['flash_fwd_bwd_ms']:8.2f} ms, xla {row['xla_fwd_bwd_ms']:8.2f} ms "
              f"(x{row['speedup']:.2f}); temp MiB flash {row['flash_temp_bytes'] / 2**20:8.1f} xla "
              f"{row['xla_temp_bytes'] / 2**20:8.1f}; rel err out {row['out_rel_err']:.1e} grad {row['grad_rel_err']:.1e}",
              flush=True)
    return out


def _with_attention(setting: str, make):
    """`make()` traced and compiled under FEDROUTER_ATTENTION=setting (chosen at trace time)."""
    with mock.patch.dict(os.environ, {"FEDROUTER_ATTENTION": setting}):
        fn, args = make()
        return fn.lower(*args).compile(), args


def attention_step(cfg, batch: int, seq: int, repeats: int) -> dict:
    """One LoRA training step (bf16 base) with flash attention (`auto`) and with `dense`."""
    make = lambda: common.single_client_step(cfg, 1, batch, seq, dtype="bfloat16")[:2]  # noqa: E731
    flash = "cudnn" if jax.default_backend() == "gpu" else "dot_product_xla"
    steps = {name: _with_attention(setting, make) for name, setting in (("flash", flash), ("dense", "dense"))}
    times = common.alternate({n: (lambda c=c, a=a: c(*a)) for n, (c, a) in steps.items()}, repeats=repeats, warmup=1)
    res = {"B": batch, "T": seq, "attention": flash}
    for name, (c, _) in steps.items():
        res[name] = {"step_s": times[name]["median"], "temp_bytes": memory.call_memory(c).temp}
    res["speedup"] = res["dense"]["step_s"] / res["flash"]["step_s"]
    print(f"training step B {batch} T {seq} bf16: flash {res['flash']['step_s'] * 1e3:.1f} ms "
          f"({res['flash']['temp_bytes'] / 2**20:.0f} MiB temp), dense {res['dense']['step_s'] * 1e3:.1f} ms "
          f"({res['dense']['temp_bytes'] / 2**20:.0f} MiB temp): x{res['speedup']:.2f}", flush=True)
    return res


def bf16_tracking(cfg, steps: int, batch: int, seq: int) -> dict:
    """Losses of `steps` AdamW steps on one batch: bf16 base (default attention) vs float32."""
    lora = jax.tree.map(lambda x: x[0], common.adapters(cfg, 1))
    one = common.jax_batches((1, batch, seq), cfg.vocab_size, seed=3)
    batches = jax.tree.map(lambda x: jnp.broadcast_to(x, (steps,) + x.shape[1:]), one)
    opt = make_optimizer()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        base = common.base_params(cfg, dtype=dtype)
        state = set_learning_rate(opt.init(lora), 5e-3)
        with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
            run = jax.jit(partial(local_steps, cfg=cfg, optimizer=opt))
            losses[dtype] = np.asarray(run(base, lora, state, batches, jax.random.PRNGKey(0))[2]["loss"])
    rel = np.abs(losses["bfloat16"] - losses["float32"]) / losses["float32"]
    res = {"steps": steps, "loss_float32": losses["float32"].tolist(), "loss_bfloat16": losses["bfloat16"].tolist(),
           "max_rel_diff": float(rel.max()), "within_1pct": bool(rel.max() <= 0.01)}
    print(f"bf16 vs float32 over {steps} steps: loss {losses['float32'][0]:.3f} -> {losses['float32'][-1]:.3f}, "
          f"max relative difference {rel.max():.2e}", flush=True)
    return res


def _device_bytes(key: str):
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get(key)


def _compile_once(lower):
    """`lower(chunk)` whose `.compile()` is compiled once per chunk (the checks ask for some twice)."""
    cache = {}

    def cached(chunk):
        if chunk not in cache:
            cache[chunk] = lower(chunk).compile()
        return SimpleNamespace(compile=lambda: cache[chunk])
    return cached


def round_memory(cfg, C: int, S: int, B: int, T: int, force_fraction=None) -> dict:
    """`memory.auto_client_chunk` for one round's shapes, then the chosen round run and measured;
    with `force_fraction`, also the group chosen for a budget between the smallest group's peak
    and the all-at-once round's."""
    opt = make_optimizer()
    base = common.base_params(cfg, dtype="bfloat16" if jax.default_backend() == "gpu" else "float32")
    loras = lora_lib.broadcast(jax.tree.map(lambda x: x[0], common.adapters(cfg, 1)), C)
    loras = jax.tree.map(lambda x: x + 0, loras)
    states = init_opt_states(opt, loras, 5e-4)
    batches = common.jax_batches((C, S, B, T), cfg.vocab_size)
    keys = jax.random.split(jax.random.PRNGKey(0), C)
    args = (base, loras, states, batches, keys)
    lower = _compile_once(lambda chunk: clients_local_steps.lower(*args, cfg=cfg, optimizer=opt, client_chunk=chunk))
    t0 = time.perf_counter()
    choice = memory.auto_client_chunk(lower, n_clients=C, tokens_per_client=B * T, resident=(base, loras, states))
    res = {"C": C, "S": S, "B": B, "T": T, "choice": choice.describe(), "chunk": choice.chunk, "group": choice.group,
           "budget": choice.budget, "probes": choice.probes, "sizing_s": time.perf_counter() - t0}
    print(f"memory C {C} B {B} T {T}: {choice.describe()} in {res['sizing_s']:.1f} s", flush=True)
    compiled = lower(choice.chunk).compile()
    est = memory.call_memory(compiled)
    in_use = _device_bytes("bytes_in_use")
    jax.block_until_ready(compiled(*args))
    peak = _device_bytes("peak_bytes_in_use")
    low, high = est.added_bounds()
    res["estimate"] = {"peak": est.peak, "added_low": low, "added_high": high}
    if peak is not None:  # the process's peak so far: meaningful when this run is its largest call
        res["measured_added"] = peak - in_use
        res["brackets"] = bool(low <= peak - in_use <= high)
        print(f"  estimate adds {low / 2**30:.3f}..{high / 2**30:.3f} GiB, measured {(peak - in_use) / 2**30:.3f} GiB",
              flush=True)
    if force_fraction is not None:
        smallest = memory.call_memory(lower(memory.chunk_candidates(C)[0]).compile()).peak
        whole = memory.call_memory(lower(None).compile()).peak
        budget = memory.RUNTIME_BYTES + int(smallest + force_fraction * (whole - smallest))
        forced = memory.fit_client_chunk(lower, C, budget)
        res["forced"] = {"budget": budget, "group": forced.group, "peak": forced.memory.peak,
                         "fits": bool(forced.memory.peak + memory.RUNTIME_BYTES <= budget)}
        print(f"  forced budget {budget / 2**20:.1f} MiB: groups of {forced.group}, "
              f"{forced.memory.peak / 2**20:.1f} MiB", flush=True)
    return res


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=5)
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--only", nargs="+", default=["attention", "bf16", "memory", "memory_1b"])
    args = p.parse_args(argv)
    small = args.small
    info = common.header("GPU checks: attention, bf16, client groups from memory", args)
    results = {}
    timings = {}
    plan = {
        "attention": lambda: {
            "op": attention_op(common.CONFIGS["small" if small else "1b"], 2 if small else 4,
                               [16] if small else args.seqs, 1 if small else args.repeats,
                               jnp.float32 if small else jnp.bfloat16),
            "step": attention_step(common.CONFIGS["small" if small else "34m"], 1 if small else 16,
                                   16 if small else 512, 1 if small else args.repeats)},
        "bf16": lambda: bf16_tracking(common.CONFIGS["small"], 20 if not small else 2, 1 if small else 8,
                                      16 if small else 128),
        "memory": lambda: (round_memory(common.CONFIGS["small"], 2, 1, 2, 16, 0.5) if small else
                           round_memory(common.CONFIGS["tiny"], 128, 2, 4, 64, 0.25)),
        # the real model last: its compiles take longest
        "memory_1b": lambda: None if small else round_memory(common.CONFIGS["1b"], 16, 1, 4, 512),
    }
    for name in args.only:
        t0 = time.perf_counter()
        try:
            results[name] = plan[name]()
        except Exception as err:  # one failed check must not hide the others
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"{name}: FAILED {results[name]['error']}", flush=True)
        timings[name] = time.perf_counter() - t0
        results["check_s"] = timings
        common.footer(info, results, args)  # after every check: a run killed later keeps these
    return results


if __name__ == "__main__":
    main()
