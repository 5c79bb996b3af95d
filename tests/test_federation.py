"""The federation around the methods: one client at a time == the batched simulator, partial
participation, dropouts, non-finite replies, and one compiled round whatever the participants."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from fedrouter_jax.algorithms import available
from fedrouter_jax.algorithms.base import rows
from fedrouter_jax.config import load_config
from fedrouter_jax.simulator import (NonFiniteError, SimState, _client_update, sample_dropouts,
                                     sample_participants, scatter_rows)

from helpers import smoke_overrides


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, model_dir):
    import os

    os.environ["FEDROUTER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from fedrouter_jax.runner import prepare

    cfg = load_config(None, smoke_overrides(model_dir, tmp_path_factory.mktemp("unused"), **{
        "train.rounds": 3, "fedcluster.n_clusters": 2, "fedcluster.cluster_round": 1, "checkpoint.every": 0}))
    return cfg, prepare(cfg, progress=False)


def _sim(prepared, method, **overrides):
    from fedrouter_jax.runner import Run

    cfg, data = prepared
    cfg = dataclasses.replace(cfg, method=method)
    for path, value in overrides.items():
        section, key = path.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})
    return Run(cfg, data=data, progress=False).sim


def _assert_trees_close(a, b, tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=tol, atol=tol)


# the default suite checks multi-slot, host-aggregated and client-held methods; all with -m slow
FAST = ("fedrouter_star", "fedcluster", "feddpa", "fedsa")


@pytest.mark.parametrize("method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in available()])
def test_clients_one_at_a_time_equal_the_batched_simulator(prepared, method):
    """client_setup / client_pools / client_update called per client (stacks of one), replies
    concatenated, server functions on them == Simulator.setup + round_step, over 2 rounds."""
    sim = _sim(prepared, method)
    m, env = sim.method, sim.env
    state = sim.setup()
    k0 = jax.random.fold_in(sim.key, 0)
    singles = [m.client_setup(env, rows(sim.inputs, np.array([c])), k0) for c in range(env.n_clients)]
    cat = lambda trees: jax.tree.map(lambda *x: np.concatenate([np.asarray(v) for v in x]), *trees)  # noqa: E731
    clients = cat([s[0] for s in singles])
    loop = SimState(server=jax.tree.map(np.asarray, m.server_setup(env, cat([s[1] for s in singles]), k0)),
                    clients=jax.tree.map(np.asarray, clients))
    _assert_trees_close(loop, state, 1e-6)
    for r in range(2):
        state, metrics = sim.round_step(state, r)
        ids = np.arange(env.n_clients)
        msg = m.server_plan(env, loop.server, r, ids)
        outs = [sim.train_clients(rows(loop.clients, np.array([c])), rows(msg, np.array([c])), np.array([c]), r)
                for c in ids]
        reply = cat([o[1] for o in outs])
        agg = m.server_aggregate if not m.jit_aggregate else jax.jit(m.server_aggregate, static_argnums=(0,))
        arrived = np.ones(env.n_clients, bool)
        loop = SimState(server=jax.tree.map(np.asarray, agg(env, loop.server, msg, reply, arrived, ids, r)),
                        clients=cat([o[0] for o in outs]))
        _assert_trees_close(loop, state, 1e-5)
        used = np.concatenate([o[3] for o in outs]) > 0
        np.testing.assert_allclose(np.asarray(reply.loss)[..., -1][used], metrics["loss_per_slot"], atol=1e-5)


def test_sampled_participants_vary_are_seeded_and_unsampled_clients_are_untouched(prepared):
    sim = _sim(prepared, "local", **{"federation.clients_per_round": 2})
    draws = [tuple(sample_participants(0, r, 4, 2)) for r in range(6)]
    assert len(set(draws)) > 1 and draws == [tuple(sample_participants(0, r, 4, 2)) for r in range(6)]
    assert all(len(set(d)) == 2 for d in draws)
    state = sim.setup()
    for r in range(2):
        new, metrics = sim.round_step(state, r)
        part = sample_participants(0, r, 4, 2)
        assert metrics["participants"] == part.tolist() and metrics["dropped"] == []
        for c in range(4):
            same = all(np.array_equal(a[c], b[c]) for a, b in zip(jax.tree.leaves(state.clients),
                                                                    jax.tree.leaves(new.clients)))
            assert same == (c not in part)
        state = new


def test_dropout_is_seeded_per_client_and_lost_clusters_keep_their_adapter(prepared):
    lost = sample_dropouts(0, 3, np.arange(8), 0.5)
    np.testing.assert_array_equal(lost, sample_dropouts(0, 3, np.arange(8), 0.5))
    np.testing.assert_array_equal(lost[[2, 5]], sample_dropouts(0, 3, np.array([2, 5]), 0.5))  # not who else is in
    sim = _sim(prepared, "fedrouter", **{"federation.dropout_rate": 0.5})
    state = sim.setup()
    r = next(r for r in range(20) if 0 < sample_dropouts(0, r, np.arange(4), 0.5).sum() < 4)
    lost = sample_dropouts(0, r, np.arange(4), 0.5)
    msg = sim.method.server_plan(sim.env, state.server, r, np.arange(4))
    new, metrics = sim.round_step(state, r)
    assert metrics["dropped"] == [{"client": int(c), "reason": "dropout"} for c in np.flatnonzero(lost)]
    assert metrics["participants"] == np.flatnonzero(~lost).tolist()
    trained = set(np.asarray(msg.global_id)[~lost, 0].tolist())
    for g in range(state.server.global_centroids.shape[0]):
        same = np.array_equal(new.server.adapters["q_proj"]["b"][g], state.server.adapters["q_proj"]["b"][g])
        assert same == (g not in trained)
    assert new.server.rounds_taken.tolist() == (~lost).astype(int).tolist()


def _poison(monkeypatch, bad_clients):
    """Make the replies of the participants at positions `bad_clients` non-finite (NaN
    adapters, finite flag False), as a client whose training diverged would send."""
    import fedrouter_jax.simulator as simulator

    real = simulator._client_update

    def fake(method, env, base, clients, msg, batches, pool_size, opt, keys, lr, *, opts):
        new_clients, reply, new_opt = real(method, env, base, clients, msg, batches, pool_size, opt, keys, lr,
                                           opts=opts)
        bad = np.isin(np.arange(reply.finite.shape[0]), bad_clients)
        nan_rows = lambda x: np.where(bad.reshape((-1,) + (1,) * (x.ndim - 1)), np.nan, np.asarray(x))  # noqa: E731
        reply = reply.replace(finite=np.asarray(reply.finite) & ~bad,
                              adapters=None if reply.adapters is None else jax.tree.map(nan_rows, reply.adapters))
        return new_clients, reply, new_opt

    monkeypatch.setattr(simulator, "_client_update", fake)


def test_nonfinite_reply_is_dropped_and_the_rest_aggregate_alone(prepared, monkeypatch):
    sim = _sim(prepared, "fedit")
    state, _ = sim.round_step(sim.setup(), 0)
    _poison(monkeypatch, [1])
    new, metrics = sim.round_step(state, 1)
    assert metrics["participants"] == [0, 2, 3] and metrics["dropped"] == [{"client": 1, "reason": "nonfinite"}]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(new.server))
    monkeypatch.undo()
    m, env = sim.method, sim.env
    msg = m.server_plan(env, state.server, 1, np.arange(4))
    outs = [sim.train_clients(rows(state.clients, np.array([c])), rows(msg, np.array([c])), np.array([c]), 1)
            for c in (0, 2, 3)]
    reply = jax.tree.map(lambda *x: np.concatenate(x), *[o[1] for o in outs])
    alone = m.server_aggregate(env, state.server, rows(msg, np.array([0, 2, 3])), reply, np.ones(3, bool),
                               np.array([0, 2, 3]), 1)
    _assert_trees_close(new.server, jax.tree.map(np.asarray, alone), 1e-6)


def test_every_reply_nonfinite_stops_with_a_clear_error(prepared, monkeypatch):
    sim = _sim(prepared, "fedit")
    _poison(monkeypatch, [0, 1, 2, 3])
    with pytest.raises(NonFiniteError, match=r"round 1: non-finite .* client\(s\) \[0, 1, 2, 3\], every reply"):
        sim.round_step(sim.setup(), 0)


def test_on_nonfinite_stop_keeps_the_old_behaviour(prepared, monkeypatch):
    sim = _sim(prepared, "fedit", **{"federation.on_nonfinite": "stop"})
    _poison(monkeypatch, [2])
    with pytest.raises(NonFiniteError, match=r"client\(s\) \[2\]; nothing was aggregated"):
        sim.round_step(sim.setup(), 0)


def test_one_compile_while_the_participants_change(prepared):
    sim = _sim(prepared, "fedrouter", **{"federation.clients_per_round": 2, "train.trim_padding": False,
                                         "train.lm_head_on": "all_tokens"})
    before = _client_update._cache_size()
    state = sim.setup()
    seen = set()
    for r in range(4):
        state, metrics = sim.round_step(state, r)
        seen.add(tuple(metrics["participants"]))
    assert len(seen) > 1
    assert _client_update._cache_size() - before == 1
    assert len(sim.compile_keys) == 1


def test_scatter_rows_replaces_only_kept_rows():
    full = {"x": np.zeros((4, 2))}
    out = scatter_rows(full, np.array([1, 3]), {"x": np.ones((2, 2))}, np.array([True, False]))
    np.testing.assert_array_equal(out["x"], [[0, 0], [1, 1], [0, 0], [0, 0]])
    np.testing.assert_array_equal(full["x"], 0)  # not modified in place


def test_metrics_jsonl_records_participants_and_drops(prepared, tmp_path):
    from fedrouter_jax.runner import Run

    cfg, data = prepared
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "run"), train=dataclasses.replace(cfg.train, rounds=2),
                              federation=dataclasses.replace(cfg.federation, clients_per_round=3, dropout_rate=0.3))
    Run(cfg, data=data, progress=False).run()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r, rec in enumerate(recs):
        part = sample_participants(0, r, 4, 3)
        lost = sample_dropouts(0, r, part, 0.3)
        assert rec["participants"] == part[~lost].tolist()
        assert rec["dropped"] == [{"client": int(c), "reason": "dropout"} for c in part[lost]]


def test_accelerator_client_groups_are_sized_from_the_compiled_round(prepared, monkeypatch):
    """`train.client_chunk: auto` off the CPU asks memory.auto_client_chunk with the round's own
    lowering (here on the CPU, posing as an accelerator with a given free memory); the groups it
    picks do not change the result."""
    import fedrouter_jax.memory as memory

    sim = _sim(prepared, "fedit")
    state = sim.setup()
    ref, _ = sim.round_step(state, 0)
    asked = []
    real = memory.auto_client_chunk

    def spy(lower, **kw):
        choice = real(lower, **kw)
        asked.append((kw["n_clients"], choice.chunk))
        return choice

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(memory, "free_device_bytes", lambda device=None, resident=(): 10 * 2**30)
    monkeypatch.setattr(memory, "auto_client_chunk", spy)
    sim2 = _sim(prepared, "fedit")
    got, _ = sim2.round_step(state, 0)
    sim2.round_step(got, 1)
    assert len(asked) == len(sim2._chunks) >= 1 and asked[0][0] == 4
    _assert_trees_close(got, ref, 1e-6)


def test_a_diverging_loss_is_reported():
    from fedrouter_jax.runner import divergence_warning

    first = {"round": 1, "train_loss": 2.0, "train_loss_first_step": 2.5}
    assert divergence_warning([], first) is None
    assert divergence_warning([first], {"round": 2, "train_loss": 9.0}) is None  # 3.6x
    w = divergence_warning([first], {"round": 3, "train_loss": 1e4})
    assert w.startswith("round 3: train loss 1e+04 is 4000.0x the first round's 2.5")
    assert divergence_warning([first], {"round": 3, "train_loss": float("nan")}) is None


def test_diverging_run_warns_in_metrics(prepared, tmp_path, monkeypatch, capsys):
    from fedrouter_jax.runner import Run

    cfg, data = prepared
    cfg = dataclasses.replace(cfg, method="fedit", out_dir=str(tmp_path / "run"),
                              train=dataclasses.replace(cfg.train, rounds=2))
    run = Run(cfg, data=data, progress=False)
    real = run.sim.round_step

    def exploding(state, r):
        state, m = real(state, r)
        return state, {**m, "train_loss": m["train_loss"] * (1 if r == 0 else 100)}

    monkeypatch.setattr(run.sim, "round_step", exploding)
    run.run()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert "warning" not in recs[0] and "diverging" in recs[1]["warning"]
    assert "[warning] round 2" in capsys.readouterr().out
