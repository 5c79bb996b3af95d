"""`host_memory.retain_freed_memory`: freed large blocks are reused, not faulted in again."""
import subprocess
import sys

import pytest

_CHILD = r"""
import ctypes, resource, sys
from fedrouter_jax import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def faults_of_one_alloc(n=64 * 2**20):  # malloc, touch every byte, free: as XLA:CPU's temporaries
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_alloc()
print(applied, faults_of_one_alloc())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_retained_memory_is_reused_without_page_faults():
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
        applied, faults = out.stdout.split()
        return applied == "True", int(faults)

    applied, retained = run("retain")
    _, default = run("default")
    assert applied
    assert default > 10_000  # 64 MiB / 4 KiB pages, mmap'd and unmapped on every free by default
    assert retained < 1_000  # the second 64 MiB block reuses the first one's pages


def test_switch_off(monkeypatch):
    from fedrouter_jax import host_memory

    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setenv(host_memory.ENV_SWITCH, "0")
    assert host_memory.retain_freed_memory() is False
