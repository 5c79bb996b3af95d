"""ROUGE-1 F-measure, the paper's metric (following FedDPA).

The authors' evaluation (``evaluation/evaluate_fl.py`` of GabrielTalasso/FedRouter) calls
``evaluate.load("rouge").compute(predictions, references)`` with the defaults, i.e. Google's
``rouge_score`` with its default tokenizer (lowercase, non-alphanumerics -> spaces) and
``use_stemmer=False``, aggregated by a bootstrap over samples (whose mid value is, up to
resampling noise, the mean of the per-sample F-measures). We follow them: ``rouge_score``,
F-measure, no stemming by default (``use_stemmer=True`` is available), and report the plain mean
of per-sample scores (deterministic, no bootstrap noise).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_SCORERS: dict[bool, object] = {}


def _scorer(use_stemmer: bool):
    if use_stemmer not in _SCORERS:
        from rouge_score import rouge_scorer

        _SCORERS[use_stemmer] = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)
    return _SCORERS[use_stemmer]


def rouge1(predictions: Sequence[str], references: Sequence[str], *,
           use_stemmer: bool = False) -> np.ndarray:
    """Per-sample ROUGE-1 F-measure.

    Args:
      predictions: N generated strings.
      references: N target strings.

    Returns:
      [N] float64 in [0, 1]; an empty prediction or reference scores 0.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions vs {len(references)} references")
    scorer = _scorer(use_stemmer)
    out = np.zeros(len(predictions), np.float64)
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str) or not isinstance(r, str):
            raise TypeError(f"sample {i}: prediction and reference must be str")
        # rouge_score's signature is score(target, prediction)
        out[i] = scorer.score(r, p)["rouge1"].fmeasure
    return out

