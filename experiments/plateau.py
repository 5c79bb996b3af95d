"""Has a run's ROUGE-1 curve plateaued? The grid's budget check (issue 16: "less than 0.01
ROUGE-1 gain over the last quarter of rounds"), from run dirs' metrics.jsonl (runs evaluated
every `eval.every` rounds) and, when finished, results.json (the last round's score).

    python experiments/plateau.py runs/grid/default/all/fedit/seed0 runs/grid/default/all/local/seed0
    python experiments/plateau.py RUN_DIR ... --markdown results/grid_budget.md

A run that has not reached its last round is reported as such (its curve so far is printed);
the verdict needs the whole curve, since the cosine schedule ties the curve's shape to
train.rounds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

GAIN = 0.01


def curve(run_dir: Path) -> tuple[list[tuple[int, float]], int]:
    """([(round, rouge1)], configured rounds) of one run dir."""
    rounds = int(yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["rounds"])
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a run that is still writing
        if "eval" in rec:
            points.append((int(rec["round"]), float(rec["eval"]["rouge1"])))
    res = run_dir / "results.json"
    if res.exists():
        points.append((rounds, float(json.loads(res.read_text())["rouge1"])))
    return points, rounds


def verdict(points: list[tuple[int, float]], rounds: int) -> tuple[str, float | None]:
    """('plateaued' | 'still rising' | 'unfinished', gain over the last quarter)."""
    if not points or points[-1][0] < rounds:
        return "unfinished", None
    start = rounds - rounds // 4
    before = [r for r in points if r[0] <= start]
    if not before:
        return "unfinished", None
    gain = points[-1][1] - before[-1][1]
    return ("plateaued" if gain < GAIN else "still rising"), gain


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    a = p.parse_args(argv)
    lines = ["| run | rounds | ROUGE-1 at round (eval.every) | verdict (gain over the last quarter) |",
             "|---|---|---|---|"]
    for run in a.runs:
        points, rounds = curve(run)
        v, gain = verdict(points, rounds)
        pts = ", ".join(f"{r}: {x:.3f}" for r, x in points)
        lines.append(f"| `{run}` | {rounds} | {pts or '—'} | {v}{'' if gain is None else f' ({gain:+.3f})'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.markdown:
        a.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
