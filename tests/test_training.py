"""Client-mapped local training equals a Python loop of single-client steps; sharding; overfitting."""
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.lora import take
import pytest

from fedrouter_jax.training import (Batch, StepSettings, client_chunk_size, clients_local_steps, init_opt_states,
                                    lora_loss, lora_train_step, make_optimizer, map_in_chunks, set_learning_rate)

from helpers import random_batch, random_lora, tiny_model

C, S, B, T = 3, 4, 2, 12


def setup():
    cfg, base = tiny_model()
    loras = random_lora(cfg, C, targets=("q_proj", "v_proj"))
    opt = make_optimizer(weight_decay=0.01)
    states = init_opt_states(opt, loras, 5e-3)
    batches = Batch(*map(jnp.asarray, random_batch((C, S, B, T), cfg.vocab_size, seed=7)))
    keys = jax.random.split(jax.random.PRNGKey(0), C)
    return cfg, base, loras, opt, states, batches, keys


@pytest.mark.parametrize("settings", [StepSettings(), StepSettings(max_grad_norm=0.05, lora_dropout=0.1)],
                         ids=["plain", "clip_and_dropout"])
def test_client_mapped_equals_python_loop(settings):
    cfg, base, loras, opt, states, batches, keys = setup()
    ref_loras, ref_losses = [], []
    for c in range(C):
        lora, st = take(loras, c), set_learning_rate(opt.init(take(loras, c)), 5e-3)
        losses = []
        for s in range(S):
            batch = Batch(*(x[c, s] for x in batches))
            lora, st, m = jax.jit(lora_train_step, static_argnames=("cfg", "optimizer", "settings"))(
                base, lora, st, batch, jax.random.split(keys[c], S)[s], cfg=cfg, optimizer=opt, settings=settings)
            losses.append(float(m["loss"]))
        ref_loras.append(lora)
        ref_losses.append(losses)
    out, _, metrics = clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt,
                                          settings=settings)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), np.array(ref_losses), rtol=1e-5, atol=1e-6)
    for c in range(C):
        for got, want in zip(jax.tree.leaves(take(out, c)), jax.tree.leaves(ref_loras[c])):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2])  # 2 of 3 clients: two groups of 2, one padded row
def test_client_chunks_equal_all_clients_at_once(chunk):
    cfg, base, loras, opt, states, batches, keys = setup()
    whole = clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt)
    cfg, base, loras, opt, states, batches, keys = setup()  # the call donated the adapters
    chunked = clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt, client_chunk=chunk)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_lm_head_on_loss_tokens_equals_all_positions():
    cfg, base, loras, opt, states, batches, keys = setup()
    lora, batch = take(loras, 0), Batch(*(x[0, 0] for x in batches))
    n = int(batch.loss_mask[:, 1:].sum())
    grad = jax.jit(jax.value_and_grad(lora_loss, has_aux=True), static_argnums=(3, 4, 5, 6))
    (want, (n_all, _)), g_want = grad(lora, base, batch, cfg, None, False, None)
    for head in (n, n + 5, B * (T - 1)):
        (got, (n_got, overflow)), g_got = grad(lora, base, batch, cfg, None, False, head)
        assert int(overflow) == 0 and float(n_got) == float(n_all) == n
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
    (_, (_, overflow)), _ = grad(lora, base, batch, cfg, None, False, n - 3)
    assert int(overflow) == 3  # reported, never silent


def test_training_on_trimmed_padding_equals_full_width():
    from fedrouter_jax.data.batching import trim_padding

    cfg, base, loras, opt, states, _, keys = setup()
    tokens, mask, loss_mask = random_batch((C, S, B, 40), cfg.vocab_size, seed=3)
    tokens, mask, loss_mask = (np.concatenate([x, np.zeros_like(x)], axis=-1) for x in (tokens, mask, loss_mask))
    trimmed = trim_padding({"tokens": tokens, "mask": mask, "loss_mask": loss_mask}, multiple=8)
    assert trimmed["tokens"].shape[-1] == 40 and trimmed["mask"][..., 40:].sum() == 0
    full = clients_local_steps(base, loras, states, Batch(*map(jnp.asarray, (tokens, mask, loss_mask))), keys,
                               cfg=cfg, optimizer=opt)
    cfg, base, loras, opt, states, _, keys = setup()
    cut_batches = Batch(*(jnp.asarray(trimmed[k]) for k in ("tokens", "mask", "loss_mask")))
    cut = clients_local_steps(base, loras, states, cut_batches, keys, cfg=cfg, optimizer=opt)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(cut)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_map_in_chunks_order_and_padding():
    xs = {"a": jnp.arange(7.0), "b": jnp.arange(14.0).reshape(7, 2)}
    fn = lambda x: x["a"] * 10 + x["b"].sum()
    want = jax.vmap(fn)(xs)
    for chunk in (None, 1, 2, 3, 4, 6, 7, 100):
        np.testing.assert_array_equal(np.asarray(map_in_chunks(fn, xs, chunk)), np.asarray(want))


def test_client_chunk_size():
    assert client_chunk_size("all", 128, 64) is None
    assert client_chunk_size(16, 128, 64) == 16
    assert client_chunk_size(200, 128, 64) is None
    assert client_chunk_size("auto", 128, 64) == 2048 // 64  # CPU budget: 2048 tokens per group
    assert client_chunk_size("auto", 8, 256) is None  # 8 x 256 tokens fit one group
    assert client_chunk_size("auto", 8, 4096) == 1
    # with 4 devices, groups are multiples of 4 that divide the client axis
    assert client_chunk_size(3, 24, 64, n_devices=4) == 12  # 6 per device -> 2 groups of 3 per device
    assert client_chunk_size(2, 24, 64, n_devices=4) == 8


def test_loss_falls_when_overfitting_one_batch():
    cfg, base, loras, opt, states, batches, keys = setup()
    one = Batch(*(jnp.broadcast_to(x[:1, :1], (1, 40) + x.shape[2:]) for x in batches))
    out, _, metrics = clients_local_steps(base, take(loras, slice(0, 1)), take(states, slice(0, 1)),
                                          one, keys[:1], cfg=cfg, optimizer=opt)
    loss = np.asarray(metrics["loss"])[0]
    assert loss[-1] < 0.3 * loss[0], loss
    assert np.isfinite(loss).all()


def test_base_is_not_in_optimizer_state():
    cfg, base, loras, opt, states, *_ = setup()
    n_state = sum(x.size for x in jax.tree.leaves(states))
    n_lora = sum(x.size for x in jax.tree.leaves(loras))
    assert n_state < 3 * n_lora  # mu + nu + scalars; the base is far bigger than the adapters
    assert sum(x.size for x in jax.tree.leaves(base)) > n_lora


SHARDED = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, sys.argv[1])
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_default_matmul_precision", "highest")
    assert len(jax.devices()) == 4
    from fedrouter_jax.sharding import client_mesh, replicate, shard_clients
    from fedrouter_jax.training import Batch, clients_local_steps, init_opt_states, make_optimizer
    from helpers import random_batch, random_lora, tiny_model
    cfg, base = tiny_model()
    C = 8
    opt = make_optimizer()
    def inputs():
        loras = random_lora(cfg, C, targets=("q_proj", "v_proj"))
        states = init_opt_states(opt, loras, 5e-3)
        batches = Batch(*map(jnp.asarray, random_batch((C, 3, 2, 12), cfg.vocab_size, seed=7)))
        return loras, states, batches, jax.random.split(jax.random.PRNGKey(0), C)
    plain = clients_local_steps(base, *inputs(), cfg=cfg, optimizer=opt)
    mesh = client_mesh(4)
    sharded = clients_local_steps(replicate(base, mesh), *shard_clients(inputs(), mesh), cfg=cfg, optimizer=opt)
    lora_leaf = jax.tree.leaves(sharded[0])[0]
    assert len(lora_leaf.sharding.device_set) == 4, lora_leaf.sharding
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # two groups of 4 clients, one client per device in each group
    chunked = clients_local_steps(replicate(base, mesh), *shard_clients(inputs(), mesh), cfg=cfg, optimizer=opt,
                                  client_chunk=4)
    assert len(jax.tree.leaves(chunked[0])[0].sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    print("SHARDED-OK")
""")


def test_sharded_client_axis_equals_unsharded(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.path.join(root, "tests")}
    r = subprocess.run([sys.executable, "-c", SHARDED, os.path.join(root, "tests")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert "SHARDED-OK" in r.stdout, r.stderr[-3000:]
