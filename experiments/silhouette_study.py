"""Why does the local Silhouette (paper Fig. 8) not find the true number of tasks per client?

    python experiments/silhouette_study.py                     # writes results/silhouette_study.json
    python experiments/silhouette_study.py --set data.train_per_client=600   # the paper's client size

For Dual and All (`configs/default.yaml` + the scenario's YAML + `--set`), on each client's
training embeddings exactly as FedRouter clusters them (`runner.prepare`: mean-pooled base-model
states of the raw task inputs), this measures, without any training:

1. Geometry: distances between the task means (all clients pooled) against each task's spread
   (RMS distance of its samples to its mean), and how much of the total variance the first
   principal components carry.
2. Silhouette against k in [k_min, k_max] per client with FedRouter's own K-Means and Silhouette
   (`clustering.choose_k_batched`, the config's n_init and seed), for the embeddings as they are
   (`raw`), L2-normalised rows (`l2`) and per-dimension standardised features (`zscore`, mean and
   std over the client's samples); the k each client would pick; and the Silhouette of the TRUE
   task partition beside the best K-Means score.
3. What the k = 2 clusters hold (the task contingency table per client).
4. A direct test of "one task lies far from the others": the same Silhouette scan with each task's
   samples removed from every client in turn (for All: does removing WebNLG make k = 3 win?).
5. Two other criteria on the same K-Means labels (sklearn): Calinski-Harabasz (max) and
   Davies-Bouldin (min).
6. The K-Means restarts (`n_init`): per-client clustering accuracy of the local K-Means at the
   scenario's fixed k (train samples) and of the local routing (test samples to the nearest
   local centroid, as `FedRouter.route`), with 1 restart (the authors' `KMeans(n_init='auto')`,
   one k-means++ run) and with 10 (our default), over `--kmeans-seeds` seeds; plus the authors'
   exact call (sklearn, `random_state=0`, on float16-rounded embeddings as their
   `get_client_embedding` stores them).

Nothing here is tuned: every transform and criterion is reported for every client, whichever k
it picks. Global clustering (Fig. 7) is scanned too, on the clients' fixed-k local centroids.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENARIO_FILES = {"dual": "configs/dual.yaml", "all": "configs/all.yaml"}
TRANSFORMS = ("raw", "l2", "zscore")


def transform(x: np.ndarray, how: str) -> np.ndarray:
    """x [N, D] float -> [N, D]: as is, L2-normalised rows, or per-dimension standardised."""
    x = np.asarray(x, np.float64)
    if how == "raw":
        return x
    if how == "l2":
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if how == "zscore":
        return (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    raise ValueError(f"transform: unknown {how!r}; valid: {TRANSFORMS}")


def geometry(emb: list, tasks: list, names) -> dict:
    """Task means and spreads over all clients' samples pooled; PCA variance shares."""
    x = np.concatenate(emb).astype(np.float64)
    t = np.concatenate(tasks)
    present = [i for i in range(len(names)) if (t == i).any()]
    mu = {i: x[t == i].mean(0) for i in present}
    spread = {names[i]: float(np.sqrt(((x[t == i] - mu[i]) ** 2).sum(1).mean())) for i in present}
    dist = {f"{names[i]}-{names[j]}": float(np.linalg.norm(mu[i] - mu[j]))
            for a, i in enumerate(present) for j in present[a + 1:]}
    var = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    share = np.cumsum(var) / var.sum()
    return {"task_mean_distance": dist, "task_rms_spread": spread,
            "mean_row_norm": float(np.linalg.norm(x, axis=1).mean()),
            "pca_cumulative_variance_share": {str(k): float(share[k - 1]) for k in (1, 2, 3, 5, 10)}}


def true_partition_silhouette(emb: list, tasks: list) -> list:
    """Per client: the Silhouette of its samples labelled by their TRUE task (NaN if one task)."""
    from sklearn.metrics import silhouette_score

    return [float(silhouette_score(e, t)) if len(np.unique(t)) > 1 else float("nan")
            for e, t in zip(emb, tasks)]


def scan(emb: list, ks: np.ndarray, cc, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FedRouter's Silhouette scan for every client: (best k [C], scores [C, len(ks)])."""
    from fedrouter_jax.simulator import pad_clients
    from fedrouter_jax.clustering import choose_k_batched

    x, mask = pad_clients([np.asarray(e, np.float32) for e in emb])
    return choose_k_batched(x, mask, ks, seed=seed, n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol)


def scan_summary(emb: list, tasks: list, ks: np.ndarray, cc, seed: int) -> dict:
    best, scores = scan(emb, ks, cc, seed)
    return {"best_k": best.tolist(), "n_true_tasks": [int(len(np.unique(t))) for t in tasks],
            "silhouette": {str(int(k)): [float(v) for v in scores[:, j]] for j, k in enumerate(ks)},
            "silhouette_true_partition": true_partition_silhouette(emb, tasks)}


def other_criteria(emb: list, ks: np.ndarray, seed: int, n_init: int) -> dict:
    """Best k per client by Calinski-Harabasz (max) and Davies-Bouldin (min), sklearn K-Means."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

    ch, db = [], []
    for e in emb:
        labels = {int(k): KMeans(int(k), n_init=n_init, random_state=seed).fit_predict(e) for k in ks}
        ch.append(int(max(ks, key=lambda k: calinski_harabasz_score(e, labels[int(k)]))))
        db.append(int(min(ks, key=lambda k: davies_bouldin_score(e, labels[int(k)]))))
    return {"calinski_harabasz_best_k": ch, "davies_bouldin_best_k": db}


def k2_contents(emb: list, tasks: list, names, cc, seed: int) -> list:
    """Per client: {cluster: {task: count}} of FedRouter's K-Means with k = 2."""
    from fedrouter_jax.simulator import pad_clients
    from fedrouter_jax.clustering import batched_kmeans

    x, mask = pad_clients([np.asarray(e, np.float32) for e in emb])
    res = batched_kmeans(x, mask, np.full(len(emb), 2), k_max=2, n_init=cc.n_init, max_iter=cc.max_iter,
                         tol=cc.tol, seed=seed)
    labels = np.asarray(res.labels)
    out = []
    for c, t in enumerate(tasks):
        lab = labels[c, : len(t)]
        out.append({str(g): {names[i]: int(((lab == g) & (t == i)).sum()) for i in np.unique(t)}
                    for g in (0, 1)})
    return out


def n_init_ablation(data, cc, seeds) -> dict:
    """Per-client clustering accuracy (train labels, test routing) for n_init 1 and 10."""
    from sklearn.cluster import KMeans

    from fedrouter_jax.simulator import pad_clients
    from fedrouter_jax.clustering import batched_kmeans, clustering_accuracy, nearest_centroid

    emb, test = data.train_emb, data.test_emb
    tasks, test_tasks = data.fed.train_tasks, data.fed.test_tasks
    x, mask = pad_clients([np.asarray(e, np.float32) for e in emb])
    k = np.full(len(emb), int(cc.n_local))  # the scenario's fixed k (dual 2, all 4)
    out = {}
    for n_init in (1, 10):
        train_acc, test_acc = [], []
        for seed in seeds:
            res = batched_kmeans(x, mask, k, k_max=int(k.max()), n_init=n_init, max_iter=cc.max_iter,
                                 tol=cc.tol, seed=int(seed))
            labels, cent, cmask = (np.asarray(a) for a in (res.labels, res.centroids, res.centroid_mask))
            train_acc.append([clustering_accuracy(t, labels[c, : len(t)]) for c, t in enumerate(tasks)])
            test_acc.append([clustering_accuracy(t, np.asarray(nearest_centroid(np.asarray(test[c], np.float32),
                                                                                cent[c], cmask[c])))
                             for c, t in enumerate(test_tasks)])
        out[f"n_init_{n_init}"] = {"seeds": [int(s) for s in seeds], "train_accuracy": train_acc,
                                   "test_routing_accuracy": test_acc,
                                   "train_min_mean_max": _mmm(train_acc), "test_min_mean_max": _mmm(test_acc)}
    authors = []
    for c, e in enumerate(emb):  # the authors' call: float16 embeddings, one k-means++ run, seed 0
        km = KMeans(n_clusters=int(k[c]), random_state=0, n_init="auto").fit(np.asarray(e, np.float16))
        authors.append(clustering_accuracy(tasks[c], km.labels_))
    out["authors_sklearn_n_init_auto_random_state_0"] = {"train_accuracy": authors,
                                                         "train_min_mean_max": _mmm([authors])}
    return out


def _mmm(rows) -> list:
    a = np.asarray(rows, np.float64)
    return [float(a.min()), float(a.mean()), float(a.max())]


def study(scenario: str, sets, kmeans_seeds=range(5)) -> dict:
    from fedrouter_jax.algorithms import Env
    from fedrouter_jax.algorithms import fedrouter
    from fedrouter_jax.config import load_config
    from fedrouter_jax.runner import prepare

    cfg = load_config([ROOT / "configs/default.yaml", ROOT / SCENARIO_FILES[scenario]],
                      list(sets) + ["out_dir=/tmp/fedrouter-silhouette-study"])
    data = prepare(cfg, progress=False)
    cc, seed = cfg.clustering, int(cfg.seed)
    names = data.fed.task_names
    emb = [np.asarray(e, np.float64) for e in data.train_emb]
    tasks = [np.asarray(t) for t in data.fed.train_tasks]
    ks = np.arange(cc.k_min, cc.k_max + 1)
    out = {"config": {"scenario": scenario, "n_clients": data.fed.n_clients,
                      "train_per_client": cfg.data.train_per_client, "seed": seed,
                      "n_init": cc.n_init, "k_range": [int(ks[0]), int(ks[-1])], "set": list(sets)},
           "geometry": {h: geometry([transform(e, h) for e in emb], tasks, names) for h in TRANSFORMS},
           "local": {}, "other_criteria": {}, "drop_one_task": {}}
    for h in TRANSFORMS:
        xs = [transform(e, h) for e in emb]
        out["local"][h] = scan_summary(xs, tasks, ks, cc, seed)
        out["other_criteria"][h] = other_criteria(xs, ks, seed, cc.n_init)
        out[f"k2_clusters_{h}"] = k2_contents(xs, tasks, names, cc, seed)
    for drop in range(len(names)):
        keep = [t != drop for t in tasks]
        if all(k.all() for k in keep):
            continue  # no client holds that task
        xs = [e[k] for e, k in zip(emb, keep)]
        ts = [t[k] for t, k in zip(tasks, keep)]
        out["drop_one_task"][names[drop]] = {h: scan_summary([transform(e, h) for e in xs], ts, ks, cc, seed)
                                             for h in ("raw", "l2")}
    # Fig. 7 on this data: the global scan over the clients' fixed-k local centroids
    env = Env(config=dataclasses.replace(cfg, clustering=dataclasses.replace(cc, n_global="auto")),
              model_cfg=data.model_cfg, n_clients=data.fed.n_clients)
    loc, _ = fedrouter.client_setup(env, data.inputs, None)
    _, _, scores = fedrouter.global_clustering(env, loc.centroids, loc.centroid_mask)
    out["global_silhouette_fixed_local_k"] = {str(int(k)): float(v) for k, v in zip(ks, scores)}
    out["n_init_ablation"] = n_init_ablation(data, cc, list(kmeans_seeds))
    return out


def summary_lines(res: dict) -> list[str]:
    lines = []
    for scen, r in res["scenarios"].items():
        for h in TRANSFORMS:
            loc = r["local"][h]
            lines.append(f"{scen:4s} {h:6s} silhouette best k {loc['best_k']} (true {loc['n_true_tasks']}); "
                         f"CH {r['other_criteria'][h]['calinski_harabasz_best_k']}; "
                         f"DB {r['other_criteria'][h]['davies_bouldin_best_k']}")
        for task, d in r["drop_one_task"].items():
            lines.append(f"{scen:4s} without {task:8s} raw best k {d['raw']['best_k']}, l2 {d['l2']['best_k']}")
        ab = r["n_init_ablation"]
        lines.append(f"{scen:4s} clustering accuracy min/mean/max, n_init 1: train {ab['n_init_1']['train_min_mean_max']}"
                     f" test {ab['n_init_1']['test_min_mean_max']}; n_init 10: train "
                     f"{ab['n_init_10']['train_min_mean_max']} test {ab['n_init_10']['test_min_mean_max']}; authors' "
                     f"call: train {ab['authors_sklearn_n_init_auto_random_state_0']['train_min_mean_max']}")
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="dual,all")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--kmeans-seeds", type=int, default=5, help="K-Means seeds of the n_init ablation")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "silhouette_study.json")
    p.add_argument("--commit", default=None, help="code version to record (default: git HEAD of the repo)")
    args = p.parse_args(argv)
    res = {"commit": args.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                   capture_output=True, text=True).stdout.strip(),
           "scenarios": {s: study(s, args.set, range(args.kmeans_seeds)) for s in args.scenarios.split(",")}}
    res["summary"] = summary_lines(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print("\n".join(res["summary"]))
    return res


if __name__ == "__main__":
    main()
