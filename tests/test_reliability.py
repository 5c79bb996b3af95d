"""Issue 13: the CLI never destroys, loses or silently corrupts a run. One test per defect
(each failed on the code before the fix), a fuzz test over every leaf of the resolved config,
disk-full and kill-during-save / during-restore tests."""
import json
import os
import shutil
import tomllib
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import struct

from fedrouter_jax.checkpoint import MARKER_FILE, CheckpointError, CheckpointStore, CheckpointWarning

ROOT = Path(__file__).resolve().parents[1]


def _state(step):
    rng = np.random.default_rng(step)
    return {"adapters": {"a": rng.standard_normal((4, 64, 8)).astype(np.float32),
                         "b": rng.standard_normal((4, 8, 64)).astype(np.float32)},
            "key": jax.random.PRNGKey(step), "round": np.int32(step)}


def _extra(step):
    return {"history": [{"round": r + 1, "train_loss": 1.0 / (r + 1)} for r in range(step)]}


def _store_with_steps(path, steps=(1, 2)):
    store = CheckpointStore(path, keep=5)
    for s in steps:
        store.save(s, _state(s), _extra(s))
    return store


def _largest_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip(path: Path, n: int = 256) -> None:
    """Same-length corruption in the middle of a file."""
    data = bytearray(path.read_bytes())
    mid = max(0, len(data) // 2 - n // 2)
    for i in range(mid, min(len(data), mid + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _assert_equal_trees(got, want):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


# ----------------------------------------------------------------------------- defect 3


def test_defect3_flipped_bytes_in_newest_step_are_detected_and_previous_step_used(tmp_path):
    _store_with_steps(tmp_path)
    _flip(_largest_file(tmp_path / "2"))
    reader = CheckpointStore(tmp_path, read_only=True)
    with pytest.warns(CheckpointWarning, match=r"step 2 skipped: .*sha256.*using step 1"):
        assert reader.latest_step() == 1
    with pytest.warns(CheckpointWarning, match="step 2 skipped"):
        state, extra = reader.restore(like=_state(1))
    assert reader.restored_step == 1
    _assert_equal_trees(state, _state(1))
    assert extra == _extra(1)
    with pytest.raises(CheckpointError, match="step 2 is not a usable checkpoint"):
        reader.restore(2)


def test_defect3_same_length_edit_of_history_is_detected(tmp_path):
    _store_with_steps(tmp_path)
    meta = tmp_path / "2" / "extra" / "metadata"
    text = meta.read_text()
    assert '"round": 2' in text or '"round":2' in text
    meta.write_text(text.replace("2", "7", 1))  # same length, still valid JSON
    with pytest.warns(CheckpointWarning, match="step 2 skipped"):
        _, extra = CheckpointStore(tmp_path, read_only=True).restore()
    assert extra == _extra(1)


def test_defect3_restored_arrays_are_checked_against_their_checksums(tmp_path):
    _store_with_steps(tmp_path, steps=(1,))
    marker = tmp_path / "1" / MARKER_FILE
    m = json.loads(marker.read_text())
    m["state_sha256"]["adapters/a"] = "0" * 64  # as if Orbax had read back other numbers
    marker.write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match="state leaf 'adapters/a' does not match its sha256"):
        CheckpointStore(tmp_path, read_only=True).restore(1)


@struct.dataclass
class _Server:
    centroids: jax.Array
    round: jax.Array


def test_struct_dataclass_state_round_trips_with_checksums(tmp_path):
    state = {"server": _Server(np.arange(6, dtype=np.float32).reshape(2, 3), np.int32(4)), "x": np.ones(3)}
    store = CheckpointStore(tmp_path)
    store.save(1, state, {})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    got, _ = store.restore(like=abstract)
    assert isinstance(got["server"], _Server)
    _assert_equal_trees(got, state)
    got_plain, _ = store.restore(1)  # no target: nested dicts, same checksums by key path
    np.testing.assert_array_equal(got_plain["server"]["centroids"], state["server"].centroids)


# ----------------------------------------------------------------------------- defect 4


def test_defect4_damaged_steps_are_never_deleted_and_no_usable_step_is_an_error(tmp_path):
    _store_with_steps(tmp_path)
    for s in (1, 2):
        f = _largest_file(tmp_path / str(s))
        f.write_bytes(f.read_bytes()[:-8])  # truncated: fails the size check too
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    store = CheckpointStore(tmp_path, keep=5)  # a writer opening the directory
    with pytest.raises(CheckpointError, match="no usable checkpoint.*nothing was deleted"):
        with pytest.warns(CheckpointWarning):
            store.restore()
    with pytest.warns(CheckpointWarning, match="no earlier usable step"):
        assert store.latest_step() is None
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    # saving round 2 again moves only the broken step 2 aside (quarantine), never deletes it
    with pytest.warns(CheckpointWarning, match="moved to"):
        store.save(2, _state(2), _extra(2))
    assert (tmp_path / "quarantine" / "2-0").is_dir() and (tmp_path / "1").is_dir()


def test_defect4_orbax_version_is_bounded_to_the_tested_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    orbax = next(d for d in deps if d.startswith("orbax-checkpoint"))
    assert "<" in orbax, orbax
    import orbax.checkpoint as ocp

    assert ocp.__version__.startswith("0.12.")


# ----------------------------------------------------------------------------- the CLI, end to end

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import io  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import yaml  # noqa: E402

from fedrouter_jax.cli import main  # noqa: E402
from fedrouter_jax.config import config_to_dict, load_config  # noqa: E402
from fedrouter_jax.rundir import LOCK_FILE, RunDir, RunDirError  # noqa: E402

from helpers import smoke_overrides  # noqa: E402

SMOKE = ["--config", str(ROOT / "configs" / "smoke.yaml"), "--no-progress"]


def cli(*argv):
    """(exit code, stdout, stderr) of `fedrouter-jax argv...`, in-process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def run_args(model_dir, out_dir, **extra):
    return ["run", *SMOKE, *[a for o in smoke_overrides(model_dir, out_dir, **extra) for a in ("--set", o)]]


def assert_one_line_error(rc, err, *names):
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.startswith("fedrouter-jax: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in names:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    """One complete 3-round run (the only training from scratch in this module)."""
    out = tmp_path_factory.mktemp("runs") / "a"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDROUTER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        rc, stdout, err = cli(*run_args(model_dir, out))
    assert rc == 0, err
    assert [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(LOCK_FILE))
    return dst


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- defect 1: --fresh deletes whatever out_dir points to


def test_defect1_fresh_refuses_a_directory_that_is_not_a_run(model_dir, tmp_path, monkeypatch):
    notes = tmp_path / "notes-v"
    notes.mkdir()
    (notes / "precious.txt").write_text("keep")
    rc, _, err = cli(*run_args(model_dir, notes, **{"train.rounds": 1}), "--fresh")
    assert_one_line_error(rc, err, str(notes), "precious.txt", "nothing was changed")
    assert sorted(p.name for p in notes.iterdir()) == ["precious.txt"]
    # out_dir=. of a checkout
    checkout = tmp_path / "checkout"
    (checkout / ".git").mkdir(parents=True)
    (checkout / "setup.py").write_text("x")
    monkeypatch.chdir(checkout)
    rc, _, err = cli(*run_args(model_dir, ".", **{"train.rounds": 1}), "--fresh")
    assert_one_line_error(rc, err, ".git")
    assert sorted(p.name for p in checkout.iterdir()) == [".git", "setup.py"]


def test_fresh_removes_only_the_files_of_a_run(tmp_path):
    run = tmp_path / "r"
    (run / "checkpoints" / "3").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "results.json", "route_reference.npz"):
        (run / name).write_text("x")
    with RunDir(run, fresh=True):
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]


# -- defect 2: --out-dir D acts on the out_dir recorded inside D/config.yaml


def test_defect2_resume_and_eval_act_on_the_named_directory(finished_run, tmp_path):
    moved = copy_run(finished_run, tmp_path / "b")
    assert yaml.safe_load((moved / "config.yaml").read_text())["out_dir"] == str(finished_run)
    before = _tree(finished_run)
    rc, out, err = cli("resume", "--out-dir", moved, "--no-progress")
    assert rc == 0, err
    assert "round 3" in out and (moved / "results.json").is_file()
    rc, out, err = cli("eval", "--out-dir", moved)
    assert rc == 0, err
    assert "using round 3 of" in out and str(moved) in out
    assert _tree(finished_run) == before  # the run it was copied from is not touched


# -- defect 3 (CLI): a corrupted newest step is skipped, eval says which round it uses


def test_defect3_eval_skips_a_corrupted_step_and_names_the_round(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "c")
    _flip(_largest_file(run / "checkpoints" / "3"))
    with pytest.warns(CheckpointWarning, match=r"step 3 skipped: .*sha256.*using step 2"):
        rc, out, err = cli("eval", "--out-dir", run)
    assert rc == 0, err
    assert "using round 2 of" in out


# -- defect 4 (CLI): with every step damaged, resume stops and deletes nothing


def test_defect4_resume_with_every_step_damaged_stops_and_keeps_them(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "d")
    for s in (1, 2, 3):
        if (run / "checkpoints" / str(s)).is_dir():
            f = _largest_file(run / "checkpoints" / str(s))
            f.write_bytes(f.read_bytes()[:-4])
    before = _tree(run)
    rc, _, err = cli("resume", "--out-dir", run, "--no-progress")
    assert_one_line_error(rc, err, "no usable checkpoint", "nothing was deleted")
    after = _tree(run)
    after.pop(LOCK_FILE, None)
    assert after == before


# -- defect 5: two writers on one out_dir


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_defect5_second_writer_is_refused_before_writing(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "e")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(run)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        rc, _, err = cli("resume", "--out-dir", run, "--no-progress")
        assert_one_line_error(rc, err, "in use by another fedrouter-jax process", str(run))
        assert _tree(run) == before
        assert cfg["out_dir"]  # untouched config
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunDir(run, must_exist=True):  # a killed holder released the lock
        pass


# -- defect 6: config edits are checked against the checkpoint


def test_defect6_resume_refuses_a_config_that_changes_the_state_shapes(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "f")
    path = run / "config.yaml"
    original = path.read_text()
    for key, section, value in (("data.n_clients", "data", 2), ("lora.rank", "lora", 2),
                                ("lora.targets", "lora", ["q_proj"])):
        cfg = yaml.safe_load(original)
        cfg[section][key.split(".")[1]] = value
        path.write_text(yaml.safe_dump(cfg))
        rc, _, err = cli("resume", "--out-dir", run, "--no-progress")
        assert_one_line_error(rc, err, key, "round 3", str(path))
        rc, _, err = cli("eval", "--out-dir", run)
        assert_one_line_error(rc, err, key)


def test_defect6_run_on_an_existing_run_names_the_keys_that_differ(model_dir, finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "g")
    rc, _, err = cli(*run_args(model_dir, run, **{"train.rounds": 5, "train.lr": 0.01}))
    assert_one_line_error(rc, err, "train.rounds (3 -> 5)", "train.lr")


# -- defect 7: one-line errors naming the file and the key, nothing half-made left behind


def test_defect7_nonfinite_round_is_one_line_and_leaves_nothing(model_dir, tmp_path, monkeypatch):
    import fedrouter_jax.runner as runner

    def diverge(self, state, r):  # what train.lr=1e12 did: NaN losses in round 1
        raise runner.NonFiniteError(f"round {r + 1}: non-finite loss for client(s) [0]; lower train.lr")

    monkeypatch.setattr(runner.Simulator, "round_step", diverge)
    out = tmp_path / "lr"
    rc, _, err = cli(*run_args(model_dir, out, **{"train.rounds": 1, "train.lr": 1e12}))
    assert_one_line_error(rc, err, "round 1", "train.lr", "smoke.yaml")
    assert not out.exists()  # no half-made run blocks the next attempt
    rc, _, err = cli(*run_args(model_dir, out, **{"train.rounds": 1, "train.lr": 1e12}))
    assert_one_line_error(rc, err, "round 1")  # the same failure again, not "a different config"


def _model_copy(model_dir, tmp_path, edit):
    dst = Path(shutil.copytree(model_dir, tmp_path / "model"))
    edit(dst)
    return dst


@pytest.mark.parametrize("key,value", [("num_hidden_layers", "4"), ("num_hidden_layers", 4.0),
                                       ("rope_scaling", "llama3"), ("rms_norm_eps", "abc")])
def test_defect7_bad_config_json_names_file_and_key(model_dir, tmp_path, key, value):
    def edit(d):
        cfg = json.loads((d / "config.json").read_text())
        cfg[key] = value
        (d / "config.json").write_text(json.dumps(cfg))
    bad = _model_copy(model_dir, tmp_path, edit)
    rc, _, err = cli(*run_args(bad, tmp_path / "o"))
    assert_one_line_error(rc, err, str(bad / "config.json"), key)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", ["config_json_invalid", "tokenizer_json_invalid", "tokenizer_missing",
                                  "vocab_too_small", "safetensors_truncated", "safetensors_tiny"])
def test_defect7_broken_model_files_name_the_file(model_dir, tmp_path, case):
    def edit(d):
        st = next(d.glob("*.safetensors"))
        if case == "config_json_invalid":
            (d / "config.json").write_text('{"vocab_size": 4,')
        elif case == "tokenizer_json_invalid":
            (d / "tokenizer.json").write_text("{not json")
        elif case == "tokenizer_missing":
            (d / "tokenizer.json").unlink()
        elif case == "vocab_too_small":
            cfg = json.loads((d / "config.json").read_text())
            cfg["vocab_size"] = 50
            (d / "config.json").write_text(json.dumps(cfg))
        elif case == "safetensors_truncated":
            st.write_bytes(st.read_bytes()[:-100])
        else:
            st.write_bytes(b"\x01\x02\x03")
    bad = _model_copy(model_dir, tmp_path, edit)
    rc, _, err = cli(*run_args(bad, tmp_path / "o"))
    name = {"config_json_invalid": "config.json", "tokenizer_json_invalid": "tokenizer.json",
            "tokenizer_missing": "tokenizer.json", "vocab_too_small": "vocab_size"}.get(case, ".safetensors")
    assert_one_line_error(rc, err, name)
    assert "sentencepiece" not in err
    assert not (tmp_path / "o").exists()


def test_defect7_broken_data_files_name_the_file(tmp_path):
    import datasets

    from fedrouter_jax.data.real import DataError, load_real_task

    rows = [{"dialogue": f"hello {i}", "summary": f"hi {i}"} for i in range(4)]
    (tmp_path / "utf" / "samsum").mkdir(parents=True)
    (tmp_path / "utf" / "samsum" / "train.jsonl").write_bytes(b'{"dialogue": "ab\xff", "summary": "x"}\n')
    for name in ("arrow_trunc", "arrow_empty", "state_trunc"):
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / name / "samsum"))
    arrow = next((tmp_path / "arrow_trunc" / "samsum").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:50])
    next((tmp_path / "arrow_empty" / "samsum").glob("*.arrow")).write_bytes(b"")
    state = tmp_path / "state_trunc" / "samsum" / "state.json"
    state.write_text(state.read_text()[:20])
    for name, why in (("utf", "not UTF-8"), ("arrow_trunc", "ArrowInvalid"), ("arrow_empty", "ArrowInvalid"),
                      ("state_trunc", "truncated JSON")):
        with pytest.raises(DataError) as e:
            load_real_task("samsum", tmp_path / name, cache_dir=tmp_path / "cache")
        msg = str(e.value)
        assert str(tmp_path / name / "samsum") in msg and why in msg, msg
        assert "An error occurred while generating" not in msg and "\n" not in msg


@pytest.mark.parametrize("override,key", [("seed=-7", "seed"), ("train.lr=.inf", "train.lr"),
                                          ("lora.alpha=.inf", "lora.alpha"),
                                          ("train.weight_decay=.inf", "train.weight_decay"),
                                          ("data.dirichlet_alpha=.nan", "data.dirichlet_alpha"),
                                          ("federation.dropout_rate=.nan", "federation.dropout_rate"),
                                          ("eval.router_modes=[bogus]", "eval.router_modes[0]")])
def test_defect7_bad_config_values_name_the_key(override, key):
    from fedrouter_jax.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        load_config(ROOT / "configs" / "smoke.yaml", [override])


# -- defect 8: validation of sections the run does not use


def test_defect8_only_the_chosen_methods_settings_are_validated():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["method=fedrouter", "data.n_clients=2",
                                                         "clustering.n_global=2"])
    assert cfg.data.n_clients == 2 and cfg.fedcluster.n_clusters == 4
    from fedrouter_jax.config import ConfigError

    with pytest.raises(ConfigError, match="fedcluster.n_clusters"):
        load_config(ROOT / "configs" / "smoke.yaml", ["method=fedcluster", "data.n_clients=2"])
    load_config(None, ["method=fedit", "clustering.k_min=1", "feddpa.max_weight=3"])
    with pytest.raises(ConfigError, match="feddpa.max_weight"):
        load_config(None, ["method=feddpa", "feddpa.max_weight=3"])


# ----------------------------------------------------------------------------- fuzz: every config leaf

# (dotted key, mutation) pairs that are valid values by design (0 = "never" / "all" / "at the end").
_VALID = {("seed", "zero"), ("eval.every", "zero"), ("checkpoint.every", "zero"), ("train.client_mesh_devices", "zero"),
          ("train.weight_decay", "zero"), ("train.lr_min", "zero"),
          ("fedcluster.cluster_round", "zero"), ("feddpa.instance_num", "zero"), ("feddpa.fixed_weight", "zero"),
          ("feddpa.train_weight", "zero"), ("feddpa.max_weight", "zero"), ("federation.dropout_rate", "zero"),
          ("clustering.tol", "zero"), ("clustering.min_silhouette", "zero"), ("clustering.min_silhouette", "negative"),
          ("train.max_grad_norm", "zero"), ("lora.dropout", "zero"),  # 0 = off
          ("data.hf_dir", "unknown_choice")}  # hf_dir: only read with data.source: hf
_METHOD_FOR = {"fedcluster": "fedcluster", "feddpa": "feddpa"}


def _mutations(value):
    """{name: YAML text} of invalid-looking values for a leaf of this Python type."""
    if isinstance(value, bool):
        return {"wrong_type": "'maybe'", "number": "3"}
    if isinstance(value, int):
        return {"wrong_type": "'x'", "negative": "-3", "zero": "0", "float": "1.5", "inf": ".inf"}
    if isinstance(value, float):
        return {"wrong_type": "'x'", "negative": "-1.0", "zero": "0", "inf": ".inf", "nan": ".nan"}
    if isinstance(value, list):
        return {"wrong_type": "3", "unknown_choice": "[bogus]"}
    return {"wrong_type": "[1, 2]", "unknown_choice": "bogus-choice-xyz"}


def _leaves(d, prefix=""):
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _leaves(v, key)
        else:
            yield key, v


class _Accepted(Exception):
    pass


def test_fuzz_every_config_leaf(model_dir, tmp_path, monkeypatch):
    import fedrouter_jax.runner

    def accepted(*a, **k):  # a value that passed every check would start training: stop here
        raise _Accepted()

    monkeypatch.setattr(fedrouter_jax.runner, "run_from_config", accepted)
    base = smoke_overrides(model_dir, tmp_path / "fuzz")
    resolved = config_to_dict(load_config(ROOT / "configs" / "smoke.yaml", base))
    checked, accepted_values = 0, []
    for key, value in _leaves(resolved):
        section = key.split(".")[0]
        method = [f"method={_METHOD_FOR[section]}"] if section in _METHOD_FOR else []
        for name, text in _mutations(value).items():
            if (key, name) in _VALID or (key == "out_dir" and name == "unknown_choice"):
                continue
            if key in ("model.path", "data.hf_dir") and name == "unknown_choice":
                text = str(tmp_path / "no-such-dir")
            if key == "method" and name == "wrong_type":
                text = "3"
            sets = [*base, *method, f"{key}={text}"]
            try:
                rc, _, err = cli("run", *SMOKE, *[a for o in sets for a in ("--set", o)])
            except _Accepted:
                accepted_values.append((key, name))
                continue
            assert rc == 2 and "Traceback" not in err, (key, name, err)
            assert key in err, (key, name, err)
            checked += 1
    for section in [k for k, v in resolved.items() if isinstance(v, dict)] + [""]:
        bogus = f"{section}.bogus_key" if section else "bogus_key"
        rc, _, err = cli("run", *SMOKE, *[a for o in [*base, f"{bogus}=1"] for a in ("--set", o)])
        assert rc == 2 and bogus in err and "Traceback" not in err, (bogus, err)
        checked += 1
    assert accepted_values == []
    assert checked > 200
    assert not (tmp_path / "fuzz").exists()  # nothing left on disk


# ----------------------------------------------------------------------------- disk full, kill mid-restore


def test_disk_full_during_save_keeps_the_previous_step_and_saves_again(tmp_path, monkeypatch):
    import errno

    import fedrouter_jax.checkpoint as ck

    store = _store_with_steps(tmp_path, steps=(1,))

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(root))

    monkeypatch.setattr(ck, "_fsync_and_hash_tree", full)
    with pytest.raises(OSError, match="No space left"):
        store.save(2, _state(2), _extra(2))
    monkeypatch.undo()
    reader = CheckpointStore(tmp_path, read_only=True)
    with pytest.warns(CheckpointWarning, match="step 2 skipped"):
        assert reader.latest_step() == 1  # progress kept: round 1, not from scratch
    with pytest.warns(CheckpointWarning, match="moved to"):
        CheckpointStore(tmp_path, keep=5).save(2, _state(2), _extra(2))  # space freed: save round 2 again
    state, extra = CheckpointStore(tmp_path, read_only=True).restore()
    _assert_equal_trees(state, _state(2))
    assert extra == _extra(2)


_RESTORE_LOOP = """
import sys
sys.path.insert(0, sys.argv[2])
from fedrouter_jax.checkpoint import CheckpointStore
store = CheckpointStore(sys.argv[1], keep=5)  # a writer, as the runner opens it
while True:
    store.restore()
    print("restored", flush=True)
"""


def test_kill_during_restore_changes_nothing(tmp_path):
    _store_with_steps(tmp_path, steps=(1, 2))
    before = _tree(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", _RESTORE_LOOP, str(tmp_path), str(ROOT)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert child.stdout.readline().strip() == "restored"
        child.send_signal(signal.SIGKILL)  # somewhere inside the next restore
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert _tree(tmp_path) == before
    reader = CheckpointStore(tmp_path, read_only=True)
    assert reader.latest_step() == 2 and reader.verify(1) is None
