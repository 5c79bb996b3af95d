"""Greedy batched generation with a KV cache, static shapes, mixed adapters per example.

Prompts are LEFT-padded `[B, P]` so every row's next token is written at the same cache slot;
RoPE positions count real tokens only, so padding does not shift them. The cache has a static
size `P + N` (N = max_new_tokens); a `while_loop` stops as soon as every row has emitted EOS.
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from fedrouter_jax.lora import LoraStack
from fedrouter_jax.models import llama
from fedrouter_jax.models.config import LlamaConfig


@partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "pad_id", "attention"))
def greedy_generate(
    params: dict,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    lora: Optional[LoraStack] = None,
    adapter_ids: Optional[jax.Array] = None,
    *,
    cfg: LlamaConfig,
    max_new_tokens: int,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
    attention: Optional[str] = None,
) -> tuple[jax.Array, jax.Array]:
    """Greedy continuation of left-padded prompts.

    prompt_tokens, prompt_mask: [B, P]; adapter_ids: [B] (with a stack) -> (tokens [B, N] int32
    with `pad_id` after EOS, lengths [B] = tokens before and excluding EOS). `attention`: the
    prompt's forward (`llama.transformer`; None = `FEDROUTER_ATTENTION`); decoding steps attend
    the cache densely.
    """
    b, p = prompt_tokens.shape
    n = max_new_tokens
    hidden, (k, v) = llama.transformer(
        params, prompt_tokens, prompt_mask, cfg=cfg, lora=lora, adapter_ids=adapter_ids, return_cache=True,
        attention=attention,
    )
    pad = [(0, 0), (0, 0), (0, n), (0, 0), (0, 0)]  # [L, B, S, K, hd]: room for N new tokens
    cache = (jnp.pad(k, pad), jnp.pad(v, pad))
    key_mask = jnp.concatenate([prompt_mask.astype(bool), jnp.zeros((b, n), bool)], axis=1)
    next_pos = prompt_mask.astype(jnp.int32).sum(axis=1)  # [B] position of the first new token
    first = jnp.argmax(llama.lm_head(params, hidden[:, -1], cfg), axis=-1).astype(jnp.int32)
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    is_eos = lambda t: (t[:, None] == eos[None, :]).any(axis=1)

    out = jnp.full((b, n), pad_id, jnp.int32)
    state = (0, first, jnp.zeros((b,), bool), out, jnp.zeros((b,), jnp.int32), cache, key_mask)

    def cond(s):
        i, _, done, *_ = s
        return (i < n) & ~done.all()

    def body(s):
        i, tok, done, out, lengths, cache, key_mask = s
        done = done | is_eos(tok)
        out = out.at[:, i].set(jnp.where(done, pad_id, tok))
        lengths = lengths + (~done).astype(jnp.int32)
        key_mask = key_mask.at[:, p + i].set(True)
        hidden, cache = llama.transformer(
            params, tok[:, None], jnp.ones((b, 1), bool), cfg=cfg, lora=lora, adapter_ids=adapter_ids,
            positions=(next_pos + i)[:, None], cache=cache, cache_index=p + i, key_mask=key_mask,
        )
        nxt = jnp.argmax(llama.lm_head(params, hidden[:, -1], cfg), axis=-1).astype(jnp.int32)
        return i + 1, nxt, done, out, lengths, cache, key_mask

    _, _, _, out, lengths, _, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths


def greedy_generate_uncached(params, prompt_tokens, prompt_mask, lora=None, adapter_ids=None, *, cfg, max_new_tokens):
    """Reference greedy decoding by full recomputation (no cache, no early stop): [B, N].
    Used to check the cached path; O(N) full forwards."""
    toks, mask = prompt_tokens, prompt_mask
    apply = jax.jit(partial(llama.apply, cfg=cfg))  # one compile per length; op-by-op is slower
    out = []
    for _ in range(max_new_tokens):
        logits = apply(params, toks, mask, lora=lora, adapter_ids=adapter_ids)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        out.append(nxt)
        toks = jnp.concatenate([toks, nxt[:, None]], axis=1)
        mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], axis=1)
    return jnp.stack(out, axis=1)
