"""Choice of the number of clusters k by maximum Silhouette (paper Sec. 4.6, Figs. 7-8).

Silhouette is undefined for k = 1, so a data set that is a single task can never pick k = 1 by
Silhouette alone. The paper does not apply Silhouette to its Single scenario (it uses one cluster
there). Our choice, opt-in: ``min_silhouette`` - if the best score is below this threshold (or
no k in the range gives a defined score) we return k = 1. ``min_silhouette=None`` (default)
always returns the arg-max over ``k_range``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .kmeans import batched_kmeans
from .silhouette import batched_silhouette_score

__all__ = ["choose_k", "choose_k_batched"]


def _pick(scores: np.ndarray, ks: np.ndarray, min_silhouette: float | None) -> int:
    """scores [len(ks)] with NaN = undefined; ties go to the smaller k (first maximum)."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    j = int(np.argmax(s))
    if not np.isfinite(s[j]):
        return 1 if min_silhouette is not None else int(ks[0])
    if min_silhouette is not None and s[j] < min_silhouette:
        return 1
    return int(ks[j])


def choose_k(
    x,
    k_range=range(2, 9),
    *,
    seed: int = 0,
    n_init: int | str = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    sample_mask=None,
    min_silhouette: float | None = None,
) -> tuple[int, dict[int, float]]:
    """k in ``k_range`` with the highest Silhouette of the K-Means labels.

    x: [N, D]. -> (best_k, {k: score}); scores are NaN where undefined (k >= #samples).
    best_k = 1 when ``min_silhouette`` is set and the best score is below it.
    """
    ks = np.asarray(list(k_range), np.int64)
    if ks.size == 0 or ks.min() < 2:
        raise ValueError(f"k_range must hold ks >= 2 (Silhouette is undefined for k=1), got {ks}")
    mask = None if sample_mask is None else np.asarray(sample_mask, bool)[None]
    best, scores = choose_k_batched(
        np.asarray(x, np.float32)[None], mask, ks, seed=np.asarray([seed]), n_init=n_init,
        max_iter=max_iter, tol=tol, min_silhouette=min_silhouette,
    )
    return int(best[0]), {int(k): float(v) for k, v in zip(ks, scores[0])}


def choose_k_batched(
    x,
    mask,
    k_range=range(2, 9),
    *,
    seed=0,
    n_init: int | str = 10,
    max_iter: int = 300,
    tol: float = 1e-4,
    min_silhouette: float | None = None,
    client_batch_size: int = 1,
    client_ids=None,
) -> tuple[np.ndarray, np.ndarray]:
    """`choose_k` for every client: two jitted calls per k (batched K-Means, batched Silhouette).

    Both are compiled once for the whole range (k_max = max(k_range), the current k is a traced
    per-client cluster count), so scanning k costs no recompilation.
    x: [C, N, D], mask: [C, N] bool or None; seed: int or [C] ints, client_ids: see `batched_kmeans`.
    -> (best_k [C] int, scores [C, len(k_range)] float, NaN where undefined, e.g. a client with
    <= k valid samples).
    """
    x = jnp.asarray(x, jnp.float32)
    c, n, _ = x.shape
    mask_np = np.ones((c, n), bool) if mask is None else np.asarray(mask, bool)
    n_valid = mask_np.sum(1)
    ks = np.asarray(list(k_range), np.int64)
    if ks.size == 0 or ks.min() < 2:
        raise ValueError(f"k_range must hold ks >= 2 (Silhouette is undefined for k=1), got {ks}")
    k_max = int(ks.max())
    scores = np.full((c, ks.size), np.nan, np.float64)
    for j, k in enumerate(ks):
        k = int(k)
        ok = n_valid > k
        if not ok.any():
            continue
        k_c = np.where(ok, k, np.clip(n_valid, 1, k))  # too-small clients: legal, score NaN
        res = batched_kmeans(
            x, mask_np, k_c, k_max=k_max, n_init=n_init, seed=seed, max_iter=max_iter, tol=tol,
            client_batch_size=client_batch_size, client_ids=client_ids,
        )
        s = np.asarray(
            batched_silhouette_score(
                x, res.labels, mask_np, n_labels=k_max, client_batch_size=client_batch_size
            )
        )
        scores[:, j] = np.where(ok, s, np.nan)
    best = np.array([_pick(scores[i], ks, min_silhouette) for i in range(c)], np.int64)
    return best, scores
