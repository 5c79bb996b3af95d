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


SMOKE = {"train.rounds": 2, "fedcluster.n_clusters": 2, "fedcluster.cluster_round": 1,
         # one compiled round per method, shared by the simulator and a node holding every client
         "train.trim_padding": False, "train.lm_head_on": "all_tokens"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, model_dir):
    cfg = load_config(None, smoke_overrides(model_dir, tmp_path_factory.mktemp("unused"), **SMOKE))
    from fedrouter_jax.runner import prepare

    return cfg, prepare(cfg, progress=False)


@pytest.fixture(scope="module")
def fedrouter_sim(smoke, tmp_path_factory):
    """The simulator's FedRouter run, shared by the tests below: (state, results, cfg, its dir)."""
    out = tmp_path_factory.mktemp("fedrouter-sim")
    return (*_simulated(smoke, "fedrouter", out), out / "sim")


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


# FedRouter in the default suite (the deployment tests below run it too); the other six with
# -m slow, to keep the default run short
FAST = ("fedrouter",)


@pytest.mark.parametrize("method", [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in available()])
def test_server_and_client_apps_through_a_fake_grid_equal_the_simulator(smoke, method, tmp_path, request):
    """Every message crosses Flower's own serialisation; adapters, client states, optimizer,
    metrics.jsonl and ROUGE-1 equal a simulator run (one node holding the 4 clients)."""
    if method == "fedrouter":
        ref_state, ref_results, cfg, ref_dir = request.getfixturevalue("fedrouter_sim")
    else:
        (ref_state, ref_results, cfg), ref_dir = _simulated(smoke, method, tmp_path), tmp_path / "sim"
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "flower"))
    state, results = _flower_in_process(cfg, 1)
    assert_same_run(state, results, ref_state, ref_results, tmp_path / "flower", ref_dir)


def test_three_nodes_a_failing_node_and_a_server_restart(fedrouter_sim, tmp_path, monkeypatch):
    """3 nodes for 4 clients (node 1 holds clients 0 and 3) == the simulator; then a node whose
    ClientApp raises in round 2 is dropped as client_error (its clients and their clusters keep
    their state), and a server killed after round 1 resumes from its checkpoint."""
    from fedrouter_jax.flower.server import FlowerServer

    ref_state, ref_results, cfg, ref_dir = fedrouter_sim
    cfg = dataclasses.replace(cfg, out_dir=str(tmp_path / "three"))
    state, results = _flower_in_process(cfg, 3)
    assert_same_run(state, results, ref_state, ref_results, tmp_path / "three", ref_dir)

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
    assert np.isfinite(results["rouge1"]) and "missing_clients" not in results["local"]
    assert state.server.rounds_taken.tolist() == [2, 1, 2, 2]  # client 1's round robin did not move
    # a cluster only client 1 was to train keeps its round-1 adapter
    plan = recs[1]["plan"]["global_cluster"]
    others = {g for c, gs in enumerate(plan) if c != 1 for g in gs}
    for g in set(plan[1]) - others:
        from fedrouter_jax.checkpoint import CheckpointStore

        round1, _ = CheckpointStore(tmp_path / "failing" / "checkpoints", read_only=True).restore(1)
        np.testing.assert_array_equal(state.server.adapters["q_proj"]["b"][g], round1.server.adapters["q_proj"]["b"][g])


def _cli_flower(tmp_path, model_dir, out, runtime, nodes, *extra, timeout=480):
    """`fedrouter-jax flower` in its own process (bounded in time) -> the Popen, already started."""
    import os
    import subprocess
    import sys

    (tmp_path / "empty.yaml").write_text("{}\n")
    sets = [a for o in smoke_overrides(model_dir, out, **SMOKE) for a in ("--set", o)]
    argv = [sys.executable, "-m", "fedrouter_jax", "flower", "--config", str(tmp_path / "empty.yaml"), "--runtime",
            runtime, "--nodes", str(nodes), *sets, *extra, "--run-timeout", str(timeout - 30)]
    return subprocess.Popen(argv, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout):
    import subprocess

    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # the driver's own finally stops what it started; this is its leader only
        out, _ = proc.communicate()
        raise AssertionError(f"fedrouter-jax flower did not finish in {timeout} s:\n{out[-3000:]}")
    return proc.returncode, out


def _no_process_left(out):
    import os

    for pid_file in (out / "flower").glob("*.pid"):
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"{pid_file}: process {pid} still runs")


def test_simulation_runtime_equals_the_simulator(fedrouter_sim, tmp_path, model_dir):
    """Flower's simulation runtime (Ray actors, 3 nodes for 4 clients), 2 rounds: the same
    adapters, client states and ROUGE-1 as the simulator."""
    from fedrouter_jax.checkpoint import CheckpointStore

    ref_state, ref_results, _, ref_dir = fedrouter_sim
    out = tmp_path / "run"
    rc, log = _finish(_cli_flower(tmp_path, model_dir, out, "simulation", 3), 480)
    assert rc == 0, log[-3000:]
    _no_process_left(out)
    state, _ = CheckpointStore(out / "checkpoints", read_only=True).restore(like=ref_state)
    results = json.loads((out / "results.json").read_text())
    assert_same_run(state, results, ref_state, ref_results, out, ref_dir)


def test_deployment_runtime_survives_a_killed_supernode(tmp_path, model_dir):
    """1 SuperLink + 3 SuperNodes on 127.0.0.1, 3 rounds; SuperNode 1 (client 1) is killed
    during round 2: the run completes, 3 rounds in metrics.jsonl, client 1 dropped."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    proc = _cli_flower(tmp_path, model_dir, out, "deployment", 3, "--set", "train.rounds=3", "--round-timeout", "60",
                       timeout=540)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)  # round 1 written: round 2 is under way
    pid = int((out / "flower" / "supernode-1.pid").read_text())
    os.killpg(pid, signal.SIGKILL)  # the SuperNode and its ClientApp process, by the PID we wrote
    rc, log = _finish(proc, 540)
    assert rc == 0, log[-3000:]
    _no_process_left(out)
    recs = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert [r["round"] for r in recs] == [1, 2, 3]
    assert recs[0]["participants"] == [0, 1, 2, 3]
    for r in recs[1:]:
        assert r["participants"] == [0, 2, 3]
        assert [d["client"] for d in r["dropped"]] == [1]
        assert r["dropped"][0]["reason"] in ("node_unavailable", "timeout")
    assert any(r["dropped"][0]["reason"] == "node_unavailable" for r in recs[1:])
    results = json.loads((out / "results.json").read_text())
    assert results["local"]["missing_clients"] == [1]


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["simulation", "deployment"])
@pytest.mark.parametrize("method", sorted(available()))
def test_every_method_in_both_runtimes_equals_the_simulator(smoke, method, runtime, tmp_path, model_dir):
    """Item 3 for every method of `fedrouter-jax methods`: the real runtimes (2 nodes for 4
    clients, 2 rounds, a process per node / Ray actors) give the simulator's adapters, client
    states, optimizer, metrics and ROUGE-1. Slow: about 1-2 min per case on 2 cores."""
    from fedrouter_jax.checkpoint import CheckpointStore

    sim_dir = tmp_path / "sim-root"
    ref_state, ref_results, _ = _simulated(smoke, method, sim_dir)
    out = tmp_path / "run"
    rc, log = _finish(_cli_flower(tmp_path, model_dir, out, runtime, 2, "--set", f"method={method}"), 480)
    assert rc == 0, log[-3000:]
    _no_process_left(out)
    state, _ = CheckpointStore(out / "checkpoints", read_only=True).restore(like=ref_state)
    assert_same_run(state, json.loads((out / "results.json").read_text()), ref_state, ref_results, out, sim_dir / "sim")
