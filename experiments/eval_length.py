"""How long must `eval.max_new_tokens` be? Reference lengths per task, and what a longer limit costs.

    python experiments/eval_length.py                         # writes results/eval_length.json
    python experiments/eval_length.py --per-task 500 --repeats 1 --no-timing   # quick

1. Token lengths of every task's references (`" " + output`, the response as training encodes
   it, EOS not counted: generation may stop after exactly that many new tokens) with the
   embedded tokenizer, on a large seeded sample per task and on the main job's own train and
   test sets (`--config`). From them: the share cut at a given `max_new_tokens`, and the
   smallest limit at which >= `--fit` of the references fit, per task and overall.
2. Prompt lengths (BOS + the Alpaca prompt), because the runner gives prompts
   `model.max_seq_len - eval.max_new_tokens` tokens and cuts longer ones from the left.
3. The wall time of one evaluation of the main job's test set (greedy decoding with the KV cache,
   as `runner.evaluate`) at each limit, with a FedRouter-shaped plan: one freshly initialised
   adapter per task (B = 0, so the output is the base model's) and samples grouped by their
   true task. Measured twice per limit: with EOS disabled, so every batch decodes the full
   limit (the upper bound, and what an untrained model that never emits EOS costs), and with
   EOS (what the base model costs). A trained model stops each batch at its longest answer
   (+ 1 step for EOS): its decoding steps are counted from the reference lengths and priced at
   the forced run's time per step. Wall time on a shared machine is noisy: compare the steps.
   Compile time is excluded (one warm-up call per shape) and reported separately.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def token_lengths(tok, texts: list[str]) -> np.ndarray:
    """Tokens per text without special tokens: [N] int."""
    if not texts:
        return np.zeros(0, np.int64)
    return np.array([len(x) for x in tok(texts, add_special_tokens=False)["input_ids"]], np.int64)


def reference_lengths(tok, examples: list[dict]) -> np.ndarray:
    """Response tokens as `tokenize_examples` encodes them (separator + output, no EOS): [N]."""
    from fedrouter_jax.data import RESPONSE_SEPARATOR

    return token_lengths(tok, [RESPONSE_SEPARATOR + e["output"] for e in examples])


def prompt_lengths(tok, examples: list[dict]) -> np.ndarray:
    """BOS + prompt tokens, as `encode_prompts` builds them before any cut: [N]."""
    from fedrouter_jax.data import prompt_texts

    return 1 + token_lengths(tok, prompt_texts(examples))


def smallest_fitting(lengths: np.ndarray, fit: float) -> int:
    """Smallest limit n with mean(lengths <= n) >= fit."""
    s = np.sort(lengths)
    return int(s[int(np.ceil(fit * len(s))) - 1])


def describe(lengths: np.ndarray, limits: list[int], fit: float) -> dict:
    """Summary of a length sample: quantiles, share longer than each limit, the fitting limit."""
    return {
        "n": int(lengths.size),
        "mean": float(lengths.mean()),
        "quantiles": {q: int(np.percentile(lengths, float(q[1:]), method="higher"))
                      for q in ("p50", "p90", "p95", "p99")},
        "max": int(lengths.max()),
        "share_longer_than": {str(n): float((lengths > n).mean()) for n in limits},
        f"smallest_limit_fitting_{fit:g}": smallest_fitting(lengths, fit),
    }


def length_tables(tok, per_task: dict, limits: list[int], fit: float) -> dict:
    """{task: describe(...), "overall": describe(...)} for references of `per_task` examples."""
    lens = {t: reference_lengths(tok, ex) for t, ex in per_task.items()}
    out = {t: describe(v, limits, fit) for t, v in lens.items()}
    out["overall"] = describe(np.concatenate(list(lens.values())), limits, fit)
    return out


def _by_task(fed, split: str) -> dict:
    data = getattr(fed, split)
    labels = getattr(fed, f"{split}_tasks")
    out = {t: [] for t in fed.task_names}
    for exs, labs in zip(data, labels):
        for e, l in zip(exs, labs):
            out[fed.task_names[int(l)]].append(e)
    return out


def time_evaluation(cfg, model_cfg, base, tok, fed, limit: int, max_seq_len: int, repeats: int,
                    use_eos: bool) -> dict:
    """Seconds for one evaluation of `fed.test` at `limit` new tokens (fastest of `repeats`)."""
    import jax

    from fedrouter_jax.algorithms.base import EvalPlan
    from fedrouter_jax.data import encode_prompts
    from fedrouter_jax.lora import LoraStack, init_lora
    from fedrouter_jax.routing import generate_routed

    lc = cfg.lora
    n_tasks = len(fed.task_names)
    stack = init_lora(jax.random.PRNGKey(0), model_cfg, n_tasks, rank=lc.rank, alpha=lc.alpha,
                      targets=tuple(lc.targets))
    plan = EvalPlan(adapters=LoraStack(params=stack.params, alpha=lc.alpha),
                    adapter_ids=[np.asarray(t, np.int32) for t in fed.test_tasks])
    prompts = [encode_prompts(ex, tok, max_seq_len - limit, warn=False)[:2] for ex in fed.test]
    cut = sum(int((prompt_lengths(tok, ex) > max_seq_len - limit).sum()) for ex in fed.test)
    eos = (tok.eos_token_id,) if use_eos else ()

    def once() -> tuple[float, float, list]:
        w0, c0 = time.perf_counter(), time.process_time()
        gens = generate_routed(base, model_cfg, plan, prompts, batching=cfg.eval.batching,
                               batch_size=cfg.eval.batch_size, max_new_tokens=limit, eos_ids=eos,
                               pad_id=tok.pad_token_id)
        return time.perf_counter() - w0, time.process_time() - c0, gens

    t_first, _, gens = once()  # includes compiling each batch shape
    timed = [once()[:2] for _ in range(repeats)]
    lens = [np.array([len(g) for g in c]) for c in gens]
    n_gen = np.concatenate(lens)
    return {"max_new_tokens": limit, "max_seq_len": max_seq_len, "eos": use_eos,
            "prompts_cut": cut, "wall_seconds_min": min(w for w, _ in timed),
            "cpu_seconds_min": min(c for _, c in timed), "wall_seconds_all": [w for w, _ in timed],
            "first_call_wall_seconds_incl_compile": t_first,
            "decoding_steps": batch_steps(fed, lens, limit, cfg.eval.batch_size),
            "mean_generated_tokens": float(n_gen.mean()), "n_samples": int(n_gen.size)}


def batch_steps(fed, ref_len_per_client: list, limit: int, batch_size: int) -> int:
    """Decoding steps of a trained model that answers with the reference length: grouped batches
    by true task (as `time_evaluation`'s plan), each batch runs min(limit, longest + 1) steps
    (the + 1 emits EOS)."""
    lens = np.concatenate(ref_len_per_client)
    tasks = np.concatenate(fed.test_tasks)
    steps = 0
    for t in np.unique(tasks):
        group = lens[tasks == t]
        for s in range(0, group.size, batch_size):
            steps += min(limit, int(group[s:s + batch_size].max()) + 1)
    return steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="the main job's config")
    p.add_argument("--per-task", type=int, default=5000, help="seeded examples per task for the length tables")
    p.add_argument("--seed", type=int, default=12345, help="seed of that sample (not the main job's)")
    p.add_argument("--fit", type=float, default=0.99, help="share of references that must fit")
    p.add_argument("--limits", default="16,24,32,40,48", help="max_new_tokens values to report")
    p.add_argument("--repeats", type=int, default=2, help="timed evaluations per setting (the fastest is kept)")
    p.add_argument("--no-timing", action="store_true", help="lengths only")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "eval_length.json")
    p.add_argument("--commit", default=None, help="code version to record (default: git HEAD of the repo)")
    args = p.parse_args(argv)

    from fedrouter_jax.config import load_config
    from fedrouter_jax.data import TASKS, build_scenario, generate_examples
    from fedrouter_jax.runner import load_model_tokenizer, model_directory

    cfg = load_config(args.config)
    tok = load_model_tokenizer(model_directory(cfg))
    limits = sorted({int(x) for x in args.limits.split(",")} | {int(cfg.eval.max_new_tokens)})
    d = cfg.data
    fed = build_scenario(d.scenario, n_clients=d.n_clients, train_per_client=d.train_per_client,
                         test_per_client=d.test_per_client, seed=cfg.seed)
    sample = {t: generate_examples(t, args.per_task, args.seed) for t in TASKS}
    report = {
        "config": str(Path(args.config).relative_to(ROOT)) if Path(args.config).is_relative_to(ROOT) else args.config,
        "commit": args.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip(),
        "tokenizer": "embedded" if cfg.model.path == "embedded" else cfg.model.path,
        "fit": args.fit,
        "config_max_new_tokens": int(cfg.eval.max_new_tokens),
        "config_max_seq_len": int(cfg.model.max_seq_len),
        "reference_tokens": {
            f"sample_{args.per_task}_per_task_seed{args.seed}": length_tables(tok, sample, limits, args.fit),
            "main_job_test": length_tables(tok, _by_task(fed, "test"), limits, args.fit),
            "main_job_train": length_tables(tok, _by_task(fed, "train"), limits, args.fit),
        },
        "prompt_tokens": {t: describe(prompt_lengths(tok, ex), [cfg.model.max_seq_len - n for n in limits], args.fit)
                          for t, ex in sample.items()},
    }
    fitting = report["reference_tokens"][f"sample_{args.per_task}_per_task_seed{args.seed}"]
    key = f"smallest_limit_fitting_{args.fit:g}"
    recommended = max(v[key] for v in fitting.values())  # every task and overall
    longest_prompt = max(v["max"] for v in report["prompt_tokens"].values())
    report["recommended_max_new_tokens"] = recommended
    report["max_seq_len_needed_for_no_prompt_cut"] = {
        str(n): longest_prompt + n for n in sorted({int(cfg.eval.max_new_tokens), recommended})}

    if not args.no_timing:
        import jax

        from fedrouter_jax.models.hf_io import load_pretrained

        model_cfg, base = load_pretrained(model_directory(cfg))
        runs = []
        settings = sorted({int(cfg.eval.max_new_tokens), recommended})
        for n in settings:
            for use_eos in (False, True):
                runs.append(time_evaluation(cfg, model_cfg, base, tok, fed, n, cfg.model.max_seq_len,
                                            args.repeats, use_eos))
                print(json.dumps({k: runs[-1][k] for k in ("max_new_tokens", "eos", "wall_seconds_min",
                                                           "cpu_seconds_min", "decoding_steps",
                                                           "mean_generated_tokens", "prompts_cut")}))
        # Decoding steps (one batch decoding one token) drive the cost: the KV cache holds
        # max_seq_len positions whatever the limit (prompts get max_seq_len - limit), so a step
        # costs the same at every limit. A trained model is estimated at the forced run's time
        # per step (an upper bound: the per-batch prefill does not grow with the limit).
        ref_per_client = [reference_lengths(tok, ex) for ex in fed.test]
        forced = {r["max_new_tokens"]: r for r in runs if not r["eos"]}
        trained = {}
        for n in settings:
            steps = batch_steps(fed, ref_per_client, n, cfg.eval.batch_size)
            per_step = forced[n]["wall_seconds_min"] / forced[n]["decoding_steps"]
            trained[str(n)] = {"decoding_steps": steps, "wall_seconds_at_forced_rate": per_step * steps}
        report["timing"] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
                       f"{jax.device_count()} x {jax.devices()[0].platform}",
            "test_samples": int(sum(len(t) for t in fed.test)),
            "eval_batch_size": int(cfg.eval.batch_size), "batching": cfg.eval.batching,
            "runs": runs,
            "trained_model_answering_reference_lengths": trained,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({"recommended_max_new_tokens": recommended,
                      "share_cut_at_config": {t: v["share_longer_than"][str(cfg.eval.max_new_tokens)]
                                              for t, v in fitting.items()}}, indent=1))
    return report


if __name__ == "__main__":
    main()
