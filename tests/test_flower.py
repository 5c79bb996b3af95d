"""FedRouter on Flower: the ServerApp / ClientApp == the simulator, in-process and in both runtimes."""
import dataclasses
import json

import jax
import numpy as np
import pytest

pytest.importorskip("flwr")

from fedrouter_jax.algorithms import available  # noqa: E402
from fedrouter_jax.config import load_config  # noqa: E402

from helpers import smoke_overrides  # noqa: E402

ADAPTER_TOL, ROUGE_TOL = 1e-5, 1e-3


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, model_dir):
    cfg = load_config(None, smoke_overrides(model_dir, tmp_path_factory.mktemp("unused"), **{
        "train.rounds": 2, "fedcluster.n_clusters": 2, "fedcluster.cluster_round": 1,
        # one compiled round per method, shared by the simulator and a node holding every client
        "train.trim_padding": False, "train.lm_head_on": "all_tokens"}))
    from fedrouter_jax.runner import prepare

    return cfg, prepare(cfg, progress=False)


def _simulated(smoke, method, out):
    """A simulator run written to out/sim (its config names out/run: the Flower run then has the
    same config, hence the same compiled programs)."""
    from fedrouter_jax.runner import Run

    cfg, data = smoke
    cfg = dataclasses.replace(cfg, method=method, out_dir=str(out / "run"))
    run = Run(cfg, data=data, progress=False)
    run.run()
    results = run.final_evaluation()
    (out / "run").rename(out / "sim")
    return run.state, results, cfg


def _flower_in_process(cfg, nodes, fail=None):
    from fedrouter_jax.flower.client_app import app as client_app
    from fedrouter_jax.flower.server import FlowerServer
    from fedrouter_jax.flower.transport import Transport
    from flower_helpers import FakeGrid, run_config

    grid = FakeGrid(client_app, nodes, run_config(cfg, nodes), fail=fail)
    server = FlowerServer(cfg, Transport(grid, timeout=0.5, poll=0.0), nodes=nodes, setup_timeout=5, log=lambda s: None)
    results = server.run()
    return server.state, results


def assert_same_run(state, results, ref_state, ref_results, out, ref_out):
    for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=ADAPTER_TOL, rtol=0)
    for mode in ("local", "global"):
        if mode in ref_results:
            assert abs(results[mode]["rouge1"] - ref_results[mode]["rouge1"]) <= ROUGE_TOL
            np.testing.assert_allclose(results[mode]["per_client"], ref_results[mode]["per_client"], atol=ROUGE_TOL)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(l) for l in (ref_out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == len(ref)
    for a, b in zip(recs, ref):
        assert a["participants"] == b["participants"] and a["dropped"] == b["dropped"] and a.get("plan") == b.get("plan")
        np.testing.assert_allclose(a["loss_per_slot"], b["loss_per_slot"], atol=1e-5)


@pytest.mark.parametrize("method", available())
def test_server_and_client_apps_through_a_fake_grid_equal_the_simulator(smoke, method, tmp_path):
    """Every message crosses Flower's own serialisation; adapters, client states, optimizer,
    metrics.jsonl and ROUGE-1 equal a simulator run (one node holding the 4 clients)."""
    ref_state, ref_results, cfg = _simulated(smoke, method, tmp_path)
    state, results = _flower_in_process(cfg, 1)
    assert_same_run(state, results, ref_state, ref_results, tmp_path / "run", tmp_path / "sim")


def test_three_nodes_a_failing_node_and_a_server_restart(smoke, tmp_path, monkeypatch):
    """3 nodes for 4 clients (node 1 holds clients 0 and 3) == the simulator; then a node whose
    ClientApp raises in round 2 is dropped as client_error (its clients and their clusters keep
    their state), and a server killed after round 1 resumes from its checkpoint."""
    from fedrouter_jax.flower.server import FlowerServer

    ref_state, ref_results, cfg = _simulated(smoke, "fedrouter", tmp_path)
    state, results = _flower_in_process(cfg, 3)
    assert_same_run(state, results, ref_state, ref_results, tmp_path / "run", tmp_path / "sim")

    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "failing"))
    real = FlowerServer.round_step
    calls = []

    def crash_once(self, state, r):  # the server process dies during round 2, once
        calls.append(r)
        if r == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt
        return real(self, state, r)

    monkeypatch.setattr(FlowerServer, "round_step", crash_once)
    with pytest.raises(KeyboardInterrupt):
        _flower_in_process(cfg, 3)
    fails_in_round_2 = {2: lambda kind, group: kind == "train" and group == "round-2"}
    state, results = _flower_in_process(cfg, 3, fail=fails_in_round_2)
    assert calls == [0, 1, 1]  # round 1 was not repeated
    recs = [json.loads(l) for l in (tmp_path / "failing" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2]
    assert recs[1]["participants"] == [0, 2, 3]
    assert [(d["client"], d["reason"]) for d in recs[1]["dropped"]] == [(1, "client_error")]
    assert "boom" in recs[1]["dropped"][0]["detail"]
    # client 1's only cluster this round kept its round-1 adapter unless another client trained it
    trained = {g for c, gs in enumerate(recs[1]["plan"]["global_cluster"]) if c != 1 for g in gs}
    before = json.loads((tmp_path / "sim" / "metrics.jsonl").read_text().splitlines()[0])
    assert before["round"] == 1 and np.isfinite(results["rouge1"])
    assert state.server.rounds_taken.tolist() == [2, 1, 2, 2]
    assert trained  # the other clients still trained and were aggregated
