"""The shape every federated method shares, so the runner, benchmarks and grid treat them alike.

A method is a small object of pure-ish functions over a state that is a plain nested dict of
arrays (checkpointable as is):

  init(ctx, key)                      -> state                 (before round 1)
  plan(ctx, state, round)             -> RoundPlan             (server: who trains what, from which weights)
  -- the runner trains every slot of the plan in ONE jitted client-mapped call --
  aggregate(ctx, state, plan, trained, round) -> state         (server: fold the trained slots back)
  route(ctx, state, mode)             -> EvalPlan              (which adapter serves each test sample)

A *slot* is one adapter trained by one client in a round (FedRouter: one per client;
FedRouter*: one per client-cluster pair). The slot count is fixed by the config so the round
step compiles once.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence

import jax
import numpy as np

from fedrouter_jax.lora import LoraStack, init_lora
from fedrouter_jax.models.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Context:
    """What a method may read. Built once per run by the runner; never mutated.

    train_sizes: [C]; train_emb / test_emb: per client [N_c, D] float32 base-model embeddings of
    the raw task inputs. True task labels are NOT here: no method may read them.
    """

    config: Any  # FedRouterConfig
    model_cfg: LlamaConfig
    n_clients: int
    train_sizes: np.ndarray
    train_emb: Sequence[np.ndarray]
    test_emb: Sequence[np.ndarray]

    @property
    def alpha(self) -> float:
        return float(self.config.lora.alpha)

    def new_adapters(self, key: jax.Array, n: int) -> dict:
        """`n` freshly initialised adapters (PEFT init), as the plain params dict of a stack."""
        lc = self.config.lora
        return init_lora(key, self.model_cfg, n, rank=lc.rank, alpha=lc.alpha, targets=tuple(lc.targets)).params

    def stack(self, params: dict) -> LoraStack:
        return LoraStack(params=params, alpha=self.alpha)


@dataclasses.dataclass
class RoundPlan:
    """Slots of one round. slot_client: [J]; pools: J index arrays into that client's train set;
    start: adapters [J, ...] to train from; frozen: optional [J, ...] adapters added but not
    trained; weights: [J] aggregation weights (samples); log: JSON-able description."""

    slot_client: np.ndarray
    pools: list
    start: LoraStack
    frozen: Optional[LoraStack] = None
    weights: Optional[np.ndarray] = None
    log: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalPlan:
    """adapters: [A, ...] stack (or None = base model); adapter_ids: per client [N_c] ints in
    [-1, A) (-1 = base). `mix`: optional extension for methods that blend two adapters per
    sample (FedDPA): per client `(other_ids [N_c], weight [N_c])` or
    `(other_ids [N_c], weight [N_c], self_weight [N_c])`, the sample's update being
    self_weight * adapters[ids] + weight * adapters[other_ids] (self_weight 1 if absent)."""

    adapters: Optional[LoraStack]
    adapter_ids: list
    mix: Optional[list] = None
    log: dict = dataclasses.field(default_factory=dict)


class Algorithm(Protocol):
    name: str

    def n_slots(self, ctx: Context) -> int: ...

    def init(self, ctx: Context, key: jax.Array) -> dict: ...

    def plan(self, ctx: Context, state: dict, round_idx: int) -> RoundPlan: ...

    def aggregate(self, ctx: Context, state: dict, plan: RoundPlan, trained: LoraStack, round_idx: int) -> dict: ...

    def route(self, ctx: Context, state: dict, mode: str) -> EvalPlan: ...


_REGISTRY: dict[str, type] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def get_algorithm(name: str) -> Algorithm:
    from fedrouter_jax import algorithms  # noqa: F401  (imports populate the registry)

    if name not in _REGISTRY:
        raise ValueError(f"method: unknown method {name!r}; valid methods are {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def available() -> list[str]:
    from fedrouter_jax import algorithms  # noqa: F401

    return sorted(_REGISTRY)
