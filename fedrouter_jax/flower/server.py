"""The server side of a Flower run: the method's server functions around message exchanges.

    server = FlowerServer(cfg, Transport(grid, timeout=600), nodes=3)
    server.run()          # setup -> rounds (checkpoint each) -> evaluation -> results.json

The server holds the whole `SimState` (server state, every client's state rows and optimizer
moments), exactly what a simulator run checkpoints: each round it sends a node the rows of its
participants with their plan, and scatters back the rows that arrived. So the checkpoints,
metrics.jsonl and results.json are those of `fedrouter-jax run`, a restarted server resumes
from the last complete round (`fedrouter-jax eval/export` read it), and a node that fails
changes nothing but the round's `arrived` mask. Participants, seeded dropouts, batches and keys
are the simulator's stateless functions of (seed, round, client), so the numbers are the same.
"""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import jax
import numpy as np

from fedrouter_jax.algorithms.base import Env, get_method, rows
from fedrouter_jax.checkpoint import CheckpointStore
from fedrouter_jax.config import config_to_dict, save_config
from fedrouter_jax.flower.records import decode, encode
from fedrouter_jax.flower.transport import Failure, Transport
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.runner import _write_jsonl, model_directory
from fedrouter_jax.simulator import SimState, Simulator, _host, fold_replies, sample_participants
from fedrouter_jax.training import make_optimizer, round_learning_rate


def _cat(trees: list):
    """Stacks with a leading axis -> one stack (host numpy)."""
    return jax.tree.map(lambda *x: np.concatenate([np.asarray(v) for v in x]), *trees)


class FlowerServer:
    """One federated run of `cfg.method` whose clients live on Flower nodes."""

    def __init__(self, cfg, transport: Transport, *, nodes: int, setup_timeout: float = 600.0, log=print):
        self.cfg, self.transport, self.log = cfg, transport, log
        self.n_nodes, self.setup_timeout = int(nodes), float(setup_timeout)
        self.method = get_method(cfg.method)
        model_cfg = LlamaConfig.from_json(model_directory(cfg) / "config.json")  # shapes only, no weights
        self.env = Env(config=cfg, model_cfg=model_cfg, n_clients=int(cfg.data.n_clients))
        self.key = jax.random.PRNGKey(cfg.seed)
        self.node_of: dict[int, int] = {}  # client id -> node id

    # -- nodes ----------------------------------------------------------------------------------
    def _learn(self, node: int, client_ids) -> None:
        for c in client_ids:
            self.node_of[int(c)] = int(node)

    def refresh_nodes(self) -> None:
        """Forget nodes that left; ask nodes that joined (e.g. a restarted SuperNode) which clients they hold."""
        current = set(self.transport.node_ids())
        self.node_of = {c: n for c, n in self.node_of.items() if n in current}
        new = sorted(current - set(self.node_of.values()))
        if new:
            replies, _ = self.transport.exchange("query.hello", {n: encode({}) for n in new}, "hello")
            for node, content in replies.items():
                self._learn(node, decode(content)[1]["client_ids"])

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.setup_timeout
        while len(nodes := self.transport.node_ids()) < self.n_nodes and time.monotonic() < deadline:
            time.sleep(0.2)
        if len(nodes) < self.n_nodes:
            raise RuntimeError(f"setup: {len(nodes)} of {self.n_nodes} nodes connected within {self.setup_timeout:g} s")
        return nodes

    # -- setup ----------------------------------------------------------------------------------
    def setup(self) -> SimState:
        """client_setup on every node (its clients' stack), server_setup on the messages in client order."""
        nodes = self._wait_for_nodes()
        replies, failures = self.transport.exchange("query.setup", {n: encode({}) for n in nodes}, "setup",
                                                    timeout=self.setup_timeout)
        if failures:
            node, f = next(iter(failures.items()))
            raise RuntimeError(f"setup: node {node} failed ({f.reason}: {f.detail})")
        ids, clients, msgs = [], [], []
        for node, content in sorted(replies.items()):
            trees, meta = decode(content)
            self._learn(node, meta["client_ids"])
            ids += meta["client_ids"]
            clients.append(trees["clients"])
            msgs.append(trees["setup"])
        if sorted(ids) != list(range(self.env.n_clients)):
            missing = sorted(set(range(self.env.n_clients)) - set(ids))
            raise RuntimeError(f"setup: the nodes hold clients {sorted(ids)}; missing {missing} of data.n_clients="
                               f"{self.env.n_clients} (one node per partition-id in [0, num-partitions))")
        order = np.argsort(ids)
        clients, msgs = rows(_cat(clients), order), rows(_cat(msgs), order)
        server = self.method.server_setup(self.env, msgs, jax.random.fold_in(self.key, 0))
        opt = None
        if not self.cfg.train.reset_optimizer_each_round:  # the simulator's zero moments [C, S, ...]
            like = types.SimpleNamespace(env=self.env, n_slots=int(self.method.slots(self.env)),
                                         optimizer=make_optimizer(self.cfg.train.weight_decay))
            opt = Simulator._zero_opt(like)
        return SimState(server=_host(server), clients=_host(clients), opt=opt)

    # -- one round ------------------------------------------------------------------------------
    def round_step(self, state: SimState, round_idx: int) -> tuple[SimState, dict]:
        """The simulator's round with client_update on the nodes. -> (state, metrics record)."""
        cfg, env, method = self.cfg, self.env, self.method
        participants = sample_participants(cfg.seed, round_idx, env.n_clients, cfg.federation.clients_per_round)
        msg = method.server_plan(env, state.server, round_idx, participants)
        clients = rows(state.clients, participants)
        opt = None if state.opt is None else rows(state.opt, participants)
        self.refresh_nodes()
        failed: dict[int, Failure] = {}
        at_node: dict[int, list[int]] = {}
        for p, c in enumerate(participants):
            if int(c) in self.node_of:
                at_node.setdefault(self.node_of[int(c)], []).append(p)
            else:
                failed[p] = Failure("node_unavailable", f"no connected node holds client {int(c)}")
        contents = {n: encode({"plan": rows(msg, np.array(pos)), "clients": rows(clients, np.array(pos)),
                               "opt": None if opt is None else rows(opt, np.array(pos))},
                              {"round": round_idx, "participants": participants[pos].tolist()})
                    for n, pos in at_node.items()}
        replies, failures = self.transport.exchange("train", contents, f"round-{round_idx + 1}")
        got: dict[int, dict] = {}
        for node, pos in at_node.items():
            if node in failures:
                failed.update({p: failures[node] for p in pos})
                continue
            trees, _ = decode(replies[node])
            got.update({p: rows(trees, np.array([j])) for j, p in enumerate(pos)})
        return self.finish_round(state, round_idx, participants, msg, clients, opt, got, failed)

    def finish_round(self, state, round_idx, participants, msg, clients, opt, got: dict, failed: dict):
        """Replies by position -> (new state, metrics), as `Simulator.round_step` after training:
        seeded dropouts and non-finite replies dropped, the missing ones too (their clusters keep
        their adapters), server_aggregate on the rest."""
        cfg, method = self.cfg, self.method
        n = len(participants)
        if not got:  # nothing came back: the state stays as it was
            lr = round_learning_rate(round_idx, cfg.train.rounds, cfg.train.lr, cfg.train.lr_min, cfg.train.lr_schedule)
            record = {"lr": lr, "train_loss": float("nan"), "train_loss_first_step": float("nan"), "loss_per_slot": [],
                      "participants": [],
                      "dropped": [{"client": int(c), "reason": failed[p].reason, "detail": failed[p].detail}
                                  for p, c in enumerate(participants)]}
            if method.log_plan is not None:
                record["plan"] = method.log_plan(msg)
            return state, record
        # a missing row: the client keeps its rows, the server sees zeros (never aggregated)
        like = next(iter(got.values()))
        fill = lambda p: {"clients": rows(clients, np.array([p])),  # noqa: E731
                          # fresh moments each round (state.opt None): the node's are not kept
                          "opt": jax.tree.map(np.zeros_like, like["opt"]) if opt is None else rows(opt, np.array([p])),
                          "reply": jax.tree.map(np.zeros_like, like["reply"]),
                          "pool_size": np.zeros_like(like["pool_size"])}
        out = _cat([got[p] if p in got else fill(p) for p in range(n)])
        return fold_replies(method, self.env, state, msg, participants, round_idx, out["clients"], out["reply"],
                            out["opt"], np.asarray(out["pool_size"]), failed)

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, state: SimState, mode: str) -> dict:
        """server_route, then every node routes and scores its own clients ("base": no adapters)."""
        route = None if mode == "base" else self.method.server_route(self.env, state.server, mode)
        self.refresh_nodes()
        held: dict[int, list[int]] = {}
        for c, node in sorted(self.node_of.items()):
            held.setdefault(node, []).append(c)
        contents = {}
        for node, ids in held.items():
            at = np.array(ids)
            mine = None if route is None else route.replace(
                per_client=None if route.per_client is None else rows(route.per_client, at))
            contents[node] = encode({"route": mine, "clients": rows(state.clients, at)},
                                    {"mode": mode, "client_ids": ids})
        replies, _ = self.transport.exchange("evaluate", contents, f"evaluate-{mode}")
        return combine_results([decode(r)[1] for r in replies.values()], self.env.n_clients)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        store = CheckpointStore(out / "checkpoints", keep=cfg.checkpoint.keep)
        state = self.setup()  # also the restore target (setup is deterministic)
        history, start = [], 0
        if store.latest_step() is not None:
            state, extra = store.restore(like=state)
            history, start = extra["history"], store.restored_step
            self.log(f"[resume] from the complete checkpoint of round {start} in {store.directory}")
        _write_jsonl(out / "metrics.jsonl", history)
        rounds = cfg.train.rounds
        for r in range(start, rounds):
            t0 = time.perf_counter()
            state, metrics = self.round_step(state, r)
            rec = {"round": r + 1, **metrics, "time_s": round(time.perf_counter() - t0, 3)}
            if cfg.eval.every and (r + 1) % cfg.eval.every == 0 and r + 1 < rounds:
                ev = self.evaluate(state, cfg.eval.router)
                rec["eval"] = {k: ev[k] for k in ("rouge1", "per_client", "per_task") if k in ev}
            history.append(rec)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            if cfg.checkpoint.every and ((r + 1) % cfg.checkpoint.every == 0 or r + 1 == rounds):
                store.save(r + 1, state, {"history": history, "config": config_to_dict(cfg)})
            dropped = ", ".join(f"{d['client']}:{d['reason']}" for d in rec["dropped"]) or "none"
            self.log(f"[round {r + 1}/{rounds}] loss {rec['train_loss']:.4f}, dropped {dropped}, {rec['time_s']:.2f} s")
        self.state = state
        results = {"method": cfg.method, "scenario": cfg.data.scenario, "seed": cfg.seed}
        modes = [cfg.eval.router] + [m for m in cfg.eval.router_modes if m != cfg.eval.router]
        for mode in modes:
            results[mode] = self.evaluate(state, mode)
        results["router"] = cfg.eval.router
        results["rouge1"] = results[cfg.eval.router]["rouge1"]
        if cfg.eval.include_base:
            results["base"] = self.evaluate(state, "base")
        (out / "results.json").write_text(json.dumps(results, indent=2))
        store.close()
        return results


def combine_results(parts: list[dict], n_clients: int) -> dict:
    """The nodes' `runner.evaluate` results (each over its own clients) -> one result as
    `runner.evaluate` over all clients gives; clients without a result are NaN and listed in
    `missing_clients`."""
    per_client = [float("nan")] * n_clients
    acc = [float("nan")] * n_clients
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    samples, has_acc = [], False
    for part in parts:
        res, ids, counts = part["result"], part["client_ids"], part["task_counts"]
        for j, c in enumerate(ids):
            per_client[c] = res["per_client"][j]
        for t, m in res["per_task"].items():
            total.setdefault(t, 0.0)
            count.setdefault(t, 0)
            if m is not None and counts[t]:
                total[t] += m * counts[t]
                count[t] += counts[t]
        samples += [{**s, "client": ids[s["client"]]} for s in res["samples"]]
        if "clustering_accuracy_per_client" in res:
            has_acc = True
            for j, c in enumerate(ids):
                acc[c] = res["clustering_accuracy_per_client"][j]
    n = sum(count.values())
    result = {
        "rouge1": sum(total.values()) / n if n else float("nan"),
        "per_client": per_client,
        "per_task": {t: (total[t] / count[t] if count[t] else None) for t in total},
        "samples": sorted(samples, key=lambda s: s["client"]),  # stable: each client's own order
    }
    if has_acc:
        result["clustering_accuracy"] = float(np.mean(acc))
        result["clustering_accuracy_per_client"] = acc
    missing = sorted(set(range(n_clients)) - {c for p in parts for c in p["client_ids"]})
    if missing:
        result["missing_clients"] = missing
    return result
