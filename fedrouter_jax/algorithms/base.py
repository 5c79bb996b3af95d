"""A federated method as a small record of pure functions, split by who runs them.

Client side (each function takes a *stack* of clients on the leading axis, so the simulator
calls it once for all clients and a deployment calls it with a stack of one; rows never mix):

  client_setup(env, inputs, key)              -> (client_state [C, ...], setup_msg [C, ...])
  client_pools(env, client_state, msg, inputs) -> pools [P, S, N] bool: which samples train each slot
  client_update(env, base, client_state, msg, batches, opt_state, keys, lr)
                                              -> (client_state, Reply, opt_state)   (trains the slots)
  client_route(env, client_state, route_msg, inputs, mode) -> Routing   (which adapter serves each test sample)
  route_features(env, base, client_state, inputs) -> inputs   (optional, before client_route: features of
                                              the client's own prompts computed with its own model; FedDPA)
  route_reference(env, base, client_state, inputs) -> {name: [C, ...]}   (optional: what client_route
                                              compares a new input with, from the client's training data;
                                              kept by the run for the export bundle; FedDPA dynamic)

Server side:

  server_setup(env, setup_msgs [C, ...], key) -> server_state
  server_plan(env, server_state, round, participants [P]) -> msg [P, ...]  (who trains what, from which weights)
  server_aggregate(env, server_state, msg, reply [P, ...], arrived [P], round) -> server_state
  server_route(env, server_state, mode)       -> RouteMessage

A *slot* is one adapter a client trains in a round (FedRouter: 1; FedRouter*: one per local
cluster; FedDPA: global + local). `slots(env)` is fixed by the config, and the number of
participants P by `federation.clients_per_round`, so the round compiles once.

`client_update` is the same for every method: the method says which adapters each slot
starts from (`client_slots`), the shared trainer runs every slot of every participant in ONE
client-mapped call, and the method turns the trained slots into the client's new state and its
reply (`client_reply`). States and messages are frozen pytrees (`flax.struct.dataclass`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedrouter_jax.config import FedRouterConfig
from fedrouter_jax.lora import LoraStack, init_lora
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.tree_util import take_rows
from fedrouter_jax.training import step_settings


@dataclasses.dataclass(frozen=True)
class Env:
    """What every method function may read: the run's config and model shape. Static (hashable)."""

    config: FedRouterConfig  # the run's one config object (Run.cfg, RunData.cfg are this one)
    model_cfg: LlamaConfig
    n_clients: int

    @property
    def alpha(self) -> float:
        return float(self.config.lora.alpha)

    def new_adapters(self, key: jax.Array, n: int) -> dict:
        """`n` freshly initialised adapters (PEFT init), as the plain params dict of a stack."""
        lc = self.config.lora
        return init_lora(key, self.model_cfg, n, rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets)).params

    def stack(self, params: dict) -> LoraStack:
        return LoraStack(params=params, alpha=self.alpha)


@struct.dataclass
class ClientInputs:
    """A stack of clients' own data summaries (host numpy). True task labels are NOT here.

    client_id [C] int32; train_emb [C, N, D] float32 (zero rows past a client's data) with
    train_mask [C, N]; test_emb [C, M, D] with test_mask [C, M]: base-model embeddings of the
    raw task inputs. Optional (None unless the runner gives them): train_prompt [C, N, T] int32 /
    train_prompt_mask [C, N, T] bool and test_prompt / test_prompt_mask [C, M, T'] the left-padded
    generation prompts (BOS + prompt, no response) of the same samples; route_features: what a
    method's `route_features` computed from them for `client_route` (FedDPA: sim(x) [C, M]).
    """

    client_id: Any
    train_emb: Any
    train_mask: Any
    test_emb: Any
    test_mask: Any
    train_prompt: Any = None
    train_prompt_mask: Any = None
    test_prompt: Any = None
    test_prompt_mask: Any = None
    route_features: Any = None


@struct.dataclass
class Reply:
    """What participants send back after training. adapters: the method's payload (leaves
    [P, S, ...], or None); weight [P, S]: samples behind each slot (0 = slot not trained);
    loss / grad_norm [P, S, steps]; finite [P]: every loss, gradient and trained adapter finite."""

    adapters: Any
    weight: Any
    loss: Any
    grad_norm: Any
    finite: Any
    head_overflow: Any


@struct.dataclass
class RouteMessage:
    """Server -> clients for evaluation. adapters: the shared adapters [A, ...] (params dict or
    None); per_client: the method's per-client routing info, leaves [C, ...] (or None)."""

    adapters: Any
    per_client: Any
    shared: Any = None


@struct.dataclass
class Routing:
    """How a stack of clients serves its test samples. own: adapters each client holds itself,
    leaves [C, A_own, ...] (or None); ids [C, M]: index into [shared adapters | own adapters]
    (-1 = base model); optional blend per sample: the update is
    self_weight * adapter[ids] + mix_weight * adapter[mix_ids]; local_cluster [C, M]: the local
    cluster each sample was routed to (FedRouter; metrics only) or None."""

    own: Any
    ids: Any
    mix_ids: Any = None
    mix_weight: Any = None
    self_weight: Any = None
    local_cluster: Any = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A federated method: pure functions over frozen pytree state (see the module docstring).

    batch_stream(env, client, slot) -> int names the deterministic batch stream of a slot
    (`data.sample_round_batches` draws from `(seed, round, stream)`): a function of the client's
    own id and slot only, so a client samples its batches alone exactly as in the simulator.
    """

    name: str
    slots: Callable[[Env], int]
    client_setup: Callable
    client_pools: Callable
    client_slots: Callable  # (env, client_state, msg) -> (start [P, S, ...] params, frozen or None)
    client_reply: Callable  # (env, client_state, msg, trained [P, S, ...], reply) -> (client_state, reply)
    client_route: Callable
    server_setup: Callable
    server_plan: Callable
    server_aggregate: Callable
    server_route: Callable
    batch_stream: Callable = None  # (env, client, slot) -> int; None: client * slots + slot
    jit_aggregate: bool = True  # False: server_aggregate runs on the host (e.g. scipy clustering)
    log_plan: Callable = None  # msg -> JSON-able dict for metrics.jsonl (optional)
    # (env, base, client_state, inputs) -> inputs with route_features set; None: not needed
    route_features: Callable = None
    # (env, base, client_state, inputs) -> {name: array [C, ...]} or None: what the router compares
    # a NEW input with, from each client's own training data (FedDPA's dynamic mixing). The run
    # writes it after its last round (runner.Run.write_route_reference) and `export` copies it
    # into the bundle, so `predict` can route as `client_route` does; None: nothing needed
    route_reference: Callable = None
    description: str = ""
    # (key, class) of the method's own config section, a `fedrouter_jax.config.section`
    # dataclass read as `env.config.<key>` (YAML / --set: `<key>.field`); its optional
    # `problems(cfg) -> [messages]` runs only when this method is the one chosen
    config_section: tuple[str, type] | None = None

    def stream(self, env: Env, client, slot):
        if self.batch_stream is not None:
            return self.batch_stream(env, client, slot)
        return client * self.slots(env) + slot

    def client_update(self, env: Env, base: dict, client_state, msg, batches, pool_size, opt_state, keys, lr,
                      *, train_fn: Callable):
        """Trains every slot of every participant in ONE call and forms the replies.

        batches: `training.Batch` with leaves [P, S, steps, B, T]; pool_size [P, S]: samples in
        each slot's pool (0 = slot unused); opt_state [P, S, ...] or None (fresh AdamW from the
        start adapters); keys [P, 2]; lr: scalar. `train_fn(base, start, frozen, opt_state,
        batches, keys, lr)` is the client-mapped trainer (`training.train_slots`) over one slot
        axis [P*S, ...]. -> (client_state, Reply, opt_state [P, S, ...]).
        """
        start, frozen = self.client_slots(env, client_state, msg)
        p, s = jax.tree.leaves(start)[0].shape[:2]
        flat = lambda t: None if t is None else jax.tree.map(lambda x: x.reshape((p * s,) + x.shape[2:]), t)  # noqa: E731
        unflat = lambda t: jax.tree.map(lambda x: x.reshape((p, s) + x.shape[1:]), t)  # noqa: E731
        slot_keys = jax.vmap(lambda k: jax.random.split(k, s))(keys).reshape(p * s, -1)
        trained, opt_state, metrics = train_fn(base, env.stack(flat(start)), None if frozen is None else
                                               env.stack(flat(frozen)), flat(opt_state), flat(batches), slot_keys, lr,
                                               settings=step_settings(env.config.train, env.config.lora))
        trained, opt_state, metrics = unflat(trained.params), unflat(opt_state), unflat(metrics)
        finite = _all_finite_rows(metrics["loss"], metrics["grad_norm"], trained)
        reply = Reply(adapters=trained, weight=jnp.asarray(pool_size, jnp.float32), loss=metrics["loss"], grad_norm=metrics["grad_norm"],
                      finite=finite, head_overflow=metrics["head_overflow"])
        client_state, reply = self.client_reply(env, client_state, msg, trained, reply)
        return client_state, reply, opt_state


def _all_finite_rows(*trees) -> jax.Array:
    """[P] True where every leaf row (leading axis P) of every tree is free of NaN/Inf."""
    oks = [jnp.isfinite(x).reshape(x.shape[0], -1).all(axis=1) for t in trees for x in jax.tree.leaves(t)]
    return jnp.logical_and.reduce(jnp.stack(oks), axis=0)


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Makes `method` a `method:` choice (and its config section, if any, a config key)."""
    key, cls = method.config_section or (None, None)
    owners = [m.name for m in _REGISTRY.values() if m.name != method.name and m.config_section is not None
              and m.config_section[0] == key and m.config_section[1] is not cls]
    if owners:
        raise ValueError(f"method {method.name!r}: config section {key!r} is already {owners[0]!r}'s")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    from fedrouter_jax import algorithms  # noqa: F401  (imports populate the registry)

    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; valid methods are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available() -> list[str]:
    from fedrouter_jax import algorithms  # noqa: F401

    return sorted(_REGISTRY)


def config_sections() -> dict[str, type]:
    """{key: section class} of the registered methods' own config sections, in registration
    order (one entry for a section several methods share, like fedrouter / fedrouter_star)."""
    from fedrouter_jax import algorithms  # noqa: F401

    out: dict[str, type] = {}
    for m in _REGISTRY.values():
        if m.config_section is not None:
            out.setdefault(*m.config_section)
    return out


# ----------------------------------------------------------------------------- shared helpers


def pool_all(inputs_mask, n_slots: int = 1) -> np.ndarray:
    """Every slot trains on all of the client's samples: train_mask [P, N] -> [P, S, N]."""
    m = np.asarray(inputs_mask, bool)
    return np.repeat(m[:, None], n_slots, axis=1)


def same_init(env: Env, key: jax.Array, n: int) -> dict:
    """`n` copies of ONE freshly initialised adapter (every method starts from the same weights)."""
    one = env.new_adapters(key, 1)
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape[1:]), one)


rows = take_rows  # leading-axis indexing lives in tree_util (one implementation)
