"""Export bundle: a trained run's adapters and routers in files that serve without the run.

    fedrouter-jax export --out-dir RUN --dest DIR     (checkpoint -> bundle; `export_run`)
    fedrouter-jax predict --bundle DIR ...            (bundle -> predictions; predict.py)

Layout of DIR (everything a server needs besides the base model, which is referenced by path
and fingerprint, never copied)::

    DIR/bundle.json            the router file (below)
    DIR/router.safetensors     float32 arrays named by bundle.json (centroids); may be empty
    DIR/adapters/adapter_<i>/  PEFT LoRA i (adapter_config.json + adapter_model.safetensors),
                               loadable by `peft.PeftModel.from_pretrained` / `load_adapter`

Adapter i is row i of the simulator's evaluation stack: the shared (server) adapters first,
then each client's own ones (`simulator.eval_plan`); every adapter id below indexes it, -1 is
the base model. bundle.json holds `format`, `version`, `method`, `round`, `n_clients`,
`default_router`, `base_model` {path ("embedded" = the packaged tiny Llama), fingerprint
(`embeddings.model_fingerprint`), tokenizer_fingerprint, dtype}, `prompt` {with_input,
no_input templates (`data.prompt`), bos, max_prompt_tokens (a longer prompt keeps BOS and its
last tokens)}, `embedding` {field ("input": the raw task input), bos, max_tokens (cut on the
right), pad_multiple, batch_size, pooling}, `generation` {max_new_tokens, batch_size},
`lora` {rank, alpha, targets}, `adapters` [{name, dir, owner: null (shared) or client}] and
`routers` {"local": rule, "global": rule}, each rule one of:

    {"rule": "fixed", "adapter": a}                       every input -> a
    {"rule": "per_client", "adapter_of_client": [C]}      client c's inputs -> a_c
    {"rule": "nearest_centroid", "centroids": NAME [G, D], "adapter_of_centroid": [G]}
        -> adapter_of_centroid[argmin_g |e - centroids[g]|^2] (ties: lowest g)
    {"rule": "nearest_client_centroid", "centroids": NAME [C, K, D],
     "adapter_of_centroid": [C][K] (-1: no centroid)}    the same over client c's own centroids
    {"rule": "blend", "adapter": g, "mix_adapter_of_client": [C], "mixing": {...}}
        update = self_weight * dW(g) + mix_weight * dW(own adapter of c)   (FedDPA)
        mixing {"kind": "fixed", "self_weight", "mix_weight"}, or {"kind": "dynamic", "variant",
        "max_weight", "instance_num", "train_weight", "seed", "servable", and when servable
        "features": NAME [C, N, D] (client c's training features in its first train_count[c]
        rows), "train_count": [C], "input_features", "draws"; else "why"}: per input x of client
        c, `algorithms.baselines.dynamic_blend` of x's feature (reference: its prompt's
        last-token state under base + c's local adapter; pre_issue16: its embedding e) and
        c's rows, the draws from `draw_rng(seed, c)`

plus `needs_client` and `embeds` (whether the rule reads the input's embedding). e is the
padding-aware mean of the base model's final-normed last hidden state over BOS + the tokens of
the input field (no L2 normalisation), as `embeddings.embed_tokens`.

FedDPA's dynamic features come from the run directory's `route_reference.npz` (written by
the run after its last round, `runner.Run.write_route_reference`; `save_route_reference`), not
from the checkpoint. They are features of every client's TRAINING data: a bundle holds all
clients' rows, so one given to a client's server should be that client's own.

Export reads the checkpoint only (no dataset, no embeddings, no base weights beyond the
fingerprint's samples): the state is restored from the checkpoint's own metadata, which gives
nested dicts; each of the method's dataclass levels (`SimState.server` / `.clients`) is viewed
by attribute so the method's own `server_route` / `client_route` run on it unchanged. A
method's routers come from `ROUTERS` (one function per method; `register_router` adds one).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import types
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from fedrouter_jax.lora import LoraStack, stack_adapters, take

BUNDLE_FILE = "bundle.json"
ARRAYS_FILE = "router.safetensors"
ADAPTERS_DIR = "adapters"
FORMAT, VERSION = "fedrouter-jax-bundle", 1
POOLING = "mean over real tokens of the base model's final-normed last hidden state; no L2 normalisation"
ROUTE_REFERENCE_FILE = "route_reference.npz"  # in the run directory (rundir.RUN_ENTRIES)
FEDDPA_FEATURES = "feddpa_train_features"  # its array in router.safetensors


class BundleError(ValueError):
    """A bundle (or a run to export) that cannot serve: names the file and the key."""


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class Bundle:
    """A bundle read back: `meta` is bundle.json, `arrays` the named router arrays."""

    directory: Path
    meta: dict
    arrays: dict

    @property
    def method(self) -> str:
        return self.meta["method"]

    @property
    def n_clients(self) -> int:
        return int(self.meta["n_clients"])

    def router(self, mode: str) -> dict:
        routers = self.meta["routers"]
        if mode not in routers:
            raise BundleError(f"{self.directory / BUNDLE_FILE}: routers has no {mode!r} router "
                              f"(has {sorted(routers)})")
        return routers[mode]

    def adapter_dir(self, index: int) -> Path:
        return self.directory / self.meta["adapters"][int(index)]["dir"]

    def load_adapters(self, indices) -> LoraStack:
        """Adapters `indices` (bundle ids >= 0) as one stack [len(indices), ...] (float32)."""
        from fedrouter_jax.models.hf_io import load_peft

        loaded = [load_peft(self.adapter_dir(i)) for i in indices]
        return LoraStack(params=stack_adapters(loaded).params, alpha=float(self.meta["lora"]["alpha"]))


def read_bundle(directory: str | Path) -> Bundle:
    """bundle.json + router.safetensors of DIR, checked for format and version."""
    from safetensors.numpy import load_file

    directory = Path(directory)
    path = directory / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"{path}: no bundle here (write one with `fedrouter-jax export`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise BundleError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
                          f"expected {FORMAT!r} version {VERSION}")
    arrays_path = directory / ARRAYS_FILE
    arrays = load_file(str(arrays_path)) if arrays_path.exists() else {}
    for mode, rule in meta["routers"].items():
        named = (("centroids", rule.get("centroids")), ("mixing.features", rule.get("mixing", {}).get("features")))
        for key, name in named:
            if name is not None and name not in arrays:
                raise BundleError(f"{arrays_path}: routers.{mode}.{key} names {name!r}, which is not in the file")
    return Bundle(directory, meta, arrays)


# ----------------------------------------------------------------------------- route reference (run dir)


@dataclasses.dataclass(frozen=True)
class RouteReference:
    """A run directory's route reference for the exported step: arrays (the method's
    `route_reference` output) and meta, or problem (why it cannot be used) with arrays None."""

    path: Path
    arrays: Optional[dict] = None
    meta: Optional[dict] = None
    problem: Optional[str] = None


def save_route_reference(out_dir: str | Path, arrays: dict, meta: dict) -> Path:
    """Write OUT_DIR/route_reference.npz atomically (temporary sibling, fsync, os.replace)."""
    path = Path(out_dir) / ROUTE_REFERENCE_FILE
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, __meta__=np.array(json.dumps(meta)), **{k: np.asarray(v) for k, v in arrays.items()})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_route_reference(out_dir: str | Path) -> Optional[tuple[dict, dict]]:
    """(arrays, meta) of OUT_DIR/route_reference.npz, or None when there is none."""
    path = Path(out_dir) / ROUTE_REFERENCE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files if k != "__meta__"}, json.loads(str(z["__meta__"]))


def route_reference_meta(cfg, method, round_: int) -> dict:
    """What a route reference is checked against at export: method, round, seed, and the
    method's own config section (the features depend on them)."""
    from fedrouter_jax.config import config_to_dict

    section = method.config_section[0] if method.config_section else None
    full = config_to_dict(cfg)
    return {"method": cfg.method, "round": int(round_), "seed": int(cfg.seed), "n_clients": int(cfg.data.n_clients),
            "section": None if section is None else {section: full.get(section)}}


def _route_reference(out_dir: Path, cfg, method, step: int) -> RouteReference:
    path = out_dir / ROUTE_REFERENCE_FILE
    again = (f"`fedrouter-jax eval --out-dir {out_dir}` writes it for the latest checkpoint (as the run does "
             "after its last round); then export again")
    loaded = load_route_reference(out_dir)
    if loaded is None:
        return RouteReference(path, problem=f"{path} is missing (a run from before this file, or one that "
                                            f"stopped before its last round): {again}")
    arrays, meta = loaded
    want = json.loads(json.dumps(route_reference_meta(cfg, method, step)))  # as stored (tuples -> lists)
    diff = sorted(k for k in want if meta.get(k) != want[k])
    if diff:
        got = ", ".join(f"{k} {meta.get(k)!r} (checkpoint: {want[k]!r})" for k in diff)
        return RouteReference(path, meta=meta, problem=f"{path} is of another state: {got}; {again}")
    return RouteReference(path, arrays=arrays, meta=meta)


# ----------------------------------------------------------------------------- routers per method


def _probe_inputs(n_clients: int, dim: int):
    """One zero sample per client: what `client_route` needs to show its adapters and, for
    methods whose routing ignores the input, each client's adapter. route_features: a zero
    feature per sample ([C, 1], FedDPA's similarity; `route_features` itself needs the data)."""
    from fedrouter_jax.algorithms.base import ClientInputs

    zeros = np.zeros((n_clients, 1, dim), np.float32)
    ones = np.ones((n_clients, 1), bool)
    return ClientInputs(client_id=np.arange(n_clients, dtype=np.int32), train_emb=zeros, train_mask=ones,
                        test_emb=zeros, test_mask=ones, route_features=np.zeros((n_clients, 1), np.float32))


def _fixed_or_per_client(ids: list) -> dict:
    """Each client's one adapter: one rule for all clients when they share it."""
    ids = [int(i) for i in ids]
    if len(set(ids)) == 1:
        return {"rule": "fixed", "adapter": ids[0], "needs_client": False, "embeds": False}
    return {"rule": "per_client", "adapter_of_client": ids, "needs_client": True, "embeds": False}


def _input_blind_routers(env, state, plans: dict, reference=None) -> tuple[dict, dict]:
    """FedIT, Local, FedSA, FedCluster: a client's inputs all go to one adapter in both modes."""
    return {mode: _fixed_or_per_client([ids[0] for ids in plan.adapter_ids]) for mode, plan in plans.items()}, {}


def _centroid_routers(env, state, plans: dict, reference=None) -> tuple[dict, dict]:
    """FedRouter(*): local = nearest of the client's own centroids, then that centroid's global
    adapter; global = nearest global centroid (fedrouter.client_route). Adapter g = cluster g."""
    clients = state.clients
    msg = _route_message(env, state, "global")
    l2g = np.where(np.asarray(clients.centroid_mask, bool), np.asarray(msg.per_client), -1)
    g = np.asarray(msg.shared).shape[0]
    routers = {
        "local": {"rule": "nearest_client_centroid", "centroids": "local_centroids",
                  "adapter_of_centroid": l2g.astype(int).tolist(), "needs_client": True, "embeds": True},
        "global": {"rule": "nearest_centroid", "centroids": "global_centroids",
                   "adapter_of_centroid": list(range(g)), "needs_client": False, "embeds": True},
    }
    arrays = {"global_centroids": np.asarray(msg.shared, np.float32),
              "local_centroids": np.asarray(clients.centroids, np.float32)}
    return routers, arrays


def _blend_routers(env, state, plans: dict, reference: Optional[RouteReference] = None) -> tuple[dict, dict]:
    """FedDPA: per input self_weight * dW(global) + mix_weight * dW(the client's local adapter).
    Fixed mixing: the weights are the method's own (read from its client_route, so both
    `feddpa.variant`s). Dynamic mixing weighs each input by its similarity to the client's
    training samples: their features come from the run's route reference (`reference`) and go
    into router.safetensors; without a usable one the rule is recorded with servable false and
    why, and predict says so."""
    dc = env.config.feddpa
    plan = plans["local"]
    first = lambda per_client: [x[0].item() for x in per_client]  # noqa: E731  (one probe row per client)
    glob, self_w, mix_w = set(first(plan.adapter_ids)), set(first(plan.self_weight)), set(first(plan.mix_weight))
    if dc.mixing == "fixed":
        if len(glob) != 1 or len(self_w) != 1 or len(mix_w) != 1:
            raise BundleError(f"method feddpa: client_route gave per-client global adapters / weights "
                              f"{sorted(glob)} / {sorted(self_w)} / {sorted(mix_w)}; the blend rule expects one each")
        mixing = {"kind": "fixed", "self_weight": float(self_w.pop()), "mix_weight": float(mix_w.pop())}
    arrays = {}
    if dc.mixing != "fixed":
        ref = dc.variant == "reference"
        features = ("last-token states under base + its local adapter" if ref else "base-model embeddings")
        mixing = {"kind": dc.mixing, "variant": dc.variant, "max_weight": float(dc.max_weight),
                  "instance_num": int(dc.instance_num), "train_weight": float(dc.train_weight),
                  "seed": int(env.config.seed)}
        problem = "no route reference" if reference is None else reference.problem
        if problem is None:
            feats, count = np.asarray(reference.arrays["train_features"]), np.asarray(reference.arrays["train_count"])
            if feats.shape[0] != env.n_clients or count.shape != (env.n_clients,):
                raise BundleError(f"{reference.path}: train_features {feats.shape} / train_count {count.shape}, "
                                  f"expected {env.n_clients} clients")
            arrays[FEDDPA_FEATURES] = feats
            mixing.update(
                servable=True, features=FEDDPA_FEATURES, train_count=count.astype(int).tolist(),
                features_are=f"client c's training samples' {features} (rows [:train_count[c]])",
                input_features=("the last-token state of the input's prompt (`prompt`, left-padded to "
                                "max_prompt_tokens) under base + the client's mix adapter" if ref else
                                "the input's embedding (`embedding`)"),
                draws="instance_draws(train_count[c], n_inputs, instance_num, numpy default_rng([seed, 7, c]))")
        else:
            mixing.update(servable=False, why=f"an input's weight compares it with the {features} of the client's "
                                              f"training samples, which the checkpoint does not hold; {problem}")
        embeds = problem is None and not ref
    else:
        embeds = False
    rule = {"rule": "blend", "adapter": int(min(glob)), "mix_adapter_of_client": first(plan.mix_ids),
            "mixing": mixing, "needs_client": True, "embeds": embeds}
    return {"local": rule, "global": dict(rule)}, arrays


ROUTERS: dict[str, Callable] = {
    "feddpa": _blend_routers,
    "fedrouter": _centroid_routers, "fedrouter_star": _centroid_routers,
    "fedit": _input_blind_routers, "local": _input_blind_routers, "fedsa": _input_blind_routers,
    "fedcluster": _input_blind_routers,
}


def register_router(method: str, fn: Callable) -> None:
    """`fn(env, state, plans {mode: probe EvalPlan}, reference) -> (routers {mode: rule}, arrays)` for a
    method; reference: the run's `RouteReference` (or None) for a method with `route_reference`."""
    ROUTERS[method] = fn


def _route_message(env, state, mode: str):
    """The method's own server_route on the restored server state."""
    from fedrouter_jax.algorithms.base import get_method

    return get_method(env.config.method).server_route(env, state.server, mode)


# ----------------------------------------------------------------------------- export


def _fields(tree):
    """A restored dataclass level (nested dict of its fields) read by attribute; None stays."""
    return None if tree is None else types.SimpleNamespace(**tree)


def restore_state(checkpoints: Path, step: Optional[int] = None):
    """(SimState with attribute-viewed server / clients, extra, step) from the checkpoint alone."""
    from fedrouter_jax.checkpoint import CheckpointStore
    from fedrouter_jax.simulator import SimState

    if not checkpoints.is_dir():
        raise BundleError(f"{checkpoints}: no checkpoints here (--out-dir names a run directory)")
    tree, extra = (store := CheckpointStore(checkpoints, read_only=True)).restore(step)
    state = SimState(server=_fields(tree.get("server")), clients=_fields(tree.get("clients")), opt=None)
    return state, extra, store.restored_step


def export_run(out_dir: str | Path, dest: str | Path, *, step: Optional[int] = None) -> Bundle:
    """Write the bundle of run OUT_DIR's checkpoint `step` (default: the latest verified) to DEST.

    DEST must not exist, be empty, or hold a bundle (replaced whole, via a temporary sibling
    directory, so a failed export leaves the old one)."""
    from fedrouter_jax.algorithms.base import Env, get_method
    from fedrouter_jax.config import config_from_dict
    from fedrouter_jax.embeddings import file_fingerprint, model_fingerprint
    from fedrouter_jax.models.config import LlamaConfig
    from fedrouter_jax.runner import model_directory
    from fedrouter_jax.simulator import eval_plan

    out_dir, dest = Path(out_dir), Path(dest)
    state, extra, step = restore_state(out_dir / "checkpoints", step)
    if "config" not in extra:
        raise BundleError(f"{out_dir / 'checkpoints' / str(step)}: the checkpoint holds no config")
    cfg = config_from_dict(extra["config"])
    if cfg.method not in ROUTERS:
        raise BundleError(f"method {cfg.method!r}: no bundle router (bundle.register_router); "
                          f"methods with one: {sorted(ROUTERS)}")
    model_dir = model_directory(cfg).resolve()
    model_cfg = LlamaConfig.from_json(model_dir / "config.json")
    n_clients = int(cfg.data.n_clients)
    env = Env(config=cfg, model_cfg=model_cfg, n_clients=n_clients)
    method = get_method(cfg.method)
    probe = _probe_inputs(n_clients, model_cfg.hidden_size)
    # the method's own route functions, on inputs that carry no data: they give the adapters
    plans = {mode: eval_plan(dataclasses.replace(method, route_features=None), env, state, probe, mode)
             for mode in ("local", "global")}
    reference = None if method.route_reference is None else _route_reference(out_dir, cfg, method, step)
    routers, arrays = ROUTERS[cfg.method](env, state, plans, reference)
    stack, owners = plans["local"].adapters, _owners(env, state, plans["local"])
    tok_files = [p for p in (model_dir / "tokenizer.json",) if p.exists()]
    meta = {
        "format": FORMAT, "version": VERSION, "method": cfg.method, "round": int(step), "n_clients": n_clients,
        "default_router": cfg.eval.router,
        "base_model": {"path": "embedded" if cfg.model.path == "embedded" else str(model_dir),
                       "fingerprint": model_fingerprint(model_dir), "tokenizer_fingerprint": file_fingerprint(tok_files),
                       "dtype": cfg.model.dtype},
        "prompt": _prompt_meta(cfg),
        "embedding": {"field": "input", "bos": True, "max_tokens": int(cfg.model.embed_max_tokens),
                      "pad_multiple": 16, "batch_size": int(cfg.eval.batch_size), "pooling": POOLING},
        "generation": {"greedy": True, "max_new_tokens": int(cfg.eval.max_new_tokens),
                       "batch_size": int(cfg.eval.batch_size)},
        "lora": {"rank": int(cfg.lora.rank), "alpha": float(cfg.lora.alpha), "targets": list(cfg.lora.targets)},
        "adapters": [{"name": f"adapter_{i}", "dir": f"{ADAPTERS_DIR}/adapter_{i}", "owner": o}
                     for i, o in enumerate(owners)],
        "routers": routers,
    }
    _write(dest, meta, stack, arrays, base_model_path=str(model_dir))
    return read_bundle(dest)


def _owners(env, state, plan) -> list:
    """Per adapter of the joint stack: None (shared) or the client that holds it."""
    n = 0 if plan.adapters is None else plan.adapters.n_adapters
    msg = _route_message(env, state, "local")
    n_shared = 0 if msg.adapters is None else jax.tree.leaves(msg.adapters)[0].shape[0]
    n_own = (n - n_shared) // max(env.n_clients, 1)
    return [None] * n_shared + [c for c in range(env.n_clients) for _ in range(n_own)]


def _prompt_meta(cfg) -> dict:
    from fedrouter_jax.data.prompt import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, RESPONSE_SEPARATOR

    return {"with_input": PROMPT_WITH_INPUT, "no_input": PROMPT_NO_INPUT,
            "rule": "with_input when instruction and input are both non-empty; else no_input with "
                    "instruction = the non-empty one of instruction / input",
            "response_separator": RESPONSE_SEPARATOR, "bos": True,
            "max_prompt_tokens": int(cfg.model.max_seq_len - cfg.eval.max_new_tokens)}


def _write(dest: Path, meta: dict, stack: Optional[LoraStack], arrays: dict, *, base_model_path: str) -> None:
    from fedrouter_jax.models.hf_io import export_peft, write_safetensors

    if dest.exists() and any(dest.iterdir()) and not (dest / BUNDLE_FILE).is_file():
        raise BundleError(f"{dest}: exists and holds no bundle ({BUNDLE_FILE}); choose a new --dest")
    tmp = dest.with_name(f".{dest.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / ADAPTERS_DIR).mkdir(parents=True)
    for i, entry in enumerate(meta["adapters"]):
        export_peft(tmp / entry["dir"], take(stack, i), base_model_path=base_model_path)
    write_safetensors(tmp / ARRAYS_FILE, {k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()})
    (tmp / BUNDLE_FILE).write_text(json.dumps(meta, indent=2))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
