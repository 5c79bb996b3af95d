"""The ClientApp: one Flower node runs the method's client functions for the clients it holds.

A node with `partition-id` i of `num-partitions` n holds clients i, i + n, i + 2n, ... of the
config's `data.n_clients` (`node_clients`); it builds and embeds only their data
(`runner.prepare(clients=...)`, embeddings cached on disk) and keeps no state between messages:
the server sends each participant's client state (and optimizer moments) with its plan and gets
the new ones back, so a node can restart, or a new process serve every message, without
changing any number.

Messages (content: `records.encode` trees + meta; see docs/DESIGN.md "Flower deployment"):
  query.hello  -> meta client_ids                         (which clients this node holds)
  query.setup  -> trees clients, setup; meta client_ids   (client_setup of the node's stack)
  train        <- trees plan, clients, opt; meta round, participants
               -> trees clients, reply, opt, pool_size    (Simulator.train_clients: ONE jitted call)
  evaluate     <- trees route, clients; meta mode, client_ids
               -> meta result (runner.evaluate on the node's own test sets), task_counts
"""
from __future__ import annotations

import dataclasses
import json
import os
from functools import lru_cache

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedrouter_jax.flower.records import decode, encode

app = ClientApp()


def node_clients(partition_id: int, num_partitions: int, n_clients: int) -> list[int]:
    """Client ids a node holds: every num_partitions-th from its partition id."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"node config: partition-id={partition_id} is outside [0, num-partitions={num_partitions})")
    ids = list(range(partition_id, n_clients, num_partitions))
    if not ids:
        raise ValueError(f"node config: partition-id={partition_id} holds no client of data.n_clients={n_clients}")
    return ids


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache under FEDROUTER_CACHE (a new process per message
    then loads the compiled round instead of compiling it again), only in processes started
    with FEDROUTER_XLA_CACHE=1 (the `fedrouter-jax flower` driver sets it): the setting is
    process-wide, so a ClientApp driven in-process (tests, notebooks) must not turn it on for its
    host. JAX_COMPILATION_CACHE_DIR wins."""
    import jax

    from fedrouter_jax.embeddings import cache_dir

    if os.environ.get("FEDROUTER_XLA_CACHE") != "1" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir().parent / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@dataclasses.dataclass
class Node:
    """What a node derives from the config for its clients: their data and a Simulator over them."""

    cfg: object
    ids: list
    data: object
    sim: object


@lru_cache(maxsize=4)  # simulation: an actor serves several nodes; deployment: one process per message
def _node(config_json: str, ids: tuple) -> Node:
    from fedrouter_jax.algorithms.base import Env, get_method
    from fedrouter_jax.config import config_from_dict
    from fedrouter_jax.runner import prepare
    from fedrouter_jax.simulator import Simulator

    enable_compilation_cache()
    cfg = config_from_dict(json.loads(config_json))
    data = prepare(cfg, progress=False, clients=list(ids))
    env = Env(config=cfg, model_cfg=data.model_cfg, n_clients=cfg.data.n_clients)
    sim = Simulator(get_method(cfg.method), env, data.base, data.inputs, data.train_sets,
                    mesh_devices=cfg.train.client_mesh_devices)
    return Node(cfg, list(ids), data, sim)


def _ids(context: Context) -> list[int]:
    cfg = json.loads(context.run_config["fedrouter-config"])
    nc = context.node_config
    return node_clients(int(nc["partition-id"]), int(nc["num-partitions"]), int(cfg["data"]["n_clients"]))


def node_for(context: Context) -> Node:
    return _node(context.run_config["fedrouter-config"], tuple(_ids(context)))


@app.query("hello")
def hello(msg: Message, context: Context) -> Message:
    return Message(encode({}, {"client_ids": _ids(context)}), reply_to=msg)


@app.query("setup")
def setup(msg: Message, context: Context) -> Message:
    """client_setup for the node's clients (the simulator's key: fold_in(seed key, 0))."""
    import jax

    node = node_for(context)
    sim = node.sim
    clients, setup_msg = sim.method.client_setup(sim.env, sim.inputs, jax.random.fold_in(sim.key, 0))
    return Message(encode({"clients": clients, "setup": setup_msg}, {"client_ids": node.ids}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Simulator.train_clients on the participants' rows the server sent."""
    trees, meta = decode(msg.content)
    node = node_for(context)
    participants = np.asarray(meta["participants"], np.int32)
    new_clients, reply, new_opt, pool_size = node.sim.train_clients(trees["clients"], trees["plan"], participants,
                                                                    int(meta["round"]), trees["opt"])
    out = {"clients": new_clients, "reply": reply, "opt": new_opt, "pool_size": pool_size}
    return Message(encode(out, {"participants": participants.tolist()}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Route and score the node's own test sets with the adapters the server sent."""
    from fedrouter_jax.runner import base_plan
    from fedrouter_jax.runner import evaluate as score
    from fedrouter_jax.simulator import SimState, eval_plan

    trees, meta = decode(msg.content)
    node = node_for(context)
    if meta["mode"] == "base":
        plan = base_plan(node.data)
    else:  # eval_plan = server_route + client_route; the server already ran server_route
        routed = dataclasses.replace(node.sim.method, server_route=lambda env, route, mode: route)
        plan = eval_plan(routed, node.sim.env, SimState(server=trees["route"], clients=trees["clients"]),
                         node.sim.inputs, meta["mode"], base=node.sim.base)
    result = score(node.data, plan, progress=False)
    fed = node.data.fed
    counts = {t: int(sum((np.asarray(tt) == i).sum() for tt in fed.test_tasks)) for i, t in enumerate(fed.task_names)}
    return Message(encode({}, {"client_ids": node.ids, "result": result, "task_counts": counts}), reply_to=msg)
