"""Crash-safe, checksummed round checkpoints: a thin wrapper over Orbax's CheckpointManager.

One step per round holds two items: ``state`` (any pytree of jax / numpy arrays, typed or raw
uint32 PRNG keys, Python / numpy scalars, ``flax.struct`` dataclasses; saved with
``args.StandardSave``) and ``extra`` (a JSON-able dict: metrics history, schedule position,
resolved config; ``args.JsonSave``). Orbax refuses zero-size arrays.

Layout of one step (Orbax writes it under a temporary name and renames it to ``<dir>/2/``
when done, so Orbax's part of a step is complete or not there; we add our manifest last)::

    <dir>/2/
      state/..., extra/..., Orbax's own files   Orbax's; never parsed here, hashed like the rest
      fedrouter_complete.json     OURS, written last after every file above was fsync'ed:
                                  sha256 + size of every file of the step, sha256 of every
                                  state leaf (by its key path) and of the canonical extra JSON
    <dir>/quarantine/<step>-<n>/  a step of ours that failed verification and stood in the way
                                  of a new save of that round (moved, never deleted)
    <dir>/.trash/                 steps being pruned (atomic rename, then rmtree)

What counts as a usable step is decided from the disk only: Orbax's own API says the step is
finalized (``ocp.path.step.is_path_finalized``; no reading of Orbax's marker files here), our
manifest exists, and every file's content matches its sha256. ``restore`` also recomputes the
sha256 of every restored leaf and of the extra dict. ``latest_step()`` and ``restore()`` skip a
step that fails with a :class:`CheckpointWarning` naming it and the step used instead; when no
step is usable they raise :class:`CheckpointError` saying so (nothing is deleted: the user
decides).

Nothing is deleted or moved when a store opens. Only ``save(step)`` moves what stands in the
way of that step: a step dir of ours (manifest present) that fails verification, or one Orbax
finalized whose manifest never got written (a crash between the two), goes to ``quarantine/``;
Orbax temporaries of that step (never finalized, so never a checkpoint) are removed. Old steps
are pruned only *after* the new step verified, so ``keep`` verified steps survive.

One writer per directory (the run directory's lock, ``rundir.RunLock``, guarantees it for the
CLI); readers (e.g. an evaluation process) should pass ``read_only=True``.

    store = CheckpointStore("runs/x/checkpoints", keep=3)
    store.save(round_idx, state, {"metrics": history, "config": config_to_dict(cfg)})
    step = store.latest_step()                       # latest verified step, None when none
    state, extra = store.restore(step, like=state)   # bit-exact, checksums verified
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["CheckpointStore", "CheckpointError", "CheckpointWarning", "TMP_SUFFIX", "MARKER_FILE",
           "QUARANTINE_DIR"]

STATE_ITEM = "state"
EXTRA_ITEM = "extra"
MARKER_FILE = "fedrouter_complete.json"
MARKER_FORMAT = 2  # 1: sizes only (no checksums; never trusted)
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax atomicity_types.TMP_DIR_SUFFIX
TRASH_DIR = ".trash"
QUARANTINE_DIR = "quarantine"
_STEP_RE = re.compile(r"^[0-9]+$")
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A requested checkpoint is missing, incomplete or fails verification, or none is usable."""


class CheckpointWarning(UserWarning):
    """A step was skipped (names it, why, and the step used instead) or quarantined."""


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


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_and_hash_tree(root: Path) -> dict[str, dict]:
    """fsyncs every file and directory under root (children first); {relpath: {size, sha256}}."""
    files: dict[str, dict] = {}
    for dirpath, _, filenames in os.walk(root, topdown=False):
        d = Path(dirpath)
        for name in filenames:
            p = d / name
            _fsync_path(p)
            files[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": _file_sha256(p)}
        _fsync_path(d)
    return files


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


def _extra_sha256(extra: dict) -> str:
    text = json.dumps(extra, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _key_name(entry: Any) -> str:
    """One key path entry as a plain name: dict keys, dataclass fields and indices alike, so a
    state saved as a struct dataclass and restored as nested dicts gets the same names."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaf_digests(tree: Any) -> dict[str, str]:
    """{"a/b/0": sha256 of (dtype, shape, bytes)} for every leaf; typed PRNG keys by key data."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        a = np.ascontiguousarray(np.asarray(leaf))
        h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
        out["/".join(_key_name(e) for e in path)] = h.hexdigest()
    return out


def _is_finalized(step_dir: Path) -> bool:
    """Orbax's own answer to "did this step's save finish" (no reading of its marker files)."""
    return bool(ocp.path.step.is_path_finalized(step_dir))


def _read_marker(step_dir: Path) -> dict | None:
    try:
        marker = json.loads((step_dir / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _structure_problem(step_dir: Path) -> str | None:
    """Cheap checks (no file contents read): finalized by Orbax, our manifest, file sizes."""
    if not step_dir.is_dir():
        return "no such step directory"
    if not _is_finalized(step_dir):
        return "Orbax did not finalize it (save interrupted)"
    marker = _read_marker(step_dir)
    if marker is None:
        return f"{MARKER_FILE} is missing or unreadable (save did not finish)"
    if marker.get("step") != int(step_dir.name):
        return f"{MARKER_FILE} names step {marker.get('step')}"
    if marker.get("format") != MARKER_FORMAT:
        return f"{MARKER_FILE} has format {marker.get('format')} (no checksums), expected {MARKER_FORMAT}"
    for rel, info in marker.get("files", {}).items():
        try:
            actual = (step_dir / rel).stat().st_size
        except OSError:
            return f"file {rel} listed in {MARKER_FILE} is missing"
        if actual != info.get("size"):
            return f"file {rel} has {actual} bytes, {MARKER_FILE} recorded {info.get('size')}"
    return None


def _content_problem(step_dir: Path) -> str | None:
    """Structure checks plus the sha256 of every file of the step."""
    problem = _structure_problem(step_dir)
    if problem is not None:
        return problem
    for rel, info in _read_marker(step_dir)["files"].items():
        if _file_sha256(step_dir / rel) != info.get("sha256"):
            return f"file {rel} does not match its sha256 (content changed after the save)"
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
    """Keeps the last `keep` verified steps of (state pytree, extra JSON dict) in `directory`."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep: expected >= 1, got {keep}")
        self.directory = Path(directory).expanduser().absolute()
        self.keep = keep
        self.read_only = read_only
        self.skipped: list[tuple[int, str]] = []  # (step, why) skipped by the last lookup
        if not read_only:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._empty_trash()  # only steps we pruned ourselves are ever renamed into .trash
        # With several JAX processes one of them writes and each reads for itself (the state is
        # host numpy, the same in every process): Orbax must not wait for the others at barriers.
        alone = (ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                    active_processes={jax.process_index()})
                 if jax.process_count() > 1 else ocp.options.MultiprocessingOptions())
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # pruning is ours: only after the new step verified
            enable_async_checkpointing=False,
            create=not read_only and alone.active_processes is None,  # else made above (Orbax refuses it)
            read_only=read_only,
            cleanup_tmp_directories=False,  # nothing is removed on open
            todelete_subdir=None if read_only else TRASH_DIR,
            save_interval_steps=0 if read_only else 1,  # read-only: no "saving disabled" warning
            multiprocessing_options=alone,
        )
        absl = logging.getLogger("absl")
        level = absl.level
        if read_only:  # Orbax logs "Given directory is read only" on every read-only open
            absl.setLevel(logging.ERROR)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl.setLevel(level)

    # -- context manager -------------------------------------------------------------------
    def close(self) -> None:
        self._mngr.close()

    def __enter__(self) -> "CheckpointStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- queries (from disk) ---------------------------------------------------------------
    def _step_dirs(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted((p for p in self.directory.iterdir() if _STEP_RE.match(p.name) and p.is_dir()),
                      key=lambda p: int(p.name))

    def all_steps(self) -> list[int]:
        """Complete steps (finalized, manifest present, file sizes match), ascending; contents
        are verified by `latest_step`, `verify` and `restore`."""
        return [int(p.name) for p in self._step_dirs() if _structure_problem(p) is None]

    def verify(self, step: int) -> str | None:
        """None when every file of `step` matches its recorded sha256; else what is wrong."""
        return _content_problem(self.directory / str(int(step)))

    def verified_steps(self) -> tuple[int | None, list[tuple[int, str]]]:
        """(latest step whose files verify or None, [(newer step skipped, why), ...])."""
        skipped = []
        for p in reversed(self._step_dirs()):
            problem = _content_problem(p)
            if problem is None:
                return int(p.name), skipped
            skipped.append((int(p.name), problem))
        return None, skipped

    def latest_step(self) -> int | None:
        """The latest verified step (None when there is none); warns for each newer one skipped."""
        step, skipped = self.verified_steps()
        self._note_skipped(skipped, step)
        return step

    def is_damaged(self, step: int) -> bool:
        """True for a step this store marked complete whose contents no longer verify (a step
        without our manifest is an interrupted save, not damage)."""
        step_dir = self.directory / str(int(step))
        return _read_marker(step_dir) is not None and _content_problem(step_dir) is not None

    def _note_skipped(self, skipped: list[tuple[int, str]], used: int | None) -> None:
        self.skipped = skipped
        for bad, why in skipped:
            instead = f"using step {used}" if used is not None else "no earlier usable step"
            warnings.warn(f"{self.directory}/{bad}: checkpoint step {bad} skipped: {why}; {instead}",
                          CheckpointWarning, stacklevel=3)

    def _no_usable(self, skipped: list[tuple[int, str]]) -> CheckpointError:
        if not skipped:
            return CheckpointError(f"{self.directory}: no complete checkpoint to restore")
        detail = "; ".join(f"step {s}: {why}" for s, why in skipped)
        return CheckpointError(
            f"{self.directory}: no usable checkpoint: every step fails verification ({detail}); "
            "nothing was deleted. Move them away or start over (run --fresh)"
        )

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: Any, extra: dict | None = None) -> None:
        """Saves `state` and `extra` as `step`; returns once the step is durable and verified.

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
        self._clear_way(step)
        digests = _leaf_digests(state)
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
        self._mark_complete(self.directory / str(step), digests, _extra_sha256(extra))
        self._prune()

    def _clear_way(self, step: int) -> None:
        """Makes room for `step`: a verified one is an error; a broken one of ours is quarantined;
        Orbax temporaries of `step` (never finalized, so never a checkpoint) are removed."""
        step_dir = self.directory / str(step)
        if step_dir.exists():
            problem = _content_problem(step_dir)
            if problem is None:
                raise CheckpointError(f"{self.directory}: step {step} already exists; delete(step) it first")
            ours = _read_marker(step_dir) is not None or _is_finalized(step_dir)
            if not ours:
                raise CheckpointError(f"{step_dir}: in the way of saving step {step} and not a checkpoint "
                                      f"of this tool ({problem}); move it away")
            self._quarantine(step_dir, problem)
        for p in self.directory.glob(f"{step}{TMP_SUFFIX}*"):
            if p.is_dir() and ocp.path.step.is_path_temporary(p):
                shutil.rmtree(p)

    def _quarantine(self, step_dir: Path, why: str) -> None:
        qdir = self.directory / QUARANTINE_DIR
        qdir.mkdir(exist_ok=True)
        n = 0
        while (qdir / f"{step_dir.name}-{n}").exists():
            n += 1
        dst = qdir / f"{step_dir.name}-{n}"
        os.rename(step_dir, dst)
        _fsync_path(self.directory)
        warnings.warn(f"{step_dir}: checkpoint step {step_dir.name} failed verification ({why}); moved to {dst} "
                      "to save that round again", CheckpointWarning, stacklevel=3)

    def _mark_complete(self, step_dir: Path, digests: dict[str, str], extra_sha: str) -> None:
        files = _fsync_and_hash_tree(step_dir)
        files.pop(MARKER_FILE, None)
        _fsync_path(self.directory)  # the tmp -> final rename
        _write_json_durably(step_dir / MARKER_FILE, {
            "format": MARKER_FORMAT, "step": int(step_dir.name), "files": files,
            "state_sha256": digests, "extra_sha256": extra_sha, "orbax_version": ocp.__version__,
        })
        problem = _content_problem(step_dir)
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

    # -- restore ---------------------------------------------------------------------------
    def restore(self, step: int | None = None, like: Any = None) -> tuple[Any, dict]:
        """Returns (state, extra) of `step`, bit-exact, after verifying every checksum.

        `step=None`: the latest step that verifies; each newer one that fails (files or restored
        contents) is skipped with a CheckpointWarning; none usable -> CheckpointError. An
        explicit `step` that fails raises CheckpointError. `self.restored_step` names the step.
        `like` is a pytree (concrete arrays or jax.ShapeDtypeStruct) giving the structure,
        dtypes and shardings to restore into; without it the saved metadata decides.
        """
        if step is not None:
            out = self._restore_verified(int(step), like)
            if isinstance(out, str):
                raise CheckpointError(f"{self.directory / str(int(step))}: step {step} is not a usable "
                                      f"checkpoint ({out}); complete steps: {self.all_steps()}")
            self.restored_step = int(step)
            return out
        skipped = []
        for p in reversed(self._step_dirs()):
            out = self._restore_verified(int(p.name), like)
            if isinstance(out, str):
                skipped.append((int(p.name), out))
                continue
            self._note_skipped(skipped, int(p.name))
            self.restored_step = int(p.name)
            return out
        self._note_skipped(skipped, None)
        raise self._no_usable(skipped)

    def read_extra(self, step: int) -> dict:
        """The verified `extra` dict of `step` alone (the state is not read into memory)."""
        step_dir = self.directory / str(int(step))
        problem = _content_problem(step_dir)
        if problem is None:
            self._mngr.reload()
            try:
                extra = self._mngr.restore(int(step), args=ocp.args.Composite(
                    **{EXTRA_ITEM: ocp.args.JsonRestore()}))[EXTRA_ITEM]
            except Exception as e:  # noqa: BLE001
                problem = f"Orbax could not read it: {type(e).__name__}"
            else:
                if _extra_sha256(extra) == _read_marker(step_dir).get("extra_sha256"):
                    return extra
                problem = "extra (history / metadata) does not match its sha256"
        raise CheckpointError(f"{step_dir}: step {step} is not a usable checkpoint ({problem})")

    def _restore_verified(self, step: int, like: Any) -> tuple[Any, dict] | str:
        """(state, extra) when the files and the restored contents verify; else the problem."""
        step_dir = self.directory / str(step)
        problem = _content_problem(step_dir)
        if problem is not None:
            return problem
        marker = _read_marker(step_dir)
        if like is None:
            state_args = ocp.args.StandardRestore()
        else:
            state_args = ocp.args.StandardRestore(jax.tree.map(_abstract, like))
        self._mngr.reload()
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                **{STATE_ITEM: state_args, EXTRA_ITEM: ocp.args.JsonRestore()}))
        except Exception as e:  # noqa: BLE001 - any decode failure makes the step unusable
            return f"Orbax could not read it: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        state, extra = out[STATE_ITEM], out[EXTRA_ITEM]
        want = marker.get("state_sha256", {})
        got = _leaf_digests(state)
        bad = sorted(k for k in got if want.get(k) != got[k])
        if bad:
            return f"state leaf {bad[0]!r} does not match its sha256" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else "")
        if like is None and set(got) != set(want):
            return f"state leaves {sorted(set(want) - set(got))[:3]} are missing"
        if _extra_sha256(extra) != marker.get("extra_sha256"):
            return "extra (history / metadata) does not match its sha256"
        if like is not None:
            state = jax.tree.map(_match_kind, state, like)
        return state, extra
