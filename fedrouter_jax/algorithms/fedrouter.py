"""FedRouter (Talasso et al.): task-centric adapters from local + global K-Means, and a router.

Paper sections 3.1-3.3, with the choices the paper leaves open taken from the authors' code
(GitHub GabrielTalasso/FedRouter):

* Embeddings: mean-pooled last hidden state of the frozen base over the raw task input
  (computed by the runner, see `embeddings.py`); no L2 normalisation.
* Local clustering, once before round 1: K-Means per client, all clients in one batched call.
  `clustering.n_local` fixed (default 4, the authors' code fixes it per scenario) or "auto"
  (Silhouette over [k_min, k_max], as the paper's Fig. 8; clients below `min_silhouette` get 1).
* Global clustering, once: K-Means over all clients' centroids, unweighted (as the code),
  `n_global` fixed or "auto" by Silhouette (Fig. 7).
* One adapter per global cluster lives on the server; a client's local adapter for cluster l
  is the global adapter its centroid was matched to, so "the server averages the adapters of
  each global cluster" is a sample-weighted segment mean over the slots trained that round.
* Schedule (`clustering.schedule`):
    - "global" (DEFAULT, the paper): the server walks each client round-robin through the
      global clusters its centroids belong to (client c starts at offset c, so in a round the
      clients spread over the clusters instead of all training the same one — the authors'
      `round % n_local` has that effect too, since local indices are arbitrary per client)
      and sends the global centroid; the client trains the adapter of its *nearest local
      centroid* (Euclidean) to it.
    - "local_index" (the authors' code): the client trains local cluster `round % n_local`.
  The paper is specific here, so it is the default; both give the same schedule whenever
  every local centroid is the nearest one to its own global centroid.
* FedRouter* (`method: fedrouter_star`): every client trains all its adapters every round.
* Routing: "local" mode = nearest of the client's own centroids, then that centroid's global
  adapter (the code's behaviour); "global" mode = nearest of all global centroids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.algorithms.base import Context, EvalPlan, RoundPlan, register
from fedrouter_jax.clustering import batched_kmeans, choose_k, choose_k_batched, kmeans, nearest_centroid
from fedrouter_jax.lora import LoraStack
from fedrouter_jax.tree_util import segment_weighted_mean, take_rows


def pad_clients(arrays) -> tuple[np.ndarray, np.ndarray]:
    """Per-client [N_c, D] arrays -> x [C, N, D] zero-padded and mask [C, N]."""
    n = max(a.shape[0] for a in arrays)
    x = np.zeros((len(arrays), n, arrays[0].shape[1]), np.float32)
    mask = np.zeros((len(arrays), n), bool)
    for c, a in enumerate(arrays):
        x[c, : len(a)] = a
        mask[c, : len(a)] = True
    return x, mask


def local_clustering(ctx: Context) -> dict:
    """K-Means of every client's train embeddings in one batched call.

    -> centroids [C, k_max, D], centroid_mask [C, k_max], labels [C, N] (-1 pad), n_local [C],
    silhouette [C, n_k] (NaN when k was fixed).
    """
    cc = ctx.config.clustering
    x, mask = pad_clients(ctx.train_emb)
    ks = np.arange(cc.k_min, cc.k_max + 1)
    if cc.n_local == "auto":
        n_local, scores = choose_k_batched(
            x, mask, ks, seed=ctx.config.seed, n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol,
            min_silhouette=cc.min_silhouette,
        )
    else:
        n_local = np.full((ctx.n_clients,), int(cc.n_local))
        scores = np.full((ctx.n_clients, ks.size), np.nan)
    too_few = np.flatnonzero(mask.sum(1) < n_local)
    if too_few.size:
        c = int(too_few[0])
        raise ValueError(
            f"clustering.n_local={cc.n_local}: client {c} has only {int(mask[c].sum())} training samples"
        )
    res = batched_kmeans(
        x, mask, n_local, k_max=int(n_local.max()), n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol,
        seed=ctx.config.seed,
    )
    return {
        "centroids": np.asarray(res.centroids), "centroid_mask": np.asarray(res.centroid_mask),
        "labels": np.asarray(res.labels), "n_local": np.asarray(n_local, np.int32),
        "silhouette": scores.astype(np.float32),
    }


def global_clustering(ctx: Context, centroids: np.ndarray, centroid_mask: np.ndarray) -> dict:
    """K-Means over all clients' local centroids (unweighted).

    centroids [C, k_max, D], centroid_mask [C, k_max] -> global_centroids [G, D],
    local_to_global [C, k_max] (-1 where no centroid), silhouette [n_k].
    """
    cc = ctx.config.clustering
    flat = centroids[centroid_mask]
    ks = np.arange(cc.k_min, cc.k_max + 1)
    scores = np.full((ks.size,), np.nan, np.float32)
    if cc.n_global == "auto":
        ks_ok = ks[ks < len(flat)]
        if ks_ok.size == 0:
            raise ValueError(f"clustering.n_global=auto: only {len(flat)} local centroids to cluster")
        n_global, sc = choose_k(flat, ks_ok, seed=ctx.config.seed, n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol)
        scores[: ks_ok.size] = [sc[int(k)] for k in ks_ok]
    else:
        n_global = int(cc.n_global)
    if n_global > len(flat):
        raise ValueError(
            f"clustering.n_global={n_global} exceeds the {len(flat)} local centroids of all clients"
        )
    res = kmeans(flat, n_global, n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol, seed=ctx.config.seed)
    local_to_global = np.full(centroid_mask.shape, -1, np.int32)
    local_to_global[centroid_mask] = np.asarray(res.labels)
    return {"global_centroids": np.asarray(res.centroids), "local_to_global": local_to_global, "silhouette": scores}


@register("fedrouter")
class FedRouter:
    """One adapter per task cluster; each client trains one of its clusters per round."""

    all_adapters_each_round = False

    def init(self, ctx: Context, key: jax.Array) -> dict:
        loc = local_clustering(ctx)
        glob = global_clustering(ctx, loc["centroids"], loc["centroid_mask"])
        g = glob["global_centroids"].shape[0]
        return {
            "adapters": ctx.new_adapters(key, g),
            "local_centroids": loc["centroids"], "local_mask": loc["centroid_mask"],
            "train_labels": loc["labels"], "n_local": loc["n_local"],
            "global_centroids": glob["global_centroids"], "local_to_global": glob["local_to_global"],
            "silhouette_local": loc["silhouette"], "silhouette_global": glob["silhouette"],
        }

    def _slots(self, ctx: Context, state: dict, round_idx: int) -> list[tuple[int, int, int]]:
        """(client, local cluster, global cluster) trained this round."""
        l2g, cmask = np.asarray(state["local_to_global"]), np.asarray(state["local_mask"])
        slots = []
        for c in range(ctx.n_clients):
            locals_c = np.flatnonzero(cmask[c])
            if self.all_adapters_each_round:
                slots += [(c, int(l), int(l2g[c, l])) for l in locals_c]
            elif ctx.config.clustering.schedule == "local_index":
                l = int(locals_c[round_idx % locals_c.size])
                slots.append((c, l, int(l2g[c, l])))
            else:  # the paper: server picks a global cluster, client matches its nearest local centroid
                globals_c = np.unique(l2g[c, locals_c])
                g = int(globals_c[(round_idx + c) % globals_c.size])
                l = int(nearest_centroid(state["global_centroids"][g], state["local_centroids"][c], cmask[c]))
                slots.append((c, l, g))
        return slots

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan:
        slots = self._slots(ctx, state, round_idx)
        labels = np.asarray(state["train_labels"])
        clients = np.array([s[0] for s in slots], np.int32)
        globals_ = np.array([s[2] for s in slots], np.int32)
        pools = [np.flatnonzero(labels[c] == l) for c, l, _ in slots]
        start = ctx.stack(take_rows(state["adapters"], jnp.asarray(globals_)))
        return RoundPlan(
            slot_client=clients, pools=pools, start=start,
            weights=np.array([p.size for p in pools], np.float32),
            log={"schedule": [[int(c), int(l), int(g)] for c, l, g in slots]},
        )

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict:
        segments = jnp.asarray([g for _, _, g in plan.log["schedule"]], jnp.int32)
        g = np.asarray(state["global_centroids"]).shape[0]
        adapters = segment_weighted_mean(trained.params, segments, jnp.asarray(plan.weights), state["adapters"],
                                         num_segments=g)
        return {**state, "adapters": adapters}

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan:
        ids, local_labels = [], []
        for c in range(ctx.n_clients):
            emb = ctx.test_emb[c]
            l = np.asarray(nearest_centroid(emb, state["local_centroids"][c], state["local_mask"][c]))
            local_labels.append(l)
            if mode == "global":
                ids.append(np.asarray(nearest_centroid(emb, state["global_centroids"])))
            else:
                ids.append(np.asarray(state["local_to_global"])[c][l])
        return EvalPlan(adapters=ctx.stack(state["adapters"]), adapter_ids=ids,
                        log={"test_local_labels": local_labels})


@register("fedrouter_star")
class FedRouterStar(FedRouter):
    """FedRouter*: every client trains all of its local adapters every round (adapter-level budget)."""

    all_adapters_each_round = True
