"""Issue 16 faithfulness options: the authors' training settings (clipping, LoRA dropout, AdamW
constants), FedDPA's reference forward and similarity, prompts and pool-size mixes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedrouter_jax.algorithms.base import Env
from fedrouter_jax.algorithms.baselines import instance_draws, last_token_states
from fedrouter_jax.config import ConfigError, load_config
from fedrouter_jax.lora import LoraStack, delta_weight, take
from fedrouter_jax.models import llama
from fedrouter_jax.routing import blend_per_sample
from fedrouter_jax.training import (Batch, StepSettings, clip_by_global_norm, lora_loss, lora_train_step,
                                    make_optimizer, set_hyperparams, set_learning_rate, step_settings, with_frozen)

from helpers import random_batch, random_lora, tiny_model

B, T = 3, 10


def one_adapter(seed=1):
    cfg, base = tiny_model()
    return cfg, base, take(random_lora(cfg, 1, seed=seed, targets=("q_proj", "v_proj")), 0)


def a_batch(cfg, seed=7):
    return Batch(*map(jnp.asarray, random_batch((B, T), cfg.vocab_size, seed=seed)))


def step(cfg, base, lora, batch, settings, key=0, opt=None):
    opt = opt or make_optimizer()
    st = set_learning_rate(opt.init(lora), 1e-2)
    return jax.jit(lora_train_step, static_argnames=("cfg", "optimizer", "settings"))(
        base, lora, st, batch, jax.random.PRNGKey(key), cfg=cfg, optimizer=opt, settings=settings)


# ----------------------------------------------------------------------------- training settings


def test_clipping_equals_optax_clip_by_global_norm_by_hand():
    cfg, base, lora = one_adapter()
    batch = a_batch(cfg)
    grads = jax.grad(lambda lo: lora_loss(lo, base, batch, cfg)[0])(lora)
    norm = float(optax.tree.norm(grads))
    max_norm = norm / 4  # clipping is active
    by_hand = jax.tree.map(lambda g: g * (max_norm / norm), grads)
    for got, want in zip(jax.tree.leaves(clip_by_global_norm(grads, max_norm)), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    assert clip_by_global_norm(grads, 0.0) is grads
    # the step: AdamW on the clipped gradient == optax.chain(clip_by_global_norm, adamw); grad_norm before clipping
    new, _, m = step(cfg, base, lora, batch, StepSettings(max_grad_norm=max_norm))
    ref_opt = optax.chain(optax.clip_by_global_norm(max_norm), optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8,
                                                                          weight_decay=0.0))
    upd, _ = ref_opt.update(grads, ref_opt.init(lora), lora)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(optax.apply_updates(lora, upd))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-5)


def test_no_dropout_no_clipping_is_exactly_the_old_step():
    cfg, base, lora = one_adapter()
    batch = a_batch(cfg)
    opt = make_optimizer()

    @jax.jit
    def old_step(base, lora, st, batch):  # lora_train_step before the settings existed (key ignored)
        (loss, _), grads = jax.value_and_grad(lora_loss, has_aux=True)(lora, base, batch, cfg)
        upd, _ = opt.update(grads, st, lora)
        return optax.apply_updates(lora, upd), loss

    old, loss = old_step(base, lora, set_learning_rate(opt.init(lora), 1e-2), batch)
    for settings in (StepSettings(), StepSettings(lora_dropout=0.0, max_grad_norm=0.0)):
        new, _, m = step(cfg, base, lora, batch, settings, opt=opt)
        for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert float(m["loss"]) == float(loss)


def test_dropout_trains_differently_and_is_seeded():
    cfg, base, lora = one_adapter()
    batch = a_batch(cfg)
    plain = step(cfg, base, lora, batch, StepSettings())[2]["loss"]
    d1, d2, d3 = (step(cfg, base, lora, batch, StepSettings(lora_dropout=0.3), key=k)[2]["loss"] for k in (0, 0, 1))
    assert float(d1) == float(d2) and float(d1) != float(plain) and float(d1) != float(d3)


def test_dropout_leaves_the_base_and_evaluation_alone():
    cfg, base, lora = one_adapter()
    tokens, mask, _ = random_batch((B, T), cfg.vocab_size, seed=3)
    drop = (0.5, jax.random.PRNGKey(0))
    zero_b = LoraStack({t: {"a": p["a"], "b": jnp.zeros_like(p["b"])} for t, p in lora.params.items()}, lora.alpha)
    base_logits = llama.apply(base, tokens, mask, cfg=cfg)
    # B = 0 gives exactly the base, with dropout on the adapter input or not
    np.testing.assert_array_equal(np.asarray(llama.apply(base, tokens, mask, cfg=cfg, lora=zero_b, lora_dropout=drop)),
                                  np.asarray(base_logits))
    # evaluation passes no dropout: a config with lora.dropout > 0 evaluates the same model
    cfg_run = load_config(None, ["lora.dropout=0.5"])
    assert step_settings(cfg_run.train, cfg_run.lora).lora_dropout == 0.5
    evald = llama.apply(base, tokens, mask, cfg=cfg, lora=lora)
    np.testing.assert_array_equal(np.asarray(llama.apply(base, tokens, mask, cfg=cfg, lora=lora, lora_dropout=None)),
                                  np.asarray(evald))
    assert not np.allclose(np.asarray(llama.apply(base, tokens, mask, cfg=cfg, lora=lora, lora_dropout=drop)),
                           np.asarray(evald))


def test_adam_constants_are_written_into_the_state():
    cfg, base, lora = one_adapter()
    batch = a_batch(cfg)
    opt = make_optimizer()
    settings = StepSettings(adam_b1=0.8, adam_b2=0.99, adam_eps=1e-3)
    st = set_hyperparams(set_learning_rate(opt.init(lora), 1e-2), settings)
    new = jax.jit(lora_train_step, static_argnames=("cfg", "optimizer", "settings"))(
        base, lora, st, batch, jax.random.PRNGKey(0), cfg=cfg, optimizer=opt, settings=settings)[0]
    grads = jax.grad(lambda lo: lora_loss(lo, base, batch, cfg)[0])(lora)
    ref = optax.adamw(1e-2, b1=0.8, b2=0.99, eps=1e-3, weight_decay=0.0)
    upd, _ = ref.update(grads, ref.init(lora), lora)
    for got, want in zip(jax.tree.leaves(new), jax.tree.leaves(optax.apply_updates(lora, upd))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_defaults_are_the_authors_and_bad_values_name_the_key():
    cfg = load_config(None, [])
    assert (cfg.train.max_grad_norm, cfg.lora.dropout) == (1.0, 0.05)
    assert (cfg.train.adam_b1, cfg.train.adam_b2, cfg.train.adam_eps, cfg.train.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert (cfg.feddpa.variant, cfg.data.prompt, cfg.data.mix) == ("reference", "alpaca", "even")
    for key, value in (("train.max_grad_norm", "-1"), ("train.adam_b1", "1.0"), ("train.adam_b2", "0"),
                       ("train.adam_eps", "0"), ("lora.dropout", "1.0"), ("train.max_grad_norm", ".nan"),
                       ("data.mix", "bogus"), ("data.prompt", "bogus"), ("feddpa.variant", "bogus")):
        method = ["method=feddpa"] if key.startswith("feddpa") else []
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"{key}={value}", *method])


# ----------------------------------------------------------------------------- FedDPA reference


def _env(cfg_model, overrides=()):
    cfg = load_config(None, ["method=feddpa", "data.n_clients=1", "lora.targets=[q_proj, v_proj]", "lora.rank=4",
                             "lora.alpha=8", *overrides])
    return Env(config=cfg, model_cfg=cfg_model, n_clients=1)


def _dense(base, adapters_and_weights):
    """The base with sum_i w_i * dW(adapter_i) added to its weights (the LoRA forward by hand)."""
    layers = dict(base["layers"])
    for lo, w in adapters_and_weights:
        for t in lo.params:
            layers[t] = layers[t] + w * delta_weight(lo, t)
    return {**base, "layers": layers}


def test_feddpa_local_slot_forward_and_gradients_by_hand():
    """W0 x + s (a L x + (1 - a) G x); d/dG = 0; d/dL = the hand-merged model's gradient."""
    cfg, base, local = one_adapter(seed=1)
    glob = take(random_lora(cfg, 1, seed=2, targets=("q_proj", "v_proj")), 0)
    a = 0.25
    frozen = LoraStack({t: {**{k: (1 - a) * v if k == "b" else v for k, v in p.items()},
                            "trainable_weight": jnp.asarray(a)} for t, p in glob.params.items()}, glob.alpha)
    tokens, mask, _ = random_batch((B, T), cfg.vocab_size, seed=3)
    got = llama.apply(base, tokens, mask, cfg=cfg, lora=with_frozen(local, frozen))
    want = llama.apply(_dense(base, [(local, a), (glob, 1 - a)]), tokens, mask, cfg=cfg)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    batch = a_batch(cfg)
    g_local, g_frozen = jax.grad(lambda lo, fr: lora_loss(lo, base, batch, cfg, frozen=fr)[0], argnums=(0, 1))(local, frozen)
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_frozen))

    def by_hand(lo):
        return lora_loss(None, _dense(base, [(lo, a), (glob, 1 - a)]), batch, cfg)[0]

    for got, want in zip(jax.tree.leaves(g_local), jax.tree.leaves(jax.grad(by_hand)(local))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=1e-6)


def test_feddpa_inference_at_weight_a_is_the_trained_local_model():
    """weight(x) = a = 0.5 on G, 1 - a on L: the local slot's training forward (no dropout)."""
    cfg, base, local = one_adapter(seed=1)
    glob = take(random_lora(cfg, 1, seed=2, targets=("q_proj", "v_proj")), 0)
    frozen = LoraStack({t: {"a": p["a"], "b": 0.5 * p["b"], "trainable_weight": jnp.asarray(0.5)}
                        for t, p in glob.params.items()}, glob.alpha)
    tokens, mask, _ = random_batch((B, T), cfg.vocab_size, seed=3)
    train_fwd = llama.apply(base, tokens, mask, cfg=cfg, lora=with_frozen(local, frozen))
    stack = jax.tree.map(lambda g, lo: jnp.stack([g, lo]), glob, local)
    w = jnp.full((B,), 0.5)
    blended = blend_per_sample(stack, jnp.zeros(B, jnp.int32), jnp.ones(B, jnp.int32), 1.0 - w, w)
    eval_fwd = llama.apply(base, tokens, mask, cfg=cfg, lora=blended, adapter_ids=jnp.arange(B))
    np.testing.assert_allclose(np.asarray(eval_fwd), np.asarray(train_fwd), rtol=1e-5, atol=1e-5)


def _left_padded(cfg, n, seed):
    tokens, mask, _ = random_batch((n, T), cfg.vocab_size, seed=seed)
    return np.stack([np.roll(t, T - m.sum()) for t, m in zip(tokens, mask)]), \
        np.stack([np.roll(m, T - m.sum()) for m in mask])


def test_last_token_states_base_when_b_is_zero_and_local_otherwise():
    cfg, base, local = one_adapter()
    tokens, mask = _left_padded(cfg, 5, seed=4)
    zero_b = LoraStack({t: {"a": p["a"], "b": jnp.zeros_like(p["b"])} for t, p in local.params.items()}, local.alpha)
    want = np.asarray(llama.transformer(base, jnp.asarray(tokens), jnp.asarray(mask), cfg=cfg))[:, -1]
    np.testing.assert_allclose(last_token_states(base, cfg, zero_b, tokens, mask, batch_size=4), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(last_token_states(base, cfg, local, tokens, mask, batch_size=4), want, atol=1e-3)


def test_feddpa_route_features_by_hand_and_seeded():
    from fedrouter_jax.algorithms import get_method
    from fedrouter_jax.algorithms.baselines import cosine_similarity_matrix
    from fedrouter_jax.simulator import client_inputs
    from fedrouter_jax.data import prompt_inputs

    cfg, base, local = one_adapter()
    tr, trm = _left_padded(cfg, 6, seed=5)
    te, tem = _left_padded(cfg, 3, seed=6)
    inputs = client_inputs([np.zeros((6, 2), np.float32)], [np.zeros((3, 2), np.float32)]).replace(
        **prompt_inputs([(tr, trm)], [(te, tem)]))
    state = get_method("feddpa").client_setup(_env(cfg), inputs, jax.random.PRNGKey(0))[0]
    state = state.replace(adapters=jax.tree.map(lambda x: np.asarray(x)[None], local.params))
    m = get_method("feddpa")
    h_tr, h_te = (last_token_states(base, cfg, local, t, k) for t, k in ((tr, trm), (te, tem)))
    cos = cosine_similarity_matrix(np.concatenate([h_te, h_tr]))[:3, 3:]
    every = m.route_features(_env(cfg, ["feddpa.instance_num=0"]), base, state, inputs).route_features
    np.testing.assert_allclose(every[0], cos.mean(axis=1), rtol=1e-5)
    env = _env(cfg, ["feddpa.instance_num=2", "seed=3"])
    two = m.route_features(env, base, state, inputs).route_features
    draws = instance_draws(6, 3, 2, np.random.default_rng([3, 7, 0]))
    np.testing.assert_allclose(two[0], np.take_along_axis(cos, draws, axis=1).mean(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(m.route_features(env, base, state, inputs).route_features, two)
    assert all(len(set(d)) == 2 for d in draws)  # without replacement


# ----------------------------------------------------------------------------- prompts and mixes


def test_pool_size_mixes_by_hand():
    from fedrouter_jax.data import build_scenario

    fed = build_scenario("all", n_clients=2, train_per_client=100, test_per_client=20, mix="pool_sizes")
    # QQP, Gigaword, SAMSum, WebNLG: 30000, 30000, 14732, 35426 of 110158
    assert fed.task_counts("train").tolist() == [[27, 27, 13, 33]] * 2  # 13.4 -> 13, remainder to WebNLG
    assert fed.task_counts("test").tolist() == [[5, 5, 3, 7]] * 2
    dual = build_scenario("dual", n_clients=8, train_per_client=60, test_per_client=6, mix="pool_sizes")
    counts = dual.task_counts("train")
    assert counts[2].tolist() == [0, 40, 20, 0] and counts[4].tolist() == [0, 0, 18, 42]  # 67/33, 29/71
    assert build_scenario("all", n_clients=1, train_per_client=8, test_per_client=4).task_counts().tolist() == [[2] * 4]


def test_raw_input_prompt_is_the_authors_template():
    from fedrouter_jax.data import build_scenario, format_prompt

    alp = build_scenario("single", n_clients=2, train_per_client=3, test_per_client=2)
    raw = build_scenario("single", n_clients=2, train_per_client=3, test_per_client=2, prompt="raw_input")
    for a, r in zip(alp.train[0] + alp.test[1], raw.train[0] + raw.test[1]):
        assert a["instruction"] and r["instruction"] == "" and r["input"] == a["input"] and r["output"] == a["output"]
        assert format_prompt(r["instruction"], r["input"]) == (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{a['input']} \n\n### Response:")
