"""Client groups from measured memory: `train.client_chunk: auto` on an accelerator.

A round trains its clients in groups (`training.map_in_chunks`); only one group's activations
are live at a time. On an accelerator the best group is the largest that fits, and what fits is
measured, not guessed: XLA's buffer assignment of the compiled round states its bytes exactly
(`compiled.memory_analysis()`: arguments, outputs, temporaries, and the outputs that reuse
donated arguments), and the device's allocator states what is free (`device.memory_stats()`).
Compiling costs seconds, so the search compiles few sizes: the two smallest groups give the
bytes per added client, the largest group predicted to fit is compiled to confirm it, and a
smaller one is tried only if it does not. On CPU (no memory stats) `training.client_chunk_size`
keeps its cache-sized token budget.

    lower = lambda chunk: training.clients_local_steps.lower(base, loras, opt_states, batches, keys,
                                                             frozen, cfg=cfg, optimizer=opt, client_chunk=chunk)
    choice = memory.auto_client_chunk(lower, n_clients=C, tokens_per_client=B * T,
                                      resident=(base, loras, opt_states))
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax

from fedrouter_jax.training import client_chunk_size

# Fraction of the free device memory a round may plan to use: the rest absorbs the allocator's
# fragmentation and the next round's batches arriving while this one runs.
HEADROOM = 0.9
# Bytes a call takes outside XLA's buffer assignment (runtime thread pools and scratch): a bound
# that tests/test_memory.py checks against the measured peak. Library workspaces (cuBLAS, cuDNN) are
# buffers of their custom calls, so they are in the assignment.
RUNTIME_BYTES = 32 * 2**20


@dataclasses.dataclass(frozen=True)
class CallMemory:
    """Buffer bytes of one compiled call (per device for a partitioned call)."""

    argument: int
    output: int
    temp: int
    alias: int  # output bytes that reuse donated argument buffers

    @property
    def peak(self) -> int:
        """Every buffer of the call live at once: arguments + outputs + temporaries - aliased."""
        return self.argument + self.output + self.temp - self.alias

    @property
    def added(self) -> int:
        """Bytes the call allocates beyond its arguments (outputs + temporaries - aliased)."""
        return self.output + self.temp - self.alias

    def added_bounds(self) -> tuple[int, int]:
        """(low, high) of the bytes a run adds to the device's (or process's) peak."""
        return self.added, self.added + RUNTIME_BYTES


def call_memory(compiled: jax.stages.Compiled) -> CallMemory:
    """`CallMemory` of a compiled call, from XLA's buffer assignment."""
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend reports no memory analysis for compiled calls")
    return CallMemory(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
                      temp=int(ma.temp_size_in_bytes), alias=int(ma.alias_size_in_bytes))


def tree_nbytes(tree) -> int:
    """Bytes of the arrays in `tree` (abstract leaves included)."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def free_device_bytes(device: Optional[jax.Device] = None, resident=()) -> Optional[int]:
    """Bytes a call's buffers may take on `device` (default: the first), or None on CPU.

    The allocator's limit minus its bytes in use, plus the bytes of `resident`: arrays already on
    the device that the call takes as arguments (counted both in use and in `CallMemory.peak`).
    With a mesh pass per-device bytes (the bytes of the shards on this device).
    """
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)) + tree_nbytes(resident)


def group_size(chunk: Optional[int], n_clients: int) -> int:
    """Clients per group that `map_in_chunks` runs for `chunk` (None = all at once)."""
    if chunk is None or chunk >= n_clients:
        return n_clients
    n_groups = -(-n_clients // chunk)
    return -(-n_clients // n_groups)


def chunk_candidates(n_clients: int, n_devices: int = 1) -> list[Optional[int]]:
    """Every distinct `client_chunk` for C clients, smallest group first, None (all) last.

    Built from `training.client_chunk_size(k, ...)`, so with a mesh the groups are the whole
    multiples of the device count that divide the client axis, as the round requires.
    """
    out, seen = [], set()
    for per_device in range(1, -(-n_clients // n_devices) + 1):
        chunk = client_chunk_size(per_device, n_clients, 0, n_devices)
        g = group_size(chunk, n_clients)
        if g not in seen:
            seen.add(g)
            out.append(chunk)
    return out


@dataclasses.dataclass(frozen=True)
class ChunkChoice:
    """The chosen `client_chunk` and what was measured to choose it."""

    chunk: Optional[int]
    group: int  # clients per group
    memory: Optional[CallMemory]  # of the chosen round; None where nothing was measured (CPU)
    budget: Optional[int]  # bytes the round may take (HEADROOM x free), None on CPU
    probes: dict  # {group size: peak bytes} of every compiled candidate

    def describe(self) -> str:
        if self.memory is None:
            return f"client_chunk auto: groups of {self.group} clients (token budget; no device memory stats)"
        gib = 2.0**30
        return (f"client_chunk auto: groups of {self.group} clients, {self.memory.peak / gib:.2f} GiB of "
                f"{self.budget / gib:.2f} GiB usable (compiled {sorted(self.probes)})")


def fit_client_chunk(lower: Callable[[Optional[int]], jax.stages.Lowered], n_clients: int, budget: int,
                     n_devices: int = 1, candidates: Optional[Sequence[Optional[int]]] = None) -> ChunkChoice:
    """The largest client group whose compiled round fits `budget` bytes (`CallMemory.peak`).

    lower(chunk) -> the round lowered with `client_chunk=chunk` (abstract arguments are fine).
    A group fits if its peak plus `RUNTIME_BYTES` is at most `budget`. Raises MemoryError if even
    the smallest group does not fit.
    """
    usable = budget - RUNTIME_BYTES
    cands = list(candidates) if candidates is not None else chunk_candidates(n_clients, n_devices)
    sizes = [group_size(c, n_clients) for c in cands]
    measured: dict[int, CallMemory] = {}

    def measure(i: int) -> CallMemory:
        if sizes[i] not in measured:
            measured[sizes[i]] = call_memory(lower(cands[i]).compile())
        return measured[sizes[i]]

    def choice(i: int) -> ChunkChoice:
        return ChunkChoice(chunk=cands[i], group=sizes[i], memory=measured[sizes[i]], budget=budget,
                           probes={g: m.peak for g, m in measured.items()})

    if measure(0).peak > usable:
        raise MemoryError(f"train.client_chunk: auto: a group of {sizes[0]} client(s) needs "
                          f"{(measure(0).peak + RUNTIME_BYTES) / 2**30:.2f} GiB, only {budget / 2**30:.2f} GiB "
                          f"are usable on the device")
    if len(cands) == 1:
        return choice(0)
    # bytes per added client from the two smallest groups; the largest group on that line
    per_client = max((measure(1).peak - measure(0).peak) / (sizes[1] - sizes[0]), 1.0)
    fits = sizes[0] + (usable - measure(0).peak) / per_client
    i = max(j for j in range(len(cands)) if sizes[j] <= fits or j == 0)
    while i > 0 and measure(i).peak > usable:  # the line was optimistic: step down
        i -= 1
    while i + 1 < len(cands) and sizes[i + 1] in measured and measured[sizes[i + 1]].peak <= usable:
        i += 1  # a probe already showed that a larger group fits
    return choice(i)


def auto_client_chunk(lower: Callable[[Optional[int]], jax.stages.Lowered], *, n_clients: int,
                      tokens_per_client: int, n_devices: int = 1, device: Optional[jax.Device] = None,
                      resident=(), headroom: float = HEADROOM) -> ChunkChoice:
    """`train.client_chunk: auto`: measured on an accelerator, `client_chunk_size` on CPU.

    lower, n_clients: see `fit_client_chunk`; tokens_per_client: B x T of one client's step
    (CPU's token budget); resident: the round's arguments already on the device (base,
    adapters, optimizer state), see `free_device_bytes`.
    """
    free = free_device_bytes(device, resident)
    if free is None:
        chunk = client_chunk_size("auto", n_clients, tokens_per_client, n_devices)
        return ChunkChoice(chunk=chunk, group=group_size(chunk, n_clients), memory=None, budget=None, probes={})
    return fit_client_chunk(lower, n_clients, int(headroom * free), n_devices)
