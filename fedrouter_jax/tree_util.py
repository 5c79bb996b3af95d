"""Pytree math over the leading client/adapter axis: weighted means and segment reductions."""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


def weighted_mean(tree, weights: jax.Array):
    """Weighted mean over the leading axis: leaves [C, ...], weights [C] -> leaves [...]."""
    w = jnp.asarray(weights, jnp.float32)
    w = w / jnp.maximum(w.sum(), 1e-12)
    return jax.tree.map(lambda x: jnp.tensordot(w, x.astype(jnp.float32), axes=1).astype(x.dtype), tree)


@partial(jax.jit, static_argnames=("num_segments",))
def segment_weighted_mean(tree, segment_ids: jax.Array, weights: jax.Array, previous, *, num_segments: int):
    """Per-segment weighted mean of a stack, keeping `previous` where a segment got nothing.

    tree: leaves [J, ...] (e.g. the adapters trained this round); segment_ids: [J] int in
    [0, num_segments) (e.g. the global cluster of each), or -1 to ignore; weights: [J] (samples);
    previous: leaves [G, ...] -> leaves [G, ...].
    """
    w = jnp.where(segment_ids >= 0, jnp.asarray(weights, jnp.float32), 0.0)
    seg = jnp.maximum(segment_ids, 0)
    total = jax.ops.segment_sum(w, seg, num_segments=num_segments)  # [G]

    def mean(x, prev):
        s = jax.ops.segment_sum(x.astype(jnp.float32) * w.reshape((-1,) + (1,) * (x.ndim - 1)), seg,
                                num_segments=num_segments)
        m = s / jnp.maximum(total, 1e-12).reshape((-1,) + (1,) * (x.ndim - 1))
        has = (total > 0).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(has, m, prev.astype(jnp.float32)).astype(prev.dtype)

    return jax.tree.map(mean, tree, previous)


def take_rows(tree, index):
    """Leaves[index] along the leading axis (index: int array)."""
    return jax.tree.map(lambda x: x[index], tree)

