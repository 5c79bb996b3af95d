"""bf16 compute for the frozen base, float32 for the LoRA weights, their gradients, AdamW's state,
the softmax and the loss: bf16 training tracks float32 training."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.lora import take
from fedrouter_jax.training import Batch, local_steps, lora_loss, make_optimizer, set_learning_rate

from helpers import random_batch, random_lora, tiny_model

STEPS, B, T, LR = 20, 2, 16, 5e-3
# bf16 keeps 8 significant bits, so the base's activations carry relative errors of a few 1e-3;
# over 20 AdamW steps (the loss halves) the two runs' losses stayed within 0.25 % of each other
# on this model (0.55 % with the layers scanned): 1 % leaves room for other CPUs' rounding.
LOSS_RTOL = 0.01


def _bf16(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16), tree)


def _train(base, lora, batches):
    opt = make_optimizer()
    state = set_learning_rate(opt.init(lora), LR)
    run = jax.jit(partial(local_steps, cfg=tiny_model()[0], optimizer=opt))
    return run(base, lora, state, batches, jax.random.PRNGKey(0))


def test_bf16_training_tracks_float32():
    cfg, base = tiny_model()
    lora = take(random_lora(cfg, 1, targets=("q_proj", "v_proj")), 0)
    one = Batch(*map(jnp.asarray, random_batch((1, B, T), cfg.vocab_size, seed=11)))
    batches = Batch(*(jnp.broadcast_to(x, (STEPS,) + x.shape[1:]) for x in one))  # overfit one batch
    lora32, state32, m32 = _train(base, lora, batches)
    lora16, state16, m16 = _train(_bf16(base), lora, batches)

    # adapters and optimizer state stay float32; the loss is float32
    for leaf in jax.tree.leaves((lora16, state16, m16["loss"])):
        assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
    l32, l16 = np.asarray(m32["loss"]), np.asarray(m16["loss"])
    assert l32[-1] < 0.6 * l32[0], l32  # it trains
    rel = np.abs(l16 - l32) / l32
    assert rel.max() <= LOSS_RTOL, (rel.max(), l16, l32)


def test_bf16_lora_gradients_are_float32_sums():
    """The rank-R weight gradients sum over tokens in float32: not rounded to bf16 (before the fix
    every gradient of `a` was a bf16 value)."""
    cfg, base = tiny_model()
    lora = take(random_lora(cfg, 1, targets=("q_proj", "v_proj")), 0)
    batch = Batch(*map(jnp.asarray, random_batch((8, 32), cfg.vocab_size, seed=7)))
    grad = jax.jit(jax.grad(lambda l, b: lora_loss(l, b, batch, cfg)[0]))
    g32, g16 = grad(lora, base), grad(lora, _bf16(base))
    for want, got in zip(jax.tree.leaves(g32), jax.tree.leaves(g16)):
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == np.float32
        rounded = np.asarray(jnp.asarray(got).astype(jnp.bfloat16).astype(jnp.float32))
        assert np.mean(rounded == got) < 0.5  # float32 values, not bf16 ones
        assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()  # bf16 activations: a few % off
