"""Client groups from measured memory (`fedrouter_jax.memory`): the search, the CPU fallback, and
the estimate of a compiled round against the memory its run really takes (CPU: peak RSS)."""
import ctypes
import dataclasses
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from fedrouter_jax import memory
from fedrouter_jax.training import Batch, client_chunk_size, clients_local_steps, init_opt_states, make_optimizer

from helpers import TINY, random_batch, random_lora, tiny_model

MiB = 2**20


def test_chunk_candidates():
    assert memory.chunk_candidates(7) == [1, 2, 3, 4, None]  # groups of 1, 2, 3 (7 = 3+3+1 padded), 4, all
    assert [memory.group_size(c, 7) for c in memory.chunk_candidates(7)] == [1, 2, 3, 4, 7]
    # 4 devices, 24 clients (6 per device): groups of 4, 8, 12 or all 24, each a whole multiple of 4
    assert memory.chunk_candidates(24, n_devices=4) == [4, 8, 12, None]


def _fake_lower(peak_of_group, n_clients, log):
    """`lower(chunk)` whose compiled call reports `peak_of_group(g)` bytes (no compiling)."""
    def lower(chunk):
        g = memory.group_size(chunk, n_clients)
        log.append(g)
        ma = SimpleNamespace(argument_size_in_bytes=0, output_size_in_bytes=0, alias_size_in_bytes=0,
                             temp_size_in_bytes=peak_of_group(g))
        return SimpleNamespace(compile=lambda: SimpleNamespace(memory_analysis=lambda: ma))
    return lower


def test_fit_client_chunk_search():
    linear = lambda g: 100 * MiB + g * 10 * MiB  # noqa: E731
    budget = memory.RUNTIME_BYTES + linear(37) + 1
    log = []
    c = memory.fit_client_chunk(_fake_lower(linear, 128, log), 128, budget)
    assert c.group == 32 and c.chunk == 32  # 37 would fit, but the valid groups under 37 end at 32 (128 = 4 x 32)
    assert log == [1, 2, 32]  # two probes and the confirmation
    assert c.memory.peak <= budget - memory.RUNTIME_BYTES

    # a jump the line does not predict: step down until it fits
    jumpy = lambda g: linear(g) + (400 * MiB if g > 16 else 0)  # noqa: E731
    log = []
    c = memory.fit_client_chunk(_fake_lower(jumpy, 128, log), 128, budget)
    assert c.group == 16 and log == [1, 2, 32, 26, 22, 19, 16]

    assert memory.fit_client_chunk(_fake_lower(linear, 8, []), 8, 10**12).chunk is None  # all at once fits
    with pytest.raises(MemoryError, match="train.client_chunk: auto: a group of 1 client"):
        memory.fit_client_chunk(_fake_lower(linear, 8, []), 8, linear(1))


def test_auto_client_chunk_on_cpu_keeps_the_token_budget():
    assert memory.free_device_bytes() is None  # XLA:CPU reports no allocator stats
    c = memory.auto_client_chunk(lambda chunk: pytest.fail("nothing is compiled on CPU"), n_clients=128,
                                 tokens_per_client=64)
    assert c.chunk == client_chunk_size("auto", 128, 64) == 32 and c.memory is None


PAGE_SLACK = 1 * MiB  # allocator pages already resident (glibc keeps some after malloc_trim)


def _vm_hwm() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
@pytest.mark.parametrize("chunk", [None, 1])
def test_estimate_brackets_the_measured_peak(chunk):
    """Compile a round, reset the process's peak RSS, run it: the peak grew by what XLA's buffer
    assignment says the call adds, plus at most `RUNTIME_BYTES`."""
    cfg, base = tiny_model(cfg=dataclasses.replace(TINY, hidden_size=128, intermediate_size=256))
    C, S, B, T = 2, 1, 16, 128
    opt = make_optimizer()
    loras = random_lora(cfg, C, targets=("q_proj", "v_proj"))
    args = (base, loras, init_opt_states(opt, loras, 5e-3),
            Batch(*map(jnp.asarray, random_batch((C, S, B, T), cfg.vocab_size, seed=7))),
            jax.random.split(jax.random.PRNGKey(0), C))
    compiled = clients_local_steps.lower(*args, cfg=cfg, optimizer=opt, client_chunk=chunk).compile()
    est = memory.call_memory(compiled)
    low, high = est.added_bounds()
    assert low > 20 * MiB  # large enough that the bracket means something
    jax.block_until_ready(args)
    # hand freed heap pages back to the OS: pages an earlier test freed but glibc kept resident
    # would be reused without raising the peak (the CI saw 29.62 MiB grown for 29.75 MiB buffers)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    jax.block_until_ready(compiled(*args))
    grew = _vm_hwm() - before
    assert low - PAGE_SLACK <= grew <= high, (low / MiB, grew / MiB, high / MiB)
