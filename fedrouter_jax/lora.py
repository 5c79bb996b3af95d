"""Stacked LoRA adapters: a pytree whose leaves carry a leading adapter axis.

`LoraStack.params = {target: {"a": [A, L, d_in, R], "b": [A, L, R, d_out]}}` and the update of
a target projection is `delta = (alpha / R) * x @ a @ b`. A *single* adapter (what one client
trains) is the same structure without the A axis: leaves `[L, d_in, R]` / `[L, R, d_out]`.

The adapter axis is the client axis during training (one adapter per client, `vmap`ped) and
the routing axis at evaluation (`adapter_ids[b]` picks the adapter of example b).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from fedrouter_jax.models.config import LlamaConfig

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@struct.dataclass
class LoraStack:
    """LoRA factors (trainable leaves) plus the static `alpha` (not a leaf, never trained)."""

    params: dict
    alpha: float = struct.field(pytree_node=False, default=16.0)

    @property
    def rank(self) -> int:
        return next(iter(self.params.values()))["a"].shape[-1]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def n_adapters(self) -> int:
        """Size of the leading adapter axis (only meaningful for a stack)."""
        return next(iter(self.params.values()))["a"].shape[0]


def target_dims(cfg: LlamaConfig, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    dims = {
        "q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
        "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d),
    }
    if target not in dims:
        raise ValueError(f"lora.targets: unknown target {target!r}; valid targets are {TARGETS}")
    return dims[target]


def init_lora(
    key: jax.Array,
    cfg: LlamaConfig,
    n_adapters: int,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = ("q_proj", "v_proj"),
) -> LoraStack:
    """PEFT's initialisation: A ~ kaiming_uniform(a=sqrt(5)) = U(±1/sqrt(d_in)), B = 0.

    Returns leaves `a: [A, L, d_in, R]` (float32), `b: [A, L, R, d_out]`.
    """
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    params = {}
    keys = jax.random.split(key, len(targets))
    for k, target in zip(keys, targets):
        d_in, d_out = target_dims(cfg, target)
        bound = 1.0 / (d_in**0.5)
        a = jax.random.uniform(
            k, (n_adapters, cfg.num_hidden_layers, d_in, rank), jnp.float32, -bound, bound
        )
        b = jnp.zeros((n_adapters, cfg.num_hidden_layers, rank, d_out), jnp.float32)
        params[target] = {"a": a, "b": b}
    return LoraStack(params=params, alpha=float(alpha))


def take(stack: LoraStack, index) -> LoraStack:
    """Adapter(s) `index` of a stack: an int gives a single adapter, a slice a smaller stack."""
    return jax.tree.map(lambda x: x[index], stack)


def stack_adapters(adapters: Sequence[LoraStack]) -> LoraStack:
    """Stack single adapters into a `[A, ...]` stack."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def broadcast(single: LoraStack, n: int) -> LoraStack:
    """`n` copies of one adapter as a stack."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + x.shape), single)


def delta_weight(single: LoraStack, target: str) -> jax.Array:
    """Dense update `[L, d_in, d_out]` of one target (for merging or checks)."""
    p = single.params[target]
    return single.scale * jnp.einsum("lir,lro->lio", p["a"], p["b"])
