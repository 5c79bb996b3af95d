"""Baselines (FedIT, Local, FedSA, FedCluster, FedDPA) on hand-computed numbers, and smoke runs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.algorithms.baselines import (cosine_similarity_matrix, dynamic_weights, update_vectors,
                                                ward_clusters)
from fedrouter_jax.config import load_config
from fedrouter_jax.lora import delta_weight, take
from fedrouter_jax.routing import blend_per_sample
from fedrouter_jax.simulator import SimState, eval_plan

from helpers import smoke_overrides
from method_helpers import fake_round, filled_like, make_env, leaf_values, random_env, route, setup


def first_round(method, sizes=(1, 3), overrides=()):
    """Two clients (1 and 3 samples) train adapters with A = 1, 2 and B = 4, -4 in round 0:
    (env, inputs, method, msg, pools, client rows after, reply, server after, clients before, server before)."""
    env, inputs = random_env(sizes, overrides)
    m, clients, server = setup(method, env, inputs)
    msg, pools, rows, reply, new = fake_round(m, env, inputs, clients, server, 0,
                                              lambda start: filled_like(start, [[1.0], [2.0]], [[4.0], [-4.0]]))
    return env, inputs, m, msg, pools, rows, reply, new


def test_fedit_aggregation_is_sample_weighted_mean():
    env, inputs, m, msg, pools, rows, reply, new = first_round("fedit")
    assert pools.sum(-1).tolist() == [[1], [3]] and np.asarray(reply.weight).tolist() == [[1.0], [3.0]]
    # (1 * 1 + 3 * 2) / 4 = 1.75 ; (1 * 4 + 3 * -4) / 4 = -2
    np.testing.assert_allclose(leaf_values(new.adapters, "a"), [1.75])
    np.testing.assert_allclose(leaf_values(new.adapters, "b"), [-2.0])
    assert np.asarray(route(m, env, rows, new, inputs).ids).tolist() == [[0, 0], [0, 0]]


def test_fedit_keeps_its_adapter_when_no_reply_arrives():
    env, inputs = random_env()
    m, clients, server = setup("fedit", env, inputs)
    *_, new = fake_round(m, env, inputs, clients, server, 0, lambda s: filled_like(s, [[1.0], [2.0]], [[4.0], [-4.0]]),
                         arrived=[False, False])
    for t in server.adapters:
        np.testing.assert_array_equal(new.adapters[t]["a"], server.adapters[t]["a"])
    *_, new = fake_round(m, env, inputs, clients, server, 0, lambda s: filled_like(s, [[1.0], [2.0]], [[4.0], [-4.0]]),
                         arrived=[False, True])  # only client 1's reply: the mean is its adapter
    np.testing.assert_allclose(leaf_values(new.adapters, "a"), [2.0])


def test_local_has_no_mixing():
    env, inputs, m, msg, pools, rows, reply, new = first_round("local")
    assert reply.adapters is None  # nothing is sent
    np.testing.assert_array_equal(leaf_values(rows.adapters, "a"), [1.0, 2.0])
    np.testing.assert_array_equal(leaf_values(rows.adapters, "b"), [4.0, -4.0])
    r = route(m, env, rows, new, inputs)
    assert np.asarray(r.ids).tolist() == [[0, 0], [0, 0]]  # each client's own adapter (index 0 of its own)
    np.testing.assert_array_equal(leaf_values(r.own, "b", lead=2), [[4.0], [-4.0]])
    # next round each client starts from its own adapter
    start, _ = m.client_slots(env, rows, m.server_plan(env, new, 1, np.arange(2)))
    np.testing.assert_array_equal(leaf_values(start, "b", lead=2), [[4.0], [-4.0]])


def test_fedsa_averages_a_and_keeps_b_per_client():
    env, inputs, m, msg, pools, rows, reply, new = first_round("fedsa")
    assert set(next(iter(reply.adapters.values()))) == {"a"}  # only A is sent
    np.testing.assert_allclose(leaf_values(new.adapters, "a"), [1.75])
    np.testing.assert_array_equal(leaf_values(rows.adapters, "b"), [4.0, -4.0])
    r = route(m, env, rows, new, inputs)
    np.testing.assert_allclose(leaf_values(r.own, "a", lead=2), [[1.75], [1.75]])
    np.testing.assert_array_equal(leaf_values(r.own, "b", lead=2), [[4.0], [-4.0]])


def test_ward_clustering_groups_identical_update_directions():
    rng = np.random.default_rng(0)
    u, v, w = rng.normal(size=(3, 50))
    # clients 0, 2, 5 move along u, clients 1, 4 along v, client 3 along w (different norms)
    upd = np.stack([1.0 * u, 2.0 * v, 3.0 * u, 0.5 * w, 0.7 * v, 9.0 * u])
    sim = cosine_similarity_matrix(upd)
    np.testing.assert_allclose(np.diag(sim), 1.0)
    np.testing.assert_allclose(sim[0, 2], 1.0)
    np.testing.assert_allclose(sim[0, 1], u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    assert ward_clusters(sim, 3).tolist() == [0, 1, 0, 2, 1, 0]
    assert ward_clusters(sim, 1).tolist() == [0] * 6
    assert ward_clusters(sim, 6).tolist() == list(range(6))


def test_fedcluster_fedavg_then_clusters_by_update_direction():
    env, inputs = random_env((1, 1, 3, 1), ["fedcluster.n_clusters=2", "fedcluster.cluster_round=1", "train.rounds=3"])
    m, clients, server = setup("fedcluster", env, inputs)
    # round 0 (< cluster_round): FedAvg over all clients into every cluster adapter
    *_, s1 = fake_round(m, env, inputs, clients, server, 0,
                        lambda st: filled_like(st, [[1.0], [2.0], [3.0], [4.0]], [[1.0]] * 4))
    np.testing.assert_allclose(leaf_values(s1.adapters, "a"), [(1 + 2 + 9 + 4) / 6] * 2, rtol=1e-6)
    assert s1.cluster_of.tolist() == [0, 0, 0, 0]
    # round 1 (= cluster_round): B updates of clients 0, 2 along one direction, of 1, 3 along another
    rng = np.random.default_rng(1)
    scale, group = [1.0, 2.0, 3.0, 0.5], [0, 1, 0, 1]
    new_params = {}

    def train(start):
        for t, q in start.items():
            d = [rng.normal(size=np.asarray(q["b"]).shape[2:]) for _ in range(2)]
            new_params[t] = {"a": np.asarray(q["a"]) + 0.0,
                             "b": np.stack([np.asarray(q["b"][c]) + scale[c] * d[group[c]] for c in range(4)])}
        return new_params

    msg, _, _, _, s2 = fake_round(m, env, inputs, clients, s1, 1, train)
    start = jax.tree.map(lambda x: np.asarray(x)[:, 0], msg.adapters)
    upd = update_vectors(jax.tree.map(lambda x: x[:, 0], new_params), start)
    np.testing.assert_allclose(cosine_similarity_matrix(upd)[0, 2], 1.0)
    assert s2.cluster_of.tolist() == [0, 1, 0, 1]
    for t in start:  # cluster 0 = (1 * client0 + 3 * client2) / 4
        b = new_params[t]["b"][:, 0]
        np.testing.assert_allclose(s2.adapters[t]["b"][0], (b[0] + 3 * b[2]) / 4, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s2.adapters[t]["b"][1], (b[1] + b[3]) / 2, rtol=1e-5, atol=1e-6)
    assert np.asarray(route(m, env, clients, s2, inputs).ids).tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
    # later rounds start each client from its cluster's adapter
    p3 = m.server_plan(env, s2, 2, np.arange(4))
    for t in start:
        np.testing.assert_array_equal(np.asarray(p3.adapters[t]["b"][3, 0]), s2.adapters[t]["b"][1])


def test_fedcluster_client_absent_at_clustering_joins_later():
    env, inputs = random_env((1, 1, 1, 1), ["fedcluster.n_clusters=2", "fedcluster.cluster_round=0"])
    m, clients, server = setup("fedcluster", env, inputs)
    rng = np.random.default_rng(2)
    dirs = None

    def train(start, who=(0, 1, 0, 1)):
        nonlocal dirs
        out = {}
        for t, q in start.items():
            if dirs is None or t not in dirs:
                dirs = {**(dirs or {}), t: [rng.normal(size=np.asarray(q["b"]).shape[2:]) for _ in range(2)]}
            out[t] = {"a": np.asarray(q["a"]) + 0.0,
                      "b": np.stack([np.asarray(q["b"][p]) + dirs[t][who[p]] for p in range(len(who))])}
        return out

    *_, s1 = fake_round(m, env, inputs, clients, server, 0, train, arrived=[True, True, True, False])
    assert s1.cluster_of.tolist()[:3] == [0, 1, 0] and s1.cluster_of[3] == -1
    assert np.isnan(s1.similarity[3]).all() and np.isfinite(s1.similarity[:3, :3]).all()
    # client 3 replies in round 1 moving along client 1's direction: it joins client 1's cluster
    *_, s2 = fake_round(m, env, inputs, clients, s1, 1, lambda st: train(st, who=(1,)), participants=[3])
    assert s2.cluster_of.tolist() == [0, 1, 0, 1]


def test_feddpa_dynamic_weights_by_hand():
    test = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], np.float32)
    train = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    a = dynamic_weights(test, train, max_weight=0.5, instance_num=0, rng=np.random.default_rng(0))
    # mean cos: [ (1 + 0) / 2, (s + s) / 2 with s = 1/sqrt(2), (-1 + 0) / 2 -> clipped at 0 ]
    np.testing.assert_allclose(a, [0.25, 0.5 / np.sqrt(2), 0.0], rtol=1e-6)
    # one sampled instance per test sample: the weight is 0.5 * cos to that one sample
    one = dynamic_weights(test[:1], train, max_weight=0.5, instance_num=1, rng=np.random.default_rng(3))
    assert float(one[0]) in (0.5, 0.0)


@pytest.mark.parametrize("mixing", ["dynamic", "fixed"])
def test_feddpa_eval_blend_is_the_hand_combination(mixing):
    """pre_issue16: alpha on the local adapter, from the base model's input embeddings."""
    test_emb = [np.array([[1.0, 0.0], [1.0, 1.0]], np.float32), np.array([[0.0, 1.0]], np.float32)]
    train_emb = [np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([[0.0, 2.0]], np.float32)]
    env, inputs = make_env(train_emb, test_emb, ["lora.rank=2", "lora.targets=[q_proj, v_proj]",
                                                 f"feddpa.mixing={mixing}", "feddpa.fixed_weight=0.7",
                                                 "feddpa.instance_num=0", "feddpa.train_weight=0.5",
                                                 "feddpa.variant=pre_issue16"])
    m, clients, server = setup("feddpa", env, inputs)
    keys = iter(jax.random.split(jax.random.PRNGKey(5), 8))
    rand = lambda t: jax.tree.map(lambda x: np.asarray(jax.random.normal(next(keys), x.shape)), t)  # noqa: E731
    server, clients = server.replace(adapters=rand(server.adapters)), clients.replace(adapters=rand(clients.adapters))
    ev = eval_plan(m, env, SimState(server=server, clients=clients), inputs, "local")
    alpha = ([0.25, 0.5 / np.sqrt(2)], [0.5]) if mixing == "dynamic" else ([0.3, 0.3], [0.3])
    for c in range(2):  # joint stack: [global | local of client 0 | local of client 1]
        np.testing.assert_array_equal(ev.adapter_ids[c], 0)
        np.testing.assert_array_equal(ev.mix_ids[c], 1 + c)
        np.testing.assert_allclose(ev.mix_weight[c], np.array(alpha[c]) / 0.5, rtol=1e-6)  # local / (1 - tw)
        np.testing.assert_allclose(ev.self_weight[c], 1 - np.array(alpha[c]), rtol=1e-6)
    for t in server.adapters:
        np.testing.assert_array_equal(np.asarray(ev.adapters.params[t]["a"][0]), server.adapters[t]["a"][0])
        np.testing.assert_array_equal(np.asarray(ev.adapters.params[t]["b"][2]), clients.adapters[t]["b"][1])
    # blended adapter of client 0's second sample = (1 - a) * dW(G) + a / (1 - tw) * dW(L_0)
    ids = jnp.array([0, 0, 0]); other = jnp.array([1, 1, 2])
    w = jnp.concatenate([jnp.asarray(ev.mix_weight[0]), jnp.asarray(ev.mix_weight[1])])
    sw = jnp.concatenate([jnp.asarray(ev.self_weight[0]), jnp.asarray(ev.self_weight[1])])
    blended = blend_per_sample(ev.adapters, ids, other, w, sw)
    a01, a1 = alpha[0][1], alpha[1][0]
    for t in server.adapters:
        got = delta_weight(take(blended, 1), t)
        want = (1 - a01) * delta_weight(take(ev.adapters, 0), t) + a01 / 0.5 * delta_weight(take(ev.adapters, 1), t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
        got = delta_weight(take(blended, 2), t)
        want = (1 - a1) * delta_weight(take(ev.adapters, 0), t) + a1 / 0.5 * delta_weight(take(ev.adapters, 2), t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_feddpa_slots_frozen_and_aggregate():
    """pre_issue16: local slot L + tw sg(G), sample-weighted FedAvg."""
    env, inputs = random_env((1, 3), ["feddpa.train_weight=0.25", "feddpa.variant=pre_issue16"])
    m, clients, server = setup("feddpa", env, inputs)
    server = server.replace(adapters=jax.tree.map(lambda x: x + 1.0, server.adapters))  # non-zero B
    for r in (0, 1):
        msg = m.server_plan(env, server, r, np.arange(2))
        start, frozen = m.client_slots(env, clients, msg)
        assert np.asarray(m.client_pools(env, clients, msg, inputs)).sum(-1).tolist() == [[1, 1], [3, 3]]
        for t, g in server.adapters.items():  # slot 0: global alone; slot 1: local on top of tw x global
            np.testing.assert_array_equal(np.asarray(frozen[t]["b"][:, 0]), 0.0)
            np.testing.assert_allclose(np.asarray(frozen[t]["b"][:, 1]), 0.25 * np.repeat(g["b"], 2, 0))
            np.testing.assert_array_equal(np.asarray(start[t]["a"][:, 0]), np.repeat(g["a"], 2, 0))
            np.testing.assert_array_equal(np.asarray(start[t]["a"][:, 1]), clients.adapters[t]["a"])
    trained = lambda st: filled_like(st, [[1.0, 5.0], [2.0, 6.0]], [[4.0, 7.0], [-4.0, 8.0]])  # noqa: E731
    _, _, rows0, reply, s0 = fake_round(m, env, inputs, clients, server, 0, trained)
    np.testing.assert_allclose(leaf_values(s0.adapters, "a"), [1.75])
    np.testing.assert_allclose(leaf_values(s0.adapters, "b"), [-2.0])
    for t in clients.adapters:  # round 1: the reference trains no local adapter yet
        np.testing.assert_array_equal(rows0.adapters[t]["a"], clients.adapters[t]["a"])
    _, _, rows1, _, _ = fake_round(m, env, inputs, clients, server, 1, trained)
    np.testing.assert_array_equal(leaf_values(rows1.adapters, "a"), [5.0, 6.0])
    np.testing.assert_array_equal(leaf_values(rows1.adapters, "b"), [7.0, 8.0])


def test_feddpa_reference_slots_and_uniform_aggregate():
    """reference: local slot a L + (1 - a) sg(G) (a inside the forward), uniform FedAvg."""
    env, inputs = random_env((1, 3), ["feddpa.train_weight=0.25"])
    m, clients, server = setup("feddpa", env, inputs)
    server = server.replace(adapters=jax.tree.map(lambda x: x + 1.0, server.adapters))
    msg = m.server_plan(env, server, 1, np.arange(2))
    start, frozen = m.client_slots(env, clients, msg)
    for t, g in server.adapters.items():
        np.testing.assert_array_equal(np.asarray(frozen[t]["b"][:, 0]), 0.0)
        np.testing.assert_allclose(np.asarray(frozen[t]["b"][:, 1]), 0.75 * np.repeat(g["b"], 2, 0))
        np.testing.assert_array_equal(np.asarray(frozen[t]["trainable_weight"]), [[1.0, 0.25], [1.0, 0.25]])
    trained = lambda st: filled_like(st, [[1.0, 5.0], [2.0, 6.0]], [[4.0, 7.0], [-4.0, 8.0]])  # noqa: E731
    _, _, _, _, s0 = fake_round(m, env, inputs, clients, server, 0, trained)
    np.testing.assert_allclose(leaf_values(s0.adapters, "a"), [1.5])  # (1 + 2) / 2, not (1 + 3 * 2) / 4
    np.testing.assert_allclose(leaf_values(s0.adapters, "b"), [0.0])


@pytest.mark.parametrize("mixing", ["dynamic", "fixed"])
def test_feddpa_reference_route_puts_the_weight_on_the_global_adapter(mixing):
    env, inputs = random_env((1, 3), [f"feddpa.mixing={mixing}", "feddpa.fixed_weight=0.7", "feddpa.max_weight=0.5"])
    m, clients, server = setup("feddpa", env, inputs)
    sim = np.array([[0.6, -0.2], [0.4, 1.0]], np.float32)  # not clipped: the reference does not clip
    r = route(m, env, clients, server, inputs.replace(route_features=sim))
    weight = 0.5 * sim if mixing == "dynamic" else np.full((2, 2), 0.7)
    np.testing.assert_array_equal(r.ids, 0)       # the shared global adapter ...
    np.testing.assert_array_equal(r.mix_ids, 1)   # ... blended with the client's own local one
    np.testing.assert_allclose(r.self_weight, weight, rtol=1e-6)
    np.testing.assert_allclose(r.mix_weight, 1.0 - weight, rtol=1e-6)
    if mixing == "dynamic":
        with pytest.raises(ValueError, match="route_features"):
            route(m, env, clients, server, inputs)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, model_dir):
    import os

    os.environ["FEDROUTER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from fedrouter_jax.runner import prepare

    cfg = load_config(None, smoke_overrides(model_dir, tmp_path_factory.mktemp("unused"), **{
        "train.rounds": 2, "fedcluster.n_clusters": 2, "fedcluster.cluster_round": 1,
        "checkpoint.every": 0}))
    return cfg, prepare(cfg, progress=False)


# FedCluster in the default suite (its cluster assignment is checked here); the others' numbers
# are pinned by test_reference_numbers, so their plain runs are -m slow
@pytest.mark.parametrize("method", [m if m == "fedcluster" else pytest.param(m, marks=pytest.mark.slow)
                                    for m in ["fedit", "local", "fedcluster", "fedsa", "feddpa"]])
def test_smoke_run_through_runner(prepared, method, tmp_path):
    from fedrouter_jax.runner import Run

    cfg, data = prepared
    cfg = dataclasses.replace(cfg, method=method, out_dir=str(tmp_path / method))
    run = Run(cfg, data=data, progress=False)
    out = run.run()
    assert [h["round"] for h in out["history"]] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in out["history"])
    res = run.final_evaluation()
    assert 0.0 <= res["rouge1"] <= 1.0
    assert len(res["local"]["per_client"]) == cfg.data.n_clients
    if method == "fedcluster":
        assert sorted(set(np.asarray(out["state"].server.cluster_of).tolist())) <= [0, 1]
        assert np.isfinite(out["state"].server.similarity).all()
