"""Tables from the grid's results/*.jsonl, and a RESULTS.md template that embeds them.

    python experiments/report.py results/grid_cpu.jsonl                     # print Table 1 + generalization
    python experiments/report.py results/grid_cpu.jsonl --results-md RESULTS.md [--plots results/plots]

Table 1 (paper layout): Method | Single | Dual | All | Average, mean +- std over seeds (sample std,
ddof 1; 0 with one seed), Average = mean of the scenario means, best per column in bold.
Generalization table: Method | Test-Time Gen. (trained as Single, tested on all tasks;
FedRouter routed with the global centroids). A cell re-run with another config replaces the
earlier line of the same (method, scenario, variant, seed).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

METHOD_ORDER = ("fedit", "local", "fedcluster", "fedsa", "feddpa", "fedrouter", "fedrouter_star")
METHOD_NAMES = {"fedit": "FedIT", "local": "Local", "fedcluster": "FedCluster", "fedsa": "FedSA",
                "feddpa": "FedDPA", "fedrouter": "FedRouter", "fedrouter_star": "*FedRouter\\**"}
TABLE1_SCENARIOS = ("single", "dual", "all")


def load_records(*paths) -> list[dict]:
    """Finished cells, the latest line per (method, scenario, variant, seed)."""
    latest = {}
    for p in paths:
        p = Path(p)
        if not p.exists():
            continue
        for line in p.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            latest[(r["method"], r["scenario"], r.get("variant", "default"), r["seed"])] = r
    return list(latest.values())


def _stats(values) -> tuple[float, float, int]:
    v = np.asarray(values, np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else 0.0), int(v.size)


def _methods(records) -> list[str]:
    present = {r["method"] for r in records}
    return [m for m in METHOD_ORDER if m in present] + sorted(present - set(METHOD_ORDER))


def _fmt(mean, std, best):
    s = f"{mean:.3f}"
    return (f"**{s}**" if best else s) + f" ± {std:.3f}"


def table1(records, variant: str = "default", metric: str = "rouge1") -> str:
    recs = [r for r in records if r.get("variant", "default") == variant]
    methods = _methods([r for r in recs if r["scenario"] in TABLE1_SCENARIOS])
    if not methods:
        return "_no finished cells of the single / dual / all scenarios yet_\n"
    cells = {}
    for m in methods:
        for s in TABLE1_SCENARIOS:
            vals = [r[metric] for r in recs if r["method"] == m and r["scenario"] == s]
            cells[m, s] = _stats(vals) if vals else None
    avg = {m: (float(np.mean([cells[m, s][0] for s in TABLE1_SCENARIOS]))
               if all(cells[m, s] for s in TABLE1_SCENARIOS) else None) for m in methods}
    best = {s: max((cells[m, s][0] for m in methods if cells[m, s]), default=None) for s in TABLE1_SCENARIOS}
    best_avg = max((a for a in avg.values() if a is not None), default=None)
    lines = ["| Method | Single | Dual | All | Average |", "|---|---|---|---|---|"]
    for m in methods:
        row = [METHOD_NAMES.get(m, m)]
        for s in TABLE1_SCENARIOS:
            c = cells[m, s]
            row.append(_fmt(c[0], c[1], np.isclose(c[0], best[s])) if c else "–")
        a = avg[m]
        row.append("–" if a is None else (f"**{a:.3f}**" if np.isclose(a, best_avg) else f"{a:.3f}"))
        lines.append("| " + " | ".join(row) + " |")
    n = sorted({c[2] for c in cells.values() if c})
    lines.append("")
    lines.append(f"ROUGE-1, mean ± std over {'/'.join(map(str, n))} seed(s); best per column in bold.")
    return "\n".join(lines) + "\n"


def generalization_table(records, variant: str = "default") -> str:
    recs = [r for r in records if r["scenario"] == "generalization" and r.get("variant", "default") == variant]
    methods = _methods(recs)
    if not methods:
        return "_no finished cells of the generalization scenario yet_\n"
    st = {m: _stats([r["rouge1"] for r in recs if r["method"] == m]) for m in methods}
    best = max(v[0] for v in st.values())
    lines = ["| Method | Test-Time Gen. |", "|---|---|"]
    for m in methods:
        lines.append(f"| {METHOD_NAMES.get(m, m)} | {_fmt(st[m][0], st[m][1], np.isclose(st[m][0], best))} |")
    routers = sorted({f"{r['method']}: {r.get('router', '?')}" for r in recs if r["method"].startswith("fedrouter")})
    lines += ["", "Trained as Single, tested on all four tasks. Router mode: " + (", ".join(routers) or "–") + "."]
    return "\n".join(lines) + "\n"


def per_task_table(records, scenario: str, variant: str = "default") -> str:
    recs = [r for r in records if r["scenario"] == scenario and r.get("variant", "default") == variant]
    if not recs:
        return "_none yet_\n"
    tasks = sorted({t for r in recs for t, v in r["per_task"].items() if v is not None})
    lines = ["| Method | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m in _methods(recs):
        row = [METHOD_NAMES.get(m, m)]
        for t in tasks:
            v = [r["per_task"][t] for r in recs if r["method"] == m and r["per_task"].get(t) is not None]
            row.append(f"{np.mean(v):.3f}" if v else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def clustering_table(records, variant: str = "default") -> str:
    recs = [r for r in records if "clustering_accuracy" in r and r.get("variant", "default") == variant]
    if not recs:
        return "_none yet_\n"
    lines = ["| Method | Scenario | clustering accuracy (%) |", "|---|---|---|"]
    for m in _methods(recs):
        for s in ("single", "dual", "all", "generalization"):
            v = [r["clustering_accuracy"] for r in recs if r["method"] == m and r["scenario"] == s]
            if v:
                mean, std, _ = _stats(v)
                lines.append(f"| {METHOD_NAMES.get(m, m)} | {s} | {100 * mean:.1f} ± {100 * std:.1f} |")
    return "\n".join(lines) + "\n"


def timing_table(records) -> str:
    if not records:
        return "_none yet_\n"
    lines = ["| Method | Scenario | wall time per cell (s, mean) | cells |", "|---|---|---|---|"]
    for m in _methods(records):
        for s in sorted({r["scenario"] for r in records}):
            v = [r["wall_time_s"] for r in records if r["method"] == m and r["scenario"] == s]
            if v:
                lines.append(f"| {METHOD_NAMES.get(m, m)} | {s} | {np.mean(v):.1f} | {len(v)} |")
    total = sum(r["wall_time_s"] for r in records)
    lines += ["", f"Total: {total / 60:.1f} min over {len(records)} cells."]
    return "\n".join(lines) + "\n"


def write_tables(jsonl, prefix) -> None:
    """<prefix>_table1.md and <prefix>_generalization.md from a grid's jsonl."""
    recs = load_records(jsonl)
    prefix = Path(prefix)
    Path(f"{prefix}_table1.md").write_text(table1(recs))
    Path(f"{prefix}_generalization.md").write_text(generalization_table(recs))


def _setup(records) -> str:
    if not records:
        return "_no finished cells_"
    c = records[0]["config"]
    d, t, lo = c["data"], c["train"], c["lora"]
    mixes = sorted({r["config"]["feddpa"]["mixing"] for r in records if r["method"] == "feddpa"})
    fc = sorted({(r["config"]["fedcluster"]["n_clusters"], r["config"]["fedcluster"]["cluster_round"])
                 for r in records if r["method"] == "fedcluster"})
    seeds = sorted({r["seed"] for r in records})
    return "\n".join([
        f"- model: `{c['model']['path']}` ({c['model']['dtype']}, max_seq_len {c['model']['max_seq_len']})",
        f"- LoRA: rank {lo['rank']}, alpha {lo['alpha']}, targets {', '.join(lo['targets'])}",
        f"- federation: {d['n_clients']} clients, {t['rounds']} rounds x {t['local_steps']} local steps, batch "
        f"{t['batch_size']}, lr {t['lr']} ({t['lr_schedule']}), {d['train_per_client']} train / "
        f"{d['test_per_client']} test samples per client, data source `{d['source']}`",
        f"- seeds: {', '.join(map(str, seeds))}",
        f"- FedDPA mixing used in the tables: {', '.join(mixes) or '–'} "
        "(dynamic = the paper's instance-wise weighting)",
        f"- FedCluster (n_clusters, cluster_round): {', '.join(map(str, fc)) or '–'}",
        f"- eval: greedy, max_new_tokens {c['eval']['max_new_tokens']}; metric ROUGE-1 F (rouge-score)",
    ])


def results_md(jsonl_paths, out="RESULTS.md", plots_dir=None) -> str:
    """A RESULTS.md template: setup, tables filled from the jsonl files, plot links, TODO notes."""
    recs = load_records(*jsonl_paths)
    main = [r for r in recs if r.get("variant", "default") == "default"]
    parts = [
        "# Results", "",
        "_Generated by `experiments/report.py` from " + ", ".join(f"`{p}`" for p in jsonl_paths)
        + ". Numbers are filled in from the grid; the text marked TODO is for the authors._", "",
        "## Setup", "", _setup(main), "",
        "## Table 1 — task interference (ROUGE-1)", "", table1(main),
        "TODO: compare with the paper's Table 1 (FedRouter 0.561 / 0.558 / 0.566, avg 0.562).", "",
        "## Generalization (trained as Single, tested on all tasks)", "", generalization_table(main),
        "TODO: compare with the paper's Figure 3 table (FedRouter 0.583, FedIT 0.570, FedDPA 0.461).", "",
        "## Per-task ROUGE-1 (All scenario)", "", per_task_table(main, "all"),
        "## FedRouter local clustering accuracy (test samples vs true tasks)", "", clustering_table(main),
        "TODO: the paper reports 100 %, 100 %, 95.4 % for Single, Dual, All.", "",
        "## Cost", "", timing_table(main),
    ]
    variants = sorted({r.get("variant", "default") for r in recs} - {"default"})
    if variants:
        parts += ["## Variants", ""]
        for v in variants:
            vr = [r for r in recs if r.get("variant") == v]
            vals = ", ".join(f"{METHOD_NAMES.get(m, m)} {s}: {np.mean([r['rouge1'] for r in vr if r['method'] == m and r['scenario'] == s]):.3f}"
                             for m in _methods(vr) for s in sorted({r['scenario'] for r in vr if r['method'] == m}))
            parts += [f"- `{v}` ({vr[0]['n_clients']} clients): {vals}"]
        parts.append("")
    if plots_dir is not None:
        pngs = sorted(Path(plots_dir).glob("*.png"))
        parts += ["## Figures", ""]
        parts += [f"![{p.stem}]({p.as_posix()})" for p in pngs] or ["_no plots yet (see experiments/plots.py)_"]
        parts.append("")
    text = "\n".join(parts)
    if out:
        Path(out).write_text(text)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tables / RESULTS.md from grid results (jsonl).")
    p.add_argument("jsonl", nargs="+")
    p.add_argument("--results-md", help="write a RESULTS.md template here")
    p.add_argument("--plots", help="folder of PNGs to link from RESULTS.md")
    a = p.parse_args(argv)
    if a.results_md:
        results_md(a.jsonl, a.results_md, a.plots)
        print(f"wrote {a.results_md}")
    else:
        recs = load_records(*a.jsonl)
        print(table1(recs))
        print(generalization_table(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
