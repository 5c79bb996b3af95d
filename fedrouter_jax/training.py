"""LoRA training: response-only causal-LM loss, one AdamW step, K local steps, C clients at once.

Shape alphabet: C clients (or client-adapter pairs), S local steps, B batch, T tokens.
The base parameters are an argument of every function but are never differentiated and never
enter optimizer state; under the client `vmap` they are broadcast (`in_axes=None`), held once.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from fedrouter_jax.lora import LoraStack
from fedrouter_jax.models import llama
from fedrouter_jax.models.config import LlamaConfig


class Batch(NamedTuple):
    """tokens: [..., B, T] int32; mask: [..., B, T] bool; loss_mask: [..., B, T] bool."""

    tokens: jax.Array
    mask: jax.Array
    loss_mask: jax.Array


def make_optimizer(weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW whose learning rate lives in the optimizer state (`inject_hyperparams`), so a
    per-round schedule changes a value, not the compiled program. HF/PyTorch defaults for betas
    and eps; weight decay 0 as in HF `TrainingArguments` (what OpenFedLLM-based code uses)."""
    return optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay
    )


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The training step's settings from the config (hashable: a static argument of the round).

    adam_b1 / adam_b2 / adam_eps: written into the AdamW state each round (`set_hyperparams`),
    as the learning rate is, so they hold whatever optimizer object the caller built.
    max_grad_norm: the gradient is clipped to this global norm before AdamW
    (`optax.clip_by_global_norm`, what HF Trainer's `clip_grad_norm_` does); 0 = off.
    lora_dropout: dropout rate on each adapter's input while training (`llama.transformer`);
    0 = off. None of these exist at evaluation.
    """

    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 0.0
    lora_dropout: float = 0.0


def step_settings(train_cfg, lora_cfg) -> StepSettings:
    """StepSettings of a run: `train.adam_*`, `train.max_grad_norm`, `lora.dropout`."""
    return StepSettings(float(train_cfg.adam_b1), float(train_cfg.adam_b2), float(train_cfg.adam_eps),
                        float(train_cfg.max_grad_norm), float(lora_cfg.dropout))


def set_hyperparams(opt_state, settings: StepSettings) -> optax.OptState:
    """`opt_state` with AdamW's b1, b2 and eps from `settings` (works on stacked states)."""
    hp = dict(opt_state.hyperparams)
    for name, value in (("b1", settings.adam_b1), ("b2", settings.adam_b2), ("eps", settings.adam_eps)):
        hp[name] = jnp.broadcast_to(jnp.asarray(value, hp[name].dtype), jnp.shape(hp[name]))
    return opt_state._replace(hyperparams=hp)


def clip_by_global_norm(grads, max_norm: float):
    """`grads` scaled to global norm `max_norm` where larger (`optax.clip_by_global_norm`); 0 = as is."""
    if not max_norm:
        return grads
    clipped, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    return clipped


def set_learning_rate(opt_state, lr) -> optax.OptState:
    """Return `opt_state` with its injected learning rate replaced (works on stacked states)."""
    hp = dict(opt_state.hyperparams)
    hp["learning_rate"] = jnp.broadcast_to(jnp.asarray(lr, jnp.float32), jnp.shape(hp["learning_rate"]))
    return opt_state._replace(hyperparams=hp)


def with_frozen(trainable: LoraStack, frozen: Optional[LoraStack], frozen_weight=1.0) -> LoraStack:
    """One adapter whose update is `u * trainable + frozen_weight * frozen`, by concatenating ranks.

    `x a1 b1 + x a2 b2 = x [a1|a2] [b1;b2]`, and `stop_gradient` keeps the frozen half out of the
    gradient. Used by methods that train a local adapter on top of a fixed global one (FedDPA).
    Both must share alpha and rank (so the common `alpha / R` scale stays right). u is 1, or the
    frozen target's optional leaf "trainable_weight" (a scalar per adapter): a weight of the
    trained adapter INSIDE the forward (FedDPA's reference trains `0.5 L + 0.5 sg(G)`), so its
    gradient is u times that of the plain adapter.
    """
    if frozen is None:
        return trainable
    w = jnp.asarray(frozen_weight, jnp.float32)
    merged = {}
    for t, p in trainable.params.items():
        f = jax.tree.map(jax.lax.stop_gradient, frozen.params[t])
        own_b = p["b"] if "trainable_weight" not in f else f["trainable_weight"] * p["b"]
        merged[t] = {
            "a": jnp.concatenate([p["a"], f["a"]], axis=-1),
            "b": jnp.concatenate([own_b, w * f["b"]], axis=-2),
        }
    # rank doubles, so halve alpha to keep each half's scale at alpha / R
    return LoraStack(params=merged, alpha=trainable.alpha * 2)


def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] in float32: logits [..., V], targets [...] -> [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def response_loss(logits: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """Mean cross-entropy over response tokens: logits [B, T, V] -> (loss [], n_tokens [])."""
    nll = _token_nll(logits[:, :-1], batch.tokens[:, 1:])
    w = batch.loss_mask[:, 1:].astype(jnp.float32)
    n = w.sum()
    return (nll * w).sum() / jnp.maximum(n, 1.0), n


def response_loss_on_loss_tokens(base: dict, hidden: jax.Array, batch: Batch, cfg: LlamaConfig,
                                 head_tokens: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`response_loss` with the LM head and softmax computed only where a loss is taken.

    hidden: [B, T, D] final-normed states. The (at most `head_tokens`) positions t whose next
    token is a response token are gathered into `[head_tokens, D]` before the head, so prompt
    and padding positions cost no `D x V` matmul and no V-wide softmax (the head's gradient is a
    scatter-add back). Returns (loss, n_tokens, overflow): `overflow` counts loss tokens beyond
    `head_tokens` (left out of the loss); callers must size `head_tokens` so it is 0, and the
    runner checks it every round.
    """
    w = batch.loss_mask[:, 1:].reshape(-1)
    n = w.sum()
    idx = jnp.nonzero(w, size=head_tokens, fill_value=0)[0]  # [head_tokens] flat positions
    valid = (jnp.arange(head_tokens) < n).astype(jnp.float32)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])[idx]
    targets = batch.tokens[:, 1:].reshape(-1)[idx]
    nll = _token_nll(llama.lm_head(base, h, cfg), targets)
    used = valid.sum()
    return (nll * valid).sum() / jnp.maximum(used, 1.0), n.astype(jnp.float32), n - used.astype(n.dtype)


def lora_loss(lora: LoraStack, base: dict, batch: Batch, cfg: LlamaConfig, frozen=None, remat=False,
              head_tokens: Optional[int] = None, layer_loop: str = "auto", rope=None, dropout=None):
    """(loss, (n_tokens, overflow)). `head_tokens`: see `response_loss_on_loss_tokens`; None
    computes the head on all B x T positions. `layer_loop`: see `llama.unroll_layers`.
    `rope`: the batch's precomputed `llama.rope_tables` (None: computed in the forward).
    `dropout`: (rate, key) of LoRA dropout (`llama.transformer`), or None."""
    lora = with_frozen(lora, frozen)
    run = dict(cfg=cfg, lora=lora, remat=remat, layer_loop=layer_loop, rope=rope, lora_dropout=dropout)
    if head_tokens is None:
        loss, n = response_loss(llama.apply(base, batch.tokens, batch.mask, **run), batch)
        return loss, (n, jnp.zeros((), jnp.int32))
    hidden = llama.transformer(base, batch.tokens, batch.mask, **run)
    loss, n, overflow = response_loss_on_loss_tokens(base, hidden, batch, cfg, head_tokens)
    return loss, (n, overflow.astype(jnp.int32))


def lora_train_step(
    base: dict,
    lora: LoraStack,
    opt_state: optax.OptState,
    batch: Batch,
    key: jax.Array,
    *,
    cfg: LlamaConfig,
    optimizer: optax.GradientTransformation,
    frozen: Optional[LoraStack] = None,
    remat: bool = False,
    head_tokens: Optional[int] = None,
    layer_loop: str = "auto",
    rope=None,
    settings: StepSettings = StepSettings(),
):
    """One AdamW step on a single adapter. batch leaves [B, T] -> (lora, opt_state, metrics).

    `key` draws the LoRA dropout masks (`settings.lora_dropout`; unused at 0). The gradient is
    clipped to `settings.max_grad_norm` (0: not clipped) before the optimizer. metrics: loss,
    n_tokens, grad_norm (before clipping, as HF Trainer logs it), head_overflow (all scalars;
    the runner checks them once per round). `head_tokens`: compute the LM head only on that
    many loss positions (see `lora_loss`).
    """
    dropout = (settings.lora_dropout, key) if settings.lora_dropout > 0 else None
    (loss, (n, overflow)), grads = jax.value_and_grad(lora_loss, has_aux=True)(
        lora, base, batch, cfg, frozen, remat, head_tokens, layer_loop, rope, dropout)
    grad_norm = optax.tree.norm(grads)
    grads = clip_by_global_norm(grads, settings.max_grad_norm)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    return lora, opt_state, {"loss": loss, "n_tokens": n, "grad_norm": grad_norm, "head_overflow": overflow}


def local_steps(base, lora, opt_state, batches: Batch, key, *, cfg, optimizer, frozen=None, remat=False,
                head_tokens=None, layer_loop="auto", settings: StepSettings = StepSettings()):
    """S steps by `lax.scan` over batches [S, B, T] -> (lora, opt_state, metrics [S])."""
    keys = jax.random.split(key, batches.tokens.shape[0])
    # With the layers unrolled, RoPE's cos/sin for all S batches are computed here, before the
    # step loop: computed inside it, XLA fuses them into every consumer in the unrolled layers
    # and recomputes the sines and cosines per head, layer and direction (docs/DESIGN.md).
    # A loop input is a buffer, computed once.
    ropes = jax.vmap(lambda m: llama.rope_tables(m, cfg))(batches.mask) if llama.unroll_layers(layer_loop) else None

    def step(carry, xs):
        lora, opt_state = carry
        batch, k, rope = xs
        lora, opt_state, m = lora_train_step(
            base, lora, opt_state, batch, k, cfg=cfg, optimizer=optimizer, frozen=frozen, remat=remat,
            head_tokens=head_tokens, layer_loop=layer_loop, rope=rope, settings=settings,
        )
        return (lora, opt_state), m

    (lora, opt_state), metrics = jax.lax.scan(step, (lora, opt_state), (batches, keys, ropes))
    return lora, opt_state, metrics


def map_in_chunks(fn, xs, chunk: Optional[int]):
    """`jax.vmap(fn)(xs)` computed `chunk` rows at a time: a `lax.scan` over groups of rows.

    xs leaves have a leading axis N. With `chunk` None or >= N this is plain `vmap`. Otherwise the
    N rows are split into n = ceil(N / chunk) groups of g = ceil(N / n) rows (the last group
    padded with copies of the first rows; their results are dropped). Row i goes to group
    i % n, so a leading axis sharded in contiguous blocks over devices stays sharded on the
    group axis. Only one group's activations are live at a time: memory is O(g), not O(N).
    Groups of one row are a `lax.map` with no vmap: under a size-1 vmap XLA:CPU turned the
    RMSNorm backward's row sums into slow YNNPACK reductions (docs/DESIGN.md).
    """
    n_rows = jax.tree.leaves(xs)[0].shape[0]
    if chunk is None or chunk >= n_rows:
        return jax.vmap(fn)(xs)
    if chunk < 1:
        raise ValueError(f"client chunk must be >= 1, got {chunk}")
    n = -(-n_rows // chunk)
    g = -(-n_rows // n)
    pad = n * g - n_rows
    if g == 1:
        return jax.lax.map(fn, xs)

    def split(x):  # [N, ...] -> [n, g, ...] with row i at [i % n, i // n]
        if pad:
            x = jnp.concatenate([x, x[:pad]], axis=0)
        return jnp.swapaxes(x.reshape((g, n) + x.shape[1:]), 0, 1)

    def merge(y):  # [n, g, ...] -> [N, ...]
        return jnp.swapaxes(y, 0, 1).reshape((n * g,) + y.shape[2:])[:n_rows]

    _, ys = jax.lax.scan(lambda _, x: (None, jax.vmap(fn)(x)), None, jax.tree.map(split, xs))
    return jax.tree.map(merge, ys)


@partial(jax.jit, static_argnames=("cfg", "optimizer", "remat", "client_chunk", "head_tokens", "layer_loop",
                                   "settings"), donate_argnums=(1, 2))
def clients_local_steps(base, loras, opt_states, batches: Batch, keys, frozen=None, *, cfg, optimizer,
                        remat=False, client_chunk: Optional[int] = None, head_tokens: Optional[int] = None,
                        layer_loop: str = "auto", settings: StepSettings = StepSettings()):
    """All clients' local training of one round in ONE compiled call.

    loras, opt_states: leading axis C; batches leaves [C, S, B, T]; keys [C, 2];
    frozen: optional per-client frozen adapters [C, ...] (see `with_frozen`).
    Returns (loras [C, ...], opt_states [C, ...], metrics {name: [C, S]}).
    The base is broadcast (in_axes None). If the C-axis inputs are sharded over a mesh
    (`shard_clients`), XLA partitions the vmapped computation over the devices.
    `client_chunk` vmaps that many clients at a time inside the call (`map_in_chunks`): it bounds
    activation memory (C x activations otherwise) and keeps a CPU's working set in cache.
    The result does not depend on it. `head_tokens`: the LM head on loss positions only (see
    `response_loss_on_loss_tokens`; metrics["head_overflow"] must be 0). `layer_loop`: scan or
    unroll the layers (`llama.unroll_layers`; the result does not depend on it). `settings`:
    clipping and LoRA dropout of each step (`StepSettings`).
    """
    def run(xs):
        lora, opt, b, k, fr = xs
        return local_steps(base, lora, opt, b, k, cfg=cfg, optimizer=optimizer, frozen=fr, remat=remat,
                           head_tokens=head_tokens, layer_loop=layer_loop, settings=settings)

    return map_in_chunks(run, (loras, opt_states, batches, keys, frozen), client_chunk)


# Tokens per vmapped group of clients under `client_chunk: auto`. On CPU about 2k tokens keep a
# group's activations in cache while its matmuls stay large (BENCHMARKS.md, clients in one call);
# accelerators want large groups, bounded by memory only.
AUTO_CHUNK_TOKENS_CPU = 2048
AUTO_CHUNK_TOKENS_ACCELERATOR = 65536


def client_chunk_size(setting, n_clients: int, tokens_per_client: int, n_devices: int = 1) -> Optional[int]:
    """Clients per vmapped group for `clients_local_steps` (None = all at once).

    setting: "all", "auto" (a token budget per group and device, `AUTO_CHUNK_TOKENS_*`) or an int
    (clients per group and device). With a mesh of `n_devices`, groups are whole multiples of
    the device count that divide the client axis, so each device keeps its own clients.
    """
    if setting == "all":
        return None
    if setting == "auto":
        cpu = jax.default_backend() == "cpu"
        budget = AUTO_CHUNK_TOKENS_CPU if cpu else AUTO_CHUNK_TOKENS_ACCELERATOR
        per_device = max(1, budget // max(1, tokens_per_client))
    else:
        per_device = int(setting)
    if per_device * n_devices >= n_clients:
        return None
    if n_devices <= 1:
        return per_device
    per_dev_clients = n_clients // n_devices
    n_groups = next(k for k in range(1, per_dev_clients + 1)
                    if per_dev_clients % k == 0 and per_dev_clients // k <= per_device)
    return n_clients // n_groups


def train_slots(base, start: LoraStack, frozen: Optional[LoraStack], opt_states, batches: Batch, keys, lr, *,
                cfg, optimizer, remat=False, client_chunk: Optional[int] = None, head_tokens: Optional[int] = None,
                layer_loop: str = "auto", settings: Optional[StepSettings] = None):
    """Local training of J slots from `start` (leaves [J, ...]) at learning rate `lr`.

    opt_states: [J, ...] moments carried from an earlier round, or None for fresh AdamW state.
    batches leaves [J, S, B, T]; keys [J, 2]. -> (trained [J, ...], opt_states, metrics [J, S]).
    The training itself is `clients_local_steps` (see there for chunking and the LM head).
    settings: the run's `StepSettings` (AdamW b1/b2/eps written into the state, clipping, LoRA
    dropout); None keeps the optimizer's own hyperparameters, no clipping, no dropout.
    """
    opt_states = init_opt_states(optimizer, start, lr) if opt_states is None else set_learning_rate(opt_states, lr)
    if settings is None:
        settings = StepSettings()
    else:
        opt_states = set_hyperparams(opt_states, settings)
    return clients_local_steps(base, start, opt_states, batches, keys, frozen, cfg=cfg, optimizer=optimizer,
                               remat=remat, client_chunk=client_chunk, head_tokens=head_tokens,
                               layer_loop=layer_loop, settings=settings)


def init_opt_states(optimizer, loras: LoraStack, lr) -> optax.OptState:
    """Fresh optimizer state per client: leaves [C, ...], learning rate `lr`."""
    states = jax.vmap(optimizer.init)(loras)
    return set_learning_rate(states, lr)


def round_learning_rate(round_idx: int, rounds: int, lr: float, lr_min: float, schedule: str) -> float:
    """Learning rate of a round: constant within a round; across rounds cosine from `lr` to
    `lr_min` (the FedRouter authors' code) or constant (the paper states only 5e-4)."""
    if schedule == "constant" or rounds <= 1:
        return float(lr)
    import math

    return float(lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * round_idx / rounds)))
