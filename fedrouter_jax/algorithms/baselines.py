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

from functools import partial
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedrouter_jax.algorithms.base import Env, Method, RouteMessage, Routing, pool_all, register, rows, same_init
from fedrouter_jax.config import section
from fedrouter_jax.models import llama
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


@section
class FedClusterConfig:
    """`fedcluster.*`: FedCluster's own config section."""

    n_clusters: int = 4
    cluster_round: int = 1  # round after which clients are clustered
    similarity_on: Literal["b", "a", "ab"] = "b"  # LoRA factor(s) whose updates are compared (authors: B)
    similarity_layers: Literal["all", "last"] = "all"  # "last" = the authors' last LoRA tensor only

    def problems(self, cfg) -> list[str]:
        n, rounds, e = cfg.data.n_clients, cfg.train.rounds, []
        if not 1 <= self.n_clusters <= n:
            e.append(f"fedcluster.n_clusters: expected in [1, data.n_clients={n}], got {self.n_clusters}")
        if not 0 <= self.cluster_round <= rounds:
            e.append(f"fedcluster.cluster_round: expected in [0, train.rounds={rounds}], got {self.cluster_round}")
        return e


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
    server_route=_fedcluster_route, jit_aggregate=False, config_section=("fedcluster", FedClusterConfig),
    description=("FedCluster: FedAvg until fedcluster.cluster_round, then Ward clustering of the clients' "
                 "update similarities, FedAvg within each cluster"),
))


# ----------------------------------------------------------------------------- FedDPA
#
# `feddpa.variant` (docs/FAITHFULNESS.md section 1; a = train_weight, w = max_weight):
#   reference    the released code (Lydia-yang/FedDPA): local slot trained as a L + (1 - a) sg(G);
#                test sample x served by w sim(x) G + (1 - w sim(x)) L, sim = the mean cosine of
#                x's last-prompt-token state under base + L to those of `instance_num` of the
#                client's training samples (`route_features`); uniform FedAvg of G.
#   pre_issue16  this repository's first port: local trained as L + a sg(G); x served by
#                (1 - s) G + s / (1 - a) L, s = clip(w sim(x), 0, w) from the base model's
#                mean-pooled input embeddings; sample-weighted FedAvg.


@section
class FedDPAConfig:
    """`feddpa.*`: FedDPA's own config section (the variants: the comment above)."""

    variant: Literal["reference", "pre_issue16"] = "reference"
    mixing: Literal["dynamic", "fixed"] = "dynamic"
    fixed_weight: float = 0.5  # weight of the global adapter when mixing: fixed
    train_weight: float = 0.5  # a: weight of the local adapter (reference) / of the frozen global one (pre_issue16) while training the local one
    max_weight: float = 0.5  # dynamic: w, the weight = w * mean cosine similarity
    instance_num: int = 5  # dynamic: local training samples compared per test sample (0 = all)

    def problems(self, cfg) -> list[str]:
        checks = (("fixed_weight", 0.0 <= self.fixed_weight <= 1.0, "in [0, 1]"),
                  ("train_weight", 0.0 <= self.train_weight < 1.0, "in [0, 1)"),
                  ("max_weight", 0.0 <= self.max_weight <= 1.0, "in [0, 1]"),
                  ("instance_num", self.instance_num >= 0, ">= 0 (0 = all training samples)"))
        return [f"feddpa.{name}: expected {want}, got {getattr(self, name)}" for name, ok, want in checks if not ok]


def dynamic_weights(test_emb: np.ndarray, train_emb: np.ndarray, *, max_weight: float, instance_num: int,
                    rng: np.random.Generator) -> np.ndarray:
    """FedDPA's instance-wise weight of the LOCAL adapter for each test sample (pre_issue16).

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


def instance_draws(n_train: int, n_test: int, instance_num: int, rng: np.random.Generator) -> np.ndarray:
    """S(x) of each test sample: `instance_num` training indices drawn without replacement, anew
    for every test sample (the reference's `random.sample`, seeded here); all `n_train` when
    instance_num is 0 or >= n_train. -> [n_test, m] int."""
    if instance_num <= 0 or instance_num >= n_train:
        return np.broadcast_to(np.arange(n_train), (n_test, n_train))
    return np.stack([rng.choice(n_train, size=instance_num, replace=False) for _ in range(n_test)]).reshape(n_test, -1)


def draw_rng(seed: int, client_id: int) -> np.random.Generator:
    """The generator of client `client_id`'s draws S(x) (evaluation and `predict` alike)."""
    return np.random.default_rng([int(seed), 7, int(client_id)])


def drawn_mean_cosine(test: np.ndarray, train: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """sim(x) of the reference: the mean cosine of each test feature to the training features its
    draws name. test [n, D], train [m, D], draws [n, k] rows of train -> [n] float32."""
    cos = cosine_similarity_matrix(np.concatenate([test, train]))[: len(test), len(test):]  # [n, m]
    return np.take_along_axis(cos, np.asarray(draws).reshape(len(test), -1), axis=1).mean(axis=1).astype(np.float32)


def reference_blend(weight):
    """reference: weight(x) on the global adapter -> (self_weight, mix_weight) = (w, 1 - w)."""
    weight = np.asarray(weight, np.float32)
    return weight, (1.0 - weight).astype(np.float32)


def pre_issue16_blend(alpha, train_weight: float):
    """pre_issue16: alpha(x) of the local adapter -> (self_weight, mix_weight) = (1 - alpha, alpha / (1 - a))."""
    alpha = np.asarray(alpha, np.float32)
    return (1.0 - alpha).astype(np.float32), (alpha / (1.0 - float(train_weight))).astype(np.float32)


def dynamic_blend(variant: str, test: np.ndarray, train: np.ndarray, *, max_weight: float, instance_num: int,
                  train_weight: float, rng: np.random.Generator):
    """FedDPA's dynamic mixing of n inputs of ONE client from their features and that client's
    training features (reference: last-token states under base + its local adapter;
    pre_issue16: base embeddings) -> (self_weight [n], mix_weight [n]) float32. The rule of
    `_feddpa_route` (what `predict` serves a bundle with); rng: `draw_rng(seed, client)`."""
    test, train = np.asarray(test, np.float32), np.asarray(train, np.float32)
    if variant == "reference":
        sim = drawn_mean_cosine(test, train, instance_draws(len(train), len(test), int(instance_num), rng))
        return reference_blend(max_weight * sim)
    return pre_issue16_blend(dynamic_weights(test, train, max_weight=max_weight, instance_num=int(instance_num),
                                             rng=rng), train_weight)


@partial(jax.jit, static_argnames=("cfg",))
def _last_token_batch(base, lora, tokens, mask, *, cfg):
    hidden = llama.transformer(base, tokens, mask, cfg=cfg, lora=lora)
    last = mask.shape[-1] - 1 - jnp.argmax(mask[:, ::-1], axis=-1)  # last real token of each row
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def last_token_states(base: dict, cfg, lora, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Final-normed last-layer state at each prompt's last real token, under base + `lora` (one
    adapter, weight 1; the reference's `hidden_states[-1][:, -1]` of left-padded prompts).
    tokens, mask [N, T] -> [N, D] float32 (batches padded to `batch_size`: one compile)."""
    out = np.zeros((tokens.shape[0], cfg.hidden_size), np.float32)
    for s in range(0, tokens.shape[0], batch_size):
        t, m = tokens[s: s + batch_size], mask[s: s + batch_size]
        k = t.shape[0]
        if k < batch_size:
            t, m = np.concatenate([t, np.repeat(t[:1], batch_size - k, 0)]), np.concatenate([m, np.repeat(m[:1], batch_size - k, 0)])
        out[s: s + k] = np.asarray(_last_token_batch(base, lora, jnp.asarray(t), jnp.asarray(m), cfg=cfg))[:k]
    return out


def _is_reference(env: Env) -> bool:
    return env.config.feddpa.variant == "reference"


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
    """Slot 0: the global adapter alone. Slot 1: the local adapter on top of the frozen global
    one: a L + (1 - a) sg(G) (reference; a inside the forward, `training.with_frozen`'s
    trainable_weight) or L + a sg(G) (pre_issue16)."""
    a = float(env.config.feddpa.train_weight)
    own, frozen_w = (a, 1.0 - a) if _is_reference(env) else (1.0, a)
    g, loc = task.adapters, state.adapters
    start = jax.tree.map(lambda x, y: jnp.stack([x, y], axis=1), g, loc)
    p = jax.tree.leaves(g)[0].shape[0]
    frozen = {}
    for t, q in g.items():
        frozen[t] = {"a": jnp.stack([jnp.zeros_like(q["a"]), q["a"]], axis=1),
                     "b": jnp.stack([jnp.zeros_like(q["b"]), frozen_w * q["b"]], axis=1)}
        if own != 1.0:
            frozen[t]["trainable_weight"] = jnp.tile(jnp.asarray([1.0, own], jnp.float32), (p, 1))
    return start, frozen


def _feddpa_reply(env: Env, state: AdapterState, task: DPATask, trained, reply):
    """The global slot is sent; the local slot stays on the client (from round 2 on)."""
    keep = task.keep_local
    new = AdapterState(jax.tree.map(lambda t, old: jnp.where(keep.reshape((-1,) + (1,) * (old.ndim - 1)), t[:, 1], old),
                                    trained, state.adapters))
    return new, reply.replace(adapters=jax.tree.map(lambda x: x[:, :1], trained), weight=reply.weight[:, :1])


def _feddpa_aggregate(env, state: AdapterState, task, reply, arrived, participants, round_idx) -> AdapterState:
    """FedAvg of the global slots: uniform over the arrived replies (reference,
    `fed_utils/model_aggregation.py`) or sample-weighted (pre_issue16)."""
    if _is_reference(env):
        reply = reply.replace(weight=(reply.weight > 0).astype(jnp.float32))
    return _fedit_aggregate(env, state, task, reply, arrived, participants, round_idx)


def _feddpa_route_features(env: Env, base: dict, state: AdapterState, inputs):
    """reference, dynamic mixing: each client's sim(x) [C, M] (`route_features`), computed with
    base + its own local adapter on its own prompts (`last_token_states`). The training samples
    compared with each test sample are drawn here (seed, client), so only those are embedded."""
    dc = env.config.feddpa
    if not _is_reference(env) or dc.mixing == "fixed":
        return inputs
    if inputs.train_prompt is None or inputs.test_prompt is None:
        raise ValueError("feddpa.variant: reference needs the clients' prompt tokens in the route inputs "
                         "(ClientInputs.train_prompt / test_prompt, set by runner.prepare)")
    test_m, train_m = np.asarray(inputs.test_mask, bool), np.asarray(inputs.train_mask, bool)
    sim = np.zeros(test_m.shape, np.float32)
    batch = int(env.config.eval.batch_size)
    for c, cid in enumerate(np.asarray(inputs.client_id)):
        n_test, n_train = int(test_m[c].sum()), int(train_m[c].sum())
        if n_test == 0 or n_train == 0:
            continue
        draws = instance_draws(n_train, n_test, int(dc.instance_num), draw_rng(env.config.seed, cid))
        used, where = np.unique(draws, return_inverse=True)
        lora = env.stack(jax.tree.map(lambda x: jnp.asarray(x[c]), state.adapters))
        te = last_token_states(base, env.model_cfg, lora, np.asarray(inputs.test_prompt[c])[test_m[c]],
                               np.asarray(inputs.test_prompt_mask[c])[test_m[c]], batch)
        tr = last_token_states(base, env.model_cfg, lora, np.asarray(inputs.train_prompt[c])[train_m[c]][used],
                               np.asarray(inputs.train_prompt_mask[c])[train_m[c]][used], batch)
        sim[c, :n_test] = drawn_mean_cosine(te, tr, where.reshape(draws.shape))
    return inputs.replace(route_features=sim)


def _feddpa_route_reference(env: Env, base: dict, state: AdapterState, inputs):
    """Dynamic mixing: what a new input of client c is compared with, from c's own training data
    (written by the run after its last round, exported into the bundle; `dynamic_blend`).
    reference: the last-token states of ALL its training prompts under base + its local adapter
    (`last_token_states`); pre_issue16: their base-model embeddings. -> {"train_features"
    [C, N, D] float32 (client c's rows first, zero after), "train_count" [C] int32}; None when
    mixing is fixed (nothing to compare)."""
    dc = env.config.feddpa
    if dc.mixing == "fixed":
        return None
    train_m = np.asarray(inputs.train_mask, bool)
    count = train_m.sum(axis=1).astype(np.int32)
    feats = np.zeros(train_m.shape + (env.model_cfg.hidden_size,), np.float32)
    if _is_reference(env) and (inputs.train_prompt is None):
        raise ValueError("feddpa.variant: reference needs the clients' training prompt tokens "
                         "(ClientInputs.train_prompt, set by runner.prepare)")
    batch = int(env.config.eval.batch_size)
    for c in range(train_m.shape[0]):
        if count[c] == 0:
            continue
        if _is_reference(env):
            lora = env.stack(jax.tree.map(lambda x: jnp.asarray(x[c]), state.adapters))
            tokens = np.asarray(inputs.train_prompt[c])[train_m[c]]
            mask = np.asarray(inputs.train_prompt_mask[c])[train_m[c]]
            feats[c, : count[c]] = last_token_states(base, env.model_cfg, lora, tokens, mask, batch)
        else:
            feats[c, : count[c]] = np.asarray(inputs.train_emb[c], np.float32)[train_m[c]]
    return {"train_features": feats, "train_count": count}


def _feddpa_route(env: Env, state: AdapterState, msg: RouteMessage, inputs, mode: str) -> Routing:
    """Shared [global] + own [local]; per test sample a blend of the two (see the variants above)."""
    dc, seed = env.config.feddpa, int(env.config.seed)
    m = np.asarray(inputs.test_mask, bool)
    own = jax.tree.map(lambda x: np.asarray(x)[:, None], state.adapters)
    ids, mix_ids = np.where(m, 0, -1).astype(np.int32), np.where(m, 1, -1).astype(np.int32)
    if _is_reference(env):  # weight(x) on the global adapter, 1 - weight(x) on the local one
        if dc.mixing == "fixed":
            weight = np.where(m, dc.fixed_weight, 0.0)
        elif inputs.route_features is None:
            raise ValueError("feddpa.variant: reference routes with route_features (call the method's "
                             "route_features(env, base, client_state, inputs) first)")
        else:
            weight = dc.max_weight * np.asarray(inputs.route_features, np.float32)
        self_w, mix_w = reference_blend(np.where(m, weight, 0.0))
        return Routing(own=own, ids=ids, mix_ids=mix_ids, mix_weight=np.where(m, mix_w, 0.0).astype(np.float32),
                       self_weight=self_w)
    tw = float(dc.train_weight)
    alpha = np.zeros(m.shape, np.float32)
    for c, cid in enumerate(np.asarray(inputs.client_id)):
        test, train = np.asarray(inputs.test_emb[c])[m[c]], np.asarray(inputs.train_emb[c])[np.asarray(inputs.train_mask[c], bool)]
        if dc.mixing == "fixed":
            alpha[c, : len(test)] = 1.0 - dc.fixed_weight
        else:
            alpha[c, : len(test)] = dynamic_weights(test.astype(np.float32), train.astype(np.float32),
                                                    max_weight=dc.max_weight, instance_num=dc.instance_num,
                                                    rng=draw_rng(seed, cid))
    self_w, mix_w = pre_issue16_blend(alpha, tw)
    return Routing(own=own, ids=ids, mix_ids=mix_ids, mix_weight=mix_w, self_weight=self_w)


FEDDPA = register(Method(
    name="feddpa", slots=lambda env: 2,
    client_setup=_feddpa_client_setup, client_pools=lambda env, s, task, inputs: pool_all(inputs.train_mask, 2),
    client_slots=_feddpa_slots, client_reply=_feddpa_reply, client_route=_feddpa_route,
    server_setup=_feddpa_server_setup, server_plan=_feddpa_plan, server_aggregate=_feddpa_aggregate,
    server_route=_shared_route, route_features=_feddpa_route_features, route_reference=_feddpa_route_reference,
    # slot s of client c: stream s * C + c (global slots of all clients first, as before this split)
    batch_stream=lambda env, client, slot: slot * env.n_clients + client, config_section=("feddpa", FedDPAConfig),
    description=("FedDPA-T: global adapter by FedAvg + a local adapter trained on top of the frozen global one; "
                 "instance-wise dynamic weighting at test time (feddpa.variant)"),
))
