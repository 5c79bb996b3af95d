"""Jitted K-Means (Lloyd) with scikit-learn semantics, for one data set or for all clients at once.

What matches `sklearn.cluster.KMeans(algorithm="lloyd")` (scikit-learn 1.9):

* k-means++ seeding is sklearn's *greedy* k-means++: the first centroid is drawn uniformly
  (weighted by the sample mask), every further one is the best of ``2 + int(log k)`` candidates
  drawn with probability proportional to the squared distance to the closest chosen centroid
  (best = lowest resulting potential). The random stream is JAX's, so seeds do not reproduce
  sklearn's centroids.
* The data are centred (the masked mean is subtracted) before clustering and the mean is added
  back to the centroids, as sklearn does (``copy_x=True``); it keeps the distance trick below
  accurate when the data sit far from the origin.
* Assignment uses sklearn's Euclidean trick: ``argmin_k ||c_k||^2 - 2 x.c_k`` (the ``||x||^2``
  term does not change the argmin); when a squared distance is needed it is
  ``||x||^2 - 2 x.c + ||c||^2`` clamped at 0. Float32 throughout; per iteration two matmuls
  (x.c^T for the E-step, onehot^T.x for the M-step), run per row block of ~4 MiB on large data
  (``lax.scan``) so each block is read from memory once per iteration, as sklearn's chunks.
* ``tol`` is relative: it is multiplied by the mean of the per-feature variances of X (over the
  valid samples). One Lloyd iteration assigns labels with the current centroids and recomputes
  the centroids; the loop stops (``lax.while_loop``, so it stops early) when the labels did not
  change since the previous iteration ("strict convergence") or when the squared Frobenius norm
  of the centroid shift is <= the scaled tol, or after ``max_iter`` iterations. Without strict
  convergence the labels are recomputed with the final centroids. ``n_iter`` counts iterations
  exactly as sklearn's ``n_iter_``. ``inertia`` = sum of squared distances of the valid samples
  to their assigned centroid, computed directly as ``sum((x - c[label])**2)`` (as sklearn's
  ``_inertia_dense``), not with the trick.
* Empty clusters are repaired as sklearn's ``_relocate_empty_clusters_dense``: the e-th empty
  cluster (in index order) is re-seeded at the e-th farthest valid sample from its assigned
  centroid (distances to the centroids of the E-step); that sample is moved out of its old
  cluster's sum. If every sample sits exactly on its centroid nothing is relocated and the
  still-empty cluster is put at the centroid of the largest cluster (sklearn's
  ``_average_centers``).

Batching over clients: `batched_kmeans` runs every client in one jitted call. Clients are visited
with ``lax.map`` (sequentially by default: each client's while_loop stops at its own convergence
and its [N, D] block stays in cache across iterations, which is what decides speed on a CPU);
``client_batch_size > 1`` vmaps groups of clients instead (the vmapped while_loop runs until the
whole group converged, a converged client's state is frozen by the batching rule's select, so the
results are identical either way). Padded samples (``mask == False``) get weight 0: they never
move a centroid, never enter the tol scale, the inertia, the k-means++ draws or the empty-cluster
repair, and get label -1. Per-client ``n_clusters`` (<= k_max, traced: no recompilation per k):
centroids with index >= k_c are masked (``centroid_mask == False``), are never assigned and stay
at 0. ``tol`` and ``max_iter`` are traced too; ``k_max`` and ``n_init`` are static.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "KMeansResult",
    "BatchedKMeansResult",
    "kmeans",
    "batched_kmeans",
    "kmeans_plusplus",
    "nearest_centroid",
    "pairwise_sq_distances",
]


class KMeansResult(NamedTuple):
    """Result of `kmeans` on one data set."""

    centroids: jax.Array  # [K, D] float32
    labels: jax.Array  # [N] int32 (-1 on masked samples)
    inertia: jax.Array  # [] float32
    n_iter: jax.Array  # [] int32 (Lloyd iterations of the kept run)


class BatchedKMeansResult(NamedTuple):
    """Result of `batched_kmeans` on C clients padded to N samples and k_max clusters."""

    centroids: jax.Array  # [C, k_max, D] float32 (0 where centroid_mask is False)
    centroid_mask: jax.Array  # [C, k_max] bool, True for the k_c clusters of client c
    labels: jax.Array  # [C, N] int32, -1 on padded samples
    inertia: jax.Array  # [C] float32
    n_iter: jax.Array  # [C] int32


# ----------------------------------------------------------------------------- distances


def pairwise_sq_distances(x: jax.Array, c: jax.Array) -> jax.Array:
    """Squared Euclidean distances ``||x||^2 - 2 x.c + ||c||^2`` clamped at 0.

    x: [..., N, D], c: [..., K, D] -> [..., N, K] float32. The clamp removes the small negative
    values that cancellation produces for nearly equal vectors (sklearn does the same).
    """
    xx = jnp.sum(x * x, axis=-1)[..., :, None]
    cc = jnp.sum(c * c, axis=-1)[..., None, :]
    d = xx - 2.0 * jnp.einsum("...nd,...kd->...nk", x, c) + cc
    return jnp.maximum(d, 0.0)


@jax.jit
def nearest_centroid(
    x: jax.Array, centroids: jax.Array, centroid_mask: jax.Array | None = None
) -> jax.Array:
    """Index of the nearest centroid (Euclidean) for every vector.

    x: [..., D], centroids: [K, D], centroid_mask: [K] bool (False = never chosen) -> [...] int32.
    Used to match the server's global centroids to a client's local ones and by the routers.
    Ties go to the lowest index.
    """
    x = jnp.asarray(x, jnp.float32)
    centroids = jnp.asarray(centroids, jnp.float32)
    lead = x.shape[:-1]
    # Distances are translation invariant: shifting by the centroids' mean keeps the float32
    # trick accurate for embeddings far from the origin.
    shift = jnp.mean(centroids, axis=0)
    xf = x.reshape(-1, x.shape[-1]) - shift
    c = centroids - shift
    # ||x||^2 is constant per row, so the argmin only needs ||c||^2 - 2 x.c (sklearn's trick).
    s = jnp.sum(c * c, -1)[None, :] - 2.0 * xf @ c.T
    if centroid_mask is not None:
        s = jnp.where(jnp.asarray(centroid_mask, bool)[None, :], s, jnp.inf)
    return jnp.argmin(s, axis=-1).astype(jnp.int32).reshape(lead)


# ----------------------------------------------------------------------------- single-client core
# Everything below works on one client whose centred data are stored in row blocks:
# xb [nb, B, D], xxb [nb, B] (squared norms), wb [nb, B] float32 in {0, 1} (0 = padding),
# cmask [K] bool (active centroids). Small data sets are one block (nb = 1). Large ones are cut
# in blocks of ~4 MiB so both matmuls of a Lloyd step (x.c^T and onehot^T.x) read each block
# while it is in cache: one pass over X from memory per iteration, like sklearn's chunked loop.

_BLOCK_BYTES = 1 << 22  # rows per block = 4 MiB / (4 D)
_ONE_BLOCK_BYTES = 1 << 24  # data sets up to 16 MiB stay one block (they fit in the L3 cache)


def _block_rows(n: int, d: int) -> int:
    if n * d * 4 <= _ONE_BLOCK_BYTES:
        return n
    return int(max(64, min(n, _BLOCK_BYTES // (4 * d))))


def _assign(x, c, cmask):
    """E-step on x [B, D]. -> labels [B] int32, ||c||^2 - 2 x.c of the chosen centroid [B]."""
    s = jnp.sum(c * c, -1)[None, :] - 2.0 * (x @ c.T)  # [B, K]
    s = jnp.where(cmask[None, :], s, jnp.inf)
    labels = jnp.argmin(s, axis=-1).astype(jnp.int32)
    return labels, jnp.min(s, axis=-1)


def _lloyd_step(xb, xxb, wb, c, cmask):
    """One sklearn Lloyd iteration: E-step with c, M-step, empty-cluster repair.

    -> (new centroids [K, D], labels [nb, B], squared Frobenius shift [])
    """
    k = c.shape[0]

    def block(carry, blk):
        sums, counts = carry
        x, w = blk
        labels, smin = _assign(x, c, cmask)
        onehot = (labels[:, None] == jnp.arange(k)[None, :]).astype(x.dtype) * w[:, None]
        # one matmul instead of a scatter-add (scatters are slow on CPU)
        return (sums + onehot.T @ x, counts + jnp.sum(onehot, 0)), (labels, smin)

    zero = (jnp.zeros_like(c), jnp.zeros((k,), c.dtype))
    if xb.shape[0] == 1:  # no scan for a single block
        (sums, counts), (labels, smin) = block(zero, (xb[0], wb[0]))
        labels, smin = labels[None], smin[None]
    else:
        (sums, counts), (labels, smin) = jax.lax.scan(block, zero, (xb, wb))

    # Empty-cluster repair (sklearn's _relocate_empty_clusters_dense, vectorised): the e-th empty
    # cluster takes the e-th farthest sample from its own centroid. Behind a cond: it is rare and
    # its top_k costs as much as the rest of the step on small clients.
    def relocate_empty(sums, counts):
        x, lab = xb.reshape(-1, xb.shape[-1]), labels.reshape(-1)
        empty = (counts == 0) & cmask
        dist = jnp.where(wb > 0, jnp.maximum(xxb + smin, 0.0), -jnp.inf).reshape(-1)
        top_d, top_i = jax.lax.top_k(dist, k)  # descending
        rank = jnp.clip(jnp.cumsum(empty) - 1, 0, k - 1)
        far = top_i[rank]  # [K] sample index for each (empty) cluster
        relocate = empty & (top_d[rank] > -jnp.inf) & (top_d[0] > 0)
        xf = x[far] * relocate[:, None].astype(x.dtype)  # [K, D]
        old = (lab[far][:, None] == jnp.arange(k)[None, :]).astype(x.dtype)  # [K new, K old]
        old = old * relocate[:, None].astype(x.dtype)
        sums = sums - old.T @ xf
        counts = counts - jnp.sum(old, axis=0)
        sums = jnp.where(relocate[:, None], xf, sums)
        counts = jnp.where(relocate, 1.0, counts)
        return sums, counts

    any_empty = jnp.any((counts == 0) & cmask)
    sums, counts = jax.lax.cond(any_empty, relocate_empty, lambda s, n: (s, n), sums, counts)

    # _average_centers: a still-empty active cluster goes to the largest cluster's centroid.
    biggest = jnp.argmax(jnp.where(cmask, counts, -1.0))
    means = sums / jnp.maximum(counts, 1.0)[:, None]
    new_c = jnp.where((counts > 0)[:, None], means, means[biggest][None, :])
    new_c = jnp.where(cmask[:, None], new_c, c)  # inactive centroids never move
    shift = jnp.sum(jnp.where(cmask[:, None], (new_c - c) ** 2, 0.0))
    return new_c, labels, shift


def _lloyd(xb, xxb, wb, c0, cmask, tol_scaled, max_iter):
    """Lloyd iterations from c0 until sklearn's convergence rule.

    -> (centroids [K, D], labels [nb, B], inertia [], n_iter [])
    """
    invalid = wb == 0

    def cond(state):
        i, _, _, done, _ = state
        return (i < max_iter) & jnp.logical_not(done)

    def body(state):
        i, c, labels_old, _, _ = state
        new_c, labels, shift = _lloyd_step(xb, xxb, wb, c, cmask)
        strict = jnp.all((labels == labels_old) | invalid)
        done = strict | (shift <= tol_scaled)
        return i + 1, new_c, labels, done, strict

    init = (jnp.int32(0), c0, jnp.full(wb.shape, -1, jnp.int32), jnp.bool_(False), jnp.bool_(False))
    n_iter, c, labels, _, strict = jax.lax.while_loop(cond, body, init)

    # Without strict convergence sklearn reruns the E-step so labels match the final centroids.
    # Same pass: inertia computed directly, sum w * ||x - c[label]||^2 (sklearn's _inertia_dense).
    def final(x, w, lab_loop):
        lab = jnp.where(strict, lab_loop, _assign(x, c, cmask)[0])
        diff = x - c[lab]
        return lab, jnp.sum(jnp.sum(diff * diff, -1) * w)

    if xb.shape[0] == 1:
        lab, inertia = final(xb[0], wb[0], labels[0])
        return c, lab[None], inertia, n_iter
    labels, inertias = jax.lax.map(lambda a: final(*a), (xb, wb, labels))
    return c, labels, jnp.sum(inertias), n_iter


def _kmeanspp(key, x, xx, w, k_active, k_max):
    """sklearn's greedy k-means++ on centred x [N, D]. -> centroids [k_max, D] (0 beyond k_active).

    k_active may be traced (per-client k): the loop runs k_active - 1 steps and draws
    ``2 + int(log k_max)`` candidates of which the first ``2 + int(log k_active)`` compete,
    exactly sklearn's number of local trials for k_active.
    """
    n, d = x.shape
    n_draw = _n_local_trials(k_max)
    n_trials = 2 + jnp.floor(jnp.log(k_active.astype(jnp.float32)) + 1e-6).astype(jnp.int32)
    trial_ok = jnp.arange(n_draw) < n_trials
    key, sub = jax.random.split(key)
    logits = jnp.where(w > 0, 0.0, -jnp.inf)
    first = jax.random.categorical(sub, logits)
    centers = jnp.zeros((k_max, d), x.dtype).at[0].set(x[first])
    closest = jnp.maximum(xx + xx[first] - 2.0 * (x @ x[first]), 0.0) * w  # [N]
    pot = jnp.sum(closest)

    def body(ci, carry):
        centers, closest, pot, key = carry
        key, sub = jax.random.split(key)
        r = jax.random.uniform(sub, (n_draw,), x.dtype) * pot
        cand = jnp.searchsorted(jnp.cumsum(closest), r, method="compare_all")  # carries w
        cand = jnp.clip(cand, 0, n - 1)
        xc = x[cand]  # [L, D]
        dc = jnp.maximum(xx[cand][:, None] + xx[None, :] - 2.0 * (xc @ x.T), 0.0)  # [L, N]
        dc = jnp.minimum(closest[None, :], dc * w[None, :])
        pots = jnp.where(trial_ok, jnp.sum(dc, axis=-1), jnp.inf)
        b = jnp.argmin(pots)
        centers = centers.at[ci].set(xc[b])
        return centers, dc[b], pots[b], key

    centers, *_ = jax.lax.fori_loop(1, k_active, body, (centers, closest, pot, key))
    return centers


def _n_local_trials(k: int) -> int:
    return 2 + int(math.log(k))


def _client_kmeans(x, w, k_active, init, key, *, k_max, max_iter, tol, n_init, use_init):
    """Full K-Means for one client. x [N, D] raw, w [N] float32, init [k_max, D] (if use_init).

    -> (centroids [k_max, D] un-centred, labels [N] (-1 where w == 0), inertia [], n_iter [])
    """
    n, d = x.shape
    n_valid = jnp.maximum(jnp.sum(w), 1.0)
    mean = (w @ x) / n_valid  # [D]
    rows = _block_rows(n, d)
    pad = (-n) % rows
    # Centred copy (padded rows exactly 0), cut in row blocks [nb, B, D].
    xb = jnp.pad((x - mean) * w[:, None], ((0, pad), (0, 0))).reshape(-1, rows, d)
    wb = jnp.pad(w, (0, pad)).reshape(-1, rows)
    xxb = jnp.sum(xb * xb, axis=-1)
    # sklearn: tol * mean(np.var(X, axis=0)); xb is centred so the variance is mean(x^2).
    tol_scaled = jnp.sum(xxb) / n_valid / d * tol
    cmask = jnp.arange(k_max) < k_active

    if use_init:
        c0 = jnp.where(cmask[:, None], init - mean, 0.0)
        c, labels, inertia, n_iter = _lloyd(xb, xxb, wb, c0, cmask, tol_scaled, max_iter)
    else:
        xf, xxf, wf = xb.reshape(-1, d), xxb.reshape(-1), wb.reshape(-1)

        def one_run(key):
            c0 = _kmeanspp(key, xf, xxf, wf, k_active, k_max)
            return _lloyd(xb, xxb, wb, c0, cmask, tol_scaled, max_iter)

        keys = jax.random.split(key, n_init)
        cs, labs, inertias, iters = jax.lax.map(one_run, keys)  # sequential restarts
        best = jnp.argmin(inertias)  # first minimum, like sklearn's strict "<" update
        c, labels, inertia, n_iter = cs[best], labs[best], inertias[best], iters[best]

    c = jnp.where(cmask[:, None], c + mean, 0.0)
    labels = jnp.where(w > 0, labels.reshape(-1)[:n], -1)
    return c, labels, inertia, n_iter


@partial(jax.jit, static_argnames=("k_max", "n_init", "use_init", "client_batch_size"))
def _batched_kmeans_jit(
    x, w, k_active, init, keys, max_iter, tol, *, k_max, n_init, use_init, client_batch_size
):
    # tol and max_iter are traced: changing them does not recompile.
    fn = partial(
        _client_kmeans,
        k_max=k_max,
        max_iter=max_iter,
        tol=tol,
        n_init=n_init,
        use_init=use_init,
    )
    bs = None if client_batch_size <= 1 else client_batch_size
    return jax.lax.map(lambda a: fn(*a), (x, w, k_active, init, keys), batch_size=bs)


# ----------------------------------------------------------------------------- public API


def _resolve_n_init(n_init) -> int:
    # "auto" follows sklearn >= 1.4: one k-means++ run. Our default stays 10 (robustness on the
    # small local data sets of FedRouter clients is worth the restarts).
    if n_init == "auto":
        return 1
    n_init = int(n_init)
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1 or 'auto', got {n_init}")
    return n_init


def kmeans(
    x,
    n_clusters: int,
    *,
    init=None,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_init: int | str = 10,
    seed: int = 0,
    sample_mask=None,
) -> KMeansResult:
    """K-Means (Lloyd) of one data set with scikit-learn's semantics (see the module docstring).

    x: [N, D] (numpy or jax; cast to float32). init: optional [n_clusters, D]: Lloyd runs from
    exactly these centroids, once (n_init is ignored, as sklearn with an array init). Otherwise
    greedy k-means++ from ``key(seed)``, ``n_init`` restarts (int, or "auto" = 1 as sklearn),
    lowest inertia kept.
    sample_mask: optional [N] bool, False = padding (ignored everywhere, label -1).
    -> KMeansResult(centroids [K, D], labels [N], inertia [], n_iter []).
    """
    x = x if isinstance(x, jax.Array) and x.dtype == jnp.float32 else np.asarray(x, np.float32)
    n, d = x.shape
    w = np.ones((n,), np.float32) if sample_mask is None else np.asarray(sample_mask, np.float32)
    if not 1 <= n_clusters <= max(int(w.sum()), 1):
        raise ValueError(f"n_clusters={n_clusters} must be in [1, #valid samples={int(w.sum())}]")
    use_init = init is not None
    if use_init:
        init = jnp.asarray(init, jnp.float32)
        if init.shape != (n_clusters, d):
            raise ValueError(f"init has shape {init.shape}, expected {(n_clusters, d)}")
    else:
        init = jnp.zeros((1, 1), jnp.float32)  # unused placeholder
    # One client, no lax.map around it: a large x is not copied into a loop body.
    c, labels, inertia, n_iter = _kmeans_jit(
        x,
        w,
        jnp.int32(n_clusters),
        init,
        jax.random.key(seed),
        jnp.int32(max_iter),
        jnp.float32(tol),
        k_max=int(n_clusters),
        n_init=1 if use_init else _resolve_n_init(n_init),
        use_init=use_init,
    )
    return KMeansResult(c, labels, inertia, n_iter)


@partial(jax.jit, static_argnames=("k_max", "n_init", "use_init"))
def _kmeans_jit(x, w, k_active, init, key, max_iter, tol, *, k_max, n_init, use_init):
    return _client_kmeans(
        x, w, k_active, init, key,
        k_max=k_max, max_iter=max_iter, tol=tol, n_init=n_init, use_init=use_init,
    )


def batched_kmeans(
    x,
    mask,
    n_clusters,
    *,
    k_max: int | None = None,
    init=None,
    max_iter: int = 300,
    tol: float = 1e-4,
    n_init: int | str = 10,
    seed=0,
    client_batch_size: int = 1,
    client_ids=None,
) -> BatchedKMeansResult:
    """K-Means of every client in one jitted call; each client equals its own `kmeans` call.

    x: [C, N, D] padded client data; mask: [C, N] bool (True = real sample) or None;
    n_clusters: int or [C] ints (per-client k_c <= k_max); k_max: static padded cluster count
    (default max(n_clusters)); init: optional [C, k_max, D] initial centroids (rows >= k_c ignored);
    seed: k-means++ seed: an int (row c uses ``fold_in(key(seed), client_ids[c])``, client_ids
    default ``arange(C)``, so a client clustered alone with its id gets the same result) or [C]
    ints (row c uses ``key(seed[c])``, as `kmeans(..., seed=seed[c])` does); client_batch_size: clients per
    vmapped group inside ``lax.map`` (1 = strictly sequential, usually fastest on CPU).
    -> BatchedKMeansResult(centroids [C, k_max, D], centroid_mask [C, k_max], labels [C, N],
    inertia [C], n_iter [C]).
    """
    x = jnp.asarray(x, jnp.float32)
    c_num, n, d = x.shape
    mask = jnp.ones((c_num, n), bool) if mask is None else jnp.asarray(mask, bool)
    k_arr = np.broadcast_to(np.asarray(n_clusters, np.int32), (c_num,))
    if k_max is None:
        k_max = int(k_arr.max())
    if int(k_arr.min()) < 1 or int(k_arr.max()) > k_max:
        raise ValueError(f"n_clusters must be in [1, k_max={k_max}], got {k_arr}")
    if not isinstance(mask, jax.core.Tracer):
        n_valid = np.asarray(mask).sum(axis=1)
        if np.any((n_valid < k_arr) & (n_valid > 0)):  # an empty client just gets labels -1
            raise ValueError(f"a client has fewer valid samples {n_valid} than clusters {k_arr}")
    use_init = init is not None
    if use_init:
        init = jnp.asarray(init, jnp.float32)
        if init.shape != (c_num, k_max, d):
            raise ValueError(f"init has shape {init.shape}, expected {(c_num, k_max, d)}")
        n_init_r = 1
    else:
        init = jnp.zeros((c_num, 1, 1), jnp.float32)  # unused placeholder
        n_init_r = _resolve_n_init(n_init)
    if np.ndim(seed) == 0:
        ids = jnp.arange(c_num) if client_ids is None else jnp.asarray(client_ids, jnp.int32).reshape(c_num)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(ids)
    else:
        keys = jax.vmap(jax.random.key)(jnp.asarray(seed, jnp.int32).reshape(c_num))
    c, labels, inertia, n_iter = _batched_kmeans_jit(
        x,
        mask.astype(jnp.float32),
        jnp.asarray(k_arr),
        init,
        keys,
        jnp.int32(max_iter),
        jnp.float32(tol),
        k_max=int(k_max),
        n_init=n_init_r,
        use_init=use_init,
        client_batch_size=int(client_batch_size),
    )
    cmask = jnp.arange(k_max)[None, :] < jnp.asarray(k_arr)[:, None]
    return BatchedKMeansResult(c, cmask, labels, inertia, n_iter)


def kmeans_plusplus(x, n_clusters: int, *, seed: int = 0, sample_mask=None) -> jax.Array:
    """Greedy k-means++ centroids (sklearn's variant, 2 + log k local trials).

    x: [N, D], sample_mask: [N] bool or None -> [K, D] (K distinct data points). Not centred.
    """
    x = jnp.asarray(x, jnp.float32)
    w = (
        jnp.ones((x.shape[0],), jnp.float32)
        if sample_mask is None
        else jnp.asarray(sample_mask, jnp.float32)
    )
    return _kmeanspp_jit(jax.random.key(seed), x, w, k=int(n_clusters))


@partial(jax.jit, static_argnames=("k",))
def _kmeanspp_jit(key, x, w, *, k):
    xx = jnp.sum(x * x, -1)
    return _kmeanspp(key, x, xx, w, jnp.int32(k), k)
