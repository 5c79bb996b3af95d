"""Figures (matplotlib, Agg backend, PNG) for the grid results and FedRouter's clustering.

    # per-round train loss (and ROUGE-1 when the grid ran with eval.every > 0) per method, per scenario
    python experiments/plots.py curves results/grid_cpu.jsonl --out results/plots
    # paper Fig. 4: t-SNE of the clients' test embeddings, coloured by true task
    python experiments/plots.py tsne --scenario single --out results/plots/tsne_single.png
    # paper Fig. 7 / 8: Silhouette against k, global (single, dual, all) and local (dual, all)
    python experiments/plots.py silhouette --out results/plots
    python experiments/plots.py silhouette --runs runs/sil_dual runs/sil_all --out results/plots  # from run dirs
    # paper Fig. 6: FedRouter against the number of clients (8 -> 16 -> 32)
    python experiments/grid.py configs/grid_clients.yaml
    python experiments/plots.py clients results/grid_clients.jsonl --out results/plots/clients.png

`tsne` and `silhouette` build the scenario data from `configs/default.yaml` + the scenario's
YAML (+ `--set KEY=VALUE`), embed it with the base model (cached) and, for `silhouette`, run
FedRouter's clustering (`FedRouter.init`, no training) with `clustering.n_global: auto` and, for
Dual / All, `clustering.n_local: auto`; the state holds `silhouette_local` [C, n_k] and
`silhouette_global` [n_k] for k in [k_min, k_max].
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from report import METHOD_NAMES, _methods, load_records  # noqa: E402

SCENARIO_FILES = {"single": "configs/single.yaml", "dual": "configs/dual.yaml", "all": "configs/all.yaml",
                  "generalization": "configs/generalization.yaml"}


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _name(m: str) -> str:
    return METHOD_NAMES.get(m, m).strip("*").replace("\\", "")


def plot_curves(jsonl, out_dir) -> list[Path]:
    """One PNG per scenario: train loss per round (mean over seeds) and ROUGE-1 per round."""
    recs = [r for r in load_records(jsonl) if r.get("variant", "default") == "default"]
    paths = []
    for scen in sorted({r["scenario"] for r in recs}):
        rs = [r for r in recs if r["scenario"] == scen]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for m in _methods(rs):
            mr = [r for r in rs if r["method"] == m]
            n = min(len(r["train_loss"]) for r in mr)
            loss = np.mean([r["train_loss"][:n] for r in mr], axis=0)
            ax1.plot(np.arange(1, n + 1), loss, marker="o", ms=3, label=_name(m))
            per_round = {}
            for r in mr:
                for rnd, v in r.get("rouge1_per_round", []):
                    per_round.setdefault(rnd, []).append(v)
                per_round.setdefault(len(r["train_loss"]), []).append(r["rouge1"])  # the final evaluation
            xs = sorted(per_round)
            ax2.plot(xs, [np.mean(per_round[x]) for x in xs], marker="o", ms=3, label=_name(m))
        ax1.set(title=f"{scen}: train loss (last local step)", xlabel="round", ylabel="loss")
        ax2.set(title=f"{scen}: ROUGE-1", xlabel="round", ylabel="ROUGE-1")
        ax1.legend(fontsize=8)
        paths.append(_save(fig, Path(out_dir) / f"curves_{scen}.png"))
    return paths


def _scenario_config(scenario: str, sets=(), extra=()):
    from fedrouter_jax.config import load_config

    return load_config([ROOT / "configs/default.yaml", ROOT / SCENARIO_FILES[scenario]],
                       list(extra) + list(sets) + ["out_dir=/tmp/fedrouter-plots"])


def plot_tsne(scenario: str, out, sets=(), seed: int = 0) -> Path:
    """Paper Fig. 4: t-SNE of every client's test embeddings, colour = true task, marker = client."""
    from sklearn.manifold import TSNE

    from fedrouter_jax.runner import prepare

    data = prepare(_scenario_config(scenario, sets), progress=False)
    x = np.concatenate(data.test_emb)
    task = np.concatenate(data.fed.test_tasks)
    client = np.concatenate([np.full(len(e), c) for c, e in enumerate(data.test_emb)])
    y = TSNE(n_components=2, perplexity=min(30.0, (len(x) - 1) / 3), random_state=seed, init="pca").fit_transform(x)
    fig, ax = plt.subplots(figsize=(6, 5))
    markers = "o^sDvP*Xhp<>"
    for c in np.unique(client):
        for t in np.unique(task):
            sel = (client == c) & (task == t)
            if sel.any():
                ax.scatter(y[sel, 0], y[sel, 1], s=12, color=f"C{t}", marker=markers[c % len(markers)], alpha=0.8,
                           label=data.fed.task_names[t] if c == client.min() or not (task[client < c] == t).any() else None)
    ax.legend(title="task", fontsize=8)
    ax.set(title=f"t-SNE of client test embeddings ({scenario}); marker = client", xticks=[], yticks=[])
    return _save(fig, out)


def _silhouettes(state) -> dict:
    """The global [n_k] and per-client [C, n_k] Silhouette scores of a FedRouter SimState."""
    return {"silhouette_global": state.server.silhouette, "silhouette_local": state.clients.silhouette}


def silhouette_states(scenarios=("single", "dual", "all"), sets=()) -> dict:
    """scenario -> (FedRouter's Silhouette scores after its clustering, k values), without training."""

    from fedrouter_jax.runner import Run, prepare

    out = {}
    for s in scenarios:
        extra = ["clustering.n_global=auto"] + ([] if s == "single" else ["clustering.n_local=auto"])
        cfg = _scenario_config(s, sets, extra)
        data = prepare(cfg, progress=False)
        state = Run(cfg, data=data, progress=False).initial_state()  # client_setup + server_setup
        out[s] = (_silhouettes(state), np.arange(cfg.clustering.k_min, cfg.clustering.k_max + 1))
    return out


def states_from_runs(run_dirs) -> dict:
    from fedrouter_jax.checkpoint import CheckpointStore
    from fedrouter_jax.config import load_config

    out = {}
    for d in run_dirs:
        cfg = load_config(Path(d) / "config.yaml")
        store = CheckpointStore(Path(d) / "checkpoints", read_only=True)
        tree, _ = store.restore(store.latest_step())  # nested dicts: {"server": ..., "clients": ...}
        st = {"silhouette_global": tree["server"]["silhouette"], "silhouette_local": tree["clients"]["silhouette"]}
        out[f"{cfg.data.scenario} ({Path(d).name})"] = (st, np.arange(cfg.clustering.k_min, cfg.clustering.k_max + 1))
    return out


def plot_silhouette(states: dict, out_dir) -> list[Path]:
    """Fig. 7 (global Silhouette vs k per scenario) and Fig. 8 (local, mean +- std over clients)."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (st, ks) in states.items():
        g = np.asarray(st["silhouette_global"], np.float64)
        if np.isfinite(g).any():
            ax.plot(ks[: g.size], g, marker="o", label=name)
    ax.set(title="Global clustering: Silhouette vs k", xlabel="number of global clusters k", ylabel="Silhouette")
    ax.legend()
    paths = [_save(fig, Path(out_dir) / "silhouette_global.png")]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, (st, ks) in states.items():
        loc = np.asarray(st["silhouette_local"], np.float64)
        if not np.isfinite(loc).any():
            continue
        mean, std = np.nanmean(loc, axis=0), np.nanstd(loc, axis=0)
        ax.errorbar(ks[: mean.size], mean, yerr=std, marker="o", capsize=3, label=name)
    ax.set(title="Local clustering: Silhouette vs k (mean ± std over clients)", xlabel="number of local clusters k",
           ylabel="Silhouette")
    ax.legend()
    paths.append(_save(fig, Path(out_dir) / "silhouette_local.png"))
    return paths


def plot_clients(jsonl, out, method: str = "fedrouter") -> Path:
    """Fig. 6: ROUGE-1 against the number of clients (mean +- std over seeds), per scenario."""
    recs = [r for r in load_records(jsonl) if r["method"] == method]
    fig, ax = plt.subplots(figsize=(5, 4))
    for scen in sorted({r["scenario"] for r in recs}):
        rs = [r for r in recs if r["scenario"] == scen]
        ns = sorted({r["n_clients"] for r in rs})
        vals = [[r["rouge1"] for r in rs if r["n_clients"] == n] for n in ns]
        ax.errorbar(ns, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], marker="o", capsize=3,
                    label=f"{_name(method)} ({scen})")
        for n, v in zip(ns, vals):
            ax.annotate(f"{n // 4}/task", (n, np.mean(v)), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set(xscale="log", xlabel="number of clients", ylabel="ROUGE-1", title="Scaling the number of clients")
    ax.set_xticks(sorted({r["n_clients"] for r in recs}) or [8])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.legend()
    return _save(fig, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("curves")
    c.add_argument("jsonl")
    c.add_argument("--out", default="results/plots")
    t = sub.add_parser("tsne")
    t.add_argument("--scenario", default="single", choices=list(SCENARIO_FILES))
    t.add_argument("--out", default="results/plots/tsne_single.png")
    t.add_argument("--set", action="append", default=[])
    s = sub.add_parser("silhouette")
    s.add_argument("--runs", nargs="*", help="FedRouter run dirs (n_local/n_global auto); default: cluster now")
    s.add_argument("--scenarios", default="single,dual,all")
    s.add_argument("--out", default="results/plots")
    s.add_argument("--set", action="append", default=[])
    k = sub.add_parser("clients")
    k.add_argument("jsonl")
    k.add_argument("--out", default="results/plots/clients.png")
    k.add_argument("--method", default="fedrouter")
    a = p.parse_args(argv)
    if a.cmd == "curves":
        plot_curves(a.jsonl, a.out)
    elif a.cmd == "tsne":
        plot_tsne(a.scenario, a.out, a.set)
    elif a.cmd == "silhouette":
        states = states_from_runs(a.runs) if a.runs else silhouette_states(a.scenarios.split(","), a.set)
        plot_silhouette(states, a.out)
    else:
        plot_clients(a.jsonl, a.out, a.method)
    return 0


if __name__ == "__main__":
    sys.exit(main())
