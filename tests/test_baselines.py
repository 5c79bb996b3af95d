"""Baselines (FedIT, Local, FedSA, FedCluster, FedDPA) on hand-computed numbers, and smoke runs."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.algorithms.base import Context, get_algorithm
from fedrouter_jax.algorithms.baselines import (cosine_similarity_matrix, dynamic_weights, update_vectors,
                                                ward_clusters)
from fedrouter_jax.config import load_config
from fedrouter_jax.lora import LoraStack, delta_weight, take
from fedrouter_jax.routing import blend_per_sample

from helpers import TINY, smoke_overrides


def make_ctx(sizes=(1, 3), overrides=(), test_emb=None, train_emb=None):
    n = len(sizes)
    cfg = load_config(None, ["lora.rank=2", "lora.targets=[q_proj, v_proj]", f"data.n_clients={n}",
                             "data.train_per_client=8", "fedcluster.n_clusters=1", *overrides])
    rng = np.random.default_rng(0)
    train = train_emb or [rng.normal(size=(s, 4)).astype(np.float32) for s in sizes]
    test = test_emb or [rng.normal(size=(2, 4)).astype(np.float32) for _ in sizes]
    return Context(config=cfg, model_cfg=TINY, n_clients=n, train_sizes=np.asarray(sizes), train_emb=train,
                   test_emb=test)


def filled(ctx, n, a_vals, b_vals):
    """A stack of n adapters whose A (B) leaves of adapter i are all a_vals[i] (b_vals[i])."""
    p = ctx.new_adapters(jax.random.PRNGKey(0), n)
    col = lambda v, x: jnp.asarray(v, jnp.float32).reshape((n,) + (1,) * (x.ndim - 1)) * jnp.ones_like(x)
    return ctx.stack({t: {"a": col(a_vals, q["a"]), "b": col(b_vals, q["b"])} for t, q in p.items()})


def leaf_values(params, factor):
    """Per adapter, the (constant) value of each factor's leaves; asserts they are constant."""
    out = []
    for t, q in params.items():
        x = np.asarray(q[factor])
        v = x.reshape(x.shape[0], -1)
        np.testing.assert_array_equal(v, v[:, :1].repeat(v.shape[1], 1))
        out.append(v[:, 0])
    np.testing.assert_array_equal(out[0], out[-1])
    return out[0]


def first_round(method):
    """Two clients (1 and 3 samples) train adapters with A = 1, 2 and B = 4, -4; the round's
    (ctx, algo, plan, aggregated state)."""
    ctx = make_ctx(sizes=(1, 3))
    algo = get_algorithm(method)
    state = algo.init(ctx, jax.random.PRNGKey(0))
    plan = algo.plan(ctx, state, 0)
    new = algo.aggregate(ctx, state, plan, filled(ctx, 2, [1.0, 2.0], [4.0, -4.0]), 0)
    return ctx, algo, plan, new


def test_fedit_aggregation_is_sample_weighted_mean():
    ctx, algo, plan, new = first_round("fedit")
    assert plan.slot_client.tolist() == [0, 1] and plan.weights.tolist() == [1.0, 3.0]
    assert [p.size for p in plan.pools] == [1, 3]
    # (1 * 1 + 3 * 2) / 4 = 1.75 ; (1 * 4 + 3 * -4) / 4 = -2
    np.testing.assert_allclose(leaf_values(new["adapters"], "a"), [1.75])
    np.testing.assert_allclose(leaf_values(new["adapters"], "b"), [-2.0])
    ev = algo.route(ctx, new, "local")
    assert [ids.tolist() for ids in ev.adapter_ids] == [[0, 0], [0, 0]]


def test_local_has_no_mixing():
    ctx, algo, plan, new = first_round("local")
    np.testing.assert_array_equal(leaf_values(new["adapters"], "a"), [1.0, 2.0])
    np.testing.assert_array_equal(leaf_values(new["adapters"], "b"), [4.0, -4.0])
    assert [ids.tolist() for ids in algo.route(ctx, new, "local").adapter_ids] == [[0, 0], [1, 1]]
    # next round each client starts from its own adapter
    np.testing.assert_array_equal(leaf_values(algo.plan(ctx, new, 1).start.params, "b"), [4.0, -4.0])


def test_fedsa_averages_a_and_keeps_b_per_client():
    ctx, algo, plan, new = first_round("fedsa")
    np.testing.assert_allclose(leaf_values(new["adapters"], "a"), [1.75, 1.75])
    np.testing.assert_array_equal(leaf_values(new["adapters"], "b"), [4.0, -4.0])
    assert [ids.tolist() for ids in algo.route(ctx, new, "local").adapter_ids] == [[0, 0], [1, 1]]


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
    sizes = (1, 1, 3, 1)
    ctx = make_ctx(sizes=sizes, overrides=["fedcluster.n_clusters=2", "fedcluster.cluster_round=1",
                                           "train.rounds=3"])
    algo = get_algorithm("fedcluster")
    state = algo.init(ctx, jax.random.PRNGKey(0))
    plan = algo.plan(ctx, state, 0)
    # round 0 (< cluster_round): FedAvg over all clients into every cluster adapter
    trained = filled(ctx, 4, [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0])
    s1 = algo.aggregate(ctx, state, plan, trained, 0)
    np.testing.assert_allclose(leaf_values(s1["adapters"], "a"), [(1 + 2 + 9 + 4) / 6] * 2)
    assert s1["cluster_of"].tolist() == [0, 0, 0, 0]
    # round 1 (= cluster_round): B updates of clients 0, 2 along +, of 1, 3 along a different direction
    plan = algo.plan(ctx, s1, 1)
    start = plan.start.params
    rng = np.random.default_rng(1)
    dirs = {t: [rng.normal(size=np.asarray(q["b"]).shape[1:]) for _ in range(2)] for t, q in start.items()}
    scale = [1.0, 2.0, 3.0, 0.5]
    group = [0, 1, 0, 1]
    new_params = {t: {"a": np.asarray(q["a"]) + 0.0,
                      "b": np.stack([np.asarray(q["b"][c]) + scale[c] * dirs[t][group[c]] for c in range(4)])}
                  for t, q in start.items()}
    upd = update_vectors(new_params, start)
    np.testing.assert_allclose(cosine_similarity_matrix(upd)[0, 2], 1.0)
    s2 = algo.aggregate(ctx, s1, plan, ctx.stack(new_params), 1)
    assert s2["cluster_of"].tolist() == [0, 1, 0, 1]
    for t in start:  # cluster 0 = (1 * client0 + 3 * client2) / 4
        np.testing.assert_allclose(np.asarray(s2["adapters"][t]["b"][0]),
                                   (new_params[t]["b"][0] + 3 * new_params[t]["b"][2]) / 4, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(s2["adapters"][t]["b"][1]),
                                   (new_params[t]["b"][1] + new_params[t]["b"][3]) / 2, rtol=1e-5, atol=1e-6)
    assert [ids.tolist() for ids in algo.route(ctx, s2, "local").adapter_ids] == [[0, 0], [1, 1], [0, 0], [1, 1]]
    # later rounds start each client from its cluster's adapter
    p3 = algo.plan(ctx, s2, 2)
    for t in start:
        np.testing.assert_array_equal(np.asarray(p3.start.params[t]["b"][3]), np.asarray(s2["adapters"][t]["b"][1]))


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
    test_emb = [np.array([[1.0, 0.0], [1.0, 1.0]], np.float32), np.array([[0.0, 1.0]], np.float32)]
    train_emb = [np.array([[1.0, 0.0], [0.0, 1.0]], np.float32), np.array([[0.0, 2.0]], np.float32)]
    ctx = make_ctx(sizes=(2, 1), overrides=[f"feddpa.mixing={mixing}", "feddpa.fixed_weight=0.7",
                                            "feddpa.instance_num=0", "feddpa.train_weight=0.5"],
                   test_emb=test_emb, train_emb=train_emb)
    algo = get_algorithm("feddpa")
    lora = filled(ctx, 3, [0, 0, 0], [0, 0, 0])  # replaced by random values below
    keys = jax.random.split(jax.random.PRNGKey(5), 6)
    params = {t: {"a": jax.random.normal(keys[i], q["a"].shape), "b": jax.random.normal(keys[i + 3], q["b"].shape)}
              for i, (t, q) in enumerate(lora.params.items())}
    state = {"global": jax.tree.map(lambda x: np.asarray(x[:1]), params),
             "local": jax.tree.map(lambda x: np.asarray(x[1:]), params)}
    ev = algo.route(ctx, state, "local")
    alpha = ([0.25, 0.5 / np.sqrt(2)], [0.5]) if mixing == "dynamic" else ([0.3, 0.3], [0.3])
    for c in range(2):
        np.testing.assert_array_equal(ev.adapter_ids[c], 0)
        np.testing.assert_array_equal(ev.mix[c][0], 1 + c)
        np.testing.assert_allclose(ev.mix[c][1], np.array(alpha[c]) / 0.5, rtol=1e-6)  # local / (1 - tw)
        np.testing.assert_allclose(ev.mix[c][2], 1 - np.array(alpha[c]), rtol=1e-6)
    # blended adapter of client 0's second sample = (1 - a) * dW(G) + a / (1 - tw) * dW(L_0)
    ids = jnp.array([0, 0, 0]); other = jnp.array([1, 1, 2])
    w = jnp.concatenate([jnp.asarray(ev.mix[0][1]), jnp.asarray(ev.mix[1][1])])
    sw = jnp.concatenate([jnp.asarray(ev.mix[0][2]), jnp.asarray(ev.mix[1][2])])
    blended = blend_per_sample(ev.adapters, ids, other, w, sw)
    a01, a1 = alpha[0][1], alpha[1][0]
    for t in params:
        got = delta_weight(take(blended, 1), t)
        want = (1 - a01) * delta_weight(take(ev.adapters, 0), t) + a01 / 0.5 * delta_weight(take(ev.adapters, 1), t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
        got = delta_weight(take(blended, 2), t)
        want = (1 - a1) * delta_weight(take(ev.adapters, 0), t) + a1 / 0.5 * delta_weight(take(ev.adapters, 2), t)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_feddpa_plan_slots_frozen_and_aggregate():
    ctx = make_ctx(sizes=(1, 3), overrides=["feddpa.train_weight=0.25"])
    algo = get_algorithm("feddpa")
    state = algo.init(ctx, jax.random.PRNGKey(0))
    state["global"] = jax.tree.map(lambda x: x + 1.0, state["global"])  # non-zero B
    p0, p1 = algo.plan(ctx, state, 0), algo.plan(ctx, state, 1)
    assert p0.slot_client.tolist() == p1.slot_client.tolist() == [0, 1, 0, 1]  # 2C slots every round
    for t, g in state["global"].items():
        fz = p0.frozen.params[t]
        np.testing.assert_array_equal(np.asarray(fz["b"][:2]), 0.0)  # global slots: nothing frozen
        np.testing.assert_allclose(np.asarray(fz["b"][2:]), 0.25 * np.repeat(g["b"], 2, 0))
        np.testing.assert_array_equal(np.asarray(p0.start.params[t]["a"][:2]), np.repeat(g["a"], 2, 0))
        np.testing.assert_array_equal(np.asarray(p0.start.params[t]["a"][2:]), state["local"][t]["a"])
    trained = filled(ctx, 4, [1.0, 2.0, 5.0, 6.0], [4.0, -4.0, 7.0, 8.0])
    s0 = algo.aggregate(ctx, state, p0, trained, 0)
    np.testing.assert_allclose(leaf_values(s0["global"], "a"), [1.75])
    np.testing.assert_allclose(leaf_values(s0["global"], "b"), [-2.0])
    for t in state["local"]:  # round 1: the reference trains no local adapter yet
        np.testing.assert_array_equal(s0["local"][t]["a"], state["local"][t]["a"])
    s1 = algo.aggregate(ctx, state, p1, trained, 1)
    np.testing.assert_array_equal(leaf_values(s1["local"], "a"), [5.0, 6.0])
    np.testing.assert_array_equal(leaf_values(s1["local"], "b"), [7.0, 8.0])


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


@pytest.mark.parametrize("method", ["fedit", "local", "fedcluster", "fedsa", "feddpa"])
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
        assert sorted(set(np.asarray(out["state"]["cluster_of"]).tolist())) <= [0, 1]
        assert np.isfinite(out["state"]["similarity"]).all()
