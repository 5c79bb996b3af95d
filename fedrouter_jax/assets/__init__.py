"""Files shipped with the package: the embedded tiny Llama and its tokenizer."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent


def embedded_model_dir() -> Path:
    """The tiny pretrained Llama (HF format) made by experiments/pretrain_tiny_base.py."""
    d = ASSETS / "tiny-llama"
    if not (d / "config.json").exists():
        raise FileNotFoundError(
            f"{d}: the embedded model is missing; re-make it with `python experiments/pretrain_tiny_base.py`"
        )
    return d
