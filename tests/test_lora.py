"""The two LoRA invariants: B = 0 is exactly the base; per-example gather == each adapter alone."""
import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax import forward
from fedrouter_jax.lora import init_lora, take, delta_weight, TARGETS
from fedrouter_jax.models import llama

from helpers import random_batch, random_lora, tiny_model


def test_peft_init_b_zero_equals_base_exactly():
    cfg, params = tiny_model()
    lora = init_lora(jax.random.PRNGKey(3), cfg, 3, rank=4, alpha=8.0, targets=TARGETS)
    a = lora.params["q_proj"]["a"]
    assert a.shape == (3, cfg.num_hidden_layers, cfg.hidden_size, 4)
    assert float(jnp.abs(a).max()) <= 1 / np.sqrt(cfg.hidden_size)
    tokens, mask, _ = random_batch((4, 12), cfg.vocab_size)
    base = np.asarray(forward(cfg, params, tokens, mask))
    with_lora = np.asarray(forward(cfg, params, tokens, mask, lora=lora, adapter_ids=[0, 1, 2, 1]))
    np.testing.assert_array_equal(base, with_lora)


def test_adapter_minus_one_is_base():
    cfg, params = tiny_model()
    lora = random_lora(cfg, 2)
    tokens, mask, _ = random_batch((3, 10), cfg.vocab_size)
    base = np.asarray(forward(cfg, params, tokens, mask))
    out = np.asarray(forward(cfg, params, tokens, mask, lora=lora, adapter_ids=[-1, 0, -1]))
    np.testing.assert_array_equal(out[[0, 2]], base[[0, 2]])
    assert np.abs(out[1] - base[1]).max() > 1e-3


def test_mixed_adapter_batch_equals_each_adapter_alone():
    cfg, params = tiny_model()
    lora = random_lora(cfg, 3)
    tokens, mask, _ = random_batch((6, 11), cfg.vocab_size, seed=4)
    ids = np.array([2, 0, 1, 1, -1, 0])
    mixed = np.asarray(forward(cfg, params, tokens, mask, lora=lora, adapter_ids=ids))
    for a in range(3):
        rows = ids == a
        alone = llama.apply(params, tokens[rows], mask[rows], cfg=cfg, lora=take(lora, a))
        np.testing.assert_allclose(mixed[rows], np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_lora_update_equals_merged_weights():
    cfg, params = tiny_model()
    single = take(random_lora(cfg, 1, targets=("q_proj", "down_proj")), 0)
    merged = jax.tree.map(lambda x: x, params)
    for t in ("q_proj", "down_proj"):
        merged["layers"][t] = params["layers"][t] + delta_weight(single, t)
    tokens, mask, _ = random_batch((2, 9), cfg.vocab_size)
    a = llama.apply(params, tokens, mask, cfg=cfg, lora=single)
    b = llama.apply(merged, tokens, mask, cfg=cfg)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def _normal_arrays(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]


def _assert_same_value_and_grads(custom, plain, h, a, b, tol):
    """custom(h, a, b) == plain(h, a, b) in value and in the gradients w.r.t. h, a, b, also for
    an adapter factor under the client vmap (the training path)."""
    np.testing.assert_allclose(custom(h, a, b), plain(h, a, b), rtol=tol)
    for got, want in zip(jax.grad(custom, argnums=(0, 1, 2))(h, a, b), jax.grad(plain, argnums=(0, 1, 2))(h, a, b)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=10 * tol, atol=10 * tol)
    for arg in (1, 2):
        pair = [a, b]
        pair[arg - 1] = jnp.stack([pair[arg - 1], 2 * pair[arg - 1]])
        in_axes = (None, 0, None) if arg == 1 else (None, None, 0)
        vg = jax.vmap(jax.grad(custom, argnums=arg), in_axes=in_axes)(h, *pair)
        doubled = (h, 2 * a, b) if arg == 1 else (h, a, 2 * b)
        np.testing.assert_allclose(np.asarray(vg[1]), np.asarray(jax.grad(plain, argnums=arg)(*doubled)),
                                   rtol=10 * tol, atol=10 * tol)


def test_lora_custom_vjp_equals_autodiff():
    """`llama._lora_delta` (hand-written backward, laid out for XLA:CPU) == plain autodiff."""
    h, a, b, g = _normal_arrays(0, (3, 5, 16), (16, 4), (4, 12), (3, 5, 12))
    plain = lambda h, a, b: jnp.sum(((h @ a) @ b) * g)  # noqa: E731
    custom = lambda h, a, b: jnp.sum(llama._lora_delta(h, a, b) * g)  # noqa: E731
    _assert_same_value_and_grads(custom, plain, h, a, b, tol=1e-6)


def test_merged_lora_projection_custom_vjp_equals_autodiff():
    """`llama._merged_lora_project` (`h @ (w + s a b)`, no weight gradient for w) == autodiff of
    the unmerged `h @ w + s (h @ a) @ b`."""
    h, w, a, b, g = _normal_arrays(1, (3, 7, 16), (16, 12), (16, 4), (4, 12), (3, 7, 12))
    s = jnp.float32(2.0)
    plain = lambda h, a, b: jnp.sum((h @ w + s * ((h @ a) @ b)) * g)  # noqa: E731
    merged = lambda h, a, b: jnp.sum(llama._merged_lora_project(h, w, a, b, s) * g)  # noqa: E731
    _assert_same_value_and_grads(merged, plain, h, a, b, tol=1e-5)


def test_merge_rule_float32_and_enough_tokens():
    w32, w16 = jnp.zeros((16, 8), jnp.float32), jnp.zeros((16, 8), jnp.bfloat16)
    assert llama._merge_lora(jnp.zeros((2, 32, 16)), w32)  # 64 tokens = 4 x d_in
    assert not llama._merge_lora(jnp.zeros((2, 16, 16)), w32)  # 32 tokens: add the rank-R update
    assert not llama._merge_lora(jnp.zeros((1, 1, 16)), w32)  # decoding
    assert not llama._merge_lora(jnp.zeros((2, 32, 16), jnp.bfloat16), w16)  # bf16 would round s a b away


def test_training_gradients_merged_equal_unmerged(monkeypatch):
    """The LoRA gradients of a training step (loss over the whole model) do not depend on whether
    the adapter is merged into the weights, for one adapter and for clients under vmap."""
    from fedrouter_jax.training import Batch, lora_loss

    cfg, params = tiny_model()
    single = take(random_lora(cfg, 1), 0)
    tokens, mask, loss_mask = random_batch((4, 12), cfg.vocab_size, seed=2)
    batch = Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(loss_mask))
    grad = jax.grad(lambda l: lora_loss(l, params, batch, cfg)[0])
    vgrad = jax.vmap(grad)
    pair = jax.tree.map(lambda x: jnp.stack([x, 0.5 * x]), single)
    monkeypatch.setattr(llama, "_merge_lora", lambda h, w: True)
    merged, vmerged = grad(single), vgrad(pair)
    monkeypatch.setattr(llama, "_merge_lora", lambda h, w: False)
    unmerged, vunmerged = grad(single), vgrad(pair)
    for got, want in zip(jax.tree.leaves((merged, vmerged)), jax.tree.leaves((unmerged, vunmerged))):
        # the two paths sum in different orders: float32 rounding relative to the tensor's scale
        # (an absolute 1e-6 failed on one machine for an entry 1e-4 of the tensor's largest)
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))
    assert float(jnp.abs(jax.tree.leaves(merged)[0]).max()) > 0
