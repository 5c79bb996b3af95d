"""Several JAX processes (hosts) running one federation: start-up, who writes, read-back.

Layout (docs/DESIGN.md, "Multi-host layout"): every process builds the same host data, since
the simulator is deterministic (same config -> same clients, batches, keys and host state). The
client axis of the round's inputs is sharded over the devices of all processes: each process
passes its whole copy with `global_shape` = its shape, and only the rows of its own devices are
copied to them. Outputs come back whole on every process (`to_host`), so the `SimState` stays
identical host numpy everywhere. Process 0, the primary, alone writes the run directory.

    initialize("10.0.0.1:1234", 2, process_id)   # before anything touches JAX devices
    x = global_array(rows, NamedSharding(mesh, P("clients")))   # rows: [C, ...] on every process
    y = to_host(jitted(x))                       # [C, ...] numpy on every process
"""
from __future__ import annotations

from typing import Optional

import jax
import numpy as np

# How long a process waits for the others at a barrier or for the primary's broadcast: they may
# be minutes apart (the primary checks and hashes checkpoints, evaluates, saves).
_WAIT_S = 600


def initialize(coordinator: Optional[str], num_processes: Optional[int], process_id: Optional[int]) -> None:
    """`jax.distributed.initialize` for `--coordinator HOST:PORT --num-processes N --process-id I`.

    All three or none (none: one process, nothing to do). The coordinator (in process 0) listens
    on HOST:PORT only. Each process's CPU devices come from `JAX_NUM_CPU_DEVICES`."""
    given = [v is not None for v in (coordinator, num_processes, process_id)]
    if not any(given):
        return
    if not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id: give all three or none")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--coordinator: expected HOST:PORT, got {coordinator!r}")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id: expected 0 <= id < --num-processes ({num_processes}), got {process_id}")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, coordinator_bind_address=coordinator)


def is_primary() -> bool:
    """True in the process that writes the run directory (process 0; the only one without
    `jax.distributed`)."""
    return jax.process_index() == 0


def global_array(x, sharding) -> jax.Array:
    """A host array that every process holds whole -> one array placed by `sharding` across
    all processes' devices (each process copies only its devices' slices)."""
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)


def to_host(x) -> np.ndarray:
    """An array (client-sharded across processes or not) whole as host numpy, [C, ...].

    A collective when `x` spans other processes' devices: every process calls it, in the same
    order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _coordination_client():
    """JAX's coordination-service client (key-value store and barriers; what Orbax uses too).

    Not gloo: a gloo collective gives a late peer 30 s, the coordination service `_WAIT_S`."""
    from jax._src import distributed

    return distributed.global_state.client


def broadcast_from_primary(name: str, value: int) -> int:
    """The primary's `value` on every process (the others' argument is ignored); `name` is
    unique within the run."""
    if jax.process_count() == 1:
        return value
    key = f"fedrouter/{name}"
    if is_primary():
        _coordination_client().key_value_set(key, str(int(value)))
        return value
    return int(_coordination_client().blocking_key_value_get(key, _WAIT_S * 1000))


def barrier(name: str) -> None:
    """Every process waits here for the others (`name` unique within the run). Before a
    round, so that no process reaches its collectives more than a compile's spread later."""
    if jax.process_count() > 1:
        _coordination_client().wait_at_barrier(f"fedrouter/{name}", _WAIT_S * 1000)
