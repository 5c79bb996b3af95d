"""Routed evaluation: generate every client's test answers with the adapter its router picked.

Two batchings of the same routing (paper 3.3: "each adapter is set once"):
  * "grouped" (default): samples of all clients are grouped by adapter; each group runs in
    fixed-size batches with that ONE adapter (no per-example gather);
  * "mixed": fixed-size batches in sample order, each example gathering its own adapter
    inside the jitted call (`adapter_ids`), also the path for per-sample blends (FedDPA).
Batches are padded to `batch_size` rows so each path compiles once.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.lora import LoraStack, take
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.models.generate import greedy_generate


@dataclasses.dataclass
class EvalPlan:
    """Which adapter serves each test sample, per client.

    adapters: [A, ...] stack (None = base model); adapter_ids: per client [N_c] ints in [-1, A)
    (-1 = base). Optional per-sample blend (FedDPA): per client mix_ids [N_c], mix_weight [N_c],
    self_weight [N_c], the sample's update being
    self_weight * adapters[adapter_ids] + mix_weight * adapters[mix_ids].
    local_cluster: per client [N_c] local cluster of each sample (FedRouter; metrics only).
    """

    adapters: Optional[LoraStack]
    adapter_ids: list
    mix_ids: Optional[list] = None
    mix_weight: Optional[list] = None
    self_weight: Optional[list] = None
    local_cluster: Optional[list] = None


@jax.jit
def blend_per_sample(stack: LoraStack, ids, other_ids, weight, self_weight=None) -> LoraStack:
    """Per-row adapters `self_weight[b] * stack[ids[b]] + weight[b] * stack[other_ids[b]]` as a
    [B, ...] stack, by concatenating ranks (ids/other_ids -1 contribute nothing; self_weight
    None = 1)."""
    def pick(x, idx, w):
        sel = x[jnp.maximum(idx, 0)]
        return sel * ((idx >= 0) * w).reshape((-1,) + (1,) * (sel.ndim - 1)).astype(sel.dtype)

    params = {}
    ones = jnp.ones_like(weight)
    first = ones if self_weight is None else self_weight
    for t, p in stack.params.items():
        params[t] = {
            "a": jnp.concatenate([pick(p["a"], ids, ones), pick(p["a"], other_ids, ones)], axis=-1),
            "b": jnp.concatenate([pick(p["b"], ids, first), pick(p["b"], other_ids, weight)], axis=-2),
        }
    return LoraStack(params=params, alpha=stack.alpha * 2)  # rank doubled: keep alpha / R


def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield np.arange(s, min(n, s + batch_size))


def _pad_rows(x: np.ndarray, batch_size: int) -> np.ndarray:
    k = x.shape[0]
    if k == batch_size:
        return x
    return np.concatenate([x, np.repeat(x[:1], batch_size - k, axis=0)], axis=0)


def generate_routed(
    base: dict,
    model_cfg: LlamaConfig,
    plan: EvalPlan,
    prompts: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    batching: str = "grouped",
    batch_size: int = 64,
    max_new_tokens: int = 32,
    eos_ids: tuple = (),
    pad_id: int = 0,
    progress=None,
) -> list[list[np.ndarray]]:
    """Greedy answers for every client's test prompts.

    prompts: per client (tokens [N_c, P], mask [N_c, P]) left-padded.
    -> per client, a list of N_c int arrays (generated tokens without EOS/padding).
    """
    tokens = np.concatenate([p[0] for p in prompts])
    mask = np.concatenate([p[1] for p in prompts])
    ids = np.concatenate([np.asarray(i, np.int32) for i in plan.adapter_ids])
    n = tokens.shape[0]
    out_tok = np.zeros((n, max_new_tokens), np.int32)
    out_len = np.zeros((n,), np.int32)
    gen = partial(greedy_generate, cfg=model_cfg, max_new_tokens=max_new_tokens, eos_ids=tuple(eos_ids), pad_id=pad_id)

    def run(rows, lora, row_ids):
        t, m = _pad_rows(tokens[rows], batch_size), _pad_rows(mask[rows], batch_size)
        a_ids = None if row_ids is None else jnp.asarray(_pad_rows(row_ids, batch_size))
        toks, lens = gen(base, jnp.asarray(t), jnp.asarray(m), lora, a_ids)
        out_tok[rows] = np.asarray(toks)[: len(rows)]
        out_len[rows] = np.asarray(lens)[: len(rows)]
        if progress is not None:
            progress(len(rows))

    blend = plan.mix_ids is not None
    if blend or batching == "mixed":
        if blend:
            other = np.concatenate([np.asarray(m, np.int32) for m in plan.mix_ids])
            weight = np.concatenate([np.asarray(w, np.float32) for w in plan.mix_weight])
            self_w = (np.ones_like(weight) if plan.self_weight is None else
                      np.concatenate([np.asarray(w, np.float32) for w in plan.self_weight]))
        for rows in _batches(n, batch_size):
            if plan.adapters is None:
                run(rows, None, None)
            elif blend:
                r = _pad_rows(rows, batch_size)
                lora = blend_per_sample(plan.adapters, jnp.asarray(ids[r]), jnp.asarray(other[r]),
                                        jnp.asarray(weight[r]), jnp.asarray(self_w[r]))
                run(rows, lora, np.arange(len(rows), dtype=np.int32))
            else:
                run(rows, plan.adapters, ids[rows])
    elif batching == "grouped":
        for a in np.unique(ids):
            group = np.flatnonzero(ids == a)
            lora = None if (a < 0 or plan.adapters is None) else take(plan.adapters, int(a))
            for chunk in _batches(group.size, batch_size):
                run(group[chunk], lora, None)
    else:
        raise ValueError(f"eval.batching: unknown value {batching!r}; valid: 'grouped', 'mixed'")

    result, start = [], 0
    for p in prompts:
        k = p[0].shape[0]
        result.append([out_tok[i, : out_len[i]] for i in range(start, start + k)])
        start += k
    return result
