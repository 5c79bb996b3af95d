"""A new federated method in about 50 lines: FedAvg with server momentum (FedAvgM, Hsu et al. 2019).

    python experiments/custom_method.py [--set fedavgm.beta=0.5 --set train.rounds=3 ...]

It reuses FedIT's client side (train the global adapter on all local data, send it back) and
writes only the server: the state holds the global adapter and a momentum buffer, and
`server_aggregate` folds the replies that arrived into them. Registering the record makes it a
`method:` like any other, so the simulator, checkpoints, evaluation and the CLI run it, and
makes its own config section `fedavgm.*` a config key (read as `env.config.fedavgm`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedrouter_jax.algorithms import base, baselines
from fedrouter_jax.config import section


@section
class FedAvgMConfig:
    """`fedavgm.*`: this method's own config section (config.py does not know it)."""

    beta: float = 0.9  # server momentum

    def problems(self, cfg) -> list[str]:  # checked when method: fedavgm
        return [] if 0.0 <= self.beta < 1.0 else [f"fedavgm.beta: expected in [0, 1), got {self.beta}"]


@struct.dataclass
class MomentumServer:
    adapters: dict  # leaves [1, ...]: the global adapter
    momentum: dict  # leaves [1, ...]


def server_setup(env, msgs, key) -> MomentumServer:
    adapters = jax.tree.map(np.asarray, base.same_init(env, key, 1))
    return MomentumServer(adapters, jax.tree.map(np.zeros_like, adapters))


def server_aggregate(env, server, task, reply, arrived, participants, round_idx) -> MomentumServer:
    """m <- beta m + (mean of the replies - global);  global <- global + m (no reply: unchanged)."""
    beta = env.config.fedavgm.beta
    glob = jax.tree.map(lambda x: x[0], server.adapters)
    mean = baselines.fedavg(reply.adapters, reply.weight, arrived, glob)
    momentum = jax.tree.map(lambda m, a, g: beta * m + (a - g)[None], server.momentum, mean, glob)
    momentum = jax.tree.map(lambda new, old: jnp.where(arrived.any(), new, old), momentum, server.momentum)
    return MomentumServer(jax.tree.map(lambda g, m: g + m, server.adapters, momentum), momentum)


# FedIT's client side and planning (send the global adapter to every participant), our server
FEDAVGM = base.register(dataclasses.replace(
    baselines.FEDIT, name="fedavgm", server_setup=server_setup, server_aggregate=server_aggregate,
    description="FedAvg with server momentum (example method)", config_section=("fedavgm", FedAvgMConfig)))


if __name__ == "__main__":
    import sys

    from fedrouter_jax.config import load_config
    from fedrouter_jax.runner import run_from_config

    overrides = ["method=fedavgm", "out_dir=runs/fedavgm"] + [a for a in sys.argv[1:] if a != "--set"]
    run_from_config(load_config("configs/smoke.yaml", overrides), progress=False)
