"""Routed evaluation: generated tokens/s of three ways to decode prompts routed to A adapters.

N prompts, each routed to one of A adapters (random, uneven groups), greedy decoding of
`--new` tokens with `fedrouter_jax.models.generate.greedy_generate` (no EOS, so every row
generates exactly `--new` tokens and the work is the same for all variants):

  grouped  one single-adapter call per adapter group, every group padded to the same fixed
           batch (the largest group), so all calls share one compiled program.
  mixed    ONE call over all N prompts with the stacked adapters and `adapter_ids [N]`.
  loop     one call per prompt (batch 1) with its adapter.

Tokens/s counts real rows only (padding rows of the grouped variant are not counted).

  python experiments/bench/bench_routing.py
  python experiments/bench/bench_routing.py --small
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax import lora as lora_lib  # noqa: E402
from fedrouter_jax.models.generate import greedy_generate  # noqa: E402


def left_padded_prompts(n: int, p: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(p // 2, 1), p + 1, size=n)
    tokens = rng.integers(3, vocab, size=(n, p)).astype(np.int32)
    mask = np.arange(p)[None, :] >= (p - lengths)[:, None]
    tokens[~mask] = 0
    return tokens, mask


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=3)
    p.add_argument("--model", default="tiny", choices=sorted(common.CONFIGS))
    p.add_argument("--prompts", type=int, default=64, help="N")
    p.add_argument("--adapters", type=int, default=4, help="A")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    args = p.parse_args(argv)
    if args.small:
        args.model, args.prompts, args.adapters, args.prompt_len, args.new, args.repeats = "small", 6, 2, 8, 4, 1
    info = common.header("Routed evaluation: grouped vs mixed-adapter vs per-sample generation", args)
    cfg = common.CONFIGS[args.model]
    base = common.base_params(cfg)
    stack = common.adapters(cfg, args.adapters)
    N, A, P, NEW = args.prompts, args.adapters, args.prompt_len, args.new
    tokens, mask = left_padded_prompts(N, P, cfg.vocab_size)
    ids = np.random.default_rng(1).choice(A, size=N, p=np.arange(1, A + 1) / (A * (A + 1) / 2))  # uneven groups
    groups = [np.flatnonzero(ids == a) for a in range(A)]
    gbatch = max(len(g) for g in groups)
    gen = lambda toks, m, lora, aid=None: greedy_generate(  # noqa: E731
        base, toks, m, lora, aid, cfg=cfg, max_new_tokens=NEW, eos_ids=(), pad_id=0)[0]

    # grouped: pad each group to gbatch rows (copies of a real row, masked out of the count)
    group_inputs = []
    for a, g in enumerate(groups):
        if len(g) == 0:
            continue
        rows = np.concatenate([g, np.full(gbatch - len(g), g[0])])
        group_inputs.append((jnp.asarray(tokens[rows]), jnp.asarray(mask[rows]), lora_lib.take(stack, slice(a, a + 1)), g))
    singles = [lora_lib.take(stack, slice(a, a + 1)) for a in range(A)]
    j_tokens, j_mask, j_ids = jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(ids, jnp.int32)
    rows = [(jnp.asarray(tokens[i:i + 1]), jnp.asarray(mask[i:i + 1]), singles[ids[i]]) for i in range(N)]

    def grouped():
        out = np.zeros((N, NEW), np.int32)
        for t, m, lora, g in group_inputs:
            out[g] = np.asarray(gen(t, m, lora))[: len(g)]
        return out

    def mixed():
        return np.asarray(gen(j_tokens, j_mask, stack, j_ids))

    def loop():
        return np.stack([np.asarray(gen(t, m, lora))[0] for t, m, lora in rows])

    # the three agree (same greedy tokens per prompt)
    g_out, m_out, l_out = grouped(), mixed(), loop()
    agree = {"grouped==loop": float((g_out == l_out).mean()), "mixed==loop": float((m_out == l_out).mean())}
    print(f"token agreement with the per-sample loop: {agree}")

    r = common.alternate({"grouped": grouped, "mixed": mixed, "loop": loop}, repeats=args.repeats, warmup=0)
    results = {"model": args.model, "N": N, "A": A, "prompt_len": P, "new_tokens": NEW,
               "group_sizes": [int(len(g)) for g in groups], "group_batch": int(gbatch), "agreement": agree}
    print(f"\nmodel {args.model}, N={N} prompts (len <= {P}) over A={A} adapters, groups "
          f"{results['group_sizes']} padded to {gbatch}, {NEW} new tokens each")
    print(f"{'variant':8s} {'s (med)':>8s} {'gen tokens/s':>13s} {'x loop':>7s}")
    for name, v in r.items():
        results[name] = {"s": v["median"], "s_all": v["wall"], "tokens_per_s": N * NEW / v["median"],
                         "speedup_vs_loop": r["loop"]["median"] / v["median"]}
        print(f"{name:8s} {v['median']:8.3f} {N * NEW / v['median']:13.1f} {results[name]['speedup_vs_loop']:7.2f}")
    common.footer(info, results, args)
    return results


if __name__ == "__main__":
    main()
