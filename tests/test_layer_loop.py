"""The layers as a Python loop (`layer_loop="unroll"`, the CPU default) compute what `lax.scan` does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedrouter_jax.lora import take
from fedrouter_jax.models import llama
from fedrouter_jax.training import Batch, local_steps, lora_loss, make_optimizer, set_learning_rate

from helpers import random_batch, random_lora, tiny_model


def test_unrolled_logits_and_cache_equal_scanned():
    cfg, params = tiny_model()
    lora = random_lora(cfg, 3)
    tokens, mask, _ = random_batch((4, 10), cfg.vocab_size, seed=2)
    ids = jnp.array([2, -1, 0, 1])
    run = {loop: llama.transformer(params, tokens, mask, cfg=cfg, lora=lora, adapter_ids=ids, return_cache=True,
                                   layer_loop=loop) for loop in ("scan", "unroll")}
    (h_scan, kv_scan), (h_unroll, kv_unroll) = run["scan"], run["unroll"]
    assert kv_unroll[0].shape == (cfg.num_hidden_layers, 4, 10, cfg.num_key_value_heads, cfg.head_dim)
    np.testing.assert_allclose(np.asarray(h_unroll), np.asarray(h_scan), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(kv_unroll), jax.tree.leaves(kv_scan)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", [False, True])
def test_unrolled_training_gradients_equal_scanned(remat):
    cfg, params = tiny_model()
    lora = take(random_lora(cfg, 1), 0)
    batch = Batch(*map(jnp.asarray, random_batch((3, 12), cfg.vocab_size, seed=5)))
    grad = lambda loop: jax.jit(jax.value_and_grad(lambda l: lora_loss(l, params, batch, cfg, remat=remat,
                                                                       layer_loop=loop)[0]))(lora)
    (loss_s, g_s), (loss_u, g_u) = grad("scan"), grad("unroll")
    np.testing.assert_allclose(float(loss_u), float(loss_s), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(g_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_layer_loop_choice():
    assert llama.unroll_layers("unroll") and not llama.unroll_layers("scan")
    assert llama.unroll_layers("auto") == (jax.default_backend() == "cpu")
    with pytest.raises(ValueError, match="layer_loop must be one of"):
        llama.unroll_layers("python")


def test_local_steps_unrolled_with_precomputed_rope_equal_scanned():
    """`local_steps` computes RoPE's tables before the step loop when the layers are unrolled."""
    cfg, params = tiny_model()
    lora = take(random_lora(cfg, 1), 0)
    opt = make_optimizer()
    batches = Batch(*map(jnp.asarray, random_batch((3, 2, 12), cfg.vocab_size, seed=6)))
    run = lambda loop: jax.jit(lambda l: local_steps(params, l, set_learning_rate(opt.init(l), 1e-2), batches,
                                                     jax.random.PRNGKey(0), cfg=cfg, optimizer=opt,
                                                     layer_loop=loop))(lora)
    (l_s, _, m_s), (l_u, _, m_u) = run("scan"), run("unroll")
    np.testing.assert_allclose(np.asarray(m_u["loss"]), np.asarray(m_s["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(l_u), jax.tree.leaves(l_s)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
