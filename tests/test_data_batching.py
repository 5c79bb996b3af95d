"""Tokenizer round-trip and AutoTokenizer load; token layout, masks, truncation, sampling."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from fedrouter_jax.data.batching import (
    encode_inputs,
    encode_prompts,
    head_token_budget,
    head_tokens_for_batches,
    sample_round_batches,
    tokenize_examples,
    trim_padding,
)
from fedrouter_jax.data.prompt import format_prompt
from fedrouter_jax.data.synthetic import TASKS, generate_examples, generic_corpus
from fedrouter_jax.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def examples():
    return [e for t in TASKS for e in generate_examples(t, 25, seed=0)]


@pytest.fixture(scope="module")
def tok(examples):
    texts = generic_corpus(400, 0) + [format_prompt(e["instruction"], e["input"]) + " "
                                      + e["output"] for e in examples]
    return train_tokenizer(texts, vocab_size=600)


def test_tokenizer_roundtrip_and_autotokenizer(tok, examples, tmp_path):
    assert len(tok) <= 600
    ids = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    assert len(ids) == 3
    texts = [format_prompt(e["instruction"], e["input"]) + " " + e["output"] for e in examples]
    texts += ["unseen: Zürich ☃ \t tabs  and   spaces\n"]
    for t in texts:
        assert tok.decode(tok(t, add_special_tokens=False)["input_ids"]) == t
    save_tokenizer(tok, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    auto = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    again = load_tokenizer(tmp_path / "tok")
    for t in texts[:10]:
        want = tok(t, add_special_tokens=False)["input_ids"]
        assert auto(t, add_special_tokens=False)["input_ids"] == want
        assert again.decode(want) == t
    assert (auto.bos_token, auto.eos_token, auto.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nothing")


def test_training_layout_and_loss_mask(tok, examples):
    ts = tokenize_examples(examples, tok, 256)
    n = len(examples)
    assert ts.tokens.shape == ts.mask.shape == ts.loss_mask.shape == (n, 256)
    assert ts.tokens.dtype == np.int32 and ts.mask.dtype == bool and ts.loss_mask.dtype == bool
    assert ts.n_truncated == 0
    for i, e in enumerate(examples):
        L, P = ts.lengths[i], ts.prompt_lengths[i]
        assert ts.mask[i, :L].all() and not ts.mask[i, L:].any()
        assert (ts.tokens[i, L:] == tok.pad_token_id).all()
        assert ts.tokens[i, 0] == tok.bos_token_id and ts.tokens[i, L - 1] == tok.eos_token_id
        # loss only on response tokens + EOS
        assert not ts.loss_mask[i, :P].any() and ts.loss_mask[i, P:L].all()
        assert not ts.loss_mask[i, L:].any()
        assert tok.decode(ts.tokens[i, 1:P]) == format_prompt(e["instruction"], e["input"])
        assert tok.decode(ts.tokens[i, P:L - 1]) == " " + e["output"]


def test_prompts_left_padded_and_equal_to_training_prefix(tok, examples):
    ts = tokenize_examples(examples, tok, 256)
    toks, mask, rep = encode_prompts(examples, tok, 200)
    assert toks.shape == mask.shape == (len(examples), 200) and rep.n_truncated == 0
    for i in range(len(examples)):
        P = ts.prompt_lengths[i]
        assert mask[i, -P:].all() and not mask[i, :-P].any()  # left padding
        assert (toks[i, :-P] == tok.pad_token_id).all()
        np.testing.assert_array_equal(toks[i, -P:], ts.tokens[i, :P])


def test_truncation_keeps_response_and_counts(tok):
    long_input = " ".join(["word"] * 300)
    ex = [{"task": "gigaword", "instruction": "Write a headline.", "input": long_input,
           "output": "short headline"},
          {"task": "gigaword", "instruction": "x", "input": "y", "output": "z " * 200},
          {"task": "qqp", "instruction": "x", "input": "y", "output": "Yes"}]
    with pytest.warns(UserWarning, match="2 of 3 prompts cut from the left, 1 responses cut"):
        ts = tokenize_examples(ex, tok, 64)
    assert (ts.report.prompts_cut, ts.report.responses_cut) == (2, 1)
    # example 0: full response + EOS kept, prompt = BOS + tail ending in "### Response:"
    assert ts.lengths[0] == 64 and ts.tokens[0, 0] == tok.bos_token_id
    P = ts.prompt_lengths[0]
    assert tok.decode(ts.tokens[0, P:63]) == " short headline"
    assert ts.tokens[0, 63] == tok.eos_token_id
    assert tok.decode(ts.tokens[0, 1:P]).endswith("word\n\n### Response:")
    # example 1: response too long for T -> prompt keeps T // 2 tokens, response cut
    assert ts.prompt_lengths[1] == 32 and ts.loss_mask[1].sum() == 32
    assert ts.tokens[1, 63] != tok.eos_token_id
    toks, mask, rep = encode_prompts(ex, tok, 32, warn=False)
    assert rep.prompts_cut == 3 and toks[0, 0] == tok.bos_token_id and mask.all()


def test_encode_inputs_raw_input_only(tok, examples):
    toks, mask = encode_inputs(examples, tok, max_len=1024)
    assert toks.shape[1] % 16 == 0 and toks.shape == mask.shape
    for i, e in enumerate(examples):
        n = mask[i].sum()
        assert mask[i, :n].all() and not mask[i, n:].any()  # right padding
        assert toks[i, 0] == tok.bos_token_id
        assert tok.decode(toks[i, 1:n]) == e["input"]
    toks, mask = encode_inputs(examples, tok, max_len=8)
    assert toks.shape == (len(examples), 8) and mask.all()


def test_sample_round_batches(tok, examples):
    sets = [tokenize_examples(examples[:40], tok, 256), tokenize_examples(examples[40:], tok, 256)]
    pools = [np.array([3, 5, 7, 9, 11, 13]), np.arange(60)]
    b = sample_round_batches(sets, pools, steps=3, batch_size=4, seed=1, round_idx=2)
    assert b["tokens"].shape == b["mask"].shape == b["loss_mask"].shape == (2, 3, 4, 256)
    assert b["indices"].shape == (2, 3, 4)
    # pool respected; small pool (6 < 12) reused in full passes: each index exactly twice
    idx0 = b["indices"][0].ravel()
    assert set(idx0) <= set(pools[0].tolist())
    assert sorted(np.bincount(idx0, minlength=14)[pools[0]]) == [2] * 6
    # big pool: no repeats within a round
    assert len(set(b["indices"][1].ravel())) == 12
    np.testing.assert_array_equal(b["tokens"][1, 0, 0], sets[1].tokens[b["indices"][1, 0, 0]])
    np.testing.assert_array_equal(b["loss_mask"][0, 2, 3],
                                  sets[0].loss_mask[b["indices"][0, 2, 3]])
    # stateless determinism by (seed, round, client)
    again = sample_round_batches(sets, pools, steps=3, batch_size=4, seed=1, round_idx=2)
    for k in b:
        np.testing.assert_array_equal(b[k], again[k])
    other = sample_round_batches(sets, pools, steps=3, batch_size=4, seed=1, round_idx=3)
    assert not np.array_equal(other["indices"], b["indices"])
    none = sample_round_batches(sets, None, steps=1, batch_size=2, seed=0, round_idx=0)
    assert none["tokens"].shape == (2, 1, 2, 256)
    with pytest.raises(ValueError, match="client 1: empty pool"):
        sample_round_batches(sets, [pools[0], np.array([], int)], steps=1, batch_size=2,
                             seed=0, round_idx=0)


def test_head_token_budget_covers_every_batch(tok, examples):
    sets = [tokenize_examples(examples[:40], tok, 256), tokenize_examples(examples[40:], tok, 256)]
    counts = np.concatenate([ts.loss_mask[:, 1:].sum(1) for ts in sets])
    budget = head_token_budget(sets, batch_size=4)
    assert budget % 64 == 0 and np.sort(counts)[-4:].sum() <= budget < np.sort(counts)[-4:].sum() + 64
    assert budget < 4 * 255  # far fewer than all positions: responses are short
    for r in range(5):  # distinct rows per batch: the budget is kept
        b = sample_round_batches(sets, None, steps=3, batch_size=4, seed=0, round_idx=r)
        assert b["loss_mask"][..., 1:].sum(axis=(-1, -2)).max() <= budget
        assert head_tokens_for_batches(budget, b["loss_mask"]) == budget
    # a pool smaller than the batch repeats its longest row: the round asks for more
    longest = int(np.argmax(sets[0].loss_mask[:, 1:].sum(1)))
    b = sample_round_batches(sets, [np.array([longest]), None], steps=1, batch_size=4, seed=0, round_idx=0)
    need = int(b["loss_mask"][..., 1:].sum(axis=(-1, -2)).max())
    got = head_tokens_for_batches(64, b["loss_mask"])
    assert need > 64 and got >= need and got % 64 == 0
    assert head_token_budget(sets, batch_size=1, multiple=10_000) == 255  # never above all positions


def test_trim_padding(tok, examples):
    sets = [tokenize_examples(examples, tok, 256)]
    b = sample_round_batches(sets, None, steps=2, batch_size=4, seed=0, round_idx=0)
    longest = int(b["mask"].sum(-1).max())
    t = trim_padding(b, multiple=32)
    assert t["tokens"].shape[-1] == -(-longest // 32) * 32 < 256
    for k in ("tokens", "mask", "loss_mask"):
        np.testing.assert_array_equal(t[k], b[k][..., :t[k].shape[-1]])
    assert not b["mask"][..., t["mask"].shape[-1]:].any()  # only padding was cut
    np.testing.assert_array_equal(t["indices"], b["indices"])
    assert trim_padding(t, multiple=10_000) is t  # nothing to cut: unchanged
