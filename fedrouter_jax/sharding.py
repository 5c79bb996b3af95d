"""Placing the client axis on a device mesh: clients split across devices, base replicated.

The same jitted round runs on 1 device, 8 GPUs, or several hosts (after `distributed.initialize`):
only the placement of its inputs changes. XLA's partitioner splits the vmapped client computation.
With several processes the mesh spans every process's devices and each process passes the whole
host array (the same everywhere: see distributed.py); read outputs back with `distributed.to_host`.
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedrouter_jax.distributed import global_array

CLIENT_AXIS = "clients"


def client_mesh(n_devices: int = 1) -> Optional[Mesh]:
    """A 1-D mesh over `n_devices` devices (0 = all); None for a single device (no sharding)."""
    devices = jax.devices()
    n = len(devices) if n_devices == 0 else n_devices
    if n > len(devices):
        raise ValueError(f"train.client_mesh_devices={n_devices}: only {len(devices)} devices are visible")
    if n <= 1:
        return None
    return Mesh(np.asarray(devices[:n]), (CLIENT_AXIS,))


def _put(x, sharding):
    if jax.process_count() > 1:  # every host holds the whole axis; its devices take their rows
        return global_array(x, sharding)
    return jax.device_put(x, sharding)


def shard_clients(tree, mesh: Optional[Mesh]):
    """Place every leaf's leading (client) axis across the mesh. Identity without a mesh."""
    if mesh is None:
        return tree
    n = mesh.devices.size

    def put(x):
        if x.shape[0] % n:
            raise ValueError(
                f"the client axis ({x.shape[0]}) must be a multiple of the {n} mesh devices "
                "(choose data.n_clients or train.client_mesh_devices accordingly)"
            )
        return _put(x, NamedSharding(mesh, P(CLIENT_AXIS)))

    return jax.tree.map(put, tree)


def replicate(tree, mesh: Optional[Mesh]):
    """Place every leaf whole on every device of the mesh (the frozen base)."""
    if mesh is None:
        return tree
    return jax.tree.map(lambda x: _put(x, NamedSharding(mesh, P())), tree)
