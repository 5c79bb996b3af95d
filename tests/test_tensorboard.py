"""metrics.tensorboard: the run's per-round scalars mirrored into TensorBoard event files."""
import json
import struct

import pytest

from fedrouter_jax.config import load_config
from fedrouter_jax.runner import run_from_config

from helpers import smoke_overrides

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")


def read_scalars(log_dir) -> dict:
    """{tag: {step: value}} from the TFRecord event files under log_dir (tensorboardX's protos)."""
    out: dict = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            ev = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, {})[ev.step] = v.simple_value
    return out


def test_tensorboard_scalars_equal_metrics_jsonl(model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, smoke_overrides(model_dir, out, **{"metrics.tensorboard": "true", "eval.every": 1}))
    results = run_from_config(cfg, progress=False)
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    scalars = read_scalars(out / "tensorboard")
    assert scalars["train/train_loss"] == {r["round"]: pytest.approx(r["train_loss"], rel=1e-6) for r in recs}
    assert scalars["federation/participants"] == {r["round"]: len(r["participants"]) for r in recs}
    evals = {r["round"]: pytest.approx(r["eval"]["rouge1"], abs=1e-6) for r in recs if "eval" in r}
    evals[3] = pytest.approx(results["rouge1"], abs=1e-6)  # the final score at the last round
    assert sorted(evals) == [1, 2, 3] and scalars["eval/rouge1"] == evals


def test_tensorboard_off_writes_nothing(model_dir, tmp_path):
    out = tmp_path / "run"
    run_from_config(load_config(None, smoke_overrides(model_dir, out, **{"train.rounds": 1})), progress=False)
    assert not (out / "tensorboard").exists()
