"""Benchmark: fedrouter_jax.clustering vs scikit-learn on the same problems, in one run.

Timings alternate ours / sklearn, after one warm-up call of each (JIT compile excluded), and the
median of ``--repeats`` is reported. Same initial centroids for both K-Means
(``KMeans(init=same, n_init=1, tol=same, algorithm="lloyd")``), so the results must agree:
we print iterations and the inertia's relative difference. Where a client's inertia differs by
more than 1e-4, sklearn is rerun in float64 (untimed) to tell which float32 run drifted.

Ours gets the data as a JAX array made once before timing (in FedRouter the embeddings come out
of the model as JAX arrays); sklearn gets the same values as a float32 numpy array.

  python experiments/bench/bench_clustering.py            # 20k x 2048, 100k x 2048, C = 8/32/128
  python experiments/bench/bench_clustering.py --small    # seconds: 2k x 64, 16 x 200 x 64

Silhouette is O(N^2 D): at 100k x 2048 sklearn needs ~10+ minutes on 2 cores, so it is only run
there with ``--silhouette-big``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score as sk_silhouette

from fedrouter_jax.clustering import batched_kmeans, kmeans, silhouette_score

K_SINGLE = 8
K_CLIENT = 4


def _mixture(rng, n, d, k, std):
    """n points around k standard-normal centres with isotropic noise std. -> float32 [n, d]."""
    centres = rng.standard_normal((k, d), dtype=np.float32)
    x = centres[rng.integers(0, k, n)]
    x += std * rng.standard_normal((n, d), dtype=np.float32)
    return x


def _alternate(fns, repeats):
    """Warm up ours (fns[0]: JIT compile), then time all fns alternately.

    -> (median seconds per fn, last outputs). sklearn needs no warm-up (and its Silhouette at
    20k x 2048 costs half a minute), so only fns[0] is called before timing.
    """
    outs = [fns[0]()] + [None] * (len(fns) - 1)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = f()
            times[i].append(time.perf_counter() - t0)
    return [float(np.median(t)) for t in times], outs


def _sk_kmeans(x, init, tol, max_iter):
    return KMeans(init.shape[0], init=init, n_init=1, tol=tol, max_iter=max_iter,
                  algorithm="lloyd").fit(x)


def bench_single(n, d, repeats, silhouette, rng, tol=1e-4, max_iter=300):
    x = _mixture(rng, n, d, K_SINGLE, std=8.0)
    init = x[rng.choice(n, K_SINGLE, replace=False)]
    xj = jax.device_put(x)
    ours = lambda: jax.block_until_ready(kmeans(xj, K_SINGLE, init=init, tol=tol,
                                                max_iter=max_iter))
    ref = lambda: _sk_kmeans(x, init, tol, max_iter)
    (t_o, t_r), (r_o, r_r) = _alternate([ours, ref], repeats)
    agree = float(np.mean(np.asarray(r_o.labels) == r_r.labels_))
    rel = abs(float(r_o.inertia) - r_r.inertia_) / r_r.inertia_
    print(f"kmeans      {n:>7d} x {d}: ours {t_o:8.3f} s  sklearn {t_r:8.3f} s  "
          f"speed-up {t_r / t_o:5.2f}x  n_iter {int(r_o.n_iter)}/{r_r.n_iter_}  "
          f"inertia rel.diff {rel:.1e}  labels agree {agree:.4f}", flush=True)
    res = {"n": n, "d": d, "kmeans_s": t_o, "sklearn_s": t_r, "n_iter": [int(r_o.n_iter), int(r_r.n_iter_)],
           "inertia_rel_diff": rel, "labels_agree": agree}
    if not silhouette:
        print(f"silhouette  {n:>7d} x {d}: skipped (O(N^2 D); --silhouette-big runs it)")
        return res
    labels = r_r.labels_
    s_o = lambda: silhouette_score(xj, labels)
    s_r = lambda: sk_silhouette(x, labels)
    (t_o, t_r), (v_o, v_r) = _alternate([s_o, s_r], max(1, repeats // 2))
    print(f"silhouette  {n:>7d} x {d}: ours {t_o:8.3f} s  sklearn {t_r:8.3f} s  "
          f"speed-up {t_r / t_o:5.2f}x  |diff| {abs(v_o - v_r):.1e}", flush=True)
    return {**res, "silhouette_s": t_o, "silhouette_sklearn_s": t_r, "silhouette_abs_diff": abs(float(v_o) - float(v_r))}


def bench_clients(c, n, d, repeats, rng, tol=1e-4, max_iter=300):
    x = np.stack([_mixture(rng, n, d, K_CLIENT, std=1.5) for _ in range(c)])
    init = np.stack([x[i, rng.choice(n, K_CLIENT, replace=False)] for i in range(c)])
    mask = np.ones((c, n), bool)
    xj = jax.device_put(x)
    ours = lambda: jax.block_until_ready(batched_kmeans(xj, mask, K_CLIENT, init=init, tol=tol,
                                                        max_iter=max_iter))
    ref = lambda: [_sk_kmeans(x[i], init[i], tol, max_iter) for i in range(c)]
    (t_o, t_r), (r_o, r_r) = _alternate([ours, ref], repeats)
    it_o = np.asarray(r_o.n_iter)
    it_r = np.array([m.n_iter_ for m in r_r])
    in_r = np.array([m.inertia_ for m in r_r])
    in_o = np.asarray(r_o.inertia)
    rel = float(np.max(np.abs(in_o - in_r) / in_r))
    agree = float(np.mean(np.asarray(r_o.labels) == np.stack([m.labels_ for m in r_r])))
    off = np.flatnonzero(np.abs(in_o - in_r) / in_r > 1e-4)
    # float64 reference for the clients where the two float32 runs ended in different optima
    f64 = [_sk_kmeans(x[i].astype(np.float64), init[i].astype(np.float64), tol, max_iter)
           for i in off]
    ours_ok = sum(abs(in_o[i] - m.inertia_) / m.inertia_ <= 1e-4 for i, m in zip(off, f64))
    sk_ok = sum(abs(in_r[i] - m.inertia_) / m.inertia_ <= 1e-4 for i, m in zip(off, f64))
    print(f"clients C={c:>4d} ({n} x {d} each): ours {t_o:7.3f} s (one call)  sklearn loop "
          f"{t_r:7.3f} s  speed-up {t_r / t_o:5.2f}x  n_iter mean {it_o.mean():.2f}/"
          f"{it_r.mean():.2f} (equal {np.mean(it_o == it_r):.2f})  max inertia rel.diff "
          f"{rel:.1e}  labels agree {agree:.4f}", flush=True)
    if len(off):
        print(f"    {len(off)} client(s) with inertia rel.diff > 1e-4 {off.tolist()}: vs sklearn "
              f"float64 ours matches {ours_ok}, sklearn float32 matches {sk_ok}", flush=True)
    return {"C": c, "n": n, "d": d, "ours_s": t_o, "sklearn_s": t_r, "n_iter_mean": [float(it_o.mean()), float(it_r.mean())],
            "max_inertia_rel_diff": rel, "labels_agree": agree, "off_clients": len(off),
            "off_f64_matches": [int(ours_ok), int(sk_ok)]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="fast smoke mode (2k x 64 problems)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    p.add_argument("--silhouette-big", action="store_true",
                   help="also run Silhouette on the 100k problem (very slow for sklearn)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    if a.small:
        singles, clients, repeats = [(2000, 64, True)], [(16, 200, 64)], 2
    else:
        singles = [(20000, 2048, True), (100000, 2048, a.silhouette_big)]
        clients = [(8, 600, 2048), (32, 600, 2048), (128, 600, 2048)]
        repeats = 5
    repeats = a.repeats or repeats
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({os.cpu_count()} cores, load "
          f"avg {os.getloadavg()[0]:.1f}); medians of {repeats} alternating repeats after "
          f"warm-up; K={K_SINGLE} (single), K={K_CLIENT} (clients)")
    results = {"single": [bench_single(n, d, repeats, sil, rng) for n, d, sil in singles],
               "clients": [bench_clients(c, n, d, repeats, rng) for c, n, d in clients],
               "load_end": os.getloadavg()[0]}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, default=float)
    return results


if __name__ == "__main__":
    main()
