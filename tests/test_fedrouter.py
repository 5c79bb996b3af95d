"""FedRouter's server/client/router pieces on hand-made numbers, and an end-to-end smoke run."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.algorithms.base import Context, get_algorithm
from fedrouter_jax.config import load_config
from fedrouter_jax.tree_util import segment_weighted_mean

from helpers import TINY


def test_segment_weighted_mean_by_hand():
    trained = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0], [7.0, 7.0]])}
    previous = {"w": jnp.array([[0.0, 0.0], [-1.0, -1.0], [5.0, 5.0]])}
    seg = jnp.array([0, 0, 2, -1])  # slot 3 ignored; segment 1 untouched this round
    weights = jnp.array([1.0, 3.0, 2.0, 100.0])
    out = segment_weighted_mean(trained, seg, weights, previous, num_segments=3)
    # segment 0: (1*[1,2] + 3*[3,4]) / 4 = [2.5, 3.5]
    np.testing.assert_allclose(np.asarray(out["w"]), [[2.5, 3.5], [-1.0, -1.0], [10.0, 10.0]])


def blob_context(n_clients=4, per_task=12, tasks_of=None, seed=0, **cluster):
    """Embeddings of 4 well-separated 'tasks'; client c holds tasks tasks_of[c]."""
    rng = np.random.default_rng(seed)
    centers = 10.0 * np.eye(4, 16)
    tasks_of = tasks_of or [(c % 4, (c + 1) % 4) for c in range(n_clients)]
    train, test, labels = [], [], []
    for ts in tasks_of:
        lab = np.repeat(ts, per_task)
        train.append((centers[lab] + rng.normal(0, 0.3, (lab.size, 16))).astype(np.float32))
        labels.append(lab)
        test.append((centers[lab] + rng.normal(0, 0.3, (lab.size, 16))).astype(np.float32))
    overrides = [f"clustering.{k}={v}" for k, v in {"n_local": 2, "n_global": 4, "n_init": 3, **cluster}.items()]
    cfg = load_config(None, overrides + [f"data.n_clients={n_clients}", "data.train_per_client=24"])
    ctx = Context(config=cfg, model_cfg=TINY, n_clients=n_clients, train_sizes=np.array([len(t) for t in train]),
                  train_emb=train, test_emb=test)
    return ctx, labels, centers


def test_local_and_global_clustering_recover_tasks():
    ctx, labels, _ = blob_context()
    state = get_algorithm("fedrouter").init(ctx, jax.random.PRNGKey(0))
    l2g = state["local_to_global"]
    for c in range(ctx.n_clients):
        # each local cluster is one task, and maps to that task's global cluster
        for l in range(2):
            members = labels[c][state["train_labels"][c, : len(labels[c])] == l]
            assert len(set(members.tolist())) == 1
    task_of_global = {}
    for c in range(ctx.n_clients):
        for l in range(2):
            t = int(labels[c][state["train_labels"][c] == l][0])
            assert task_of_global.setdefault(int(l2g[c, l]), t) == t
    assert len(task_of_global) == 4


@pytest.mark.parametrize("schedule", ["global", "local_index"])
def test_schedule_is_deterministic_and_covers_every_pair(schedule):
    ctx, _, _ = blob_context(**{"schedule": schedule})
    algo = get_algorithm("fedrouter")
    state = algo.init(ctx, jax.random.PRNGKey(0))
    seen = set()
    for r in range(2):  # n_local = 2 rounds cover every (client, local cluster) pair
        p1, p2 = algo.plan(ctx, state, r), algo.plan(ctx, state, r)
        assert p1.log == p2.log
        assert len(p1.slot_client) == ctx.n_clients  # one adapter per client per round
        seen |= {(c, l) for c, l, _ in p1.log["schedule"]}
    assert seen == {(c, l) for c in range(ctx.n_clients) for l in range(2)}


def test_fedrouter_star_trains_every_adapter_each_round():
    ctx, _, _ = blob_context()
    algo = get_algorithm("fedrouter_star")
    state = algo.init(ctx, jax.random.PRNGKey(0))
    plan = algo.plan(ctx, state, 0)
    assert sorted((c, l) for c, l, _ in plan.log["schedule"]) == [(c, l) for c in range(4) for l in range(2)]


def test_router_picks_nearest_centroid_in_both_modes():
    ctx, labels, centers = blob_context()
    algo = get_algorithm("fedrouter")
    state = algo.init(ctx, jax.random.PRNGKey(0))
    # client 0 holds tasks 0, 1; a test sample of task 3 (unseen by client 0)
    probe = [centers[[0, 1, 3]] + 0.01] + list(ctx.test_emb[1:])
    ctx2 = dataclasses.replace(ctx, test_emb=probe)
    g = np.asarray(state["global_centroids"])
    nearest_global = np.argmin(((probe[0][:, None] - g[None]) ** 2).sum(-1), axis=1)
    glob = algo.route(ctx2, state, "global").adapter_ids[0]
    np.testing.assert_array_equal(glob, nearest_global)
    loc = algo.route(ctx2, state, "local")
    lc = np.asarray(state["local_centroids"][0][state["local_mask"][0]])
    nearest_local = np.argmin(((probe[0][:, None] - lc[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(loc.log["test_local_labels"][0], nearest_local)
    np.testing.assert_array_equal(loc.adapter_ids[0], state["local_to_global"][0][nearest_local])
    # the unseen task goes to its own global adapter only in global mode
    assert glob[2] == nearest_global[2] and loc.adapter_ids[0][2] != glob[2]


def test_unknown_method_names_valid_choices():
    with pytest.raises(ValueError, match=r"unknown method 'fedx'.*fedrouter"):
        get_algorithm("fedx")
