"""Round time of the main job under several source trees / overrides, alternated in separate processes.

    python experiments/bench/bench_round_time.py --roots /path/old /path/new [--rounds 4] [--repeats 3]
    python experiments/bench/bench_round_time.py --variant old=/path/old \
        --variant same=/path/new:lora.dropout=0,train.max_grad_norm=0 --variant shipped=/path/new

Each repeat runs `configs/default.yaml` for `--rounds` rounds (no evaluation, no checkpoints)
once per variant, in a fresh process with that variant's root first on PYTHONPATH and its
overrides applied, the order rotating between repeats. Round 1 (compilation) is left out; the
median of the later rounds per process, then the median over repeats, is compared. Prints one
JSON line per process and each variant's ratio to the first one.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, tempfile
from fedrouter_jax.config import load_config
from fedrouter_jax.runner import Run
sets = [s for s in sys.argv[3].split(",") if s]
cfg = load_config(sys.argv[1], ["checkpoint.every=0", "out_dir=" + tempfile.mkdtemp()] + sets)
out = Run(cfg, progress=False).run(stop_after_round=int(sys.argv[2]))
print("RESULT " + json.dumps([h["time_s"] for h in out["history"]]))
"""


def run_once(root: str, sets: str, config: str, rounds: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD, config, str(rounds), sets], capture_output=True,
                         text=True, env=env, cwd=tempfile.gettempdir(), timeout=3600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{root}: {out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def parse_variant(spec: str) -> tuple[str, str, str]:
    """'name=/root:k=v,k=v' -> (name, root, 'k=v,k=v')."""
    name, _, rest = spec.partition("=")
    root, _, sets = rest.partition(":")
    if not name or not root:
        raise SystemExit(f"--variant {spec!r}: expected NAME=ROOT[:KEY=VALUE,...]")
    return name, root, sets


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roots", nargs=2, metavar=("OLD", "NEW"), help="shorthand for two variants without overrides")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ROOT[:K=V,...]")
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    if args.roots:
        variants = [("old", args.roots[0], ""), ("new", args.roots[1], "")] + variants
    if len(variants) < 2:
        raise SystemExit("give --roots OLD NEW or at least two --variant")
    medians: dict[str, list[float]] = {v[0]: [] for v in variants}
    for i in range(args.repeats):
        k = i % len(variants)
        for name, root, sets in variants[k:] + variants[:k]:
            times = run_once(root, sets, args.config, args.rounds)
            medians[name].append(statistics.median(times[1:]))
            print(json.dumps({"variant": name, "root": root, "sets": sets, "repeat": i, "round_s": times}), flush=True)
    ref = variants[0][0]
    summary = {f"{n}_round_s": statistics.median(m) for n, m in medians.items()}
    summary.update({f"{n}_over_{ref}": statistics.median(medians[n]) / statistics.median(medians[ref])
                    for n in medians if n != ref})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
