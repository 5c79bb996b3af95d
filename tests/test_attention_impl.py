"""Attention through `jax.nn.dot_product_attention` (the path cuDNN flash attention takes on a GPU)
equals the current bias-masked path: run on CPU with implementation="xla" (`dot_product_xla`).

Covered: GQA (4 query heads on 2 kv heads), causal masking, right and left padding and a mask
with a hole, values and gradients, the client-mapped training round, and decoding with a kv
cache filled by the prompt's forward. Padded positions are unspecified in every path, so only
real positions are compared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.lora import LoraStack, take
from fedrouter_jax.models import generate, layers, llama
from fedrouter_jax.training import Batch, clients_local_steps, init_opt_states, make_optimizer

from helpers import random_batch, random_lora, tiny_model

XLA = "dot_product_xla"


def masks():
    """[4, 16]: right padded, left padded, a hole in the middle, no padding."""
    tokens, mask, _ = random_batch((4, 16), 61, seed=3)
    mask[1] = mask[1][::-1]
    mask[2, 3:6] = False
    mask[3] = True
    return tokens, mask


def test_real_tokens_first_is_a_stable_permutation():
    _, mask = masks()
    order, dest, lengths = map(np.asarray, layers.real_tokens_first(jnp.asarray(mask)))
    np.testing.assert_array_equal(lengths, mask.sum(-1))
    for r in range(mask.shape[0]):
        np.testing.assert_array_equal(order[r][dest[r]], np.arange(16))  # inverse permutations
        np.testing.assert_array_equal(mask[r][order[r]], np.arange(16) < lengths[r])  # real tokens first
        np.testing.assert_array_equal(order[r][: lengths[r]], np.flatnonzero(mask[r]))  # in order
    np.testing.assert_array_equal(order[0], np.arange(16))  # right padding: identity


def test_attention_op_values_and_gradients():
    """The op alone, right padded: `attention_by_lengths` against `xla_attention` with the bias."""
    rng = np.random.default_rng(0)
    b, t, h, k, hd = 3, 12, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, h, hd)), jnp.float32)
    kk, v = (jnp.asarray(rng.normal(size=(b, t, k, hd)), jnp.float32) for _ in range(2))
    lengths = jnp.array([12, 7, 1], jnp.int32)
    real = np.arange(t)[None, :] < np.asarray(lengths)[:, None]  # [B, T]
    allowed = np.tril(np.ones((t, t), bool))[None] & real[:, None, :]
    bias = layers.attention_bias(jnp.asarray(allowed))
    w = jnp.asarray(real, jnp.float32)[:, :, None, None]  # loss on real queries only
    dense = lambda q, k, v: layers.xla_attention(q, k, v, bias)  # noqa: E731
    by_len = lambda q, k, v: layers.attention_by_lengths(q, k, v, lengths, "xla")  # noqa: E731
    got, want = jax.jit(by_len)(q, kk, v), jax.jit(dense)(q, kk, v)
    assert got.shape == want.shape == q.shape
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-6)
    loss = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(w * f(*a) ** 2), argnums=(0, 1, 2)))  # noqa: E731
    for got, want in zip(loss(by_len)(q, kk, v), loss(dense)(q, kk, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_model_values_and_lora_gradients(layer_loop="scan"):  # the round below runs unrolled
    cfg, base = tiny_model()
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    tokens, mask = masks()
    stack = random_lora(cfg, 3)
    ids = jnp.array([0, 1, 2, -1])
    fwd = jax.jit(llama.apply, static_argnames=("cfg", "layer_loop", "attention"))
    want = np.asarray(fwd(base, tokens, mask, cfg=cfg, lora=stack, adapter_ids=ids, layer_loop=layer_loop))
    got = np.asarray(fwd(base, tokens, mask, cfg=cfg, lora=stack, adapter_ids=ids, layer_loop=layer_loop,
                         attention=XLA))
    np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-5)

    one = take(random_lora(cfg, 1), 0)
    w = jnp.asarray(mask, jnp.float32)[..., None]

    def loss(lora, attention):
        logits = llama.apply(base, tokens, mask, cfg=cfg, lora=lora, layer_loop=layer_loop, attention=attention)
        return jnp.sum(w * jax.nn.log_softmax(logits) * 0.01)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    for a, b in zip(jax.tree.leaves(grad(one, XLA)), jax.tree.leaves(grad(one, "dense"))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_zero_lora_is_exactly_the_base():
    cfg, base = tiny_model()
    tokens, mask = masks()
    lora = random_lora(cfg, 1)
    zero = LoraStack(params=jax.tree.map(jnp.zeros_like, lora.params), alpha=lora.alpha)
    fwd = jax.jit(llama.apply, static_argnames=("cfg", "attention"))
    np.testing.assert_array_equal(np.asarray(fwd(base, tokens, mask, cfg=cfg, lora=zero, attention=XLA)),
                                  np.asarray(fwd(base, tokens, mask, cfg=cfg, attention=XLA)))


def test_client_mapped_round(monkeypatch):
    """The whole round (client vmap, scan over steps, head on loss tokens) under the env switch."""
    cfg, base = tiny_model()
    opt = make_optimizer()
    batches = Batch(*map(jnp.asarray, random_batch((2, 2, 2, 12), cfg.vocab_size, seed=7)))
    keys = jax.random.split(jax.random.PRNGKey(0), 2)

    def run():
        loras = random_lora(cfg, 2, targets=("q_proj", "v_proj"))
        clients_local_steps.clear_cache()  # the attention is chosen at trace time
        return clients_local_steps(base, loras, init_opt_states(opt, loras, 5e-3), batches, keys, cfg=cfg,
                                   optimizer=opt, head_tokens=16)

    want = run()
    monkeypatch.setenv("FEDROUTER_ATTENTION", XLA)
    got = run()
    monkeypatch.delenv("FEDROUTER_ATTENTION")
    clients_local_steps.clear_cache()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_decoding_with_kv_cache():
    """Left-padded prompts: the prompt's forward fills the same cache at real slots, and greedy
    decoding (the steps attend the cache densely) gives the same tokens."""
    cfg, base = tiny_model()
    stack = random_lora(cfg, 2)
    tokens, mask, _ = random_batch((3, 10), cfg.vocab_size, seed=5)
    mask = mask[:, ::-1].copy()
    tokens = np.where(mask, tokens[:, ::-1], 0).astype(np.int32)
    ids = jnp.array([0, 1, -1])
    prefill = jax.jit(llama.transformer, static_argnames=("cfg", "return_cache", "attention"))
    h_want, kv_want = prefill(base, tokens, mask, cfg=cfg, lora=stack, adapter_ids=ids, return_cache=True)
    h_got, kv_got = prefill(base, tokens, mask, cfg=cfg, lora=stack, adapter_ids=ids, return_cache=True,
                            attention=XLA)
    np.testing.assert_allclose(np.asarray(h_got)[mask], np.asarray(h_want)[mask], rtol=1e-5, atol=1e-5)
    for a, b in zip(kv_got, kv_want):  # [L, B, S, K, hd]
        np.testing.assert_allclose(np.asarray(a)[:, mask], np.asarray(b)[:, mask], rtol=1e-5, atol=1e-5)
    gen = lambda attention: generate.greedy_generate(base, tokens, mask, stack, ids, cfg=cfg,  # noqa: E731
                                                     max_new_tokens=6, attention=attention)
    for a, b in zip(gen(XLA), gen(None)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dispatch(monkeypatch):
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert layers.attention_impl(None, f32, 8, decoding=False) == "dense"  # CPU default: unchanged
    assert layers.attention_impl(None, bf16, 8, decoding=False) == "dense"
    assert layers.attention_impl("cudnn", bf16, 64, decoding=True) == "dense"  # decoding attends densely
    monkeypatch.setenv("FEDROUTER_ATTENTION", "dot_product_xla")
    assert layers.attention_impl(None, f32, 8, decoding=False) == XLA
    assert layers.attention_impl("dense", f32, 8, decoding=False) == "dense"  # the argument wins
    monkeypatch.setenv("FEDROUTER_ATTENTION", "flash")
    with pytest.raises(ValueError, match="FEDROUTER_ATTENTION"):
        layers.attention_impl(None, f32, 8, decoding=False)
    monkeypatch.delenv("FEDROUTER_ATTENTION")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert layers.attention_impl(None, bf16, 64, decoding=False) == "cudnn"
    assert layers.attention_impl(None, jnp.float16, 128, decoding=False) == "cudnn"
    assert layers.attention_impl(None, f32, 64, decoding=False) == "dense"  # cuDNN: no float32
    assert layers.attention_impl(None, bf16, 12, decoding=False) == "dense"  # head dim not a multiple of 8
    assert layers.attention_impl(None, bf16, 256, decoding=False) == "dense"
