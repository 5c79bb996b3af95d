"""Clustering package vs scikit-learn (the reference), with stated tolerances.

Data are float32 (what the library computes in); sklearn runs on the same values cast to float64,
so its answers are the exact ones. Tolerances: inertia 1e-4 relative, identical labels,
n_iter within 1 (equal on these data), silhouette 1e-5 absolute.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.metrics import silhouette_score as sk_silhouette

from fedrouter_jax.clustering import (
    batched_kmeans,
    batched_silhouette_score,
    choose_k,
    choose_k_batched,
    clustering_accuracy,
    kmeans,
    kmeans_plusplus,
    nearest_centroid,
    silhouette_score,
)


def _blobs(n, d, k, std=1.0, seed=0, offset=0.0):
    x, y = make_blobs(n, d, centers=k, cluster_std=std, random_state=seed)
    return (x + offset).astype(np.float32), y


def _anisotropic(n=600, seed=170):
    x, y = make_blobs(n, 2, centers=3, random_state=seed)
    x = x @ np.array([[0.6, -0.6], [-0.4, 0.8]])
    return x.astype(np.float32), y


def _datasets():
    rng = np.random.default_rng(0)
    out = []
    x, _ = _blobs(500, 2, 4, std=2.5, seed=0)
    out.append(("blobs", x, 4))
    x, _ = _anisotropic()
    out.append(("anisotropic", x, 3))
    x, _ = _blobs(800, 256, 5, std=12.0, seed=1, offset=30.0)  # overlapping, off-origin
    out.append(("highdim256", x, 5))
    return [(name, x, k, x[rng.choice(len(x), k, replace=False)]) for name, x, k in out]


@pytest.mark.parametrize("name,x,k,init", _datasets(), ids=["blobs", "aniso", "highdim256"])
def test_kmeans_matches_sklearn_from_same_init(name, x, k, init):
    ref = KMeans(k, init=init.astype(np.float64), n_init=1, tol=1e-4, max_iter=300,
                 algorithm="lloyd").fit(x.astype(np.float64))
    res = kmeans(x, k, init=init, tol=1e-4, max_iter=300)
    assert ref.n_iter_ > 1, "dataset too easy to test the loop"
    np.testing.assert_allclose(float(res.inertia), ref.inertia_, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(res.labels), ref.labels_)
    assert abs(int(res.n_iter) - ref.n_iter_) <= 1
    np.testing.assert_allclose(np.asarray(res.centroids), ref.cluster_centers_, rtol=1e-4,
                               atol=1e-4 * np.abs(x).max())


def test_kmeans_max_iter_and_tol_zero():
    # max_iter stops the loop (sklearn then re-assigns labels); tol=0 needs strict convergence.
    name, x, k, init = _datasets()[0]
    for max_iter, tol in [(2, 1e-4), (300, 0.0)]:
        ref = KMeans(k, init=init.astype(np.float64), n_init=1, tol=tol, max_iter=max_iter,
                     algorithm="lloyd").fit(x.astype(np.float64))
        res = kmeans(x, k, init=init, tol=tol, max_iter=max_iter)
        assert int(res.n_iter) == ref.n_iter_
        np.testing.assert_array_equal(np.asarray(res.labels), ref.labels_)
        np.testing.assert_allclose(float(res.inertia), ref.inertia_, rtol=1e-4)


def test_kmeanspp_restarts_as_good_as_sklearn():
    x, _ = _blobs(600, 8, 6, std=2.0, seed=3)
    ref = KMeans(6, n_init=10, random_state=0).fit(x.astype(np.float64))
    res = kmeans(x, 6, n_init=10, seed=0)
    assert float(res.inertia) <= ref.inertia_ * (1 + 1e-3)
    c = np.asarray(kmeans_plusplus(x, 6, seed=1))
    assert c.shape == (6, 8) and len({tuple(r) for r in c}) == 6  # distinct data points
    assert all((x == r).all(1).any() for r in c)


def test_empty_cluster_repair():
    name, x, k, init = _datasets()[0]  # same shapes as above: no new compilation
    init = init.copy()
    init[-1] = 1e4  # last centroid far from all data: empty after the first E-step
    res = kmeans(x, k, init=init)
    assert (np.bincount(np.asarray(res.labels), minlength=k) > 0).all()
    ref = KMeans(k, init=init.astype(np.float64), n_init=1, algorithm="lloyd").fit(
        x.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(res.labels), ref.labels_)
    np.testing.assert_allclose(float(res.inertia), ref.inertia_, rtol=1e-4)
    assert abs(int(res.n_iter) - ref.n_iter_) <= 1


def test_kmeans_row_blocks(monkeypatch):
    # Large data sets run the Lloyd step over row blocks (lax.scan); force it on a small one.
    # N = 777 is used by no other test, so the monkeypatched block size is what gets traced.
    km = importlib.import_module("fedrouter_jax.clustering.kmeans")
    monkeypatch.setattr(km, "_ONE_BLOCK_BYTES", 0)
    monkeypatch.setattr(km, "_BLOCK_BYTES", 100 * 4 * 8)  # 100 rows: 8 blocks, last one padded
    assert km._block_rows(777, 8) == 100
    x, _ = _blobs(777, 8, 4, std=2.0, seed=8)
    init = np.concatenate([x[:3], np.full((1, 8), 1e3, np.float32)])  # one empty cluster
    ref = KMeans(4, init=init.astype(np.float64), n_init=1, algorithm="lloyd").fit(
        x.astype(np.float64))
    res = kmeans(x, 4, init=init)
    np.testing.assert_array_equal(np.asarray(res.labels), ref.labels_)
    np.testing.assert_allclose(float(res.inertia), ref.inertia_, rtol=1e-4)
    assert abs(int(res.n_iter) - ref.n_iter_) <= 1
    assert float(kmeans(x, 4, n_init=2).inertia) <= ref.inertia_ * (1 + 1e-3)


def _padded_clients():
    """3 clients of 150 / 200 / 120 samples (padded to 200), k = 3 / 2 / 4, D = 16."""
    sizes, ks = [150, 200, 120], [3, 2, 4]
    x = np.zeros((3, 200, 16), np.float32)
    mask = np.zeros((3, 200), bool)
    truth = []
    for c, (n, k) in enumerate(zip(sizes, ks)):
        xc, yc = _blobs(n, 16, k, std=1.0, seed=10 + c, offset=5.0 * c)
        x[c, :n], mask[c, :n] = xc, True
        x[c, n:] = 1e3  # junk in the padding must not matter
        truth.append(yc)
    return x, mask, np.array(ks), sizes, truth


def test_batched_equals_per_client():
    x, mask, ks, sizes, _ = _padded_clients()
    rng = np.random.default_rng(0)
    init = np.zeros((3, 4, 16), np.float32)
    for c, (n, k) in enumerate(zip(sizes, ks)):
        init[c, :k] = x[c, rng.choice(n, k, replace=False)]
    res = batched_kmeans(x, mask, ks, k_max=4, init=init)
    assert res.centroids.shape == (3, 4, 16) and res.labels.shape == (3, 200)
    np.testing.assert_array_equal(np.asarray(res.centroid_mask), np.arange(4) < ks[:, None])
    for c, (n, k) in enumerate(zip(sizes, ks)):
        _assert_same_client(res, c, n, k, kmeans(x[c, :n], int(k), init=init[c, :k]))
    # k-means++ with restarts: client c seeded with seeds[c] == kmeans(seed=seeds[c]); one
    # client is enough (each per-client reference call compiles for its own N and k)
    seeds = np.array([7, 8, 9])
    res_pp = batched_kmeans(x, mask, ks, k_max=4, seed=seeds, n_init=3)
    _assert_same_client(res_pp, 0, sizes[0], ks[0], kmeans(x[0, :150], 3, seed=7, n_init=3))
    # vmapped groups of clients (a converged client is frozen) give the same result
    res_v = batched_kmeans(x, mask, ks, k_max=4, init=init, client_batch_size=3)
    np.testing.assert_array_equal(np.asarray(res_v.labels), np.asarray(res.labels))
    np.testing.assert_array_equal(np.asarray(res_v.n_iter), np.asarray(res.n_iter))
    np.testing.assert_allclose(np.asarray(res_v.inertia), np.asarray(res.inertia), rtol=1e-6)


def _assert_same_client(res, c, n, k, one):
    lab = np.asarray(res.labels[c])
    np.testing.assert_array_equal(lab[:n], np.asarray(one.labels))
    assert (lab[n:] == -1).all() and lab[:n].max() < k
    np.testing.assert_allclose(float(res.inertia[c]), float(one.inertia), rtol=1e-5)
    assert int(res.n_iter[c]) == int(one.n_iter)
    np.testing.assert_allclose(np.asarray(res.centroids[c, :k]), np.asarray(one.centroids),
                               rtol=1e-5, atol=1e-4)
    assert (np.asarray(res.centroids[c, k:]) == 0).all()


def test_silhouette_matches_sklearn():
    rng = np.random.default_rng(0)
    x, y = _blobs(400, 32, 4, std=3.0, seed=5, offset=50.0)
    single = y.copy()
    single[0] = 9  # a singleton cluster (score 0 for that sample, as sklearn)
    for labels in [y, rng.integers(0, 3, 400), single, np.where(y == 0, 100, -5)]:
        ref = sk_silhouette(x.astype(np.float64), labels)
        assert abs(silhouette_score(x, labels) - ref) < 1e-5
    with pytest.raises(ValueError):
        silhouette_score(x, np.zeros(400, int))


def test_silhouette_multi_block(monkeypatch):
    sil = importlib.import_module("fedrouter_jax.clustering.silhouette")
    monkeypatch.setattr(sil, "_MAX_BLOCK", 64)  # 300 samples -> 5 blocks of 64 (padded)
    x, y = _blobs(300, 8, 3, std=2.0, seed=6)
    assert abs(silhouette_score(x, y) - sk_silhouette(x.astype(np.float64), y)) < 1e-5


def test_batched_silhouette():
    x, mask, ks, sizes, truth = _padded_clients()
    labels = np.full((3, 200), -1)
    for c, n in enumerate(sizes):
        labels[c, :n] = truth[c]
    s = np.asarray(batched_silhouette_score(x, labels, mask, n_labels=4))
    for c, n in enumerate(sizes):
        assert abs(s[c] - sk_silhouette(x[c, :n].astype(np.float64), truth[c])) < 1e-5
    one = np.where(mask, 0, -1)  # a single cluster: undefined -> NaN
    assert np.isnan(np.asarray(batched_silhouette_score(x, one, mask, n_labels=4))).all()


def test_choose_k():
    for k in (2, 3, 4):
        x, _ = _blobs(240, 8, k, std=0.5, seed=20 + k)
        best, scores = choose_k(x, range(2, 7), n_init=2)
        assert best == k and set(scores) == set(range(2, 7))
    # one task: Silhouette alone cannot say k=1; min_silhouette (our option) does
    x1 = np.random.default_rng(0).normal(size=(240, 8)).astype(np.float32)
    assert choose_k(x1, range(2, 7), n_init=2, min_silhouette=0.5)[0] == 1


def test_choose_k_batched():
    x, mask, ks, _, _ = _padded_clients()
    best, scores = choose_k_batched(x, mask, range(2, 6), n_init=2)
    assert scores.shape == (3, 4)
    np.testing.assert_array_equal(best, ks)


def test_clustering_accuracy():
    assert clustering_accuracy([0, 0, 1, 1, 2, 2], [5, 5, 3, 3, 4, 4]) == 1.0
    assert clustering_accuracy([0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]) == pytest.approx(5 / 6)
    # more clusters than classes: the extra cluster's samples count as errors
    assert clustering_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)
    # fewer clusters than classes
    assert clustering_accuracy([0, 1, 2, 2], [0, 0, 1, 1]) == pytest.approx(3 / 4)
    assert clustering_accuracy(["a", "b"], [1, 0]) == 1.0


def test_nearest_centroid():
    c = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    x = np.array([[[1.0, 1.0], [9.0, 1.0]], [[1.0, 8.0], [6.0, 0.0]]], np.float32)
    np.testing.assert_array_equal(np.asarray(nearest_centroid(x, c)), [[0, 1], [2, 1]])
    m = np.array([True, False, True])
    np.testing.assert_array_equal(np.asarray(nearest_centroid(x, c, m)), [[0, 0], [2, 0]])


def test_bench_smoke(capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments", "bench"))
    try:
        bench = importlib.import_module("bench_clustering")
    finally:
        sys.path.pop(0)
    bench.main(["--small", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "kmeans" in out and "silhouette" in out and "clients" in out
