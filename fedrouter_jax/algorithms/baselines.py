"""The paper's baselines (Table 1 / Table 3) with FedRouter's shape (see base.py).

Every method trains all of its slots of a round in ONE client-mapped jitted call (the runner's
`training.clients_local_steps`), with the same model, LoRA config, optimizer, local-step budget
(`train.local_steps` x `train.batch_size` per slot) and evaluation as FedRouter. Slot counts are
fixed by the config (C, or 2C for FedDPA), so the round step compiles once.

State is a plain nested dict of arrays (checkpointable as is). Shapes: C clients, K clusters.

* FedIT   (Zhang et al. 2024): one global adapter, FedAvg over all clients.
* Local:  one adapter per client, no communication.
* FedCluster (Sattler et al. 2020, as adapted in the FedRouter authors' code): FedAvg until
  `fedcluster.cluster_round`, then Ward clustering of the clients' LoRA-update cosine
  similarities into `fedcluster.n_clusters` groups, FedAvg within each group.
* FedSA-LoRA (Guo et al. 2024): A averaged over clients, B kept per client.
* FedDPA  (Yang, Long et al., NeurIPS 2024): global adapter by FedAvg + a personal local
  adapter trained on top of the frozen global one; instance-wise dynamic weighting at test time.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.algorithms.base import Context, EvalPlan, RoundPlan, register
from fedrouter_jax.lora import LoraStack
from fedrouter_jax.tree_util import segment_weighted_mean, take_rows, weighted_mean


# ----------------------------------------------------------------------------- shared pieces


def _rows(params: dict, index) -> dict:
    """params leaves [A, ...] -> leaves [len(index), ...] (host numpy, materialised)."""
    return jax.tree.map(lambda x: np.asarray(x)[np.asarray(index)], params)


def _one_init(ctx: Context, key: jax.Array, n: int) -> dict:
    """`n` copies of ONE freshly initialised adapter (every method starts from the same weights)."""
    return _rows(jax.tree.map(np.asarray, ctx.new_adapters(key, 1)), np.zeros(n, np.int64))


def _all_data(ctx: Context) -> list:
    """Every client trains on all of its training samples."""
    return [np.arange(int(n)) for n in ctx.train_sizes]


def _per_client_ids(ctx: Context, ids) -> list:
    """Test-sample adapter ids: client c's samples all use adapter ids[c]."""
    return [np.full(len(ctx.test_emb[c]), int(ids[c]), np.int32) for c in range(ctx.n_clients)]


def _client_plan(ctx: Context, start: dict, log=None) -> RoundPlan:
    """One slot per client, all its data, weights = its sample count."""
    return RoundPlan(
        slot_client=np.arange(ctx.n_clients, dtype=np.int32), pools=_all_data(ctx), start=ctx.stack(start),
        weights=np.asarray(ctx.train_sizes, np.float32), log=log or {},
    )


def _host(tree):
    return jax.tree.map(np.asarray, tree)


class _OneSlotPerClient:
    def n_slots(self, ctx: Context) -> int:
        return ctx.n_clients


# ----------------------------------------------------------------------------- FedIT


@register("fedit")
class FedIT(_OneSlotPerClient):
    """FedIT (Zhang et al. 2024, the instruction-tuning form of FedAvg, McMahan et al. 2017).

    Update rule, per round t, for both LoRA factors X in {A, B}:
        every client c trains the global adapter X^t for S local steps on all its data -> X_c^t;
        X^{t+1} = sum_c n_c X_c^t / sum_c n_c          (n_c = client c's training samples).
    Evaluation: every test sample uses the global adapter.
    """

    def init(self, ctx: Context, key: jax.Array) -> dict:
        return {"adapters": _one_init(ctx, key, 1)}

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan:
        return _client_plan(ctx, _rows(state["adapters"], np.zeros(ctx.n_clients, np.int64)))

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict:
        glob = weighted_mean(trained.params, jnp.asarray(plan.weights))
        return {**state, "adapters": _host(jax.tree.map(lambda x: x[None], glob))}

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan:
        return EvalPlan(adapters=ctx.stack(state["adapters"]), adapter_ids=_per_client_ids(ctx, [0] * ctx.n_clients))


# ----------------------------------------------------------------------------- Local


@register("local")
class Local(_OneSlotPerClient):
    """Local fine-tuning: no communication, no aggregation.

    Update rule: X_c^{t+1} = X_c^t after S local steps of client c on all its data, for X in {A, B}.
    Every client starts from the same initial adapter. Evaluation: client c uses X_c.
    """

    def init(self, ctx: Context, key: jax.Array) -> dict:
        return {"adapters": _one_init(ctx, key, ctx.n_clients)}

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan:
        return _client_plan(ctx, state["adapters"])

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict:
        return {**state, "adapters": _host(trained.params)}

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan:
        return EvalPlan(adapters=ctx.stack(state["adapters"]), adapter_ids=_per_client_ids(ctx, range(ctx.n_clients)))


# ----------------------------------------------------------------------------- FedSA-LoRA


@register("fedsa")
class FedSA(_OneSlotPerClient):
    """FedSA-LoRA (Guo et al. 2024, "Selective Aggregation for LoRA in Federated Learning").

    Update rule, per round t (reference code Pengxin-Guo/FedSA-LoRA: `personalization.local_param:
    ['lora_B']`, FederatedScope's sample-weighted FedAvg for the shared part):
        client c trains (A^t, B_c^t) for S local steps on all its data -> (A_c^t, B_c^{t+1});
        A^{t+1} = sum_c n_c A_c^t / sum_c n_c      (shared: the general knowledge)
        B_c^{t+1} stays on client c                 (personal: never averaged).
    All clients start from the same (A^0, B^0 = 0). Evaluation: client c uses (A, B_c).
    State: `adapters` [C, ...] whose A rows are all equal to the shared A.
    """

    def init(self, ctx: Context, key: jax.Array) -> dict:
        return {"adapters": _one_init(ctx, key, ctx.n_clients)}

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan:
        return _client_plan(ctx, state["adapters"])

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict:
        w = jnp.asarray(plan.weights)
        c = ctx.n_clients
        out = {}
        for t, p in trained.params.items():
            a = weighted_mean(p["a"], w)
            out[t] = {"a": jnp.broadcast_to(a, (c,) + a.shape), "b": p["b"]}
        return {**state, "adapters": _host(out)}

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan:
        return EvalPlan(adapters=ctx.stack(state["adapters"]), adapter_ids=_per_client_ids(ctx, range(ctx.n_clients)))


# ----------------------------------------------------------------------------- FedCluster


def update_vectors(trained: dict, start: dict, on: str = "b", layers: str = "all") -> np.ndarray:
    """Flattened LoRA updates per slot: leaves [C, L, ...] -> [C, P] float64.

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


@register("fedcluster")
class FedCluster(_OneSlotPerClient):
    """Clustered FL for LoRA (Sattler et al. 2020; the FedRouter authors' `fed_clustered.py`).

    Update rule (rounds t = 0, 1, ... ; k = `fedcluster.n_clusters`; t* = `fedcluster.cluster_round`,
    "the round after which clients are clustered", = the authors' `sim_round`):
        t <  t*: FedAvg over all clients (as FedIT); every cluster adapter = the global one.
        t == t*: client c trains from the global adapter -> X_c; its update dX_c = X_c - X^t
                 (LoRA B by default, `fedcluster.similarity_on` / `similarity_layers`);
                 S_ij = cos(dX_i, dX_j); clusters = Ward(pdist(rows of S)) cut into k groups;
        t >= t*: X_g^{t+1} = sum_{c in g} n_c X_c^t / sum_{c in g} n_c for each cluster g
                 (a cluster without clients keeps its adapter).
    The authors average within clusters unweighted; with equal client sizes (the paper's
    600 samples each) that is the same. Evaluation: client c uses its cluster's adapter.
    State: `adapters` [k, ...], `cluster_of` [C] (all 0 before clustering), `similarity` [C, C].
    """

    def init(self, ctx: Context, key: jax.Array) -> dict:
        k = int(ctx.config.fedcluster.n_clusters)
        return {
            "adapters": _one_init(ctx, key, k),
            "cluster_of": np.zeros(ctx.n_clients, np.int32),
            "similarity": np.full((ctx.n_clients, ctx.n_clients), np.nan, np.float32),
        }

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan:
        cluster_of = np.asarray(state["cluster_of"])
        return _client_plan(ctx, _rows(state["adapters"], cluster_of), log={"cluster_of": cluster_of.tolist()})

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict:
        fc = ctx.config.fedcluster
        k = int(fc.n_clusters)
        w = jnp.asarray(plan.weights)
        if round_idx < fc.cluster_round:  # FedAvg over all: every cluster adapter = the global one
            glob = weighted_mean(trained.params, w)
            adapters = jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + x.shape), glob)
            return {**state, "adapters": _host(adapters)}
        cluster_of = np.asarray(state["cluster_of"])
        if round_idx == fc.cluster_round:
            upd = update_vectors(trained.params, plan.start.params, fc.similarity_on, fc.similarity_layers)
            sim = cosine_similarity_matrix(upd)
            cluster_of = ward_clusters(sim, k)
            state = {**state, "similarity": sim.astype(np.float32)}
        adapters = segment_weighted_mean(trained.params, jnp.asarray(cluster_of), w, state["adapters"], num_segments=k)
        return {**state, "adapters": _host(adapters), "cluster_of": cluster_of.astype(np.int32)}

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan:
        return EvalPlan(adapters=ctx.stack(state["adapters"]),
                        adapter_ids=_per_client_ids(ctx, np.asarray(state["cluster_of"])))


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


@register("feddpa")
class FedDPA:
    """FedDPA-T (Yang, Long et al., NeurIPS 2024, "Dual-Personalizing Adapter for Federated
    Foundation Models"; reference code Lydia-yang/FedDPA, `main.py --local_model`).

    Update rule, per round t, with the global adapter G^t and client c's local adapter L_c^t:
        local (t >= 1; the reference trains no local adapter in its first round):
            client c trains L_c on top of the frozen G^t, the model's update being
            tw * dW(G^t) + dW(L_c)   (tw = `feddpa.train_weight`, the code's 0.5 / 0.5 mix, written
            with the local half's factor absorbed into L_c) -> L_c^{t+1};
        global: client c trains G^t alone -> G_c^t;  G^{t+1} = sum_c n_c G_c^t / sum_c n_c.
    Both trainings run in ONE call: slots [global x C] + [local x C], a zero frozen adapter on the
    global slots and tw * G^t on the local slots (`RoundPlan.frozen`); 2C slots every round.
    Inference, per test sample x of client c, with the local weight alpha(x):
        dW = (1 - alpha) dW(G) + alpha / (1 - tw) * dW(L_c)
    (so alpha = 1 - tw reproduces the training-time model exactly), where
      * `feddpa.mixing: dynamic` (DEFAULT, the paper's instance-wise dynamic weighting, also the
        code's `--auto`): alpha(x) = max_weight * mean cosine similarity between the base-model
        representation of x and those of `instance_num` of client c's training samples (see
        `dynamic_weights`); the representation is the runner's mean-pooled last hidden state
        (the code's `emb_type=avg`), max_weight 0.5 as the code's `half`;
      * `feddpa.mixing: fixed` (the released code's default): alpha = 1 - `feddpa.fixed_weight`.
    State: `global` [1, ...], `local` [C, ...].
    """

    def init(self, ctx: Context, key: jax.Array) -> dict:
        kg, kl = jax.random.split(key)
        return {"global": _one_init(ctx, kg, 1), "local": _host(ctx.new_adapters(kl, ctx.n_clients))}

    def n_slots(self, ctx: Context) -> int:
        return 2 * ctx.n_clients

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan:
        c = ctx.n_clients
        tw = float(ctx.config.feddpa.train_weight)
        glob = _rows(state["global"], np.zeros(c, np.int64))
        start = jax.tree.map(lambda g, l: np.concatenate([g, np.asarray(l)]), glob, state["local"])
        frozen = {t: {"a": np.concatenate([np.zeros_like(p["a"]), p["a"]]),
                      "b": np.concatenate([np.zeros_like(p["b"]), tw * p["b"]])} for t, p in glob.items()}
        sizes = np.asarray(ctx.train_sizes, np.float32)
        return RoundPlan(
            slot_client=np.tile(np.arange(c, dtype=np.int32), 2), pools=_all_data(ctx) * 2,
            start=ctx.stack(start), frozen=ctx.stack(frozen), weights=np.concatenate([sizes, sizes]),
            log={"slots": "global x C + local x C", "local_kept": bool(round_idx >= 1)},
        )

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict:
        c = ctx.n_clients
        glob = weighted_mean(take_rows(trained.params, jnp.arange(c)), jnp.asarray(plan.weights[:c]))
        out = {**state, "global": _host(jax.tree.map(lambda x: x[None], glob))}
        if round_idx >= 1:
            out["local"] = _host(take_rows(trained.params, jnp.arange(c, 2 * c)))
        return out

    def mix_weights(self, ctx: Context) -> list[np.ndarray]:
        """Per client [N_c]: alpha, the local adapter's weight for each test sample."""
        dc = ctx.config.feddpa
        if dc.mixing == "fixed":
            return [np.full(len(e), 1.0 - dc.fixed_weight, np.float32) for e in ctx.test_emb]
        return [
            dynamic_weights(np.asarray(ctx.test_emb[c], np.float32), np.asarray(ctx.train_emb[c], np.float32),
                            max_weight=dc.max_weight, instance_num=dc.instance_num,
                            rng=np.random.default_rng([int(ctx.config.seed), 7, c]))
            for c in range(ctx.n_clients)
        ]

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan:
        """Stack [1 + C]: 0 = global, 1 + c = client c's local adapter; per-sample blends."""
        tw = float(ctx.config.feddpa.train_weight)
        stack = jax.tree.map(lambda g, l: np.concatenate([g, l]), state["global"], state["local"])
        alphas = self.mix_weights(ctx)
        ids = [np.zeros(len(a), np.int32) for a in alphas]
        mix = [(np.full(len(a), 1 + c, np.int32), (a / (1.0 - tw)).astype(np.float32), (1.0 - a).astype(np.float32))
               for c, a in enumerate(alphas)]
        return EvalPlan(adapters=ctx.stack(stack), adapter_ids=ids, mix=mix,
                        log={"local_weight_mean": [float(a.mean()) if a.size else float("nan") for a in alphas]})
