"""CheckpointStore: bit-exact round trips, keep-last-N, and SIGKILL in the middle of a save."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.checkpoint import (
    MARKER_FILE,
    TMP_SUFFIX,
    CheckpointError,
    CheckpointStore,
    CheckpointWarning,
)

REPO = Path(__file__).resolve().parents[1]

# Shared by this module and the child processes: a deterministic state per step.
_STATE_SRC = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np

    def make_state(step, big=1):
        rng = np.random.default_rng(step)
        return {
            "adapters": {
                "a": jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32),
                "b": jnp.asarray(rng.standard_normal((2, 5, 3)), jnp.bfloat16),
            },
            "big": rng.standard_normal(big, dtype=np.float32),
            "centroids": rng.standard_normal((4, 6)).astype(np.float32),
            "assign": jnp.asarray(rng.integers(-1, 4, size=(7,)), jnp.int32),
            "key": jax.random.PRNGKey(step),                 # raw uint32 key data
            "typed_key": jax.random.key(step + 100),         # typed PRNG key
            "u32": np.asarray(rng.integers(0, 2**32, size=(3,)), np.uint32),
            "round": np.int32(step),
            "count": step,
            "lr": 0.5 * step,
        }

    def make_extra(step):
        return {"round": step, "metrics": {"loss": [1.0 / (step + 1), 0.25], "rouge": {"c0": 0.5}},
                "schedule": [[0, 1], [2, 3]], "config": {"train": {"rounds": 3}}, "note": None}
    """
)
_ns: dict = {}
exec(_STATE_SRC, _ns)
make_state, make_extra = _ns["make_state"], _ns["make_extra"]


def _bits(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    a = np.asarray(x)
    return a.dtype, a.shape, a.tobytes()


def assert_bit_exact(got, want):
    gl, gt = jax.tree.flatten(got)
    wl, wt = jax.tree.flatten(want)
    assert gt == wt
    for g, w in zip(gl, wl):
        if isinstance(w, (int, float)) and not isinstance(w, np.generic):
            assert type(g) is type(w) and g == w
        else:
            if isinstance(w, jax.Array) and jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
                assert g.dtype == w.dtype  # typed keys stay typed
            assert _bits(g) == _bits(w)


def test_save_restore_bit_exact(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep=3)
    assert store.latest_step() is None and store.all_steps() == []
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        store.restore()
    state, extra = make_state(5), make_extra(5)
    store.save(5, state, extra)
    assert store.latest_step() == 5
    for like in (None, state, jax.tree.map(lambda x: x, state)):
        got, got_extra = store.restore(like=like)
        assert_bit_exact(got, state)
        assert got_extra == extra
    # abstract target
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype) if hasattr(x, "dtype") else x, state
    )
    got, _ = store.restore(5, like=abstract)
    assert_bit_exact(got, state)
    # a fresh store (e.g. a resumed process) sees the same
    got, got_extra = CheckpointStore(tmp_path / "ckpt", read_only=True).restore(like=state)
    assert_bit_exact(got, state)
    assert got_extra == extra
    with pytest.raises(CheckpointError, match="already exists"):
        store.save(5, state, extra)


def test_extra_json_conversion_and_layout(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    store.save(0, {"x": np.zeros(2, np.float32)},
               {"loss": np.float32(0.5), "hist": np.arange(3), "t": (1, 2)})
    _, extra = store.restore(0)
    assert extra == {"loss": 0.5, "hist": [0, 1, 2], "t": [1, 2]}
    step_dir = tmp_path / "0"
    # What Orbax 0.12.8 writes (documented in checkpoint.py) + our marker.
    for rel in ("commit_success.txt", "_CHECKPOINT_METADATA", "state/commit_success.txt",
                "extra/commit_success.txt", "extra/metadata", MARKER_FILE):
        assert (step_dir / rel).is_file(), rel
    assert json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["commit_timestamp_nsecs"]
    assert not [p for p in tmp_path.iterdir() if TMP_SUFFIX in p.name]
    with pytest.raises(TypeError, match="not JSON-serializable"):
        store.save(1, {"x": np.zeros(2)}, {"bad": object()})


def test_keep_last_n(tmp_path):
    store = CheckpointStore(tmp_path, keep=2)
    for step in range(1, 5):
        store.save(step, make_state(step), make_extra(step))
    assert store.all_steps() == [3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    got, extra = store.restore(3)
    assert_bit_exact(got, make_state(3))
    assert extra == make_extra(3)
    with pytest.raises(CheckpointError, match="step 1 is not a usable checkpoint"):
        store.restore(1)
    store.delete(4)
    assert store.latest_step() == 3


def test_incomplete_steps_are_ignored_and_never_removed_on_open(tmp_path):
    store = CheckpointStore(tmp_path, keep=5)
    store.save(1, make_state(1), make_extra(1))
    store.save(2, make_state(2), make_extra(2))
    (tmp_path / "2" / MARKER_FILE).unlink()  # a save that died before it was marked durable
    (tmp_path / ("3" + TMP_SUFFIX)).mkdir()  # a save that died mid-write
    reader = CheckpointStore(tmp_path, read_only=True)
    assert reader.all_steps() == [1] and (tmp_path / "2").exists()
    # a truncated file is caught by the manifest's size list
    big = tmp_path / "1" / "extra" / "metadata"
    data = big.read_bytes()
    big.write_bytes(data[:-1])
    assert reader.all_steps() == []
    with pytest.warns(CheckpointWarning, match="step 1 skipped"):
        assert reader.latest_step() is None
    big.write_bytes(data)
    assert reader.latest_step() == 1
    CheckpointStore(tmp_path, keep=5)  # opening a writer removes nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "3" + TMP_SUFFIX]


# --- SIGKILL in the middle of a save (child process) ------------------------------------------

_CHILD = _STATE_SRC + textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import fedrouter_jax.checkpoint as ck

    directory, mode, sentinel = sys.argv[1], sys.argv[2], Path(sys.argv[3])

    def block(where):
        sentinel.write_text(where)
        while True:
            time.sleep(60)

    store = ck.CheckpointStore(directory, keep=3)
    store.save(1, make_state(1), make_extra(1))

    if mode == "after_tmp_dir":          # tmp dir created, nothing written yet
        import orbax.checkpoint._src.path.atomicity as at
        orig = at._create_tmp_directory
        async def create(*a, **k):
            out = await orig(*a, **k)
            block("after_tmp_dir")
        at._create_tmp_directory = create
    elif mode == "torn_item":           # state written, extra/metadata half-written
        from orbax.checkpoint._src.handlers import json_checkpoint_handler as jh
        async def save_fn(self, x, directory):
            text = __import__("json").dumps(x)
            (directory / "metadata").write_text(text[: len(text) // 2])
            block("torn_item")
        jh.JsonCheckpointHandler._save_fn = save_fn
    elif mode == "before_rename":       # all items written, commit marker + rename pending
        import orbax.checkpoint._src.path.atomicity as at
        async def finalize(self, *a, **k):
            block("before_rename")
        at.AtomicRenameTemporaryPath.finalize = finalize
    elif mode == "before_marker":       # Orbax finalized the step, our durable marker pending
        def write_marker(path, obj):
            block("before_marker")
        ck._write_json_durably = write_marker
    elif mode == "large_write":         # no hook: the parent kills it once the tmp dir appears
        sentinel.write_text("large_write")
    store.save(2, make_state(2, big=(8 << 20) if mode == "large_write" else 1), make_extra(2))
    sentinel.write_text("finished")
    """
)


def _run_child_and_kill(directory: Path, mode: str, tmp_path: Path) -> str:
    sentinel = tmp_path / f"sentinel-{mode}"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), mode, str(sentinel)],
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not sentinel.exists():
            if child.poll() is not None:
                raise AssertionError(f"child exited early:\n{child.stdout.read().decode()}")
            assert time.monotonic() < deadline, "child never reached the kill point"
            time.sleep(0.005)
        if mode == "large_write":  # kill once array data of step 2 starts to land on disk
            item_tmp = directory / ("2" + TMP_SUFFIX) / ("state" + TMP_SUFFIX)
            while not (item_tmp.is_dir() and any(p.is_file() for p in item_tmp.rglob("*"))):
                assert child.poll() is None and time.monotonic() < deadline
                time.sleep(0.001)
        else:
            time.sleep(0.05)  # let the blocked child settle; it cannot progress
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return sentinel.read_text()


@pytest.mark.parametrize(
    "mode", ["after_tmp_dir", "torn_item", "before_rename", "before_marker", "large_write"]
)
def test_sigkill_mid_save_keeps_last_complete_step(tmp_path, mode):
    directory = tmp_path / "ckpt"
    where = _run_child_and_kill(directory, mode, tmp_path)
    assert where == mode  # killed while step 2 was being saved, never after it finished
    leftovers = sorted(p.name for p in directory.iterdir())
    assert "1" in leftovers and len(leftovers) == 2, leftovers  # step 1 + debris of step 2

    reader = CheckpointStore(directory, read_only=True)
    assert reader.latest_step() == 1 and reader.all_steps() == [1]
    state, extra = reader.restore(like=make_state(1))
    assert_bit_exact(state, make_state(1))
    assert extra == make_extra(1)

    # A brand-new writer touches nothing on open; saving step 2 again clears the debris of
    # step 2 only (an Orbax temporary is removed, a finalized step without our manifest is
    # moved to quarantine/, never deleted).
    store = CheckpointStore(directory, keep=3)
    assert sorted(p.name for p in directory.iterdir()) == leftovers
    store.save(2, make_state(2), make_extra(2))
    assert store.all_steps() == [1, 2]
    expected = ["1", "2"] + (["quarantine"] if mode == "before_marker" else [])
    assert sorted(p.name for p in directory.iterdir()) == expected
    state, extra = store.restore()
    assert_bit_exact(state, make_state(2))
    assert extra == make_extra(2)
