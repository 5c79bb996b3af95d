"""FedRouter's server/client/router pieces on hand-made numbers, and an end-to-end smoke run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.algorithms import get_method
from fedrouter_jax.tree_util import segment_weighted_mean

from method_helpers import fake_round, make_env, route, setup


def test_segment_weighted_mean_by_hand():
    trained = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0], [10.0, 10.0], [7.0, 7.0]])}
    previous = {"w": jnp.array([[0.0, 0.0], [-1.0, -1.0], [5.0, 5.0]])}
    seg = jnp.array([0, 0, 2, -1])  # slot 3 ignored; segment 1 untouched this round
    weights = jnp.array([1.0, 3.0, 2.0, 100.0])
    out = segment_weighted_mean(trained, seg, weights, previous, num_segments=3)
    # segment 0: (1*[1,2] + 3*[3,4]) / 4 = [2.5, 3.5]
    np.testing.assert_allclose(np.asarray(out["w"]), [[2.5, 3.5], [-1.0, -1.0], [10.0, 10.0]])


def blob_env(n_clients=4, per_task=12, tasks_of=None, seed=0, test=None, **cluster):
    """Embeddings of 4 well-separated 'tasks'; client c holds tasks tasks_of[c]."""
    rng = np.random.default_rng(seed)
    centers = 10.0 * np.eye(4, 16)
    tasks_of = tasks_of or [(c % 4, (c + 1) % 4) for c in range(n_clients)]
    train, tests, labels = [], [], []
    for ts in tasks_of:
        lab = np.repeat(ts, per_task)
        train.append((centers[lab] + rng.normal(0, 0.3, (lab.size, 16))).astype(np.float32))
        labels.append(lab)
        tests.append((centers[lab] + rng.normal(0, 0.3, (lab.size, 16))).astype(np.float32))
    if test is not None:
        tests = test(centers, tests)
    overrides = [f"clustering.{k}={v}" for k, v in {"n_local": 2, "n_global": 4, "n_init": 3, **cluster}.items()]
    env, inputs = make_env(train, tests, overrides + ["data.train_per_client=24"])
    return env, inputs, labels, centers


def test_local_and_global_clustering_recover_tasks():
    env, inputs, labels, _ = blob_env()
    m, clients, server = setup("fedrouter", env, inputs)
    l2g = server.local_to_global
    for c in range(env.n_clients):
        # each local cluster is one task, and maps to that task's global cluster
        for l in range(2):
            members = labels[c][clients.train_labels[c, : len(labels[c])] == l]
            assert len(set(members.tolist())) == 1
    task_of_global = {}
    for c in range(env.n_clients):
        for l in range(2):
            t = int(labels[c][clients.train_labels[c] == l][0])
            assert task_of_global.setdefault(int(l2g[c, l]), t) == t
    assert len(task_of_global) == 4


def test_one_client_alone_clusters_as_in_the_batch():
    env, inputs, _, _ = blob_env()
    m = get_method("fedrouter")
    k = jax.random.PRNGKey(0)
    all_clients, msgs = m.client_setup(env, inputs, k)
    for c in range(env.n_clients):
        one, msg = m.client_setup(env, jax.tree.map(lambda x: x[c: c + 1], inputs), k)
        np.testing.assert_allclose(one.centroids[0], all_clients.centroids[c], rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(one.train_labels[0], all_clients.train_labels[c])
        np.testing.assert_array_equal(msg.counts[0], msgs.counts[c])


def _trained_slots(m, env, inputs, clients, server, r):
    """(client, local cluster, global cluster) of every used slot of round r."""
    msg = m.server_plan(env, server, r, np.arange(env.n_clients))
    pools = np.asarray(m.client_pools(env, clients, msg, inputs))
    out = []
    for c in range(env.n_clients):
        for s in range(pools.shape[1]):
            if pools[c, s].any():
                ls = set(np.asarray(clients.train_labels)[c][pools[c, s]].tolist())
                assert len(ls) == 1  # a slot trains exactly one local cluster
                out.append((c, ls.pop(), int(msg.global_id[c, s])))
    return out


@pytest.mark.parametrize("schedule", ["global", "local_index"])
def test_schedule_is_deterministic_and_covers_every_pair(schedule):
    env, inputs, _, _ = blob_env(**{"schedule": schedule})
    m, clients, server = setup("fedrouter", env, inputs)
    seen = set()
    for r in range(2):  # n_local = 2 rounds cover every (client, local cluster) pair
        slots = _trained_slots(m, env, inputs, clients, server, r)
        assert slots == _trained_slots(m, env, inputs, clients, server, r)
        assert len(slots) == env.n_clients  # one adapter per client per round
        seen |= {(c, l) for c, l, _ in slots}
        for c, l, g in slots:
            assert server.local_to_global[c, l] == g
        server = server.replace(rounds_taken=server.rounds_taken + 1)
    assert seen == {(c, l) for c in range(env.n_clients) for l in range(2)}


def test_round_robin_advances_only_with_the_rounds_a_client_takes_part_in():
    env, inputs, _, _ = blob_env()
    m, clients, server = setup("fedrouter", env, inputs)
    ident = lambda st: st  # noqa: E731
    g0 = m.server_plan(env, server, 0, np.arange(4)).global_id[:, 0]
    # round 0: only clients 1 and 2 reply
    *_, s1 = fake_round(m, env, inputs, clients, server, 0, ident, participants=[1, 2, 3], arrived=[True, True, False])
    assert s1.rounds_taken.tolist() == [0, 1, 1, 0]
    g1 = m.server_plan(env, s1, 1, np.arange(4)).global_id[:, 0]
    assert g1[0] == g0[0] and g1[3] == g0[3]  # clients 0 and 3 retry their cluster
    assert g1[1] != g0[1] and g1[2] != g0[2]  # clients 1 and 2 moved on


def test_fedrouter_star_trains_every_adapter_each_round():
    env, inputs, _, _ = blob_env()
    m, clients, server = setup("fedrouter_star", env, inputs)
    slots = _trained_slots(m, env, inputs, clients, server, 0)
    assert sorted((c, l) for c, l, _ in slots) == [(c, l) for c in range(4) for l in range(2)]


def test_router_picks_nearest_centroid_in_both_modes():
    # client 0 holds tasks 0, 1; a test sample of task 3 (unseen by client 0)
    env, inputs, labels, centers = blob_env(test=lambda centers, tests: [centers[[0, 1, 3]] + 0.01] + tests[1:])
    m, clients, server = setup("fedrouter", env, inputs)
    probe = centers[[0, 1, 3]] + 0.01
    g = np.asarray(server.global_centroids)
    nearest_global = np.argmin(((probe[:, None] - g[None]) ** 2).sum(-1), axis=1)
    glob = np.asarray(route(m, env, clients, server, inputs, "global").ids)[0, :3]
    np.testing.assert_array_equal(glob, nearest_global)
    loc = route(m, env, clients, server, inputs, "local")
    lc = np.asarray(clients.centroids[0][clients.centroid_mask[0]])
    nearest_local = np.argmin(((probe[:, None] - lc[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(loc.local_cluster[0, :3], nearest_local)
    np.testing.assert_array_equal(loc.ids[0, :3], server.local_to_global[0][nearest_local])
    # the unseen task goes to its own global adapter only in global mode
    assert glob[2] == nearest_global[2] and loc.ids[0][2] != glob[2]


def test_unknown_method_names_valid_choices():
    with pytest.raises(ValueError, match=r"unknown method 'fedx'.*fedrouter"):
        get_method("fedx")
