"""ROUGE-1 F-measure on hand-checked pairs (rouge-score is the reference)."""

import numpy as np
import pytest

from fedrouter_jax.metrics import rouge1


def test_known_pairs():
    preds = ["the cat sat on the mat", "hello world", "Yes", "", "a b c d"]
    refs = ["the cat sat on the mat", "foo bar", "yes", "something", "a b x"]
    got = rouge1(preds, refs)
    # identical 1.0; disjoint 0.0; case-insensitive 1.0; empty 0.0;
    # overlap {a, b}: P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7
    np.testing.assert_allclose(got, [1.0, 0.0, 1.0, 0.0, 4 / 7], atol=1e-12)


def test_counts_repeated_words_by_clipping():
    # pred unigrams: the x2, cat; ref: the, cat, runs -> overlap 2 (the once, cat once)
    # P = 2/3, R = 2/3 -> F = 2/3
    np.testing.assert_allclose(rouge1(["the the cat"], ["the cat runs"]), [2 / 3])


def test_stemming_is_off_by_default_like_the_authors():
    assert rouge1(["cats running"], ["cat run"])[0] == 0.0
    assert rouge1(["cats running"], ["cat run"], use_stemmer=True)[0] == 1.0


def test_length_mismatch_and_empty():
    with pytest.raises(ValueError):
        rouge1(["a"], ["a", "b"])
    assert rouge1([], []).shape == (0,)
