"""End-to-end: a tiny run; kill-and-resume equals an uninterrupted run bit for bit."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from fedrouter_jax.checkpoint import CheckpointStore
from fedrouter_jax.config import load_config
from fedrouter_jax.runner import run_from_config

from helpers import smoke_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_metrics_checkpoints_and_table(model_dir, tmp_path, capsys):
    cfg = load_config(None, smoke_overrides(model_dir, tmp_path / "run", **{"eval.include_base": True}))
    results = run_from_config(cfg, progress=False)
    out = tmp_path / "run"
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["round"] for l in lines] == [1, 2, 3]
    assert all(np.isfinite(json.loads(l)["train_loss"]) for l in lines)
    assert CheckpointStore(out / "checkpoints", read_only=True).latest_step() == 3
    assert 0.0 <= results["rouge1"] <= 1.0 and "clustering_accuracy" in results["local"]
    assert len(results["local"]["per_client"]) == 4
    printed = capsys.readouterr().out
    assert "per task" in printed and "local clustering accuracy" in printed


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from fedrouter_jax import checkpoint, runner
    from fedrouter_jax.config import load_config
    mode, k = sys.argv[3], int(sys.argv[4])
    if mode == "after":      # SIGKILL right after round k's checkpoint is complete
        orig = checkpoint.CheckpointStore.save
        def save(self, step, *a, **kw):
            orig(self, step, *a, **kw)
            if step == k:
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.CheckpointStore.save = save
    elif mode == "during":   # SIGKILL while round k's checkpoint is being written
        def mark(self, step_dir):
            os.kill(os.getpid(), signal.SIGKILL)
        orig_mark = checkpoint.CheckpointStore._mark_complete
        checkpoint.CheckpointStore._mark_complete = (
            lambda self, d, *a: mark(self, d) if d.name == str(k) else orig_mark(self, d, *a))
    cfg = load_config(None, sys.argv[5:])
    runner.Run(cfg, progress=False).run()
    print("FINISHED")
""")


def _child(model_dir, out, mode, k, rounds=4):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "JAX_PLATFORMS": "cpu"}
    args = smoke_overrides(model_dir, out, **{"train.rounds": rounds})
    return subprocess.run([sys.executable, "-c", CHILD, str(ROOT / "tests"), "x", mode, str(k), *args],
                          capture_output=True, text=True, env=env, timeout=600)


def _final(out):
    store = CheckpointStore(Path(out) / "checkpoints", read_only=True)
    tree, extra = store.restore(store.latest_step())
    history = [{k: v for k, v in r.items() if k != "time_s"} for r in extra["history"]]
    return tree, history


def test_kill_and_resume_is_bit_exact(model_dir, tmp_path):
    ref = _child(model_dir, tmp_path / "ref", "none", 0)
    assert "FINISHED" in ref.stdout, ref.stderr[-3000:]
    for mode in ("after", "during"):
        out = tmp_path / mode
        killed = _child(model_dir, out, mode, 2)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        expected_latest = 2 if mode == "after" else 1
        assert CheckpointStore(out / "checkpoints", read_only=True).latest_step() == expected_latest
        resumed = _child(model_dir, out, "none", 0)
        assert "FINISHED" in resumed.stdout and "[resume]" in resumed.stdout, resumed.stderr[-3000:]
        (t_ref, h_ref), (t_got, h_got) = _final(tmp_path / "ref"), _final(out)
        assert h_got == h_ref
        import jax
        for a, b in zip(jax.tree.leaves(t_ref), jax.tree.leaves(t_got)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        lines = [json.loads(l)["round"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert lines == [1, 2, 3, 4]
