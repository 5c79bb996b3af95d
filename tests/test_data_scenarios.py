"""Federated scenarios: per-client task counts, determinism, disjointness, sources."""

import numpy as np
import pytest

from fedrouter_jax.data.real import DataError
from fedrouter_jax.data.scenarios import build_scenario
from fedrouter_jax.data.synthetic import TASKS, generate_examples

SMALL = dict(train_per_client=40, test_per_client=20)


def _check_labels(fd):
    for split in ("train", "test"):
        for ex, lab in zip(getattr(fd, split), getattr(fd, f"{split}_tasks")):
            assert lab.dtype == np.int32 and len(lab) == len(ex)
            assert [TASKS[j] for j in lab] == [e["task"] for e in ex]


def _all_inputs(fd):
    return [e["input"] for split in (fd.train, fd.test) for c in split for e in c]


def test_single():
    fd = build_scenario("single", seed=0, **SMALL)
    assert fd.n_clients == 8 and fd.task_names == ("qqp", "gigaword", "samsum", "webnlg")
    want = np.zeros((8, 4), int)
    for i in range(8):
        want[i, i // 2] = 40
    np.testing.assert_array_equal(fd.task_counts("train"), want)
    np.testing.assert_array_equal(fd.task_counts("test"), want // 2)
    assert fd.client_tasks[0] == ("qqp",) and fd.client_tasks[7] == ("webnlg",)
    _check_labels(fd)
    ins = _all_inputs(fd)
    assert len(set(ins)) == len(ins)  # same-task clients differ; no train/test overlap


def test_dual_all_generalization_counts():
    fd = build_scenario("dual", seed=0, **SMALL)
    c = fd.task_counts()
    for i in range(8):
        assert c[i, i // 2 % 4] == 20 and c[i, (i // 2 + 1) % 4] == 20 and c[i].sum() == 40
    assert fd.client_tasks[6] == ("webnlg", "qqp")
    np.testing.assert_array_equal(fd.task_counts("test"), c // 2)
    fa = build_scenario("all", seed=0, **SMALL)
    assert (fa.task_counts() == 10).all() and (fa.task_counts("test") == 5).all()
    fg = build_scenario("generalization", seed=0, **SMALL)
    np.testing.assert_array_equal(fg.task_counts(),
                                  build_scenario("single", seed=0, **SMALL).task_counts())
    assert (fg.task_counts("test") == 5).all()
    for f in (fd, fa, fg):
        _check_labels(f)
        ins = _all_inputs(f)
        assert len(set(ins)) == len(ins)


def test_default_sizes_and_other_n_clients():
    fd = build_scenario("dual", n_clients=8, seed=1)
    assert (fd.task_counts().sum(1) == 600).all() and (fd.task_counts("test").sum(1) == 300).all()
    f12 = build_scenario("single", n_clients=12, seed=0, train_per_client=8, test_per_client=4)
    assert [t for (t,) in f12.client_tasks] == [TASKS[(i // 2) % 4] for i in range(12)]
    f3 = build_scenario("all", n_clients=1, seed=0, train_per_client=6, test_per_client=3)
    assert f3.task_counts().tolist() == [[2, 2, 1, 1]]


def test_deterministic_and_seed_dependent():
    a = build_scenario("dual", seed=3, **SMALL)
    b = build_scenario("dual", seed=3, **SMALL)
    c = build_scenario("dual", seed=4, **SMALL)
    assert a.train == b.train and a.test == b.test
    for x, y in zip(a.train_tasks, b.train_tasks):
        np.testing.assert_array_equal(x, y)
    assert a.train != c.train
    # tasks are mixed within a client (order carries no task information)
    assert len(set(a.train_tasks[0][:10].tolist())) == 2


def test_dirichlet_100_clients():
    fd = build_scenario("dirichlet", n_clients=100, seed=0, train_per_client=20,
                        test_per_client=10, dirichlet_alpha=0.5)
    assert fd.n_clients == 100
    c, ct = fd.task_counts(), fd.task_counts("test")
    assert (c.sum(1) == 20).all() and (ct.sum(1) == 10).all()
    assert (c > 0).sum(1).min() >= 1 and len({tuple(r) for r in c}) > 50  # heterogeneous
    _check_labels(fd)
    ins = _all_inputs(fd)
    assert len(set(ins)) == len(ins)
    concentrated = build_scenario("dirichlet", n_clients=100, seed=0, train_per_client=20,
                                  test_per_client=0, dirichlet_alpha=0.05).task_counts()
    spread = build_scenario("dirichlet", n_clients=100, seed=0, train_per_client=20,
                            test_per_client=0, dirichlet_alpha=100.0).task_counts()
    assert (concentrated.max(1) / 20).mean() > 0.85 > 0.5 > (spread.max(1) / 20).mean()


def test_unknown_scenario_and_bad_sources():
    with pytest.raises(ValueError, match="unknown scenario 'triple'.*single, dual, all"):
        build_scenario("triple")
    src = {t: generate_examples(t, 30, seed=0) for t in TASKS}
    with pytest.raises(DataError, match="need 120 qqp examples.*have 30"):
        build_scenario("single", source=src, **SMALL)
    bad = dict(src, qqp=[dict(src["qqp"][0], output="")] + src["qqp"][1:])
    with pytest.raises(DataError, match=r"source\['qqp'\]: row \d+: field 'output': empty"):
        build_scenario("single", source=bad, train_per_client=5, test_per_client=2)
    wrong = dict(src, qqp=src["samsum"])
    with pytest.raises(DataError, match="field 'task'.*not allowed"):
        build_scenario("single", source=wrong, train_per_client=5, test_per_client=2)


def test_mapping_and_callable_sources():
    src = {t: generate_examples(t, 30, seed=9) for t in TASKS}
    fd = build_scenario("all", source=src, seed=0, train_per_client=8, test_per_client=4)
    assert (fd.task_counts() == 2).all()
    pool = {e["input"] for t in TASKS for e in src[t]}
    ins = _all_inputs(fd)
    assert set(ins) <= pool and len(set(ins)) == len(ins)
    calls = []

    def source(task, n, seed):
        calls.append((task, n))
        return generate_examples(task, n, seed)

    fc = build_scenario("single", source=source, seed=0, **SMALL)
    assert sorted(calls) == sorted((t, 120) for t in TASKS)
    assert fc.train == build_scenario("single", seed=0, **SMALL).train
