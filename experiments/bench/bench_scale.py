"""Scale: rounds/s and memory for 8 -> 32 -> 128 -> 512 simulated clients on one CPU host.

Data: the Dirichlet task mixture of `fedrouter_jax.data.scenarios` (alpha 0.5, synthetic
examples) tokenized to T tokens with a small BPE trained on the first clients' examples; each
round samples S x B examples per client with `data.batching.sample_round_batches`.
A round = sample batches (numpy) + one `clients_local_steps` call for all C clients (fresh
AdamW state per client) + FedAvg of the adapters, called as the runner calls it: clients
vmapped in groups (`--chunk`, default `auto` = about 2k tokens per group on CPU; `all` = every
client at once) and the LM head on loss positions only. Each C runs in a fresh process so its
peak RSS is its own; where memory would end is extrapolated from the measured bytes per client.

  python experiments/bench/bench_scale.py
  python experiments/bench/bench_scale.py --small
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax import lora as lora_lib  # noqa: E402
from fedrouter_jax.training import (Batch, client_chunk_size, clients_local_steps, init_opt_states,  # noqa: E402
                                    make_optimizer)

LR = 5e-4


def client_data(C: int, T: int, per_client: int, vocab: int, seed: int = 0):
    from fedrouter_jax.data.batching import tokenize_examples
    from fedrouter_jax.data.prompt import format_example
    from fedrouter_jax.data.scenarios import build_scenario
    from fedrouter_jax.data.tokenizer import train_tokenizer

    data = build_scenario("dirichlet", n_clients=C, train_per_client=per_client, test_per_client=0,
                          seed=seed, dirichlet_alpha=0.5)
    texts = [format_example(e["instruction"], e["input"], e["output"]) for c in data.train[:16] for e in c]
    tok = train_tokenizer(texts, vocab_size=min(vocab, 1024))
    return [tokenize_examples(c, tok, T, warn=False) for c in data.train]


def child(model: str, C: int, S: int, B: int, T: int, rounds: int, chunk_setting="auto") -> dict:
    from fedrouter_jax.data.batching import head_token_budget, head_tokens_for_batches, sample_round_batches

    cfg = common.CONFIGS[model]
    base = jax.block_until_ready(common.base_params(cfg))
    rss0 = common.current_rss_bytes()
    t0 = time.perf_counter()
    sets = client_data(C, T, per_client=max(S * B, 8), vocab=cfg.vocab_size)
    data_s = time.perf_counter() - t0
    chunk = client_chunk_size(chunk_setting if chunk_setting in ("auto", "all") else int(chunk_setting), C, B * T)
    budget = head_token_budget(sets, B)
    opt = make_optimizer()
    global_lora = jax.tree.map(lambda x: x[0], common.adapters(cfg, 1))
    start = jax.jit(lambda g: (lambda l: (l, init_opt_states(opt, l, LR)))(lora_lib.broadcast(g, C)))
    fedavg = jax.jit(lambda loras: jax.tree.map(lambda x: x.mean(axis=0), loras))

    def one_round(r, g):
        b = sample_round_batches(sets, steps=S, batch_size=B, seed=0, round_idx=r)
        batches = Batch(jnp.asarray(b["tokens"]), jnp.asarray(b["mask"]), jnp.asarray(b["loss_mask"]))
        keys = jax.random.split(jax.random.PRNGKey(r), C)
        loras, states = start(g)
        loras, _, metrics = clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt,
                                                client_chunk=chunk,
                                                head_tokens=head_tokens_for_batches(budget, b["loss_mask"]))
        return jax.block_until_ready(fedavg(loras)), metrics

    t0 = time.perf_counter()
    g, _ = one_round(0, global_lora)  # compile + first round
    first_s = time.perf_counter() - t0
    times = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        g, metrics = one_round(r, g)
        times.append(time.perf_counter() - t0)
    loss = np.asarray(metrics["loss"])
    return {"C": C, "chunk": chunk, "round_s": float(np.median(times)), "round_s_all": times, "first_round_s": first_s,
            "data_prep_s": data_s, "peak_rss": common.peak_rss_bytes(), "rss_after_base": rss0,
            "base_bytes": common.tree_bytes(base), "adapter_bytes": common.tree_bytes(global_lora),
            "loss_finite": bool(np.isfinite(loss).all())}


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=2)
    p.add_argument("--model", default="tiny", choices=sorted(common.CONFIGS))
    p.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128, 512, 2048])
    p.add_argument("--chunk", default="auto", help="clients per vmapped group: auto, all or an int")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*json.loads(args.child))))
        return {}
    if args.small:
        args.model, args.clients, args.steps, args.batch, args.seq, args.repeats = "small", [2, 4], 2, 2, 16, 1
    info = common.header("Scale: rounds/s and memory vs number of simulated clients", args)
    import psutil

    ram = psutil.virtual_memory().total
    results = {"model": args.model, "S": args.steps, "B": args.batch, "T": args.seq, "ram_bytes": ram, "runs": []}
    print(f"{'C':>5s} {'chunk':>5s} {'round s':>8s} {'rounds/s':>9s} {'client-steps/s':>15s} {'peak RSS MiB':>13s} "
          f"{'1st round s':>11s}")
    for C in args.clients:
        if args.small:  # smoke test: in-process (peak RSS is then cumulative, not per C)
            m = child(args.model, C, args.steps, args.batch, args.seq, args.repeats, args.chunk)
        else:
            spec = json.dumps([args.model, C, args.steps, args.batch, args.seq, args.repeats, args.chunk])
            out = subprocess.run([sys.executable, __file__, "--child", spec], capture_output=True, text=True)
            if out.returncode != 0:  # e.g. killed for memory: report and stop growing C
                print(f"{C:5d} failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:]}")
                results["runs"].append({"C": C, "failed": out.stderr[-2000:]})
                break
            m = json.loads(out.stdout.strip().splitlines()[-1])
        results["runs"].append(m)
        print(f"{C:5d} {str(m['chunk'] or 'all'):>5s} {m['round_s']:8.3f} {1 / m['round_s']:9.3f} {C * args.steps / m['round_s']:15.1f} "
              f"{m['peak_rss'] / 2**20:13.1f} {m['first_round_s']:11.1f}", flush=True)
    ok = [m for m in results["runs"] if "failed" not in m]
    if len(ok) >= 2:
        cs = np.array([m["C"] for m in ok], float)
        rss = np.array([m["peak_rss"] for m in ok], float)
        slope, icpt = np.polyfit(cs, rss, 1)
        results["bytes_per_client"] = float(slope)
        results["rss_intercept"] = float(icpt)
        results["max_clients_estimate"] = float((ram - icpt) / slope) if slope > 0 else float("inf")
        print(f"peak RSS ~ {icpt / 2**20:.0f} MiB + {slope / 2**20:.2f} MiB x C (fit over C={[int(c) for c in cs]}); "
              f"base {ok[0]['base_bytes'] / 2**20:.1f} MiB held once, adapter {ok[0]['adapter_bytes'] / 2**10:.0f} KiB; "
              f"RAM {ram / 2**30:.1f} GiB -> memory ends near C ~ {results['max_clients_estimate']:,.0f} "
              f"(at these B, T, S)")
    common.footer(info, results, args)
    return results


if __name__ == "__main__":
    main()
