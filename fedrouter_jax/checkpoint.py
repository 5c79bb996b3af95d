"""Crash-safe round checkpoints: a thin wrapper over Orbax's CheckpointManager.

One step per round holds two items: ``state`` (any pytree of jax / numpy arrays, typed or raw
uint32 PRNG keys, Python / numpy scalars; saved with ``args.StandardSave``) and ``extra`` (a
JSON-able dict: metrics history, schedule position, resolved config; ``args.JsonSave``).
Orbax refuses zero-size arrays ("Cannot save arrays with zero size: ... name=<leaf>").

What Orbax 0.12.8 writes on a local filesystem (``AtomicRenameTemporaryPath``; observed in
tests/test_checkpoint.py by SIGKILLing a child at each stage)::

    <dir>/2.orbax-checkpoint-tmp/      the step while it is written; inside it each item is also
      _CHECKPOINT_METADATA             written to <item>.orbax-checkpoint-tmp/ and renamed to
      state.orbax-checkpoint-tmp/      <item>/ (with its own commit_success.txt) when done; then
      extra.orbax-checkpoint-tmp/      the step gets a commit timestamp and commit_success.txt,
                                       and ONE rename makes it ...
    <dir>/2/
      _CHECKPOINT_METADATA             JSON: item handlers, init / commit timestamps
      commit_success.txt               step-level commit marker (written just before the rename)
      state/                           OCDBT / zarr3: manifest.ocdbt, _METADATA, _sharding,
                                       ocdbt.process_0/{manifest.ocdbt,d/*}, d/*,
                                       array_metadatas/, commit_success.txt
      extra/                           metadata (the JSON), commit_success.txt
      fedrouter_complete.json          OURS: written last, after every file above was fsync'ed;
                                       lists each file's size
    <dir>/.trash/                      steps being deleted (atomic rename, then rmtree)

Orbax's Python layer does not fsync (JSON and metadata files are plain ``write_text``; only
TensorStore's array files may be synced), and the manager's in-process ``latest_step()`` may
name a step whose (async) save has not finished. So completeness is decided here, from the disk only: a step
counts iff its directory name is a plain integer (no tmp suffix), it holds Orbax's
``commit_success.txt`` at the step level and in both item directories, its
``_CHECKPOINT_METADATA`` has a commit timestamp, and our ``fedrouter_complete.json`` is present
and every file it lists exists with the recorded size. ``save`` returns only after all of that
is on disk and fsync'ed (files, directories, the parent), so a SIGKILL or crash at any point
leaves either the complete step or something that is ignored. Opening a writable store removes
leftovers (``*.orbax-checkpoint-tmp*`` directories, unmarked step directories, ``.trash``).
Old steps are pruned only *after* the new step is complete, so ``keep`` complete steps survive.

One writer per directory: a writable store sweeps leftovers when it opens and before each
save; readers (e.g. an evaluation process) should pass ``read_only=True``.

    store = CheckpointStore("runs/x/checkpoints", keep=3)
    store.save(round_idx, state, {"metrics": history, "config": config_to_dict(cfg)})
    step = store.latest_step()                       # None when nothing complete exists
    state, extra = store.restore(step, like=state)   # bit-exact
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointStore", "CheckpointError", "TMP_SUFFIX", "MARKER_FILE"]

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
MARKER_FILE = "fedrouter_complete.json"
ORBAX_COMMIT_FILE = "commit_success.txt"  # orbax atomicity_types.COMMIT_SUCCESS_FILE
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax atomicity_types.TMP_DIR_SUFFIX
TRASH_DIR = ".trash"
_STEP_RE = re.compile(r"^[0-9]+$")


class CheckpointError(RuntimeError):
    """A requested checkpoint is missing or incomplete."""


# ---------------------------------------------------------------------------------------------
# Filesystem helpers.
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> dict[str, int]:
    """fsyncs every file and directory under root (children first); returns {relpath: size}."""
    sizes: dict[str, int] = {}
    for dirpath, _, filenames in os.walk(root, topdown=False):
        d = Path(dirpath)
        for name in filenames:
            p = d / name
            _fsync_path(p)
            sizes[p.relative_to(root).as_posix()] = p.stat().st_size
        _fsync_path(d)
    return sizes


def _write_json_durably(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, (np.ndarray, jax.Array)):
        return np.asarray(x).tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"extra: value of type {type(x).__name__} is not JSON-serializable")


def _step_problem(step_dir: Path) -> str | None:
    """None when step_dir is a complete checkpoint; else why it is not (checked on disk)."""
    if not _STEP_RE.match(step_dir.name):
        return f"{step_dir.name!r} is not a finalized step name"
    if not step_dir.is_dir():
        return "no such step directory"
    for sub in ("", STATE_ITEM, EXTRA_ITEM):
        if not (step_dir / sub / ORBAX_COMMIT_FILE).is_file():
            return f"Orbax commit marker {sub + '/' if sub else ''}{ORBAX_COMMIT_FILE} is missing"
    try:
        meta = json.loads((step_dir / ORBAX_STEP_METADATA).read_text())
    except (OSError, ValueError):
        return f"{ORBAX_STEP_METADATA} is missing or unreadable"
    if not meta.get("commit_timestamp_nsecs"):
        return f"{ORBAX_STEP_METADATA} has no commit timestamp"
    try:
        marker = json.loads((step_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return f"{MARKER_FILE} is missing or unreadable (save did not finish)"
    if marker.get("step") != int(step_dir.name):
        return f"{MARKER_FILE} names step {marker.get('step')}"
    for rel, size in marker.get("files", {}).items():
        try:
            actual = (step_dir / rel).stat().st_size
        except OSError:
            return f"file {rel} listed in {MARKER_FILE} is missing"
        if actual != size:
            return f"file {rel} has {actual} bytes, {MARKER_FILE} recorded {size}"
    return None


def _abstract(x: Any) -> Any:
    """A restore target leaf: arrays (incl. typed PRNG keys, numpy scalars) -> ShapeDtypeStruct."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic)):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
    return x  # Python scalars restore as themselves


def _match_kind(restored: Any, like: Any) -> Any:
    if isinstance(like, (np.ndarray, np.generic)):
        out = np.asarray(restored)
        return out[()] if isinstance(like, np.generic) else out
    return restored


# ---------------------------------------------------------------------------------------------
# The store.
# ---------------------------------------------------------------------------------------------


class CheckpointStore:
    """Keeps the last `keep` complete steps of (state pytree, extra JSON dict) in `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep: expected >= 1, got {keep}")
        self.directory = Path(directory).expanduser().absolute()
        self.keep = keep
        self.read_only = read_only
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._sweep()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruning is ours: only after the new step is durably complete
            enable_async_checkpointing=False,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=False,  # done synchronously by _sweep
            todelete_subdir=None if read_only else TRASH_DIR,  # delete = atomic rename first
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # -- context manager -------------------------------------------------------------------
    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries (from disk) ---------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending. Torn, partial or in-progress steps are excluded."""
        if not self.directory.is_dir():
            return []
        return sorted(
            int(p.name) for p in self.directory.iterdir()
            if _STEP_RE.match(p.name) and _step_problem(p) is None
        )

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Saves `state` and `extra` as `step`; returns once the step is durably complete.

        `extra` must be JSON-able (numpy / jax scalars and arrays are converted to Python
        numbers / lists; tuples come back as lists).
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory}: store opened read_only")
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"step: expected an int >= 0, got {step!r}")
        step = int(step)
        extra = json.loads(json.dumps({} if extra is None else extra, default=_json_default))
        if not isinstance(extra, dict):
            raise ValueError(f"extra: expected a dict, got {type(extra).__name__}")
        self._sweep()
        if step in self.all_steps():
            raise CheckpointError(
                f"{self.directory}: step {step} already exists; delete(step) it first"
            )
        self._mngr.reload()
        saved = self._mngr.save(
            step,
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardSave(state), EXTRA_ITEM: ocp.args.JsonSave(extra)}
            ),
            force=True,
        )
        self._mngr.wait_until_finished()
        if not saved:
            raise CheckpointError(f"{self.directory}: Orbax declined to save step {step}")
        self._mark_complete(self.directory / str(step))
        self._prune()

    def _mark_complete(self, step_dir: Path) -> None:
        sizes = _fsync_tree(step_dir)
        _fsync_path(self.directory)  # the tmp -> final rename
        _write_json_durably(step_dir / MARKER_FILE, {"step": int(step_dir.name), "files": sizes})
        problem = _step_problem(step_dir)
        if problem is not None:
            raise CheckpointError(f"{step_dir}: incomplete right after saving: {problem}")

    def delete(self, step: int) -> None:
        """Removes one step (atomic rename into .trash, then rmtree)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory}: store opened read_only")
        self._trash(self.directory / str(int(step)))
        self._empty_trash()

    def _prune(self) -> None:
        steps = self.all_steps()
        for old in steps[: max(0, len(steps) - self.keep)]:
            self._trash(self.directory / str(old))
        self._empty_trash()
        self._mngr.reload()

    # -- cleanup ---------------------------------------------------------------------------
    def _trash(self, path: Path) -> None:
        if not path.exists():
            return
        trash = self.directory / TRASH_DIR
        trash.mkdir(exist_ok=True)
        dst = trash / path.name
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(path, dst)
        _fsync_path(self.directory)

    def _empty_trash(self) -> None:
        shutil.rmtree(self.directory / TRASH_DIR, ignore_errors=True)

    def _sweep(self) -> None:
        """Removes what a crashed save or delete left behind: tmp dirs, unmarked steps, trash."""
        for p in list(self.directory.iterdir()):
            if TMP_SUFFIX in p.name:
                self._trash(p)
            elif _STEP_RE.match(p.name) and _step_problem(p) is not None:
                self._trash(p)
        self._empty_trash()

    # -- restore ---------------------------------------------------------------------------
    def restore(self, step: int | None = None, like: Any = None) -> tuple[Any, dict]:
        """Returns (state, extra) of `step` (default: the latest complete one), bit-exact.

        `like` is a pytree (concrete arrays or jax.ShapeDtypeStruct) giving the structure,
        dtypes and shardings to restore into; without it the saved metadata decides.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        step_dir = self.directory / str(int(step))
        problem = _step_problem(step_dir)
        if problem is not None:
            raise CheckpointError(
                f"{step_dir}: step {step} is not a complete checkpoint ({problem}); "
                f"complete steps: {self.all_steps()}"
            )
        if like is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore(jax.tree.map(_abstract, like))
        self._mngr.reload()
        out = self._mngr.restore(
            int(step),
            args=ocp.args.Composite(
                **{STATE_ITEM: state_args, EXTRA_ITEM: ocp.args.JsonRestore()}
            ),
        )
        state = out[STATE_ITEM]
        if like is not None:
            state = jax.tree.map(_match_kind, state, like)
        return state, out[EXTRA_ITEM]
