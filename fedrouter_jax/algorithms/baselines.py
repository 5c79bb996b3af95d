"""The paper's baselines (Table 1 / Table 3) as client / server functions (see base.py).

Every method trains all slots of a round in ONE client-mapped jitted call, with the same model,
LoRA config, optimizer, local-step budget (`train.local_steps` x `train.batch_size` per slot)
and evaluation as FedRouter. Shapes: C clients, P participants this round, K clusters.

* FedIT   (Zhang et al. 2024): one global adapter, FedAvg over the replies.
* Local:  one adapter per client, kept on the client, no communication.
* FedCluster (Sattler et al. 2020, as adapted in the FedRouter authors' code): FedAvg until
  `fedcluster.cluster_round`, then Ward clustering of the clients' LoRA-update cosine
  similarities into `fedcluster.n_clusters` groups, FedAvg within each group.
* FedSA-LoRA (Guo et al. 2024): A averaged over clients on the server, B kept on each client.
* FedDPA  (Yang, Long et al., NeurIPS 2024): global adapter by FedAvg + a personal local
  adapter trained on top of the frozen global one; instance-wise dynamic weighting at test time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedrouter_jax.algorithms.base import Env, Method, RouteMessage, Routing, pool_all, register, rows, same_init
from fedrouter_jax.tree_util import segment_weighted_mean, weighted_mean


@struct.dataclass
class Nothing:
    """An empty state or message (a pytree with no leaves)."""


@struct.dataclass
class AdapterState:
    """adapters: params with leaves [A, ...] (server: its adapters; client stack: [C, ...])."""

    adapters: dict


@struct.dataclass
class AdapterTask:
    """Server -> participant: start params [P, S, ...] of its slots."""

    adapters: dict


# ----------------------------------------------------------------------------- shared pieces


def _no_client_setup(env: Env, inputs, key):
    return Nothing(), Nothing()


def _no_server_setup_state(env: Env, msgs, key):
    return Nothing()


def _pools_all(env: Env, state, task, inputs) -> np.ndarray:
    return pool_all(inputs.train_mask)


def _start_from_task(env: Env, state, task):
    return task.adapters, None


def _reply_as_is(env: Env, state, task, trained, reply):
    return state, reply


def _keep_where(has, new, old):
    """new where `has` (a scalar or [A] bool) else old, leaf by leaf."""
    def pick(n, o):
        h = jnp.reshape(has, jnp.shape(has) + (1,) * (n.ndim - jnp.ndim(has)))
        return jnp.where(h, n, o.astype(n.dtype))
    return jax.tree.map(pick, new, old)


def fedavg(adapters, weight, arrived, previous):
    """Sample-weighted mean of the arrived replies' single slot, or `previous` if none arrived.

    adapters leaves [P, 1, ...]; weight [P, 1]; arrived [P]; previous leaves [...] -> [...].
    """
    w = weight[:, 0] * arrived
    glob = weighted_mean(jax.tree.map(lambda x: x[:, 0], adapters), w)
    return _keep_where(w.sum() > 0, glob, previous)


def _shared_route(env: Env, state: AdapterState, mode: str) -> RouteMessage:
    return RouteMessage(adapters=state.adapters, per_client=None)


# ----------------------------------------------------------------------------- FedIT


def _fedit_server_setup(env: Env, msgs, key) -> AdapterState:
    return AdapterState(jax.tree.map(np.asarray, same_init(env, key, 1)))


def _fedit_plan(env: Env, state: AdapterState, round_idx: int, participants) -> AdapterTask:
    p = len(participants)
    return AdapterTask(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x)[None], (p,) + x.shape), state.adapters))


def _fedit_aggregate(env, state: AdapterState, task, reply, arrived, participants, round_idx) -> AdapterState:
    glob = fedavg(reply.adapters, reply.weight, arrived, jax.tree.map(lambda x: x[0], state.adapters))
    return AdapterState(jax.tree.map(lambda x: x[None], glob))


def _one_adapter_route(env: Env, state, msg: RouteMessage, inputs, mode: str) -> Routing:
    """Every test sample uses adapter 0 (the shared one, or the client's own)."""
    m = np.asarray(inputs.test_mask, bool)
    return Routing(own=None, ids=np.where(m, 0, -1).astype(np.int32))


FEDIT = register(Method(
    name="fedit", slots=lambda env: 1,
    client_setup=_no_client_setup, client_pools=_pools_all, client_slots=_start_from_task,
    client_reply=_reply_as_is, client_route=_one_adapter_route,
    server_setup=_fedit_server_setup, server_plan=_fedit_plan, server_aggregate=_fedit_aggregate,
    server_route=_shared_route,
    description="FedIT: one global adapter, FedAvg (X^{t+1} = sum_c n_c X_c^t / sum_c n_c)",
))


# ----------------------------------------------------------------------------- Local


def _local_client_setup(env: Env, inputs, key):
    """Every client starts from the same initial adapter and keeps it: state leaves [C, ...]."""
    n = len(np.asarray(inputs.client_id))
    return AdapterState(jax.tree.map(np.asarray, same_init(env, key, n))), Nothing()


def _own_slot(env: Env, state: AdapterState, task):
    return jax.tree.map(lambda x: x[:, None], state.adapters), None


def _local_reply(env: Env, state: AdapterState, task, trained, reply):
    """The trained adapter stays on the client; nothing is sent."""
    return AdapterState(jax.tree.map(lambda x: x[:, 0], trained)), reply.replace(adapters=None)


def _own_route(env: Env, state: AdapterState, msg: RouteMessage, inputs, mode: str) -> Routing:
    m = np.asarray(inputs.test_mask, bool)
    return Routing(own=jax.tree.map(lambda x: np.asarray(x)[:, None], state.adapters),
                   ids=np.where(m, 0, -1).astype(np.int32))


LOCAL = register(Method(
    name="local", slots=lambda env: 1,
    client_setup=_local_client_setup, client_pools=_pools_all, client_slots=_own_slot,
    client_reply=_local_reply, client_route=_own_route,
    server_setup=_no_server_setup_state, server_plan=lambda env, s, r, p: Nothing(),
    server_aggregate=lambda env, s, task, reply, arrived, participants, r: s,
    server_route=lambda env, s, mode: RouteMessage(adapters=None, per_client=None),
    description="Local: each client fine-tunes its own adapter, no communication",
))


# ----------------------------------------------------------------------------- FedSA-LoRA


def _factor(params: dict, f: str) -> dict:
    return {t: {f: p[f]} for t, p in params.items()}


def _join(a: dict, b: dict) -> dict:
    return {t: {"a": a[t]["a"], "b": b[t]["b"]} for t in a}


def _fedsa_client_setup(env: Env, inputs, key):
    """B_c^0 = 0 on every client (the same init as the server's A^0)."""
    n = len(np.asarray(inputs.client_id))
    return AdapterState(_factor(jax.tree.map(np.asarray, same_init(env, key, n)), "b")), Nothing()


def _fedsa_server_setup(env: Env, msgs, key) -> AdapterState:
    return AdapterState(_factor(jax.tree.map(np.asarray, same_init(env, key, 1)), "a"))


def _fedsa_slots(env: Env, state: AdapterState, task: AdapterTask):
    return _join(task.adapters, jax.tree.map(lambda x: x[:, None], state.adapters)), None


def _fedsa_reply(env: Env, state: AdapterState, task, trained, reply):
    """B_c stays on the client; A_c is sent."""
    return AdapterState(_factor(jax.tree.map(lambda x: x[:, 0], trained), "b")), reply.replace(adapters=_factor(trained, "a"))


def _fedsa_route(env: Env, state: AdapterState, msg: RouteMessage, inputs, mode: str) -> Routing:
    """Client c serves with (A, B_c)."""
    m = np.asarray(inputs.test_mask, bool)
    c = len(np.asarray(inputs.client_id))
    shared_a = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (c,) + x.shape), msg.shared)
    own = _join(shared_a, jax.tree.map(np.asarray, state.adapters))
    return Routing(own=jax.tree.map(lambda x: x[:, None], own), ids=np.where(m, 0, -1).astype(np.int32))


FEDSA = register(Method(
    name="fedsa", slots=lambda env: 1,
    client_setup=_fedsa_client_setup, client_pools=_pools_all, client_slots=_fedsa_slots,
    client_reply=_fedsa_reply, client_route=_fedsa_route,
    server_setup=_fedsa_server_setup, server_plan=_fedit_plan, server_aggregate=_fedit_aggregate,
    # the shared A alone serves nothing: it travels as `shared`, each client joins its own B
    server_route=lambda env, s, mode: RouteMessage(adapters=None, per_client=None,
                                                   shared=jax.tree.map(lambda x: x[0], s.adapters)),
    description="FedSA-LoRA: A averaged over clients (shared), B kept per client (personal)",
))


# ----------------------------------------------------------------------------- FedCluster


def update_vectors(trained: dict, start: dict, on: str = "b", layers: str = "all") -> np.ndarray:
    """Flattened LoRA updates per client: leaves [C, L, ...] -> [C, P] float64.

    on: "b" (the FedRouter authors' choice, `similarity_B`), "a", or "ab";
    layers: "all", or "last" (the authors' `layer=-1`: the last LoRA tensor of the state dict,
    i.e. the last layer of the last target).
    """
    parts = []
    targets = list(trained)
    if layers == "last":
        targets = targets[-1:]
    for t in targets:
        for f in ("a", "b") if on == "ab" else (on,):
            d = np.asarray(trained[t][f], np.float64) - np.asarray(start[t][f], np.float64)
            if layers == "last":
                d = d[:, -1]
            parts.append(d.reshape(d.shape[0], -1))
    return np.concatenate(parts, axis=1)


def cosine_similarity_matrix(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """x [C, P] -> S [C, C], S_ij = <x_i, x_j> / max(|x_i| |x_j|, eps) (torch's CosineSimilarity)."""
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=1)
    return (x @ x.T) / np.maximum(np.outer(n, n), eps)


def ward_clusters(similarity: np.ndarray, n_clusters: int) -> np.ndarray:
    """Ward linkage on the rows of a similarity matrix, cut into at most `n_clusters` groups.

    As the FedRouter authors' `make_clusters`: Euclidean `pdist` between the clients' similarity
    profiles (rows of S), `linkage(method="ward")`, then `fcluster` (criterion maxclust, which
    gives the threshold their scan over distances finds). Labels are renumbered 0, 1, ... in order
    of first appearance, so the result does not depend on scipy's numbering. -> [C] int32.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import pdist

    c = similarity.shape[0]
    if n_clusters >= c:
        return np.arange(c, dtype=np.int32)
    if n_clusters <= 1:
        return np.zeros(c, np.int32)
    z = linkage(pdist(np.asarray(similarity, np.float64)), method="ward")
    raw = fcluster(z, t=n_clusters, criterion="maxclust")
    _, first = np.unique(raw, return_index=True)
    order = {int(raw[i]): k for k, i in enumerate(sorted(first))}
    return np.array([order[int(r)] for r in raw], np.int32)


@struct.dataclass
class FedClusterServer:
    """adapters [K, ...]; cluster_of [C] (0 for all before clustering; -1: a client whose reply
    did not arrive in the clustering round, until its next reply); similarity [C, C] of the
    clustering round's updates (NaN rows: clients not clustered then)."""

    adapters: dict
    cluster_of: np.ndarray
    similarity: np.ndarray


def _fedcluster_server_setup(env: Env, msgs, key) -> FedClusterServer:
    k, c = int(env.config.fedcluster.n_clusters), env.n_clients
    return FedClusterServer(adapters=jax.tree.map(np.asarray, same_init(env, key, k)),
                            cluster_of=np.zeros(c, np.int32), similarity=np.full((c, c), np.nan, np.float32))


def _unassigned_start(server: FedClusterServer) -> dict:
    """What a client not yet clustered trains from: the uniform mean of the cluster adapters."""
    return jax.tree.map(lambda x: np.asarray(x).mean(0), server.adapters)


def _fedcluster_plan(env: Env, server: FedClusterServer, round_idx: int, participants) -> AdapterTask:
    of = np.asarray(server.cluster_of)[np.asarray(participants)]
    mean = _unassigned_start(server)
    start = jax.tree.map(lambda x, m: np.where((of < 0).reshape((-1,) + (1,) * (x.ndim - 1)), m, x[np.maximum(of, 0)]),
                         server.adapters, mean)
    return AdapterTask(jax.tree.map(lambda x: x[:, None], start))


def _fedcluster_aggregate(env, server: FedClusterServer, task: AdapterTask, reply, arrived, participants,
                          round_idx: int) -> FedClusterServer:
    """Host-side (Ward clustering is scipy). See `FedCluster` in the module docstring."""
    fc = env.config.fedcluster
    k = int(fc.n_clusters)
    arrived = np.asarray(arrived, bool)
    participants = np.asarray(participants)
    trained = jax.tree.map(lambda x: np.asarray(x)[:, 0], reply.adapters)
    start = jax.tree.map(lambda x: np.asarray(x)[:, 0], task.adapters)
    w = np.asarray(reply.weight)[:, 0] * arrived
    if round_idx < fc.cluster_round:  # FedAvg over all: every cluster adapter = the global one
        prev = jax.tree.map(lambda x: np.asarray(x)[0], server.adapters)
        glob = fedavg(reply.adapters, reply.weight, arrived, prev)
        return server.replace(adapters=jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (k,) + x.shape).copy(), glob))
    cluster_of = np.asarray(server.cluster_of).copy()
    sim_all = np.asarray(server.similarity).copy()
    upd = update_vectors(trained, start, fc.similarity_on, fc.similarity_layers)
    if round_idx == fc.cluster_round:
        here = np.flatnonzero(arrived)
        sim = cosine_similarity_matrix(upd[here])
        cluster_of[:] = -1
        cluster_of[participants[here]] = ward_clusters(sim, k)
        sim_all[:] = np.nan
        sim_all[np.ix_(participants[here], participants[here])] = sim
    else:  # a client absent at the clustering round joins the cluster whose adapter it moved towards
        for i in np.flatnonzero(arrived & (cluster_of[participants] < 0)):
            own = update_vectors(jax.tree.map(lambda x: x[i: i + 1], trained),
                                 jax.tree.map(lambda x: x[i: i + 1], start), fc.similarity_on, fc.similarity_layers)
            to = update_vectors(jax.tree.map(lambda x: np.asarray(x), server.adapters),
                                jax.tree.map(lambda x: np.broadcast_to(x[i], (k,) + x.shape[1:]), start),
                                fc.similarity_on, fc.similarity_layers)
            cluster_of[participants[i]] = int(np.argmax(cosine_similarity_matrix(np.concatenate([own, to]))[0, 1:]))
    seg = np.where(arrived, cluster_of[participants], -1)
    adapters = segment_weighted_mean(jax.tree.map(jnp.asarray, trained), jnp.asarray(seg), jnp.asarray(w),
                                     server.adapters, num_segments=k)
    return FedClusterServer(adapters=jax.tree.map(np.asarray, adapters), cluster_of=cluster_of.astype(np.int32),
                            similarity=sim_all.astype(np.float32))


def _fedcluster_route(env: Env, server: FedClusterServer, mode: str) -> RouteMessage:
    """Client c serves with its cluster's adapter (a client never clustered: cluster 0)."""
    return RouteMessage(adapters=server.adapters, per_client=np.maximum(np.asarray(server.cluster_of), 0))


def _cluster_route(env: Env, state, msg: RouteMessage, inputs, mode: str) -> Routing:
    m = np.asarray(inputs.test_mask, bool)
    of = np.asarray(msg.per_client)[:, None]
    return Routing(own=None, ids=np.where(m, of, -1).astype(np.int32))


FEDCLUSTER = register(Method(
    name="fedcluster", slots=lambda env: 1,
    client_setup=_no_client_setup, client_pools=_pools_all, client_slots=_start_from_task,
    client_reply=_reply_as_is, client_route=_cluster_route,
    server_setup=_fedcluster_server_setup, server_plan=_fedcluster_plan, server_aggregate=_fedcluster_aggregate,
    server_route=_fedcluster_route, jit_aggregate=False,
    description=("FedCluster: FedAvg until fedcluster.cluster_round, then Ward clustering of the clients' "
                 "update similarities, FedAvg within each cluster"),
))


# ----------------------------------------------------------------------------- FedDPA


def dynamic_weights(test_emb: np.ndarray, train_emb: np.ndarray, *, max_weight: float, instance_num: int,
                    rng: np.random.Generator) -> np.ndarray:
    """FedDPA's instance-wise weight of the LOCAL adapter for each test sample.

    alpha(x) = max_weight * mean_{i in S(x)} cos(e(x), e(x_i)), with S(x) `instance_num` local
    training samples drawn at random for each test sample (all of them if instance_num is 0 or
    >= N_c), clipped to [0, max_weight]. test_emb [N, D], train_emb [M, D] -> [N] float32.
    """
    sim = cosine_similarity_matrix(np.concatenate([test_emb, train_emb]))[: len(test_emb), len(test_emb):]
    m = train_emb.shape[0]
    if instance_num <= 0 or instance_num >= m:
        s = sim.mean(axis=1)
    else:
        pick = np.stack([rng.choice(m, size=instance_num, replace=False) for _ in range(len(test_emb))])
        s = np.take_along_axis(sim, pick, axis=1).mean(axis=1)
    return np.clip(max_weight * s, 0.0, max_weight).astype(np.float32)


@struct.dataclass
class DPATask:
    """Server -> participant: global start params [P, ...]; keep_local: whether the local
    adapter trained this round is kept (the reference trains no local adapter in round 1)."""

    adapters: dict
    keep_local: jax.Array  # [P] bool (an array, so the round compiles once)


def _feddpa_client_setup(env: Env, inputs, key):
    """Client c's local adapter: row c of one fresh stack of C (as before this split)."""
    _, kl = jax.random.split(key)
    ids = jnp.asarray(inputs.client_id)
    return AdapterState(jax.tree.map(np.asarray, rows(env.new_adapters(kl, env.n_clients), ids))), Nothing()


def _feddpa_server_setup(env: Env, msgs, key) -> AdapterState:
    kg, _ = jax.random.split(key)
    return AdapterState(jax.tree.map(np.asarray, same_init(env, kg, 1)))


def _feddpa_plan(env: Env, state: AdapterState, round_idx: int, participants) -> DPATask:
    p = len(participants)
    return DPATask(jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (p,) + x.shape[1:]), state.adapters),
                   keep_local=np.full((p,), round_idx >= 1))


def _feddpa_slots(env: Env, state: AdapterState, task: DPATask):
    """Slot 0: the global adapter alone; slot 1: the local adapter on top of tw x the frozen global."""
    tw = float(env.config.feddpa.train_weight)
    g, loc = task.adapters, state.adapters
    start = jax.tree.map(lambda a, b: jnp.stack([a, b], axis=1), g, loc)
    frozen = {t: {"a": jnp.stack([jnp.zeros_like(p["a"]), p["a"]], axis=1),
                  "b": jnp.stack([jnp.zeros_like(p["b"]), tw * p["b"]], axis=1)} for t, p in g.items()}
    return start, frozen


def _feddpa_reply(env: Env, state: AdapterState, task: DPATask, trained, reply):
    """The global slot is sent; the local slot stays on the client (from round 2 on)."""
    keep = task.keep_local
    new = AdapterState(jax.tree.map(lambda t, old: jnp.where(keep.reshape((-1,) + (1,) * (old.ndim - 1)), t[:, 1], old),
                                    trained, state.adapters))
    return new, reply.replace(adapters=jax.tree.map(lambda x: x[:, :1], trained), weight=reply.weight[:, :1])


def _feddpa_route(env: Env, state: AdapterState, msg: RouteMessage, inputs, mode: str) -> Routing:
    """Shared [global] + own [local]; per sample (1 - a) dW(G) + a / (1 - tw) dW(L_c)."""
    dc, seed = env.config.feddpa, int(env.config.seed)
    tw = float(dc.train_weight)
    m = np.asarray(inputs.test_mask, bool)
    alpha = np.zeros(m.shape, np.float32)
    for c, cid in enumerate(np.asarray(inputs.client_id)):
        test, train = np.asarray(inputs.test_emb[c])[m[c]], np.asarray(inputs.train_emb[c])[np.asarray(inputs.train_mask[c], bool)]
        if dc.mixing == "fixed":
            alpha[c, : len(test)] = 1.0 - dc.fixed_weight
        else:
            alpha[c, : len(test)] = dynamic_weights(test.astype(np.float32), train.astype(np.float32),
                                                    max_weight=dc.max_weight, instance_num=dc.instance_num,
                                                    rng=np.random.default_rng([seed, 7, int(cid)]))
    ids = np.where(m, 0, -1).astype(np.int32)
    return Routing(own=jax.tree.map(lambda x: np.asarray(x)[:, None], state.adapters), ids=ids,
                   mix_ids=np.where(m, 1, -1).astype(np.int32), mix_weight=(alpha / (1.0 - tw)).astype(np.float32),
                   self_weight=(1.0 - alpha).astype(np.float32))


FEDDPA = register(Method(
    name="feddpa", slots=lambda env: 2,
    client_setup=_feddpa_client_setup, client_pools=lambda env, s, task, inputs: pool_all(inputs.train_mask, 2),
    client_slots=_feddpa_slots, client_reply=_feddpa_reply, client_route=_feddpa_route,
    server_setup=_feddpa_server_setup, server_plan=_feddpa_plan, server_aggregate=_fedit_aggregate,
    server_route=_shared_route,
    # slot s of client c: stream s * C + c (global slots of all clients first, as before this split)
    batch_stream=lambda env, client, slot: slot * env.n_clients + client,
    description=("FedDPA-T: global adapter by FedAvg + a local adapter trained on top of the frozen global one; "
                 "instance-wise dynamic weighting at test time"),
))
