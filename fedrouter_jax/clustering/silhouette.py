"""Jitted Silhouette score equal to ``sklearn.metrics.silhouette_score`` (Euclidean).

For sample i in cluster A: a(i) = mean distance to the other members of A, b(i) = smallest mean
distance to the members of another (non-empty) cluster, s(i) = (b - a) / max(a, b); samples of
singleton clusters get s = 0 (sklearn's convention); the score is the mean of s over samples.

Float32 throughout (no float64): the data are centred first (shrinks ||x||^2, so the distance
trick ``||x||^2 - 2 x.y + ||y||^2`` loses less to cancellation), squared distances are clamped at
0 and the self-distance is set to exactly 0. Samples are split in blocks of <= 4096 rows and a
``lax.scan`` visits the block pairs (I, J >= I), so memory is [4096, 4096] distances, never
[N, N], and the symmetric half is not recomputed. Per-cluster sums of distances are matmuls with
the one-hot labels.

Labels are integers in [0, n_labels); padded samples (mask False) neither count as neighbours
nor enter the mean. The score needs 2 <= #non-empty clusters <= #samples - 1; otherwise sklearn
raises and we return NaN (the batched version cannot raise per client).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["silhouette_samples", "silhouette_score", "batched_silhouette_score"]

_MAX_BLOCK = 4096  # rows per block: <= [4096, 4096] distances (64 MiB); big matmuls run fastest


def _block_rows(n: int) -> int:
    """Rows per block: N split into ceil(N / _MAX_BLOCK) nearly equal blocks (multiple of 8)."""
    nb = max(1, -(-n // _MAX_BLOCK))
    b = -(-n // nb)
    return int(-(-b // 8) * 8) if nb > 1 else int(n)


def _silhouette_core(x, labels, w, *, n_labels, block):
    """One data set. x [N, D], labels [N] int32 in [0, n_labels), w [N] float32 in {0, 1}.

    Distances are symmetric, so only block pairs (I, J >= I) are computed (half the N^2 D
    FLOPs): block (I, J) adds its distances to the per-cluster sums of rows I and, transposed,
    of rows J. -> (s [N] float32 (0 on padded samples), score [] float32 (NaN if undefined))
    """
    n, d = x.shape
    n_valid = jnp.maximum(jnp.sum(w), 1.0)
    mean = (w @ x) / n_valid
    xc = (x - mean) * w[:, None]
    xx = jnp.sum(xc * xc, -1)
    onehot = (labels[:, None] == jnp.arange(n_labels)[None, :]).astype(jnp.float32) * w[:, None]
    counts = jnp.sum(onehot, 0)  # [K]

    pad = (-n) % block
    nb = (n + pad) // block
    xb = jnp.pad(xc, ((0, pad), (0, 0))).reshape(nb, block, d)
    xxb = jnp.pad(xx, (0, pad)).reshape(nb, block)
    ohb = jnp.pad(onehot, ((0, pad), (0, 0))).reshape(nb, block, n_labels)  # padded rows are 0
    bi, bj = np.triu_indices(nb)
    eye = jnp.eye(block, dtype=bool)

    def pair(acc, ij):
        i, j = ij
        xi, xj = xb[i], xb[j]
        d2 = xxb[i][:, None] - 2.0 * (xi @ xj.T) + xxb[j][None, :]  # [B, B]
        dist = jnp.sqrt(jnp.maximum(d2, 0.0))
        dist = jnp.where(eye & (i == j), 0.0, dist)  # self-distance exactly 0
        acc = acc.at[i].add(dist @ ohb[j])
        off = (i != j).astype(dist.dtype)  # the diagonal block is already symmetric
        acc = acc.at[j].add(off * jnp.einsum("ab,ak->bk", dist, ohb[i]))
        return acc, None

    acc0 = jnp.zeros((nb, block, n_labels), jnp.float32)
    acc, _ = jax.lax.scan(pair, acc0, (jnp.asarray(bi, jnp.int32), jnp.asarray(bj, jnp.int32)))
    sums = acc.reshape(-1, n_labels)[:n]  # [N, K] sum of distances to each cluster

    own = jax.nn.one_hot(labels, n_labels, dtype=bool)
    own_count = jnp.sum(jnp.where(own, counts[None, :], 0.0), -1)
    a = jnp.sum(jnp.where(own, sums, 0.0), -1) / jnp.maximum(own_count - 1.0, 1.0)
    other = jnp.where(own | (counts[None, :] == 0), jnp.inf, sums / jnp.maximum(counts, 1.0))
    b = jnp.min(other, -1)
    denom = jnp.maximum(a, b)
    s = jnp.where(denom > 0, (b - a) / jnp.where(denom > 0, denom, 1.0), 0.0)
    s = jnp.where((own_count > 1) & (w > 0), s, 0.0)  # singleton clusters -> 0 (sklearn)
    n_nonempty = jnp.sum(counts > 0)
    defined = (n_nonempty >= 2) & (n_nonempty <= jnp.sum(w) - 1)
    score = jnp.where(defined, jnp.sum(s) / n_valid, jnp.nan)
    return s, score


@partial(jax.jit, static_argnames=("n_labels", "block"))
def _silhouette_jit(x, labels, w, *, n_labels, block):
    return _silhouette_core(x, labels, w, n_labels=n_labels, block=block)


@partial(jax.jit, static_argnames=("n_labels", "block", "client_batch_size"))
def _batched_silhouette_jit(x, labels, w, *, n_labels, block, client_batch_size):
    fn = partial(_silhouette_core, n_labels=n_labels, block=block)
    bs = None if client_batch_size <= 1 else client_batch_size
    return jax.lax.map(lambda a: fn(*a), (x, labels, w), batch_size=bs)


def _prepare(x, labels, sample_mask, n_labels):
    x = jnp.asarray(x, jnp.float32)
    n = x.shape[0]
    w = np.ones(n, bool) if sample_mask is None else np.asarray(sample_mask, bool)
    lab = np.asarray(labels)
    if n_labels is None:
        # Relabel to 0..K-1 on the host (labels may be any integers, as in sklearn).
        uniq, inv = np.unique(lab[w], return_inverse=True)
        dense = np.zeros(n, np.int32)
        dense[w] = inv
        n_labels = max(len(uniq), 1)
    else:
        dense = np.where(w, lab, 0).astype(np.int32)
    return x, jnp.asarray(dense), jnp.asarray(w, jnp.float32), int(n_labels)


def silhouette_samples(x, labels, *, sample_mask=None, n_labels: int | None = None) -> jax.Array:
    """Per-sample silhouette. x: [N, D], labels: [N] ints, sample_mask: [N] bool -> [N] float32.

    n_labels: if given, labels must already lie in [0, n_labels) (skips host-side relabelling).
    """
    x, lab, w, k = _prepare(x, labels, sample_mask, n_labels)
    return _silhouette_jit(x, lab, w, n_labels=k, block=_block_rows(x.shape[0]))[0]


def silhouette_score(x, labels, *, sample_mask=None, n_labels: int | None = None) -> float:
    """Mean silhouette (Euclidean), equal to sklearn's within ~1e-5. x: [N, D], labels: [N].

    Raises ValueError where sklearn does (fewer than 2 or more than N-1 distinct labels).
    """
    x, lab, w, k = _prepare(x, labels, sample_mask, n_labels)
    score = float(_silhouette_jit(x, lab, w, n_labels=k, block=_block_rows(x.shape[0]))[1])
    if np.isnan(score):
        raise ValueError("silhouette is defined for 2 <= n_labels <= n_samples - 1")
    return score


def batched_silhouette_score(
    x, labels, mask=None, *, n_labels: int, client_batch_size: int = 1
) -> jax.Array:
    """Silhouette of every client in one jitted call.

    x: [C, N, D], labels: [C, N] ints in [0, n_labels) (anything on padded samples, e.g. -1),
    mask: [C, N] bool (True = real sample) -> scores [C] float32, NaN where undefined
    (fewer than 2 non-empty clusters, or every sample in its own cluster).
    """
    x = jnp.asarray(x, jnp.float32)
    c, n, _ = x.shape
    mask = jnp.ones((c, n), bool) if mask is None else jnp.asarray(mask, bool)
    labels = jnp.where(mask, jnp.asarray(labels, jnp.int32), 0)
    _, score = _batched_silhouette_jit(
        x,
        labels,
        mask.astype(jnp.float32),
        n_labels=int(n_labels),
        block=_block_rows(n),
        client_batch_size=int(client_batch_size),
    )
    return score
