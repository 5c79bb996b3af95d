"""The library example: a new method (FedAvgM) written with the client / server functions and
run by the simulator, checked against the momentum update by hand; its own config section."""

import importlib
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

from fedrouter_jax.algorithms import available, base  # noqa: E402
from fedrouter_jax.algorithms.base import rows  # noqa: E402
from fedrouter_jax.algorithms.baselines import fedavg  # noqa: E402
from fedrouter_jax.config import ConfigError, config_to_dict, load_config  # noqa: E402

from helpers import smoke_overrides  # noqa: E402


@pytest.fixture(scope="module")
def custom_method():
    """Registers "fedavgm" for this module's tests only: a registered method's section is in
    every config, and other tests' configs (and their subprocesses) must not depend on it."""
    module = importlib.import_module("custom_method")
    base.register(module.FEDAVGM)  # again, after an earlier teardown
    yield module
    del base._REGISTRY["fedavgm"]


def test_custom_method_config_section(custom_method):
    cfg = load_config(None, ["method=fedavgm", "fedavgm.beta=0.5"])
    assert cfg.fedavgm == custom_method.FedAvgMConfig(beta=0.5) and load_config().fedavgm.beta == 0.9
    assert config_to_dict(cfg)["fedavgm"] == {"beta": 0.5}
    with pytest.raises(ConfigError, match="fedavgm.bta: unknown key; did you mean 'beta'"):
        load_config(None, ["fedavgm.bta=0.5"])
    with pytest.raises(ConfigError, match="fedavgm.beta: expected float, got 'high'"):
        load_config(None, ["fedavgm.beta=high"])
    with pytest.raises(ConfigError, match=r"fedavgm.beta: expected in \[0, 1\), got 1.5"):
        load_config(None, ["method=fedavgm", "fedavgm.beta=1.5"])
    assert load_config(None, ["method=fedit", "fedavgm.beta=1.5"]).fedavgm.beta == 1.5  # not fedavgm's run


def test_custom_method_runs_through_the_simulator(custom_method, model_dir, tmp_path):
    from fedrouter_jax.runner import Run

    assert "fedavgm" in available()
    cfg = load_config(None, smoke_overrides(model_dir, tmp_path / "run", **{"method": "fedavgm", "train.rounds": 2}))
    beta = cfg.fedavgm.beta
    run = Run(cfg, progress=False)
    sim = run.sim
    state = sim.setup()
    ids = np.arange(cfg.data.n_clients)
    g_prev, m_prev = state.server.adapters, state.server.momentum
    for r in range(2):
        msg = sim.method.server_plan(sim.env, state.server, r, ids)
        _, reply, _, _ = sim.train_clients(rows(state.clients, ids), msg, ids, r)
        mean = fedavg(reply.adapters, reply.weight, np.ones(len(ids), bool), jax.tree.map(lambda x: x[0], g_prev))
        m_want = jax.tree.map(lambda m, a, g: beta * m + (a - g[0])[None], m_prev, mean, g_prev)
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

