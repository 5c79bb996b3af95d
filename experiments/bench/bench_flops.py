"""Hardware limit: matmul peak, achieved FLOP/s of our training step, memory per simulated client.

1. Peak: a jitted float32 n x n @ n x n matmul (n = 2048), median of repeats.
2. Our step: `training.local_steps` (one client, S AdamW steps in one jitted call) on the 34M
   model, B 16, T 128, LoRA r 8 on q,k,v,o; achieved FLOP/s with the count in
   `common.train_step_flops` (4 N per token for the frozen base's matmul params incl. lm_head,
   attention QK^T and PV forward + backward, LoRA forward + backward incl. weight gradients).
   Two variants: `step` as the runner trains (`lm_head_on: loss_tokens`: the head only at the
   positions that predict a response token, counted for those positions only) and `step_all`
   (the head at every position, the issue's plain count). Peak and steps are alternated in the
   same run; the ratio is step FLOP/s / peak FLOP/s.
3. Memory: `clients_local_steps` for C = 1, 2, 4, 8 clients, each in a fresh subprocess; peak
   RSS against C. The base is an `in_axes=None` argument of the client vmap, so the growth per
   added client should be adapter + optimizer state + activations + batches, not a base copy.

  python experiments/bench/bench_flops.py
  python experiments/bench/bench_flops.py --small
  # on a GPU: the issue's Llama-3.2-1B-shaped step (random bf16 weights), B 16, T 512
  python experiments/bench/bench_flops.py --model 1b --dtype bfloat16 --seq 512 --mm 8192 --mem-clients 1
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax import lora as lora_lib  # noqa: E402
from fedrouter_jax.training import clients_local_steps, init_opt_states, make_optimizer  # noqa: E402


MM_CALLS = 10


def memory_child(model: str, C: int, S: int, B: int, T: int, dtype: str = "float32") -> dict:
    """Run one round for C clients and report RSS (and device) memory (runs in a fresh process)."""
    cfg = common.CONFIGS[model]
    base = jax.block_until_ready(common.base_params(cfg, dtype=dtype))
    rss_base = common.current_rss_bytes()
    opt = make_optimizer()
    loras = lora_lib.broadcast(jax.tree.map(lambda x: x[0], common.adapters(cfg, 1)), C)
    loras = jax.tree.map(lambda x: x + 0, loras)  # materialise C copies
    states = init_opt_states(opt, loras, 5e-4)
    batches = common.jax_batches((C, S, B, T), cfg.vocab_size)
    keys = jax.random.split(jax.random.PRNGKey(0), C)
    per_client_state = (common.tree_bytes(loras) + common.tree_bytes(states) + common.tree_bytes(batches)) / C
    compiled = clients_local_steps.lower(base, loras, states, batches, keys, cfg=cfg, optimizer=opt).compile()
    ma = compiled.memory_analysis()
    xla = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
           "temp": ma.temp_size_in_bytes, "alias": ma.alias_size_in_bytes}
    rss_before = common.current_rss_bytes()
    out = clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt)
    jax.block_until_ready(out)
    return {"C": C, "peak_rss": common.peak_rss_bytes(), "rss_after_base": rss_base,
            "device_peak_bytes": common.device_peak_memory(),
            "rss_run_delta": common.current_rss_bytes() - rss_before, "xla": xla,
            "xla_total": xla["argument"] + xla["output"] + xla["temp"] - xla["alias"],
            "base_bytes": common.tree_bytes(base), "per_client_state_bytes": per_client_state}


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=5)
    common.add_shape_args(p, model="34m", steps=2, steps_help="local steps per timed call")
    p.add_argument("--mm", type=int, default=2048, help="matmul size for the peak")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="base weights and activations (the peak is measured in the same dtype)")
    p.add_argument("--mem-clients", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--mem-seq", type=int, default=64)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(memory_child(*json.loads(args.child))))
        return {}
    if args.small:
        args.model, args.steps, args.batch, args.seq, args.mm, args.repeats = "small", 2, 2, 16, 256, 1
        args.mem_clients, args.mem_batch, args.mem_seq = [1, 2], 2, 16
    info = common.header("Hardware limit: matmul peak, our step's FLOP/s, memory per client", args)
    cfg = common.CONFIGS[args.model]
    S, B, T = args.steps, args.batch, args.seq

    # --- 1 + 2: peak and our step, alternated -------------------------------------------------
    steps = {}
    for name, head_mode in (("step", "loss"), ("step_all", "all")):
        fn, fn_args, head_tokens = common.single_client_step(cfg, S, B, T, head=head_mode, dtype=args.dtype)
        steps[name] = (fn, fn_args)
        if head_mode == "loss":
            head, base = head_tokens, fn_args[0]
    n = args.mm
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n)).astype(args.dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n)).astype(args.dtype)
    mm = jax.jit(lambda a, b: a @ b)
    # the peak a long computation sustains: MM_CALLS back-to-back products per timed sample (one
    # product right after a multi-second step ran at half speed in the first idle run)
    fns = {"matmul": lambda: [mm(a, b) for _ in range(MM_CALLS)]}
    fns.update({k: (lambda f=f, xs=xs: f(*xs)) for k, (f, xs) in steps.items()})
    r = common.alternate(fns, repeats=args.repeats, warmup=1)
    mm_flops = 2 * n**3 * MM_CALLS
    peak = mm_flops / r["matmul"]["median"]
    cpu_peak = mm_flops / r["matmul"]["cpu_median"]
    results = {"model": args.model, "params": int(sum(x.size for x in jax.tree.leaves(base))),
               "B": B, "T": T, "matmul_n": n, "peak_flops": peak, "peak_flops_best": mm_flops / r["matmul"]["min"],
               "peak_flops_per_cpu_s": cpu_peak, "head_tokens": head, "dtype": args.dtype,
               "device": str(jax.devices()[0].device_kind), "device_peak_bytes": common.device_peak_memory(),
               "cpu_over_wall": {k: v["cpu_median"] / v["median"] for k, v in r.items()}}
    print(f"device {results['device']}; peak device memory {results['device_peak_bytes']} bytes (None on CPU)")
    print(f"matmul {n}^3 {args.dtype} (jit): {peak / 1e9:.1f} GFLOP/s median ({results['peak_flops_best'] / 1e9:.1f} best)")
    print(f"model {args.model}: {results['params'] / 1e6:.1f}M params, B={B} T={T}, LoRA r{common.RANK} "
          f"{','.join(common.TARGETS)}; LM head on {head} of {B * T} positions in `step`")
    for name in steps:
        flops = common.train_step_flops(cfg, B, T, head_tokens=head if name == "step" else None)
        s_per_step = r[name]["median"] / S
        achieved = flops["total"] / s_per_step
        cpu_step = flops["total"] * S / r[name]["cpu_median"]
        results[name] = {"step_s": s_per_step, "step_flops": flops, "achieved_flops": achieved,
                         "client_steps_per_s": 1 / s_per_step,
                         "fraction_of_peak": achieved / peak, "flops_per_cpu_s": cpu_step,
                         "fraction_of_peak_cpu": cpu_step / cpu_peak}
        print(f"{name:8s} FLOPs per step: base {flops['base'] / 1e9:.1f} G (4 x {flops['n_base_matmul_params'] / 1e6:.1f}M "
              f"params, head on {flops['head_positions']} positions) + attention {flops['attention'] / 1e9:.1f} G + "
              f"LoRA {flops['lora'] / 1e9:.2f} G = {flops['total'] / 1e9:.1f} GFLOP")
        print(f"{name:8s} {s_per_step:.3f} s/step -> {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of "
              f"the matmul peak (cpu/wall {results['cpu_over_wall'][name]:.2f}); per CPU-second "
              f"{cpu_step / 1e9:.1f} vs matmul {cpu_peak / 1e9:.1f} = {100 * cpu_step / cpu_peak:.0f}%")

    # --- 3: memory per simulated client (fresh process per C) --------------------------------
    mem = []
    for C in args.mem_clients:
        if args.small:  # smoke test: in-process (peak RSS is then cumulative, not per C)
            mem.append(memory_child(args.model, C, S, args.mem_batch, args.mem_seq, args.dtype))
            continue
        child = json.dumps([args.model, C, S, args.mem_batch, args.mem_seq, args.dtype])
        out = subprocess.run([sys.executable, __file__, "--child", child], capture_output=True, text=True, check=True)
        mem.append(json.loads(out.stdout.strip().splitlines()[-1]))
    results["memory"] = mem
    print(f"\nmemory of one round (clients_local_steps), {args.model}, B={args.mem_batch} T={args.mem_seq}, S={S}: "
          f"base {mem[0]['base_bytes'] / 2**20:.1f} MiB")
    print("XLA buffer assignment (exact): arguments (base + adapters + opt state + batches) + outputs + temps")
    print(f"{'C':>4s} {'args MiB':>9s} {'temp MiB':>9s} {'total MiB':>10s} {'run RSS delta MiB':>18s} "
          f"{'peak RSS MiB':>13s} {'adapter+opt+batch MiB/client':>29s}")
    for m in mem:
        x = m["xla"]
        print(f"{m['C']:4d} {x['argument'] / 2**20:9.1f} {x['temp'] / 2**20:9.1f} {m['xla_total'] / 2**20:10.1f} "
              f"{m['rss_run_delta'] / 2**20:18.1f} {m['peak_rss'] / 2**20:13.1f} {m['per_client_state_bytes'] / 2**20:29.2f}")
    if len(mem) > 1:
        cs = [m["C"] for m in mem]
        slope = np.polyfit(cs, [m["xla_total"] for m in mem], 1)
        results["xla_bytes_per_client"], results["xla_bytes_intercept"] = float(slope[0]), float(slope[1])
        print(f"XLA bytes ~ {slope[1] / 2**20:.1f} MiB + {slope[0] / 2**20:.2f} MiB x C: growth per added client = "
              f"adapter + optimizer state + batches + activations; the base ({mem[0]['base_bytes'] / 2**20:.1f} MiB) "
              f"is in the fixed part, held once. (Peak RSS is set by compilation, not by the round.)")
    common.footer(info, results, args)
    return results


if __name__ == "__main__":
    main()
