"""Compiles a C++ XLA FFI kernel on first use and caches the shared library.

The library is built with `-march=native` (see `flags`) for the machine it runs on, so the cache key covers the
source, the flags, the compiler, the jaxlib headers and the CPU's feature flags; a cache shared
between different machines cannot hand one the other's binary. A failed build raises a
one-line `KernelBuildError` (the compiler's output in `.detail`); the caller falls back to XLA.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

FLAGS = ("-O3", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")


def flags() -> tuple[str, ...]:
    """Compiler flags; `FEDROUTER_KERNEL_MARCH` (default `native`) picks the target ISA, e.g.
    `x86-64-v3` to build (and test) the AVX2 path on an AVX-512 machine."""
    return (*FLAGS, f"-march={os.environ.get('FEDROUTER_KERNEL_MARCH', 'native')}")


class KernelBuildError(RuntimeError):
    """A kernel that cannot be built: a one-line message; the compiler's output in `detail`."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


def _first_error(stderr: str) -> str:
    """The compiler's first error line (or its last line): what a one-line report shows."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")


def cache_dir() -> Path:
    return Path(os.environ.get("FEDROUTER_CACHE", Path.home() / ".cache" / "fedrouter-jax")) / "kernels"


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise KernelBuildError("no C++ compiler found (set CXX or install g++)")
    return cxx


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_key(source: Path, cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    h = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags()).encode(), version.encode(),
                 jaxlib.__version__.encode(), _cpu_flags().encode()):
        h.update(part + b"\0")
    return h.hexdigest()[:24]


def build(source: Path) -> Path:
    """Compile `source` (once per cache key) and return the shared library's path.

    The library is written to a temporary file and renamed into place, so concurrent processes
    and interrupted builds never leave a half-written library behind.
    """
    cxx = compiler()
    out = cache_dir() / f"{source.stem}-{_cache_key(source, cxx)}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *flags(), f"-I{jax.ffi.include_dir()}", str(source), "-o", tmp]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise KernelBuildError(f"{cxx} failed on {source} (exit {proc.returncode}): {_first_error(proc.stderr)}",
                                   detail=f"`{' '.join(cmd)}`:\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(source: Path) -> ctypes.CDLL:
    return ctypes.cdll.LoadLibrary(str(build(source)))
