"""The federation simulated in one process: a method's client / server functions, batched.

    sim = Simulator(method, env, base, inputs, train_sets)
    state = sim.setup(key)                      # client_setup (all clients at once), server_setup
    state, metrics = sim.round_step(state, r)   # sample participants -> server_plan -> client_pools
                                                # -> batches -> client_update (ONE jitted call for
                                                # every participant's slots) -> drop lost / non-finite
                                                # replies -> server_aggregate (jitted)
    plan = sim.eval_plan(state, "local")        # server_route + client_route -> routing.EvalPlan

No files, progress bars or checkpoints here (runner.py does those). Sampling, dropouts and
batches are stateless functions of (seed, round), so a resumed run repeats them exactly. The
participant count is fixed by `federation.clients_per_round` and the slot count by the method,
so the round compiles once whatever the participants are (batch shapes may still change per
round with `train.trim_padding` and the LM-head bucket: see `compile_keys`).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedrouter_jax.algorithms.base import ClientInputs, Env, Method, rows
from fedrouter_jax.data import sample_round_batches
from fedrouter_jax.data.batching import head_token_budget, head_tokens_for_batches, trim_padding
from fedrouter_jax.distributed import to_host
from fedrouter_jax.routing import EvalPlan
from fedrouter_jax.sharding import client_mesh, replicate, shard_clients
from fedrouter_jax.training import (Batch, client_chunk_size, init_opt_states, make_optimizer, round_learning_rate,
                                    train_slots)


class NonFiniteError(FloatingPointError):
    """A NaN/Inf loss, gradient or adapter after local training (nothing is aggregated or saved)."""


@struct.dataclass
class SimState:
    """Everything a simulated federation carries between rounds (the checkpoint is this pytree).

    server: the method's server state; clients: its client states stacked [C, ...]; opt: AdamW
    moments carried across rounds [C, S, ...] (None with train.reset_optimizer_each_round).
    """

    server: Any
    clients: Any
    opt: Any = None


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """Static settings of the round's compiled training call (hashable: a jit static argument)."""

    optimizer: Any
    client_chunk: Optional[int]
    head_tokens: Optional[int]
    layer_loop: str


@partial(jax.jit, static_argnames=("method", "env", "opts"))
def _client_update(method: Method, env: Env, base, clients, msg, batches, pool_size, opt, keys, lr, *, opts):
    train_fn = partial(train_slots, cfg=env.model_cfg, optimizer=opts.optimizer, client_chunk=opts.client_chunk,
                       head_tokens=opts.head_tokens, layer_loop=opts.layer_loop)
    return method.client_update(env, base, clients, msg, batches, pool_size, opt, keys, lr, train_fn=train_fn)


@partial(jax.jit, static_argnames=("method", "env"))
def _server_aggregate_jit(method: Method, env: Env, server, msg, reply, arrived, participants, round_idx):
    return method.server_aggregate(env, server, msg, reply, arrived, participants, round_idx)


def _host(tree):
    """Every leaf whole as host numpy (gathered from other processes' devices when sharded there)."""
    return jax.tree.map(to_host, tree)


def sample_participants(seed: int, round_idx: int, n_clients: int, per_round: Optional[int]) -> np.ndarray:
    """Sorted client ids taking part in a round: all, or `per_round` drawn without replacement
    from `default_rng([seed, 11, round])` (stateless: a resumed run draws the same)."""
    if per_round is None or per_round >= n_clients:
        return np.arange(n_clients, dtype=np.int32)
    rng = np.random.default_rng([int(seed), 11, int(round_idx)])
    return np.sort(rng.choice(n_clients, size=int(per_round), replace=False)).astype(np.int32)


def sample_dropouts(seed: int, round_idx: int, participants: np.ndarray, rate: float) -> np.ndarray:
    """[P] True where a participant's reply is lost: client c fails with probability `rate`
    from `default_rng([seed, 13, round, c])` (independent of who else takes part)."""
    if rate <= 0:
        return np.zeros(len(participants), bool)
    return np.array([np.random.default_rng([int(seed), 13, int(round_idx), int(c)]).random() < rate
                     for c in participants])


def fold_replies(method: Method, env: Env, state: SimState, msg, participants: np.ndarray, round_idx: int,
                 new_clients, reply, new_opt, pool_size: np.ndarray, failed: Optional[dict] = None):
    """The server's side of a round after training: -> (new state, metrics for metrics.jsonl).

    new_clients / reply / new_opt / pool_size: rows [P, ...] by participant position; `failed`
    {position: failure with .reason and .detail} marks rows that never arrived (a deployment's
    node gone, client error, timeout: `flower.transport.Failure`; zero-filled by the caller). Seeded dropouts
    (`federation.dropout_rate`) and non-finite replies (`federation.on_nonfinite`) are dropped
    too; a dropped row is zeroed before `server_aggregate` and its client state is not updated.
    """
    cfg = env.config
    fed = cfg.federation
    failed = failed or {}
    missing = np.array([p in failed for p in range(len(participants))], bool)
    lost = sample_dropouts(cfg.seed, round_idx, participants, fed.dropout_rate)
    finite = np.asarray(reply.finite, bool) | missing
    bad = ~finite & ~lost
    if bad.any() and (fed.on_nonfinite == "stop" or not (finite & ~lost & ~missing).any()):
        raise NonFiniteError(
            f"round {round_idx + 1}: non-finite loss/gradient/adapter for client(s) {participants[bad].tolist()}"
            + ("" if fed.on_nonfinite == "stop" else ", every reply of the round")
            + "; nothing was aggregated or checkpointed. Lower train.lr or check the data of these clients.")
    arrived = finite & ~lost & ~missing
    # a lost or discarded reply never reaches the server: its rows carry zeros, not NaN
    keep = lambda x: np.where(arrived.reshape((-1,) + (1,) * (x.ndim - 1)), x, np.zeros_like(x))  # noqa: E731
    reply = reply.replace(adapters=jax.tree.map(keep, reply.adapters))
    if method.jit_aggregate:
        server = _server_aggregate_jit(method, env, state.server, msg, reply, jnp.asarray(arrived),
                                       jnp.asarray(participants), round_idx)
    else:
        server = method.server_aggregate(env, state.server, msg, reply, arrived, participants, round_idx)
    new_state = SimState(
        server=_host(server),
        clients=scatter_rows(state.clients, participants, new_clients, arrived),
        opt=None if state.opt is None else scatter_rows(state.opt, participants, new_opt, arrived),
    )
    used = (pool_size > 0) & arrived[:, None]
    last, first = np.asarray(reply.loss)[..., -1], np.asarray(reply.loss)[..., 0]
    metrics = {
        "lr": round_learning_rate(round_idx, cfg.train.rounds, cfg.train.lr, cfg.train.lr_min, cfg.train.lr_schedule),
        "train_loss": float(last[used].mean()) if used.any() else float("nan"),
        "train_loss_first_step": float(first[used].mean()) if used.any() else float("nan"),
        "loss_per_slot": last[pool_size > 0].round(5).tolist(),
        "participants": participants[arrived].tolist(),
        "dropped": [{"client": int(c), "reason": failed[p].reason, "detail": failed[p].detail} if p in failed else
                    {"client": int(c), "reason": "dropout" if lost[p] else "nonfinite"}
                    for p, c in enumerate(participants) if not arrived[p]],
    }
    if method.log_plan is not None:
        metrics["plan"] = method.log_plan(msg)
    return new_state, metrics


def scatter_rows(full, index: np.ndarray, new, keep: np.ndarray):
    """`full` (leaves [C, ...]) with rows index[p] replaced by new[p] where keep[p] (host numpy)."""
    def put(f, n):
        f = np.array(f, copy=True)
        f[index[keep]] = np.asarray(n)[keep]
        return f

    return jax.tree.map(put, full, new)


class Simulator:
    """One method over the clients of a run (host data + the frozen base, placed once).

    `inputs` / `train_sets` hold the clients this process simulates (all of them here; one in a
    deployment's client), found by client id.
    """

    def __init__(self, method: Method, env: Env, base: dict, inputs: ClientInputs, train_sets: Sequence, *,
                 mesh_devices: int = 1):
        cfg = env.config
        self.method, self.env, self.inputs, self.train_sets = method, env, inputs, list(train_sets)
        # row of each client id in `inputs` / `train_sets` (a deployment holds only its own clients)
        self.position = {int(c): i for i, c in enumerate(np.asarray(inputs.client_id))}
        self.n_slots = int(method.slots(env))
        self.optimizer = make_optimizer(cfg.train.weight_decay)
        self.mesh = client_mesh(mesh_devices)
        self.base = replicate(base, self.mesh)
        self.key = jax.random.PRNGKey(cfg.seed)
        # LM-head positions per batch that cover any batch of distinct training rows
        self.head_budget = (head_token_budget(self.train_sets, cfg.train.batch_size)
                            if cfg.train.lm_head_on == "loss_tokens" else None)
        self.compile_keys: set = set()  # distinct (P*S, T, head, chunk) the round was compiled for
        self._chunks: dict = {}  # measured client groups per round shape (accelerators)

    # -- setup ---------------------------------------------------------------------------------
    def setup(self) -> SimState:
        """client_setup for every client (one batched call), then server_setup on their messages."""
        k0 = jax.random.fold_in(self.key, 0)
        clients, msgs = self.method.client_setup(self.env, self.inputs, k0)
        server = self.method.server_setup(self.env, msgs, k0)
        opt = None if self.env.config.train.reset_optimizer_each_round else self._zero_opt()
        return SimState(server=_host(server), clients=_host(clients), opt=opt)

    def _zero_opt(self):
        """AdamW state of zero moments for every client's slots [C, S, ...] (carried across rounds)."""
        c, s = self.env.n_clients, self.n_slots
        like = self.env.stack(self.env.new_adapters(jax.random.PRNGKey(0), c * s))
        opt = init_opt_states(self.optimizer, like, 0.0)
        return _host(jax.tree.map(lambda x: x.reshape((c, s) + x.shape[1:]), opt))

    # -- one round -------------------------------------------------------------------------------
    def round_batches(self, pools: np.ndarray, participants: np.ndarray, round_idx: int):
        """pools [P, S, N] -> (Batch [P, S, steps, B, T'], pool_size [P, S], head tokens or None).

        A slot with an empty pool (unused) samples from all the client's data with its loss mask
        cleared, so it trains nothing and the call keeps its shape."""
        t = self.env.config.train
        p_n, s_n = pools.shape[:2]
        sets, pool_list, streams = [], [], []
        for p, c in enumerate(participants):
            own = self.train_sets[self.position[int(c)]]
            for s in range(s_n):
                idx = np.flatnonzero(pools[p, s])
                sets.append(own)
                pool_list.append(idx if idx.size else np.arange(len(own)))
                streams.append(self.method.stream(self.env, int(c), s))
        b = sample_round_batches(sets, pool_list, steps=t.local_steps, batch_size=t.batch_size,
                                 seed=self.env.config.seed, round_idx=round_idx, streams=streams)
        pool_size = pools.sum(-1).astype(np.float32)
        b["loss_mask"] &= (pool_size.reshape(-1) > 0)[:, None, None, None]
        if t.trim_padding:
            b = trim_padding(b)
        head = head_tokens_for_batches(self.head_budget, b["loss_mask"]) if t.lm_head_on == "loss_tokens" else None
        shape = lambda x: x.reshape((p_n, s_n) + x.shape[1:])  # noqa: E731
        return Batch(jnp.asarray(shape(b["tokens"])), jnp.asarray(shape(b["mask"])),
                     jnp.asarray(shape(b["loss_mask"]))), pool_size, head

    def train_clients(self, clients, msg, participants: np.ndarray, round_idx: int, opt=None):
        """The participants' side of a round for a stack of them (client rows and message rows
        [P, ...]): client_pools, their batches, and client_update as ONE jitted call.
        -> (new client rows, Reply (host), new optimizer rows or None, pool_size [P, S])."""
        cfg, env, method = self.env.config, self.env, self.method
        at = np.array([self.position[int(c)] for c in participants])
        pools = np.asarray(method.client_pools(env, clients, msg, rows(self.inputs, at)), bool)
        batches, pool_size, head = self.round_batches(pools, participants, round_idx)
        lr = round_learning_rate(round_idx, cfg.train.rounds, cfg.train.lr, cfg.train.lr_min, cfg.train.lr_schedule)
        round_key = jax.random.fold_in(self.key, round_idx + 1)
        keys = jax.vmap(lambda c: jax.random.fold_in(round_key, c))(jnp.asarray(participants))
        j = len(participants) * self.n_slots
        args = shard_clients((clients, msg, batches, pool_size, opt, keys), self.mesh)
        chunk = self._client_chunk(j, batches.tokens.shape[-1], head, args, lr)
        opts = TrainOptions(self.optimizer, chunk, head, cfg.train.layer_loop)
        self.compile_keys.add((j, batches.tokens.shape[-1], head, chunk))
        new_clients, reply, new_opt = _client_update(method, env, self.base, *args, jnp.float32(lr), opts=opts)
        reply = _host(reply)
        overflow = np.asarray(reply.head_overflow)
        if overflow.any():  # a sizing bug, never a data problem: head_tokens_for_batches covers every batch
            raise RuntimeError(f"round {round_idx + 1}: {int(overflow.max())} loss tokens did not fit the LM-head "
                               "budget (training.response_loss_on_loss_tokens); set train.lm_head_on: all_tokens")
        return _host(new_clients), reply, None if new_opt is None else _host(new_opt), pool_size

    def _client_chunk(self, j: int, t: int, head, args, lr) -> Optional[int]:
        """Slots per vmapped group (`train.client_chunk`). `auto` on an accelerator: the largest
        group whose compiled round fits the device's free memory (memory.auto_client_chunk,
        measured once per round shape); on CPU a token budget (training.client_chunk_size)."""
        t_cfg = self.env.config.train
        n_dev = 1 if self.mesh is None else self.mesh.devices.size
        tokens = t_cfg.batch_size * t
        if t_cfg.client_chunk != "auto" or jax.default_backend() == "cpu":
            return client_chunk_size(t_cfg.client_chunk, j, tokens, n_dev)
        key = (j, t, head)
        if key not in self._chunks:
            from fedrouter_jax.memory import auto_client_chunk

            def lower(chunk):
                opts = TrainOptions(self.optimizer, chunk, head, t_cfg.layer_loop)
                return _client_update.lower(self.method, self.env, self.base, *args, jnp.float32(lr), opts=opts)

            choice = auto_client_chunk(lower, n_clients=j, tokens_per_client=tokens, n_devices=n_dev,
                                       resident=(self.base,))
            print(f"[memory] {choice.describe()}")
            self._chunks[key] = choice.chunk
        return self._chunks[key]

    def round_step(self, state: SimState, round_idx: int) -> tuple[SimState, dict]:
        """One round: participants sampled, server_plan, train_clients, lost and non-finite
        replies dropped, server_aggregate. -> (new state, metrics for metrics.jsonl)."""
        cfg, env, method = self.env.config, self.env, self.method
        fed = cfg.federation
        participants = sample_participants(cfg.seed, round_idx, env.n_clients, fed.clients_per_round)
        msg = method.server_plan(env, state.server, round_idx, participants)
        opt = None if state.opt is None else rows(state.opt, participants)
        new_clients, reply, new_opt, pool_size = self.train_clients(rows(state.clients, participants), msg,
                                                                    participants, round_idx, opt)
        return fold_replies(method, env, state, msg, participants, round_idx, new_clients, reply, new_opt,
                            pool_size)

    # -- evaluation ------------------------------------------------------------------------------
    def eval_plan(self, state: SimState, mode: str) -> EvalPlan:
        return eval_plan(self.method, self.env, state, self.inputs, mode, base=self.base)


def eval_plan(method: Method, env: Env, state: SimState, inputs: ClientInputs, mode: str, base=None) -> EvalPlan:
    """server_route + every client's client_route -> one stack [shared | own of client 0 | ...].
    A method with `route_features` first computes them with the `base` model (FedDPA)."""
    if method.route_features is not None:
        inputs = method.route_features(env, base, state.clients, inputs)
    msg = method.server_route(env, state.server, mode)
    r = method.client_route(env, state.clients, msg, inputs, mode)
    n_shared = 0 if msg.adapters is None else jax.tree.leaves(msg.adapters)[0].shape[0]
    parts = [] if msg.adapters is None else [_host(msg.adapters)]
    n_own = 0
    if r.own is not None:
        own = _host(r.own)  # [C, A_own, ...]
        n_own = jax.tree.leaves(own)[0].shape[1]
        parts.append(jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), own))
    adapters = None if not parts else env.stack(jax.tree.map(lambda *x: np.concatenate(x), *parts))
    mask = np.asarray(inputs.test_mask, bool)

    def remap(ids):  # client-local [shared | own] index -> index into the joint stack
        ids = np.asarray(ids, np.int32)
        offset = (n_own * np.arange(ids.shape[0]))[:, None]
        return np.where(ids >= n_shared, ids + offset, ids)

    per_client = lambda x: [np.asarray(x)[c][mask[c]] for c in range(mask.shape[0])]  # noqa: E731
    return EvalPlan(
        adapters=adapters, adapter_ids=per_client(remap(r.ids)),
        mix_ids=None if r.mix_ids is None else per_client(remap(r.mix_ids)),
        mix_weight=None if r.mix_weight is None else per_client(r.mix_weight),
        self_weight=None if r.self_weight is None else per_client(r.self_weight),
        local_cluster=None if r.local_cluster is None else per_client(r.local_cluster),
    )


def pad_clients(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-client [N_c, D] arrays -> x [C, N, D] zero-padded and mask [C, N]."""
    n = max(a.shape[0] for a in arrays)
    x = np.zeros((len(arrays), n, arrays[0].shape[1]), np.float32)
    m = np.zeros((len(arrays), n), bool)
    for c, a in enumerate(arrays):
        x[c, : len(a)] = a
        m[c, : len(a)] = True
    return x, m


def client_inputs(train_emb: Sequence[np.ndarray], test_emb: Sequence[np.ndarray]) -> ClientInputs:
    """Per-client embedding lists -> a ClientInputs stack (zero-padded, with masks)."""
    tr, trm = pad_clients(train_emb)
    te, tem = pad_clients(test_emb)
    return ClientInputs(client_id=np.arange(len(train_emb), dtype=np.int32), train_emb=tr, train_mask=trm,
                        test_emb=te, test_mask=tem)
