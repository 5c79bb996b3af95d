"""The library example: a new method (FedAvgM) written with the client / server functions and
run by the simulator, checked against the momentum update by hand."""

import sys
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import custom_method  # noqa: E402  (registers "fedavgm")

from fedrouter_jax.algorithms import available  # noqa: E402
from fedrouter_jax.algorithms.base import rows  # noqa: E402
from fedrouter_jax.algorithms.baselines import fedavg  # noqa: E402
from fedrouter_jax.config import load_config  # noqa: E402

from helpers import smoke_overrides  # noqa: E402


def test_custom_method_runs_through_the_simulator(model_dir, tmp_path):
    from fedrouter_jax.runner import Run

    assert "fedavgm" in available()
    cfg = load_config(None, smoke_overrides(model_dir, tmp_path / "run", **{"method": "fedavgm", "train.rounds": 2}))
    run = Run(cfg, progress=False)
    sim = run.sim
    state = sim.setup()
    ids = np.arange(cfg.data.n_clients)
    g_prev, m_prev = state.server.adapters, state.server.momentum
    for r in range(2):
        msg = sim.method.server_plan(sim.env, state.server, r, ids)
        _, reply, _, _ = sim.train_clients(rows(state.clients, ids), msg, ids, r)
        mean = fedavg(reply.adapters, reply.weight, np.ones(len(ids), bool), jax.tree.map(lambda x: x[0], g_prev))
        m_want = jax.tree.map(lambda m, a, g: custom_method.BETA * m + (a - g[0])[None], m_prev, mean, g_prev)
        g_want = jax.tree.map(lambda g, m: g + m, g_prev, m_want)
        state, metrics = sim.round_step(state, r)
        for got, want in ((state.server.momentum, m_want), (state.server.adapters, g_want)):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        g_prev, m_prev = state.server.adapters, state.server.momentum
    assert np.isfinite(metrics["train_loss"])
    run.state = state
    run.out.mkdir(parents=True, exist_ok=True)
    res = run.final_evaluation()
    assert 0.0 <= res["rouge1"] <= 1.0

