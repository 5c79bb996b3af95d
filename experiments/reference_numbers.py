"""Per-method reference numbers of a short run: what a refactor must reproduce.

    python experiments/reference_numbers.py [--config configs/smoke.yaml] [--out tests/data/smoke_reference.json]

Trains every method of `fedrouter-jax methods` on the config (no evaluation) and writes, per
method, the per-round train loss, the sorted last-step losses of all slots, and statistics of
every float leaf of the final simulator state (sum, |sum|, 32 strided values).
tests/test_reference_numbers.py compares the current code against the committed file.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import numpy as np


def leaf_stats(state) -> dict:
    """{key path: {shape, sum, abs_sum, sample}} of every float leaf (NaN counted as 0)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            continue
        flat = np.nan_to_num(x.astype(np.float64), nan=0.0).ravel()
        idx = np.linspace(0, flat.size - 1, min(32, flat.size)).astype(int)
        out[jax.tree_util.keystr(path)] = {"shape": list(x.shape), "sum": float(flat.sum()),
                                           "abs_sum": float(np.abs(flat).sum()), "sample": flat[idx].tolist()}
    return out


def method_numbers(cfg, data) -> dict:
    """Train `cfg.method` for cfg.train.rounds on prepared `data`; its reference numbers."""
    from fedrouter_jax.runner import Run

    run = Run(cfg, data=data, progress=False)
    state = run.initial_state()
    losses, slots = [], []
    for r in range(cfg.train.rounds):
        state, metrics = run.sim.round_step(state, r)
        losses.append(metrics["train_loss"])
        slots += metrics["loss_per_slot"]
    return {"train_loss": losses, "last_step_losses_sorted": sorted(slots), "leaves": leaf_stats(state)}


def main(argv=None) -> None:
    from fedrouter_jax.algorithms import available
    from fedrouter_jax.config import load_config, replace_path
    from fedrouter_jax.runner import prepare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smoke.yaml")
    p.add_argument("--out", default="tests/data/smoke_reference.json")
    args = p.parse_args(argv)
    cfg = load_config(args.config, ["checkpoint.every=0"])
    data = prepare(cfg, progress=False)
    out = {m: method_numbers(replace_path(cfg, "method", m), data) for m in available()}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
