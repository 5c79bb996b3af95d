"""KV-cached greedy generation equals greedy decoding by full recomputation."""
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.models.generate import greedy_generate, greedy_generate_uncached

from helpers import random_lora, tiny_model


def left_padded(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(4, 9)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[1, :3] = False
    mask[3, :6] = False
    tokens[~mask] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


def test_cached_equals_recomputation_with_mixed_adapters():
    cfg, params = tiny_model()
    lora = random_lora(cfg, 2)
    tokens, mask = left_padded(cfg.vocab_size)
    ids = jnp.array([1, 0, -1, 1])
    cached, lengths = greedy_generate(params, tokens, mask, lora, ids, cfg=cfg, max_new_tokens=7, eos_ids=(), pad_id=0)
    ref = greedy_generate_uncached(params, tokens, mask, lora, ids, cfg=cfg, max_new_tokens=7)
    np.testing.assert_array_equal(np.asarray(cached), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(lengths), 7)


def test_left_padding_does_not_change_the_continuation():
    cfg, params = tiny_model()
    tokens, mask = left_padded(cfg.vocab_size)
    out, _ = greedy_generate(params, tokens, mask, cfg=cfg, max_new_tokens=5)
    alone, _ = greedy_generate(params, tokens[3:, 6:], mask[3:, 6:], cfg=cfg, max_new_tokens=5)
    np.testing.assert_array_equal(np.asarray(out[3]), np.asarray(alone[0]))


def test_stops_at_eos_and_pads_after():
    cfg, params = tiny_model()
    tokens, mask = left_padded(cfg.vocab_size)
    free, _ = greedy_generate(params, tokens, mask, cfg=cfg, max_new_tokens=6)
    eos = int(free[0, 2])  # pretend row 0's third token is EOS
    out, lengths = greedy_generate(params, tokens, mask, cfg=cfg, max_new_tokens=6, eos_ids=(eos,), pad_id=0)
    out = np.asarray(out)
    first = [int(np.argmax(np.asarray(free[r]) == eos)) if (np.asarray(free[r]) == eos).any() else 6 for r in range(4)]
    for r in range(4):
        np.testing.assert_array_equal(out[r, :first[r]], np.asarray(free[r, :first[r]]))
        assert (out[r, first[r]:] == 0).all()
        assert int(lengths[r]) == first[r]
