"""Round time of the main job under two source trees, alternated in separate processes.

    python experiments/bench/bench_round_time.py --roots /path/old /path/new [--rounds 4] [--repeats 3]

Each repeat runs `configs/default.yaml` for `--rounds` rounds (no evaluation, no checkpoints)
once per root, in a fresh process with that root first on PYTHONPATH, the order rotating
between repeats. Round 1 (compilation) is left out; the median of the later rounds per
process, then the median over repeats, is compared. Prints one JSON line per process and the
ratio new / old.
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
cfg = load_config(sys.argv[1], ["checkpoint.every=0", "out_dir=" + tempfile.mkdtemp()])
out = Run(cfg, progress=False).run(stop_after_round=int(sys.argv[2]))
print("RESULT " + json.dumps([h["time_s"] for h in out["history"]]))
"""


def run_once(root: str, config: str, rounds: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", CHILD, config, str(rounds)], capture_output=True, text=True,
                         env=env, cwd=tempfile.gettempdir(), timeout=3600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{root}: {out.stderr[-2000:]}")
    return json.loads(line[len("RESULT "):])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--roots", nargs=2, required=True, metavar=("OLD", "NEW"))
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[2] / "configs" / "default.yaml"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    medians: dict[str, list[float]] = {r: [] for r in args.roots}
    for i in range(args.repeats):
        order = args.roots if i % 2 == 0 else args.roots[::-1]
        for root in order:
            times = run_once(root, args.config, args.rounds)
            medians[root].append(statistics.median(times[1:]))
            print(json.dumps({"root": root, "repeat": i, "round_s": times}), flush=True)
    old, new = (statistics.median(medians[r]) for r in args.roots)
    print(json.dumps({"old_round_s": old, "new_round_s": new, "new_over_old": new / old}))


if __name__ == "__main__":
    main()
