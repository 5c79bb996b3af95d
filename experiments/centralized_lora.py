"""Sanity check of the embedded default: zero-shot ROUGE-1 of the base per task (should be low)
and after centralized LoRA fine-tuning on each task (should rise clearly).

    python experiments/centralized_lora.py                      # embedded tiny Llama, writes results/centralized_lora.json
    python experiments/centralized_lora.py --steps 20 --train 64 --test 16   # quick

One adapter per task, all four trained at once (one client-mapped jitted call per "round" of
--steps-per-call steps), same LoRA / optimizer as the federated runs.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.algorithms.base import EvalPlan
from fedrouter_jax.data import TASKS, encode_prompts, generate_examples, sample_round_batches, tokenize_examples
from fedrouter_jax.lora import init_lora
from fedrouter_jax.metrics import rouge1
from fedrouter_jax.routing import generate_routed
from fedrouter_jax.runner import load_model_tokenizer, model_directory
from fedrouter_jax.config import load_config
from fedrouter_jax.models.hf_io import load_pretrained
from fedrouter_jax.training import Batch, clients_local_steps, init_opt_states, make_optimizer

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--train", type=int, default=600)
    p.add_argument("--test", type=int, default=100)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--steps-per-call", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--max-seq-len", type=int, default=160)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "centralized_lora.json")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(None, [f"model.path={args.model}"])
    model_dir = model_directory(cfg)
    model_cfg, base = load_pretrained(model_dir)
    tok = load_model_tokenizer(model_dir)
    train = [generate_examples(t, args.train, args.seed) for t in TASKS]
    test = [generate_examples(t, args.test, args.seed + 1000) for t in TASKS]
    sets = [tokenize_examples(ex, tok, args.max_seq_len, warn=False) for ex in train]
    prompts = [encode_prompts(ex, tok, args.max_seq_len - args.max_new_tokens, warn=False)[:2] for ex in test]
    opt = make_optimizer()
    lora = init_lora(jax.random.PRNGKey(args.seed), model_cfg, len(TASKS), rank=8, alpha=16.0, targets=("q_proj", "v_proj"))

    def score(plan):
        gens = generate_routed(base, model_cfg, plan, prompts, batch_size=50, max_new_tokens=args.max_new_tokens,
                               eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
        out, samples = {}, {}
        for t, g, ex in zip(TASKS, gens, test):
            preds = [s.strip() for s in tok.batch_decode([x.tolist() for x in g], skip_special_tokens=True)]
            out[t] = float(rouge1(preds, [e["output"] for e in ex]).mean())
            samples[t] = {"prediction": preds[0], "reference": ex[0]["output"]}
        return out, samples

    zero, _ = score(EvalPlan(adapters=None, adapter_ids=[np.full(args.test, -1)] * len(TASKS)))
    print("zero-shot ROUGE-1:", {k: round(v, 3) for k, v in zero.items()}, flush=True)
    opt_state = init_opt_states(opt, lora, args.lr)
    losses = []
    for r in range(args.steps // args.steps_per_call):
        b = sample_round_batches(sets, steps=args.steps_per_call, batch_size=args.batch, seed=args.seed, round_idx=r)
        batch = Batch(jnp.asarray(b["tokens"]), jnp.asarray(b["mask"]), jnp.asarray(b["loss_mask"]))
        keys = jax.random.split(jax.random.PRNGKey(r), len(TASKS))
        lora, opt_state, m = clients_local_steps(base, lora, opt_state, batch, keys, cfg=model_cfg, optimizer=opt)
        losses.append(np.asarray(m["loss"])[:, -1].round(4).tolist())
        print(f"step {(r + 1) * args.steps_per_call:4d} loss per task {losses[-1]}  {time.perf_counter() - t0:.0f}s", flush=True)
    tuned, samples = score(EvalPlan(adapters=lora, adapter_ids=[np.full(args.test, a) for a in range(len(TASKS))]))
    print("fine-tuned ROUGE-1:", {k: round(v, 3) for k, v in tuned.items()})
    for t, smp in samples.items():
        print(f"  {t}: {smp}")
    res = {"model": str(model_dir), "args": {k: str(v) for k, v in vars(args).items()}, "zero_shot": zero,
           "fine_tuned": tuned, "samples": samples, "loss_curve": losses, "seconds": round(time.perf_counter() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(json.dumps({k: res[k] for k in ("zero_shot", "fine_tuned", "seconds")}))


if __name__ == "__main__":
    main()
