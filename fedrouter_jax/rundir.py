"""The run directory (`out_dir`): what makes one, its lock, and the config check on resume.

A run of this tool writes only the entries in :data:`RUN_ENTRIES` (plus their temporaries,
:data:`RUN_TEMP_PATTERNS`); a directory is *recognisably a run* when it holds `config.yaml`
and nothing else. Only such a directory (or an empty one) is written into, and `--fresh`
removes exactly those entries, so a user's files (or a checkout, `out_dir=.`) are never touched.

    with RunDir(out, fresh=False) as rd:        # refuses a foreign dir; takes the lock
        rd.check_same_config(config_to_dict(cfg))   # `run`: names the dotted keys that differ
        check_resume_config(saved_with_checkpoint, config_to_dict(cfg), where=..., step=3)
        ...                                     # on an exception before any checkpoint step,
                                                # what this attempt created is removed again

The lock is `fcntl.flock` on `out_dir/.fedrouter.lock`, taken before anything else is written
there; the kernel releases it when the process dies, so a crash never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = ["RunDirError", "RunDir", "RUN_ENTRIES", "LOCK_FILE", "STATE_KEYS", "config_diff",
           "foreign_entries", "check_resume_config"]

LOCK_FILE = ".fedrouter.lock"
CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
RUN_ENTRIES = (CONFIG_FILE, "metrics.jsonl", "results.json", CHECKPOINT_DIR, LOCK_FILE,
               "flower",  # `fedrouter-jax flower`: its app, FLWR_HOME, PID files and logs
               "route_reference.npz")  # bundle.ROUTE_REFERENCE_FILE (FedDPA dynamic mixing)
RUN_TEMP_PATTERNS = (".config.yaml.tmp*", "metrics.tmp", ".metrics.jsonl.tmp*", ".results.json.tmp*",
                     "results.json.tmp*", ".route_reference.npz.tmp*")
# Dotted config keys (or sections) the saved state's shapes and meaning depend on: a resume
# whose config differs in one of these is refused.
STATE_KEYS = ("method", "seed", "model.path", "model.dtype", "lora.rank", "lora.targets", "data",
              "clustering.n_local", "clustering.n_global", "clustering.k_min", "clustering.k_max",
              "clustering.schedule", "federation.clients_per_round", "train.reset_optimizer_each_round",
              "fedcluster.n_clusters", "fedcluster.cluster_round")
_IGNORED_KEYS = ("out_dir",)  # the directory the user names is the run


class RunDirError(ValueError):
    """The out_dir cannot be used as asked; the message says why and what to do."""


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or any(fnmatch.fnmatchcase(name, p) for p in RUN_TEMP_PATTERNS)


def foreign_entries(out: Path) -> list[str]:
    """Names in `out` that a run of this tool never writes (sorted); [] when none / no dir."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if not _is_run_entry(p.name))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def config_diff(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (old, new)} for every leaf that differs (out_dir ignored)."""
    a, b = _flatten(old), _flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in _IGNORED_KEYS}


def _is_state_key(key: str) -> bool:
    return any(key == s or key.startswith(s + ".") for s in STATE_KEYS)


def _describe(diff: dict[str, tuple[Any, Any]], limit: int = 6) -> str:
    items = [f"{k} ({a!r} -> {b!r})" for k, (a, b) in diff.items()]
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


class RunDir:
    """An out_dir opened for one attempt of `run` / `resume` / `eval` (a context manager).

    `fresh`: remove the run's entries (only those) first. `must_exist`: the directory has to
    be a run already (`resume`, `eval`). Raises RunDirError for a directory holding anything a
    run does not write, one locked by another process, and (must_exist) one that is no run.
    """

    def __init__(self, out: str | os.PathLike, *, fresh: bool = False, must_exist: bool = False):
        self.out = Path(out).expanduser()
        self.fresh, self.must_exist = fresh, must_exist
        self._lock_fd: Optional[int] = None
        self._created_dir = False
        self._before: set[str] = set()

    # -- checks -----------------------------------------------------------------------------
    def _refuse_foreign(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise RunDirError(f"out_dir: {self.out} exists and is not a directory")
        if self.out.resolve() in (Path.home().resolve(), Path("/")):
            raise RunDirError(f"out_dir: {self.out} is a home or root directory; choose a directory for the run")
        foreign = foreign_entries(self.out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" (+{len(foreign) - 5} more)" if len(foreign) > 5 else "")
            what = "--fresh would delete it: refused" if self.fresh else "refused"
            raise RunDirError(
                f"out_dir: {self.out} is not a fedrouter-jax run directory (it holds {shown}, which a run never "
                f"writes); {what}, nothing was changed. Choose another out_dir"
            )
        if self.must_exist and not (self.out / CONFIG_FILE).is_file():
            raise RunDirError(f"{self.out / CONFIG_FILE}: no run here (expected the config.yaml a run writes)")

    # -- lock -------------------------------------------------------------------------------
    def _lock(self) -> None:
        fd = os.open(self.out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"out_dir: {self.out} is in use by another fedrouter-jax process (pid {holder}; lock "
                f"{self.out / LOCK_FILE}); wait for it to finish or choose another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- context ----------------------------------------------------------------------------
    def __enter__(self) -> "RunDir":
        self._refuse_foreign()  # read-only: a refused directory is never written to
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self._created_dir = True
        self._before = {p.name for p in self.out.iterdir()}
        self._lock()
        try:
            self._refuse_foreign()  # again under the lock (another process may have written)
            if self.fresh:
                self._remove_run_entries()
                self._before = {LOCK_FILE}
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None and not self.has_checkpoint_steps():
                self._remove_created()
        finally:
            self._unlock()
            if exc_type is not None and self._created_dir and self.out.is_dir() and not any(self.out.iterdir()):
                self.out.rmdir()

    def _remove_run_entries(self) -> None:
        for p in self.out.iterdir():
            if p.name != LOCK_FILE and _is_run_entry(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def _remove_created(self) -> None:
        """An attempt that failed before its first checkpoint leaves nothing behind."""
        for p in self.out.iterdir():
            if p.name not in self._before and p.name != LOCK_FILE and _is_run_entry(p.name):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if LOCK_FILE not in self._before:
            (self.out / LOCK_FILE).unlink(missing_ok=True)

    def has_checkpoint_steps(self) -> bool:
        ck = self.out / CHECKPOINT_DIR
        return ck.is_dir() and any(p.name.split(".")[0].isdigit() for p in ck.iterdir())

    # -- config -----------------------------------------------------------------------------
    def saved_config(self) -> Optional[dict]:
        path = self.out / CONFIG_FILE
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise RunDirError(f"{path}: cannot be read as YAML ({str(e).splitlines()[0]})") from None
        return data if isinstance(data, dict) else None

    def check_same_config(self, new: dict) -> None:
        """`run` on an existing run: the config must be the saved one (names the keys that differ)."""
        old = self.saved_config()
        if old is None:
            return
        diff = config_diff(old, new)
        if diff:
            raise RunDirError(
                f"out_dir: {self.out} holds a run with a different config ({self.out / CONFIG_FILE}): "
                f"{_describe(diff)}. Pass --fresh to start over there, choose another out_dir, or edit that "
                f"file and `resume --out-dir {self.out}` (keys the saved state depends on cannot change)"
            )


def check_resume_config(checkpoint_config: Optional[dict], new: dict, *, where: str, step: int) -> dict:
    """Refuses a config whose state keys differ from the one saved with checkpoint `step`;
    returns the other differing keys {dotted: (old, new)} (allowed: e.g. train.rounds)."""
    if checkpoint_config is None:
        return {}
    diff = config_diff(checkpoint_config, new)
    fatal = {k: v for k, v in diff.items() if _is_state_key(k)}
    if fatal:
        raise RunDirError(
            f"{where}: config differs from the one saved with the checkpoint of round {step} in keys the saved "
            f"state depends on: {_describe(fatal)}; restore those values, or start a new run (another out_dir "
            "or --fresh)"
        )
    return diff
