"""Llama as pure functions over a plain parameter pytree (layers stacked, scanned).

Shape alphabet: B batch, T tokens, D width, L layers, V vocab, A adapters, R LoRA rank.
The parameter layout is in docs/CONVENTIONS.md. LoRA enters as a `LoraStack` that is either
  * a single adapter (leaves `[L, d_in, R]`), shared by the whole batch, or
  * a stack (leaves `[A, L, d_in, R]`) with `adapter_ids: [B]` choosing one per example
    (a per-example gather inside the jitted call; id -1 = base model alone).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

from fedrouter_jax.lora import LoraStack
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.models.layers import (SEQ_LENGTH_IMPLS, apply_rope, attention_bias, attention_by_lengths,
                                         attention_impl, real_tokens_first, rms_norm, rope_cos_sin, rope_inv_freq,
                                         swiglu)
from fedrouter_jax.models.layers import attention as dense_attention



def param_shapes(cfg: LlamaConfig) -> dict:
    """The parameter tree's shapes (see docs/CONVENTIONS.md)."""
    d, f, n, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {
        "embed": (v, d),
        "layers": {
            "attn_norm": (n, d), "q_proj": (n, d, q), "k_proj": (n, d, kv), "v_proj": (n, d, kv),
            "o_proj": (n, q, d), "mlp_norm": (n, d), "gate_proj": (n, d, f), "up_proj": (n, d, f),
            "down_proj": (n, f, d),
        },
        "final_norm": (d,),
    }
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def init_params(key: jax.Array, cfg: LlamaConfig, dtype=jnp.float32, std: float = 0.02) -> dict:
    """Random base weights (normal(0, std) matrices, unit norms), as HF initialises Llama."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, shape, path in zip(keys, leaves, paths):
        if "norm" in path:
            out.append(jnp.ones(shape, dtype))
        else:
            out.append((std * jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    return jax.tree.unflatten(treedef, out)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Position of each token among the real tokens of its row: `[B, T]` (0 on left padding)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def _lora_layers(lora: Optional[LoraStack], adapter_ids: Optional[jax.Array]):
    """Per-layer LoRA factors for the scan and how to apply them.

    Returns (xs, gate): xs leaves `[L, d_in, R]` (shared) or `[L, B, d_in, R]` (per example);
    gate `[B]` float zeroes the update of examples routed to the base (id -1), or None.
    """
    if lora is None:
        return None, None
    ndim = next(iter(lora.params.values()))["a"].ndim
    if ndim == 3:
        if adapter_ids is not None:
            raise ValueError("adapter_ids given with a single adapter; pass a stack [A, ...]")
        return lora.params, None
    if adapter_ids is None:
        if lora.n_adapters != 1:
            raise ValueError(
                f"a stack of {lora.n_adapters} adapters needs adapter_ids [batch] to pick one per example"
            )
        return jax.tree.map(lambda x: x[0], lora.params), None
    ids = jnp.asarray(adapter_ids, jnp.int32)
    picked = jax.tree.map(lambda x: jnp.moveaxis(x[jnp.maximum(ids, 0)], 1, 0), lora.params)
    return picked, (ids >= 0).astype(jnp.float32)


@jax.custom_vjp
def _lora_delta(h, a, b):
    """`(h @ a) @ b` in h's dtype for h: [..., d_in], a: [d_in, R], b: [R, d_out] (one adapter).

    a, b keep their own dtype (float32 in training) and are cast to h's inside, so with a bf16
    base the products run in bf16 while the gradients of a and b come back float32, summed over
    the tokens in float32."""
    return (h @ a.astype(h.dtype)) @ b.astype(h.dtype)


def _lora_delta_fwd(h, a, b):
    u = h @ a.astype(h.dtype)
    return u @ b.astype(h.dtype), (h, a, b, u)


def _lora_delta_bwd(res, g):
    """The weight gradients are written as `(small^T @ big)^T`: contracting the token axis with
    the large activation (h or g) as the right operand in its stored layout, so XLA transposes
    only the [tokens, R] operand, never a [tokens, d] activation (autodiff's `h^T @ gu` made
    XLA:CPU copy-transpose h and g for every target of every layer)."""
    h, a, b, u = res
    gu = g @ b.astype(h.dtype).T  # [..., R]
    dh = gu @ a.astype(h.dtype).T
    hf, gf = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
    uf, guf = u.reshape(-1, u.shape[-1]), gu.reshape(-1, gu.shape[-1])
    da = jnp.einsum("tr,ti->ri", guf, hf, preferred_element_type=jnp.float32).T
    db = jnp.einsum("tr,to->ro", uf, gf, preferred_element_type=jnp.float32)
    return dh, da.astype(a.dtype), db.astype(b.dtype)


_lora_delta.defvjp(_lora_delta_fwd, _lora_delta_bwd)


@jax.custom_vjp
def _merged_lora_project(h, w, a, b, scale):
    """`h @ (w + scale a b)` for h: [..., d_in], w: [d_in, d_out], a: [d_in, R], b: [R, d_out]."""
    return h @ (w + scale * (a @ b))


def _merged_lora_project_fwd(h, w, a, b, scale):
    return _merged_lora_project(h, w, a, b, scale), (h, w, a, b, scale)


def _merged_lora_project_bwd(res, g):
    """Gradients without the d_in x d_out weight gradient: `dh = g (w + s a b)^T` is one dot,
    da = s h^T (g b^T) and db = s (h a)^T g contract the token axis against rank-R operands
    (written as `(small^T @ big)^T`, as in `_lora_delta_bwd`). The base `w` gets no cotangent."""
    h, w, a, b, scale = res
    dh = g @ (w + scale * (a @ b)).T
    hf, gf = h.reshape(-1, h.shape[-1]), g.reshape(-1, g.shape[-1])
    gb = gf @ b.T  # [tokens, R]
    u = hf @ a  # [tokens, R]
    da = scale * jnp.einsum("tr,ti->ri", gb, hf).T
    db = scale * jnp.einsum("tr,to->ro", u, gf)
    return dh, None, da.astype(a.dtype), db.astype(b.dtype), None


_merged_lora_project.defvjp(_merged_lora_project_fwd, _merged_lora_project_bwd)


# Merge an adapter into the weight when it sees at least this many tokens per input feature.
MERGE_MIN_TOKENS_PER_D_IN = 4


def _merge_lora(h: jax.Array, w: jax.Array) -> bool:
    """Fold a single adapter into the weight (`h @ (w + s a b)`) instead of adding `s (h a) b`?

    Merging replaces two token-sized, memory-bound passes per direction (the rank-R product's
    [tokens, d_out] output and its add) by a d_in x R x d_out product, and gives each adapter its
    own weight, so clients vmapped together no longer share one weight operand. It pays when an
    adapter sees many tokens per input feature and loses when few tokens meet many vmapped
    clients' weights; hence the threshold (docs/DESIGN.md).
    Only for float32 weights: in bf16 the sum `w + s a b` would round the small update away.
    """
    tokens = h.size // h.shape[-1]
    return w.dtype == jnp.float32 and tokens >= MERGE_MIN_TOKENS_PER_D_IN * w.shape[0]


_TARGET_ID = {n: i for i, n in enumerate(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))}


def _lora_input_dropout(h, name, drop):
    """PEFT's `lora_dropout(x)`: inverted dropout of the adapter's input (the base path keeps h).
    drop: (rate, key of this layer) or None; each target draws its own mask."""
    if drop is None:
        return h
    rate, key = drop
    keep = jax.random.bernoulli(jax.random.fold_in(key, _TARGET_ID[name]), 1.0 - rate, h.shape)
    return jnp.where(keep, h / (1.0 - rate), 0).astype(h.dtype)


def _project(h, w, lora_layer, name, scale, gate, drop=None):
    """`h: [B, T, d_in]` @ `w: [d_in, d_out]` plus the LoRA update of target `name` if any
    (computed on `_lora_input_dropout(h)` when `drop` is given: training only, never merged)."""
    if lora_layer is None or name not in lora_layer:
        return h @ w
    a, b = lora_layer[name]["a"], lora_layer[name]["b"]
    if a.ndim == 2 and drop is None and _merge_lora(h, w):
        return _merged_lora_project(h, w, a.astype(w.dtype), b.astype(w.dtype), jnp.asarray(scale, w.dtype))
    y = h @ w
    h = _lora_input_dropout(h, name, drop)
    if a.ndim == 2:  # one adapter for the whole batch
        delta = _lora_delta(h, a, b)
    else:  # a: [B, d_in, R], b: [B, R, d_out]
        delta = jnp.einsum("btr,bro->bto", jnp.einsum("btd,bdr->btr", h, a.astype(h.dtype)), b.astype(h.dtype))
        delta = delta * gate.astype(h.dtype)[:, None, None]
    return y + (scale * delta).astype(y.dtype)


def _block(cfg, x, layer, lora_layer, scale, gate, cos, sin, attend, cache=None, cache_index=None, drop=None):
    """One decoder layer. x: [B, T, D]; attend: (q [B, T, H, hd], k, v [B, S, K, hd]) -> [B, T, H, hd]
    with the forward's mask applied; cache: (k, v) each [B, S, K, hd] written at cache_index;
    drop: (rate, key) of LoRA dropout in this layer, or None."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    proj = lambda h, name: _project(h, layer[name], lora_layer, name, scale, gate, drop)
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    q = apply_rope(proj(h, "q_proj").reshape(b, t, cfg.num_attention_heads, hd), cos, sin)
    k = apply_rope(proj(h, "k_proj").reshape(b, t, cfg.num_key_value_heads, hd), cos, sin)
    v = proj(h, "v_proj").reshape(b, t, cfg.num_key_value_heads, hd)
    if cache is not None:
        k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), cache_index, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), cache_index, axis=1)
    o = attend(q, k, v).reshape(b, t, cfg.num_attention_heads * hd)
    x = x + proj(o, "o_proj")
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    x = x + proj(swiglu(proj(h, "gate_proj"), proj(h, "up_proj")), "down_proj")
    return x, (k, v)


LAYER_LOOPS = ("auto", "scan", "unroll")


def unroll_layers(layer_loop: str = "auto") -> bool:
    """Run the layers as a Python loop instead of a `lax.scan`? "auto": unrolled on CPU.

    This pays when the layers are differentiated (training): autodiff of a scan stacks every
    layer's residuals into `[L, ...]` buffers, which XLA:CPU zero-fills each step, copies each
    residual into (`dynamic-update-slice`) and back out of in the backward pass
    (`dynamic-slice`): memory-bound passes over every activation the backward needs
    (docs/DESIGN.md). Unrolled, each residual
    stays in the buffer that produced it. A forward-only pass stacks nothing, so inference keeps
    the scan (`transformer`'s default), and accelerators keep it too: there these copies are
    cheap next to the matmuls, and the program (compile time) stays one layer long.
    """
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop must be one of {LAYER_LOOPS}, got {layer_loop!r}")
    if layer_loop == "auto":
        return jax.default_backend() == "cpu"
    return layer_loop == "unroll"


def rope_tables(mask: jax.Array, cfg: LlamaConfig, positions: Optional[jax.Array] = None) -> tuple:
    """RoPE's (cos, sin), each `[B, T, hd]` float32, at `positions` (default: from `mask [B, T]`)."""
    if positions is None:
        positions = positions_from_mask(mask)
    return rope_cos_sin(positions, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict))


def transformer(
    params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    cfg: LlamaConfig,
    lora: Optional[LoraStack] = None,
    adapter_ids: Optional[jax.Array] = None,
    positions: Optional[jax.Array] = None,
    cache: Optional[tuple] = None,
    cache_index: Optional[jax.Array] = None,
    key_mask: Optional[jax.Array] = None,
    return_cache: bool = False,
    remat: bool = False,
    layer_loop: str = "scan",
    rope: Optional[tuple] = None,
    attention: Optional[str] = None,
    lora_dropout: Optional[tuple] = None,
):
    """Final-normed hidden states `[B, T, D]` (and the kv cache `[L, B, S, K, hd]` x2 if asked).

    tokens, mask: [B, T]. Without a cache, query t attends key s iff s <= t and mask[s].
    With a cache (decoding), the T new tokens are written at `cache_index` and attend the
    cache's keys s <= cache_index + t with `key_mask[B, S]` set.
    `layer_loop`: "scan" (`lax.scan` over the stacked layers), "unroll" (a Python loop: one copy
    of the layer per layer in the program) or "auto" (`unroll_layers`: unrolled on CPU). The
    same function up to float32 rounding (XLA fuses the unrolled program differently); training
    uses "auto", inference the scan. `rope`: this batch's `rope_tables` computed by the caller
    (see `training.local_steps`); None computes them here.
    `attention`: `layers.ATTENTION_IMPLS` (None: `FEDROUTER_ATTENTION`, default auto). On the
    sequence-length paths (cuDNN flash attention) each row's real tokens are moved in front of
    its padding first (`layers.real_tokens_first`) and the outputs moved back: same function, no
    [T, S] mask. Outputs at padded positions are unspecified on every path.
    `lora_dropout`: (rate, key) for training: dropout on every adapter's input (a mask per
    layer and target, `_lora_input_dropout`); None (evaluation) = no dropout.
    """
    cos, sin = rope_tables(mask, cfg, positions) if rope is None else rope
    t = tokens.shape[1]
    impl = attention_impl(attention, params["embed"].dtype, cfg.head_dim, decoding=cache is not None)
    dest = None
    if impl == "dense":
        if cache is None:
            q_idx, k_idx, kmask = jnp.arange(t), jnp.arange(t), mask
        else:
            s = cache[0].shape[2]
            q_idx, k_idx, kmask = cache_index + jnp.arange(t), jnp.arange(s), key_mask
        bias = attention_bias((k_idx[None, None, :] <= q_idx[None, :, None]) & kmask[:, None, :].astype(bool))
        attend = lambda q, k, v: dense_attention(q, k, v, bias)  # noqa: E731
    else:
        order, dest, lengths = real_tokens_first(mask)
        tokens = jnp.take_along_axis(tokens, order, axis=1)
        cos, sin = (jnp.take_along_axis(c, order[..., None], axis=1) for c in (cos, sin))
        attend = partial(attention_by_lengths, lengths=lengths, implementation=SEQ_LENGTH_IMPLS[impl])

    x = params["embed"][tokens]
    lora_xs, gate = _lora_layers(lora, adapter_ids)
    scale = lora.scale if lora is not None else 0.0

    rate, drop_keys = (None, None) if lora_dropout is None else (
        lora_dropout[0], jax.random.split(lora_dropout[1], cfg.num_hidden_layers))

    def body(x, xs):
        layer, lora_layer, layer_cache, drop_key = xs
        drop = None if drop_key is None else (rate, drop_key)
        x, kv = _block(cfg, x, layer, lora_layer, scale, gate, cos, sin, attend, layer_cache, cache_index, drop)
        return x, (kv if (return_cache or cache is not None) else None)

    if remat:
        body = jax.checkpoint(body)
    xs = (params["layers"], lora_xs, cache, drop_keys)
    if unroll_layers(layer_loop):
        kvs = []
        for i in range(cfg.num_hidden_layers):
            x, kv_i = body(x, jax.tree.map(lambda a: a[i], xs))
            kvs.append(kv_i)
        kv = None if kvs[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *kvs)
    else:
        x, kv = jax.lax.scan(body, x, xs)
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    if dest is not None:  # back to the caller's token order (kv: [L, B, S, K, hd])
        x = jnp.take_along_axis(x, dest[..., None], axis=1)
        if kv is not None:
            kv = jax.tree.map(lambda a: jnp.take_along_axis(a, dest[None, :, :, None, None], axis=2), kv)
    return (x, kv) if (return_cache or cache is not None) else x


def lm_head(params: dict, hidden: jax.Array, cfg: LlamaConfig) -> jax.Array:
    """`hidden: [..., D]` -> float32 logits `[..., V]` (tied embeddings reuse `embed`)."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.matmul(hidden, w, preferred_element_type=jnp.float32)


def apply(
    params: dict,
    tokens: jax.Array,
    mask: jax.Array,
    *,
    cfg: LlamaConfig,
    lora: Optional[LoraStack] = None,
    adapter_ids: Optional[jax.Array] = None,
    remat: bool = False,
    layer_loop: str = "scan",
    rope: Optional[tuple] = None,
    attention: Optional[str] = None,
    lora_dropout: Optional[tuple] = None,
) -> jax.Array:
    """Logits `[B, T, V]` (float32) for `tokens, mask: [B, T]` (other arguments: `transformer`)."""
    hidden = transformer(params, tokens, mask, cfg=cfg, lora=lora, adapter_ids=adapter_ids, remat=remat,
                         layer_loop=layer_loop, rope=rope, attention=attention, lora_dropout=lora_dropout)
    return lm_head(params, hidden, cfg)


def mean_pooled_embedding(params: dict, tokens: jax.Array, mask: jax.Array, *, cfg: LlamaConfig) -> jax.Array:
    """Padding-aware mean of the final-normed last hidden state: `[B, T] -> [B, D]` float32.

    No L2 normalisation (as the FedRouter authors' code): K-Means then sees raw Euclidean geometry.
    """
    hidden = transformer(params, tokens, mask, cfg=cfg).astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)
