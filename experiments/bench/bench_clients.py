"""Clients in one call: the client-mapped jitted round against a Python loop over clients.

One round = C clients x S local AdamW steps from one global adapter (fresh optimizer state per
client, as the runner does). Both variants run the same JAX code (`training.local_steps`):

  mapped  `training.clients_local_steps` as the runner calls it (`client_chunk: auto`): one jitted
          call for the whole round, `vmap` over groups of clients (about 2k tokens per group on
          CPU) inside a `lax.scan` over the groups, `lax.scan` over steps (base held once).
  all     the same call with every client vmapped at once (`client_chunk: all`).
  loop    a Python loop over clients calling a jitted per-client `local_steps` (S steps in one
          call per client; per-client batches pre-split outside the timed region), with the
          training default `layer_loop: auto` (layers unrolled on CPU);
  loop_scan  the same loop with the layers in a `lax.scan` (`layer_loop: scan`): the loop's
          calls are small, so unrolling need not pay for it, and the ratio is taken to the
          faster of the two loops (a baseline is never weakened).

Reports client-steps/s, tokens/s (B*T per client-step) and the ratios to the faster loop for
C = 8, 32, 128.

  python experiments/bench/bench_clients.py          # embedded-size model (d 256, 4 layers)
  python experiments/bench/bench_clients.py --small  # seconds (smoke test)
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402

from fedrouter_jax import lora as lora_lib  # noqa: E402
from fedrouter_jax.training import (Batch, client_chunk_size, clients_local_steps, init_opt_states,  # noqa: E402
                                    local_steps, make_optimizer, set_learning_rate)

LR = 5e-4


def run_one(cfg, base, C, S, B, T, repeats, with_all: bool = True) -> dict:
    opt = make_optimizer()
    global_lora = jax.tree.map(lambda x: x[0], common.adapters(cfg, 1))
    batches = common.jax_batches((C, S, B, T), cfg.vocab_size, seed=C)
    keys = jax.random.split(jax.random.PRNGKey(0), C)
    per_client = [Batch(*(x[c] for x in batches)) for c in range(C)]

    start = jax.jit(lambda g: (lambda loras: (loras, init_opt_states(opt, loras, LR)))(lora_lib.broadcast(g, C)))

    chunk = client_chunk_size("auto", C, B * T)

    def mapped(chunk=chunk):
        loras, states = start(global_lora)
        return clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt, client_chunk=chunk)[0]

    init_one = jax.jit(lambda lora: set_learning_rate(opt.init(lora), LR))

    def loop(layer_loop):
        one = jax.jit(partial(local_steps, cfg=cfg, optimizer=opt, layer_loop=layer_loop))

        def run():
            out = []
            for c in range(C):
                lora, state, _ = one(base, global_lora, init_one(global_lora), per_client[c], keys[c])
                out.append(lora)
            return lora_lib.stack_adapters(out)
        return run

    variants = {"mapped": mapped, "loop": loop("auto"), "loop_scan": loop("scan")}
    if chunk is not None and with_all:
        variants["all"] = lambda: mapped(None)
    r = common.alternate(variants, repeats=repeats, warmup=1, rotate=True)
    res = {"C": C, "S": S, "B": B, "T": T, "chunk": chunk}
    for name, v in r.items():
        res[name] = {"round_s": v["median"], "round_s_all": v["wall"], "client_steps_per_s": C * S / v["median"],
                     "tokens_per_s": C * S * B * T / v["median"], "cpu_over_wall": v["cpu_median"] / v["median"]}
    best_loop = min(r["loop"]["median"], r["loop_scan"]["median"])
    res["ratio"] = best_loop / r["mapped"]["median"]
    res["ratio_all"] = best_loop / r["all" if "all" in r else "mapped"]["median"]
    return res


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=3)
    p.add_argument("--model", default="tiny", choices=sorted(common.CONFIGS))
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, nargs="+", default=[4, 4, 2], help="B per entry of --clients")
    p.add_argument("--seq", type=int, nargs="+", default=[64, 64, 32], help="T per entry of --clients")
    p.add_argument("--no-all", action="store_true", help="skip the all-clients-at-once variant")
    args = p.parse_args(argv)
    if args.small:
        args.model, args.clients, args.steps, args.batch, args.seq, args.repeats = "small", [4], 2, [2], [16], 1
    info = common.header("Clients in one call: client-mapped round vs Python loop over clients", args)
    cfg = common.CONFIGS[args.model]
    base = common.base_params(cfg)
    per = lambda xs, i: xs[min(i, len(xs) - 1)]
    results = {"model": args.model, "runs": []}
    print(f"{'C':>5s} {'S':>3s} {'B':>3s} {'T':>4s} {'chunk':>5s} | {'mapped c-steps/s':>16s} {'tokens/s':>9s} | "
          f"{'loop c-steps/s':>14s} {'scan':>6s} | {'mapped/loop':>11s} {'all/loop':>8s}  cpu/wall m,l")
    for i, C in enumerate(args.clients):
        res = run_one(cfg, base, C, args.steps, per(args.batch, i), per(args.seq, i), args.repeats,
                      with_all=not args.no_all)
        results["runs"].append(res)
        m, lp, ls = res["mapped"], res["loop"], res["loop_scan"]
        print(f"{C:5d} {res['S']:3d} {res['B']:3d} {res['T']:4d} {str(res['chunk'] or 'all'):>5s} | "
              f"{m['client_steps_per_s']:16.2f} {m['tokens_per_s']:9.0f} | {lp['client_steps_per_s']:14.2f} "
              f"{ls['client_steps_per_s']:6.2f} | {res['ratio']:11.2f} {res['ratio_all']:8.2f}  "
              f"{m['cpu_over_wall']:.2f},{lp['cpu_over_wall']:.2f}", flush=True)
    common.footer(info, results, args)
    return results


if __name__ == "__main__":
    main()
