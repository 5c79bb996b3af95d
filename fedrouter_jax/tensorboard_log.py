"""Optional TensorBoard scalars of a run (`metrics.tensorboard: true`), written through
tensorboardX (no TensorFlow). metrics.jsonl stays the source of truth: this only mirrors the
per-round numbers of each of its records into `out_dir/tensorboard`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


class ScalarLog:
    """Per-round scalars of metrics.jsonl records: train loss, lr, round time, participants,
    drops and, on evaluated rounds, ROUGE-1 (overall and per task)."""

    def __init__(self, log_dir: Path):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ImportError("metrics.tensorboard: true needs tensorboardX: pip install 'fedrouter-jax[tensorboard]'"
                              ) from None
        self._writer = SummaryWriter(str(log_dir))

    def write(self, rec: dict) -> None:
        step = int(rec["round"])
        for key in ("train_loss", "lr", "time_s"):
            if key in rec:
                self._writer.add_scalar(f"train/{key}", float(rec[key]), step)
        if "participants" in rec:
            self._writer.add_scalar("federation/participants", len(rec["participants"]), step)
        if "dropped" in rec:
            self._writer.add_scalar("federation/dropped", len(rec["dropped"]), step)
        ev = rec.get("eval")
        if ev:
            self._writer.add_scalar("eval/rouge1", float(ev["rouge1"]), step)
            for task, value in (ev.get("per_task") or {}).items():
                if value is None:  # no test sample of this task
                    continue
                self._writer.add_scalar(f"eval/rouge1_{task}", float(value), step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def open_log(enabled: bool, out_dir: Path) -> Optional[ScalarLog]:
    return ScalarLog(Path(out_dir) / "tensorboard") if enabled else None
