"""FedRouter (Talasso et al.): task-centric adapters from local + global K-Means, and a router.

Paper sections 3.1-3.3, with the choices the paper leaves open taken from the authors' code
(GitHub GabrielTalasso/FedRouter):

* Embeddings: mean-pooled last hidden state of the frozen base over the raw task input
  (`embeddings.py`); no L2 normalisation. Each client embeds its own data.
* Local clustering (`client_setup`, once before round 1): each client runs K-Means on its own
  train embeddings (the simulator: all clients in one batched call) and sends its centroids.
  `clustering.n_local` fixed (default 4, the authors' code fixes it per scenario) or "auto"
  (Silhouette over [k_min, k_max], as the paper's Fig. 8; clients below `min_silhouette` get 1).
* Global clustering (`server_setup`, once): K-Means over all clients' centroids, unweighted (as
  the code), `n_global` fixed or "auto" by Silhouette (Fig. 7).
* One adapter per global cluster lives on the server; a client's local adapter for cluster l
  is the global adapter its centroid was matched to, so "the server averages the adapters of
  each global cluster" is a sample-weighted segment mean over the slots that arrived.
* Schedule (`clustering.schedule`), per client over the rounds it takes part in (t_c):
    - "global" (DEFAULT, the paper): the server walks client c round-robin through the global
      clusters its centroids belong to (starting at offset c, so in a round the clients spread
      over the clusters) and sends that global centroid and adapter; the client trains on the
      samples of its *nearest local centroid* (Euclidean) to it.
    - "local_index" (the authors' code): the client trains local cluster `t_c % n_local`.
  Both give the same schedule whenever every local centroid is the nearest one to its own
  global centroid.
* FedRouter* (`method: fedrouter_star`): every client trains all its adapters every round
  (one slot per local cluster).
* Routing (`client_route`): "local" mode = nearest of the client's own centroids, then that
  centroid's global adapter (the code's behaviour); "global" mode = nearest global centroid.
"""
from __future__ import annotations

from typing import Literal, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedrouter_jax.algorithms.base import Env, Method, RouteMessage, Routing, register, rows
from fedrouter_jax.clustering import batched_kmeans, choose_k, choose_k_batched, kmeans, nearest_centroid
from fedrouter_jax.config import section
from fedrouter_jax.tree_util import segment_weighted_mean


@section
class ClusterConfig:
    """`clustering.*`: FedRouter's and FedRouter*'s own config section."""

    n_local: Union[int, Literal["auto"]] = 4  # "auto" = silhouette over [k_min, k_max]
    n_global: Union[int, Literal["auto"]] = 4
    k_min: int = 2
    k_max: int = 8
    n_init: int = 10
    max_iter: int = 300
    tol: float = 1e-4
    min_silhouette: float = 0.0  # best silhouette below this => a single cluster
    schedule: Literal["global", "local_index"] = "global"

    def problems(self, cfg) -> list[str]:
        """Cross-field checks, run when the method is fedrouter or fedrouter_star."""
        c, d, e = self, cfg.data, []
        if c.k_min < 2:
            e.append(f"clustering.k_min: expected >= 2 (silhouette needs 2+ clusters), got {c.k_min}")
        if c.k_min > c.k_max:
            e.append(f"clustering.k_min: expected <= clustering.k_max ({c.k_max}), got {c.k_min}")
        for name in ("n_local", "n_global"):
            v = getattr(c, name)
            if v != "auto" and v < 1:
                e.append(f"clustering.{name}: expected >= 1 or 'auto', got {v}")
        local_max = c.n_local if c.n_local != "auto" else c.k_max
        if local_max > d.train_per_client:
            e.append(f"clustering.{'n_local' if c.n_local != 'auto' else 'k_max'}: expected <= "
                     f"data.train_per_client ({d.train_per_client}) (k-means needs a sample per cluster), "
                     f"got {local_max}")
        if c.n_global != "auto" and c.n_global > d.n_clients * local_max:
            e.append(f"clustering.n_global: expected <= the number of local centroids "
                     f"(data.n_clients x local clusters = {d.n_clients * local_max}), got {c.n_global}")
        for name, ok, want in (("n_init", c.n_init >= 1, ">= 1"), ("max_iter", c.max_iter >= 1, ">= 1"),
                               ("tol", c.tol >= 0, ">= 0"), ("min_silhouette", -1.0 <= c.min_silhouette <= 1.0,
                                                             "in [-1, 1]")):
            if not ok:
                e.append(f"clustering.{name}: expected {want}, got {getattr(c, name)}")
        return e


@struct.dataclass
class LocalClusters:
    """A stack of clients' local clustering. centroids [C, K, D], centroid_mask [C, K],
    train_labels [C, N] (-1 past the client's data), n_local [C], silhouette [C, n_k] (NaN when
    k was fixed). It is both the client state and (centroids, mask) what a client sends."""

    centroids: jax.Array
    centroid_mask: jax.Array
    train_labels: jax.Array
    n_local: jax.Array
    silhouette: jax.Array


@struct.dataclass
class CentroidsMessage:
    """Client -> server at setup: centroids [C, K, D], centroid_mask [C, K], counts [C, K]."""

    centroids: jax.Array
    centroid_mask: jax.Array
    counts: jax.Array


@struct.dataclass
class FedRouterServer:
    """adapters: params [G, ...]; global_centroids [G, D]; local_to_global [C, K] (-1 = no
    centroid); rounds_taken [C]: rounds whose reply arrived, per client (the round robin's
    position); silhouette [n_k] of the global clustering (NaN when fixed)."""

    adapters: dict
    global_centroids: jax.Array
    local_to_global: jax.Array
    rounds_taken: jax.Array
    silhouette: jax.Array


@struct.dataclass
class ClusterTask:
    """Server -> participant for one round. adapters: start params [P, S, ...]; global_id
    [P, S] (-1 = unused slot); target [P, S, D]: global centroid to match; local_hint [P, S]:
    local cluster to train (-1 = match `target`)."""

    adapters: dict
    global_id: jax.Array
    target: jax.Array
    local_hint: jax.Array


def _k_max(env: Env) -> int:
    """Local clusters per client in the state: fixed n_local, or the Silhouette range's top."""
    cc = env.config.clustering
    return int(cc.k_max) if cc.n_local == "auto" else int(cc.n_local)


def client_setup(env: Env, inputs, key):
    """Local K-Means of each client's train embeddings (one batched call for the stack)."""
    del key  # K-Means is seeded by (seed, client id), as before this split
    cc, seed = env.config.clustering, env.config.seed
    x, mask = np.asarray(inputs.train_emb, np.float32), np.asarray(inputs.train_mask, bool)
    ids = np.asarray(inputs.client_id)
    ks = np.arange(cc.k_min, cc.k_max + 1)
    if cc.n_local == "auto":
        n_local, scores = choose_k_batched(x, mask, ks, seed=seed, n_init=cc.n_init, max_iter=cc.max_iter,
                                           tol=cc.tol, min_silhouette=cc.min_silhouette, client_ids=ids)
    else:
        n_local = np.full((len(ids),), int(cc.n_local))
        scores = np.full((len(ids), ks.size), np.nan)
    too_few = np.flatnonzero(mask.sum(1) < n_local)
    if too_few.size:
        c = int(too_few[0])
        raise ValueError(f"clustering.n_local={cc.n_local}: client {int(ids[c])} has only "
                         f"{int(mask[c].sum())} training samples")
    res = batched_kmeans(x, mask, n_local, k_max=_k_max(env), n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol,
                         seed=seed, client_ids=ids)
    labels = np.asarray(res.labels)
    state = LocalClusters(centroids=np.asarray(res.centroids), centroid_mask=np.asarray(res.centroid_mask),
                          train_labels=labels, n_local=np.asarray(n_local, np.int32),
                          silhouette=scores.astype(np.float32))
    k = state.centroids.shape[1]
    counts = (labels[:, :, None] == np.arange(k)).sum(1).astype(np.int32)
    return state, CentroidsMessage(state.centroids, state.centroid_mask, counts)


def global_clustering(env: Env, centroids: np.ndarray, centroid_mask: np.ndarray):
    """K-Means over all clients' local centroids (unweighted).

    centroids [C, K, D], centroid_mask [C, K] -> (global_centroids [G, D], local_to_global
    [C, K] (-1 where no centroid), silhouette [n_k]).
    """
    cc, seed = env.config.clustering, env.config.seed
    flat = centroids[centroid_mask]
    ks = np.arange(cc.k_min, cc.k_max + 1)
    scores = np.full((ks.size,), np.nan, np.float32)
    if cc.n_global == "auto":
        ks_ok = ks[ks < len(flat)]
        if ks_ok.size == 0:
            raise ValueError(f"clustering.n_global=auto: only {len(flat)} local centroids to cluster")
        n_global, sc = choose_k(flat, ks_ok, seed=seed, n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol)
        scores[: ks_ok.size] = [sc[int(k)] for k in ks_ok]
    else:
        n_global = int(cc.n_global)
    if n_global > len(flat):
        raise ValueError(f"clustering.n_global={n_global} exceeds the {len(flat)} local centroids of all clients")
    res = kmeans(flat, n_global, n_init=cc.n_init, max_iter=cc.max_iter, tol=cc.tol, seed=seed)
    local_to_global = np.full(centroid_mask.shape, -1, np.int32)
    local_to_global[centroid_mask] = np.asarray(res.labels)
    return np.asarray(res.centroids), local_to_global, scores


def server_setup(env: Env, msgs: CentroidsMessage, key) -> FedRouterServer:
    centroids, mask = np.asarray(msgs.centroids), np.asarray(msgs.centroid_mask)
    g_centroids, l2g, scores = global_clustering(env, centroids, mask)
    return FedRouterServer(adapters=jax.tree.map(np.asarray, env.new_adapters(key, g_centroids.shape[0])),
                           global_centroids=g_centroids, local_to_global=l2g,
                           rounds_taken=np.zeros(env.n_clients, np.int32), silhouette=scores)


def _schedule(env: Env, server: FedRouterServer, c: int, every_cluster: bool) -> list[tuple[int, int]]:
    """(global cluster, local hint) per slot of client c this round (hint -1: client matches)."""
    l2g = np.asarray(server.local_to_global)[c]
    locals_c = np.flatnonzero(l2g >= 0)
    t = int(np.asarray(server.rounds_taken)[c])
    if every_cluster:
        return [(int(l2g[s]), s) if l2g[s] >= 0 else (-1, -1) for s in range(len(l2g))]
    if env.config.clustering.schedule == "local_index":
        l = int(locals_c[t % locals_c.size])
        return [(int(l2g[l]), l)]
    globals_c = np.unique(l2g[locals_c])
    return [(int(globals_c[(t + c) % globals_c.size]), -1)]


def _plan(every_cluster: bool):
    def server_plan(env: Env, server: FedRouterServer, round_idx: int, participants) -> ClusterTask:
        slots = [_schedule(env, server, int(c), every_cluster) for c in participants]
        gid = np.array([[g for g, _ in s] for s in slots], np.int32)
        hint = np.array([[h for _, h in s] for s in slots], np.int32)
        gc = np.asarray(server.global_centroids)
        return ClusterTask(adapters=rows(server.adapters, jnp.asarray(np.maximum(gid, 0))), global_id=gid,
                           target=gc[np.maximum(gid, 0)], local_hint=hint)

    return server_plan


def client_pools(env: Env, state: LocalClusters, task: ClusterTask, inputs) -> np.ndarray:
    """Samples of the local cluster each slot trains: [P, S, N] bool (all False: unused slot)."""
    labels = np.asarray(state.train_labels)
    gid, hint = np.asarray(task.global_id), np.asarray(task.local_hint)
    pools = np.zeros(gid.shape + labels.shape[1:], bool)
    for p in range(gid.shape[0]):
        for s in range(gid.shape[1]):
            if gid[p, s] < 0:
                continue
            l = int(hint[p, s]) if hint[p, s] >= 0 else int(
                nearest_centroid(task.target[p, s], state.centroids[p], state.centroid_mask[p]))
            pools[p, s] = labels[p] == l
    return pools


def client_slots(env: Env, state: LocalClusters, task: ClusterTask):
    return task.adapters, None


def client_reply(env: Env, state: LocalClusters, task: ClusterTask, trained, reply):
    return state, reply


def server_aggregate(env: Env, server: FedRouterServer, task: ClusterTask, reply, arrived, participants,
                     round_idx: int) -> FedRouterServer:
    """Sample-weighted mean of the arrived slots per global cluster; others keep their adapter."""
    p, s = task.global_id.shape
    w = (reply.weight * arrived[:, None]).reshape(p * s)
    trained = jax.tree.map(lambda x: x.reshape((p * s,) + x.shape[2:]), reply.adapters)
    g = server.global_centroids.shape[0]
    adapters = segment_weighted_mean(trained, task.global_id.reshape(p * s), w, server.adapters, num_segments=g)
    return server.replace(adapters=adapters,
                          rounds_taken=server.rounds_taken.at[participants].add(arrived.astype(jnp.int32)))


def server_route(env: Env, server: FedRouterServer, mode: str) -> RouteMessage:
    return RouteMessage(adapters=server.adapters, per_client=server.local_to_global, shared=server.global_centroids)


def client_route(env: Env, state: LocalClusters, msg: RouteMessage, inputs, mode: str) -> Routing:
    """Each test sample to its nearest centroid's adapter (local: own centroids; global: the server's)."""
    emb, m = np.asarray(inputs.test_emb), np.asarray(inputs.test_mask, bool)
    ids = np.full(m.shape, -1, np.int32)
    local = np.full(m.shape, -1, np.int32)
    l2g = np.asarray(msg.per_client)
    for c in range(m.shape[0]):
        e = emb[c][m[c]]
        l = np.asarray(nearest_centroid(e, state.centroids[c], state.centroid_mask[c]))
        local[c, : len(e)] = l
        ids[c, : len(e)] = np.asarray(nearest_centroid(e, msg.shared)) if mode == "global" else l2g[c][l]
    return Routing(own=None, ids=ids, local_cluster=local)


def _method(name: str, every_cluster: bool, description: str) -> Method:
    return Method(
        name=name, slots=(lambda env: _k_max(env)) if every_cluster else (lambda env: 1),
        client_setup=client_setup, client_pools=client_pools, client_slots=client_slots,
        client_reply=client_reply, client_route=client_route, server_setup=server_setup,
        server_plan=_plan(every_cluster), server_aggregate=server_aggregate, server_route=server_route,
        log_plan=lambda task: {"global_cluster": np.asarray(task.global_id).tolist()}, description=description,
        config_section=("clustering", ClusterConfig),
    )


FEDROUTER = register(_method("fedrouter", False, "one adapter per task cluster; each client trains one per round"))
FEDROUTER_STAR = register(_method("fedrouter_star", True, "FedRouter*: every client trains all its adapters every round"))
