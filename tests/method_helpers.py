"""Driving a method's client / server functions by hand (no model, no training)."""
import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.algorithms import Env, Reply, get_method
from fedrouter_jax.config import load_config

from helpers import TINY


def make_env(train_emb, test_emb, overrides=()):
    """(env, inputs) for clients with these embeddings (lists of [N_c, D] arrays)."""
    from fedrouter_jax.simulator import client_inputs

    n = len(train_emb)
    cfg = load_config(None, [f"data.n_clients={n}", *overrides])
    return Env(config=cfg, model_cfg=TINY, n_clients=n), client_inputs(train_emb, test_emb)


def random_env(sizes=(1, 3), overrides=(), dim=4):
    rng = np.random.default_rng(0)
    train = [rng.normal(size=(s, dim)).astype(np.float32) for s in sizes]
    test = [rng.normal(size=(2, dim)).astype(np.float32) for _ in sizes]
    return make_env(train, test, ["lora.rank=2", "lora.targets=[q_proj, v_proj]", "data.train_per_client=8",
                                  "fedcluster.n_clusters=1", *overrides])


def setup(method, env, inputs, key=0):
    m = get_method(method)
    k = jax.random.fold_in(jax.random.PRNGKey(key), 0)
    clients, msgs = m.client_setup(env, inputs, k)
    return m, clients, m.server_setup(env, msgs, k)


def filled_like(params, a_vals, b_vals):
    """params with leaves [P, S, ...] whose A (B) leaves of participant p, slot s are a_vals[p][s]."""
    def col(v, x):
        v = jnp.asarray(v, jnp.float32)
        return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) * jnp.ones_like(x, jnp.float32)

    return {t: {"a": col(a_vals, q["a"]), "b": col(b_vals, q["b"])} for t, q in params.items()}


def fake_round(m, env, inputs, clients, server, round_idx, trained_fn, participants=None, arrived=None):
    """One round where training returns `trained_fn(start [P, S, ...]) -> params`.

    -> (msg, pools, new client rows, reply, new server)."""
    participants = np.arange(env.n_clients) if participants is None else np.asarray(participants)
    take = lambda t: jax.tree.map(lambda x: np.asarray(x)[participants], t)  # noqa: E731
    rows, sub = take(clients), take(inputs)
    msg = m.server_plan(env, server, round_idx, participants)
    pools = np.asarray(m.client_pools(env, rows, msg, sub))
    start, frozen = m.client_slots(env, rows, msg)
    trained = trained_fn(start)
    p, s = pools.shape[:2]
    zeros = jnp.zeros((p, s, 1))
    reply = Reply(adapters=trained, weight=jnp.asarray(pools.sum(-1), jnp.float32), loss=zeros, grad_norm=zeros,
                  finite=jnp.ones(p, bool), head_overflow=jnp.zeros((p, s, 1), jnp.int32))
    new_rows, reply = m.client_reply(env, rows, msg, trained, reply)
    arrived = np.ones(p, bool) if arrived is None else np.asarray(arrived)
    agg = m.server_aggregate if not m.jit_aggregate else jax.jit(m.server_aggregate, static_argnums=(0,))
    new_server = agg(env, server, msg, reply, jnp.asarray(arrived), jnp.asarray(participants), round_idx)
    return msg, pools, new_rows, reply, jax.tree.map(np.asarray, new_server)


def route(m, env, clients, server, inputs, mode="local"):
    return m.client_route(env, clients, m.server_route(env, server, mode), inputs, mode)


def leaf_values(params, factor, lead=1):
    """Per leading index, the (constant) value of each factor's leaves; asserts they are constant."""
    out = []
    for t, q in params.items():
        if factor not in q:
            continue
        x = np.asarray(q[factor])
        v = x.reshape(x.shape[:lead] + (-1,))
        np.testing.assert_array_equal(v, np.repeat(v[..., :1], v.shape[-1], -1))
        out.append(v[..., 0])
    np.testing.assert_array_equal(out[0], out[-1])
    return out[0]
