"""The Python round loop around the simulator: data, embeddings, metrics, checkpoints, progress.

Only this module (and the CLI) knows about files, progress bars and checkpoints. Each round is
`Simulator.round_step(state, round) -> (state, metrics)` (plan, ONE jitted client-mapped
training call, replies checked, aggregation), then metrics.jsonl and a checkpoint of the whole
`SimState` pytree. A crash at any point leaves the last complete checkpoint; `resume`
continues bit-exactly.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from fedrouter_jax.algorithms.base import ClientInputs, Env, get_method
from fedrouter_jax.checkpoint import CheckpointStore
from fedrouter_jax.clustering import clustering_accuracy
from fedrouter_jax.config import FedRouterConfig, config_to_dict, load_config, save_config
from fedrouter_jax.data import (build_scenario, encode_inputs, encode_prompts, load_real_tasks, prompt_inputs,
                                tokenize_examples)
from fedrouter_jax.distributed import barrier, broadcast_from_primary, is_primary
from fedrouter_jax.embeddings import cache_key, cached_embeddings, embed_tokens, file_fingerprint
from fedrouter_jax.metrics import rouge1
from fedrouter_jax.models.hf_io import load_pretrained
from fedrouter_jax.routing import EvalPlan, generate_routed
from fedrouter_jax.simulator import NonFiniteError, SimState, Simulator, client_inputs  # noqa: F401
from fedrouter_jax.tensorboard_log import open_log


@dataclasses.dataclass
class RunData:
    """Everything a run derives from its config before round 1 (host side)."""

    cfg: FedRouterConfig
    model_dir: Path
    tokenizer: object
    model_cfg: object
    base: dict
    fed: object  # data.FederatedData (true task labels: metrics only)
    train_sets: list
    test_prompts: list
    inputs: ClientInputs  # every client's embeddings, stacked (what client_setup / client_route read)

    @property
    def train_emb(self) -> list:
        """Per client [N_c, D] base-model embeddings of its training samples."""
        return [e[m] for e, m in zip(np.asarray(self.inputs.train_emb), np.asarray(self.inputs.train_mask, bool))]

    @property
    def test_emb(self) -> list:
        """Per client [M_c, D] base-model embeddings of its test samples."""
        return [e[m] for e, m in zip(np.asarray(self.inputs.test_emb), np.asarray(self.inputs.test_mask, bool))]


def model_directory(cfg: FedRouterConfig) -> Path:
    if cfg.model.path == "embedded":
        from fedrouter_jax.assets import embedded_model_dir

        return embedded_model_dir()
    return Path(cfg.model.path)


def load_model_tokenizer(model_dir: Path):
    """`AutoTokenizer` from the model directory. Llama-3 ships no pad token: use EOS (pad
    positions are masked everywhere, so the choice never reaches the loss or the attention)."""
    from fedrouter_jax.hf_quiet import transformers

    AutoTokenizer = transformers().AutoTokenizer

    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no tokenizer.json / tokenizer_config.json next to the model")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.bos_token_id is None:
        raise ValueError(f"{model_dir}: the tokenizer has no BOS token")
    return tok


def _embed_clients(cfg, model_dir, tok, model_cfg, base, per_client_examples):
    """Base-model embeddings of each client's raw task inputs, cached on disk."""
    from fedrouter_jax.data import input_texts
    from fedrouter_jax.embeddings import model_fingerprint

    fp_model = model_fingerprint(model_dir)  # metadata + a bounded sample, memoised: once per start
    fp_tok = file_fingerprint([p for p in (model_dir / "tokenizer.json",) if p.exists()])
    out = []
    for examples in per_client_examples:
        texts = input_texts(examples)
        key = cache_key(fp_model + cfg.model.dtype, texts, cfg.model.embed_max_tokens, fp_tok)

        def compute():
            tokens, mask = encode_inputs(examples, tok, cfg.model.embed_max_tokens)
            return embed_tokens(base, model_cfg, tokens, mask, batch_size=cfg.eval.batch_size)

        out.append(cached_embeddings(key, compute))
    return out


def _only_clients(fed, clients: Sequence[int]):
    """The scenario's data of `clients` alone (in that order)."""
    pick = lambda xs: [xs[c] for c in clients]  # noqa: E731
    return dataclasses.replace(fed, train=pick(fed.train), test=pick(fed.test), train_tasks=pick(fed.train_tasks),
                               test_tasks=pick(fed.test_tasks), client_tasks=pick(fed.client_tasks))


def prepare(cfg: FedRouterConfig, progress: bool = True, *, clients: Optional[Sequence[int]] = None) -> RunData:
    """Model, tokenizer, scenario data, token arrays and embeddings for a config.

    clients: only these client ids (a deployment node's own): `fed`, `train_sets`,
    `test_prompts` and `inputs` then hold just them, in this order, and `inputs.client_id`
    names them; the scenario is still drawn for all `data.n_clients` (same data per client).
    """
    model_dir = model_directory(cfg)
    dtype = jnp.bfloat16 if cfg.model.dtype == "bfloat16" else jnp.float32
    model_cfg, base = load_pretrained(model_dir, dtype)
    tok = load_model_tokenizer(model_dir)
    d = cfg.data
    source = "synthetic" if d.source == "synthetic" else load_real_tasks(d.hf_dir)
    fed = build_scenario(d.scenario, n_clients=d.n_clients, train_per_client=d.train_per_client,
                         test_per_client=d.test_per_client, seed=cfg.seed, source=source,
                         dirichlet_alpha=d.dirichlet_alpha, mix=d.mix, prompt=d.prompt)
    empty = [c for c in range(fed.n_clients) if len(fed.train[c]) == 0]
    if empty:
        raise ValueError(f"data: client {empty[0]} has no training samples (scenario {d.scenario})")
    if clients is not None:
        bad = [c for c in clients if not 0 <= int(c) < fed.n_clients]
        if bad:
            raise ValueError(f"data.n_clients={fed.n_clients}: no client {bad[0]}")
        fed = _only_clients(fed, [int(c) for c in clients])
    train_sets = [tokenize_examples(ex, tok, cfg.model.max_seq_len, warn=False) for ex in fed.train]
    prompt_len = cfg.model.max_seq_len - cfg.eval.max_new_tokens
    test_prompts = [encode_prompts(ex, tok, prompt_len, warn=False)[:2] for ex in fed.test]
    cut = sum(ts.report.prompts_cut for ts in train_sets)
    rcut = sum(ts.report.responses_cut for ts in train_sets)
    if cut or rcut:
        print(f"[data] truncated to max_seq_len={cfg.model.max_seq_len}: {cut} prompts cut from the left, "
              f"{rcut} responses cut (raise model.max_seq_len to avoid)")
    train_emb = _embed_clients(cfg, model_dir, tok, model_cfg, base, fed.train)
    test_emb = _embed_clients(cfg, model_dir, tok, model_cfg, base, fed.test)
    # the clients' own prompts too: FedDPA embeds them with its local adapter at evaluation
    train_prompts = [encode_prompts(ex, tok, prompt_len, warn=False)[:2] for ex in fed.train]
    inputs = client_inputs(train_emb, test_emb).replace(**prompt_inputs(train_prompts, test_prompts))
    if clients is not None:
        inputs = inputs.replace(client_id=np.asarray(clients, np.int32))
    return RunData(cfg, model_dir, tok, model_cfg, base, fed, train_sets, test_prompts, inputs)


# ----------------------------------------------------------------------------- evaluation


def evaluate(data: RunData, plan: EvalPlan, *, progress: bool = True) -> dict:
    """Greedy-decode every client's test set with the routed adapters; ROUGE-1 per client/task.

    Also the clustering accuracy of the local routing against the true task labels (metrics only).
    """
    cfg, tok, fed = data.cfg, data.tokenizer, data.fed
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(t) for t in fed.test), desc="eval", unit="sample", leave=False)
    gens = generate_routed(
        data.base, data.model_cfg, plan, data.test_prompts, batching=cfg.eval.batching,
        batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, progress=bar.update if bar else None,
    )
    if bar:
        bar.close()
    per_client, per_task_scores, samples = [], {t: [] for t in fed.task_names}, []
    for c, g in enumerate(gens):
        preds = [s.strip() for s in tok.batch_decode([x.tolist() for x in g], skip_special_tokens=True)]
        refs = [ex["output"] for ex in fed.test[c]]
        scores = rouge1(preds, refs) if preds else np.zeros(0)
        per_client.append(float(scores.mean()) if scores.size else float("nan"))
        for t_idx, s in zip(fed.test_tasks[c], scores):
            per_task_scores[fed.task_names[t_idx]].append(float(s))
        for i in range(min(2, len(preds))):
            samples.append({"client": c, "task": fed.test[c][i]["task"], "prediction": preds[i], "reference": refs[i],
                            "adapter": int(np.asarray(plan.adapter_ids[c])[i])})
    all_scores = [s for v in per_task_scores.values() for s in v]
    result = {
        "rouge1": float(np.mean(all_scores)) if all_scores else float("nan"),
        "per_client": per_client,
        "per_task": {t: (float(np.mean(v)) if v else None) for t, v in per_task_scores.items()},
        "samples": samples,
    }
    if plan.local_cluster is not None:
        accs = [clustering_accuracy(fed.test_tasks[c], plan.local_cluster[c]) for c in range(fed.n_clients)]
        result["clustering_accuracy"] = float(np.mean(accs))
        result["clustering_accuracy_per_client"] = [float(a) for a in accs]
    return result


def base_plan(data: RunData) -> EvalPlan:
    return EvalPlan(adapters=None, adapter_ids=[np.full(len(t), -1) for t in data.fed.test])


# ----------------------------------------------------------------------------- rounds


def _write_jsonl(path: Path, records: list) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)


DIVERGENCE_FACTOR = 4.0  # a round's loss this many times the first one's: warn


def divergence_warning(history: list, rec: dict) -> Optional[str]:
    """A warning when the round's train loss rose far above the run's first loss (finite but
    exploding, e.g. a learning rate far too large), else None. NaN/Inf is handled by the
    simulator; this catches what is still finite."""
    first = (history[0] if history else rec).get("train_loss_first_step")
    loss = rec.get("train_loss")
    if first is None or loss is None or not np.isfinite(first) or not np.isfinite(loss) or first <= 0:
        return None
    if loss > DIVERGENCE_FACTOR * first:
        return (f"round {rec['round']}: train loss {loss:.3g} is {loss / first:.1f}x the first round's "
                f"{first:.3g}: the run is diverging (lower train.lr?)")
    return None


class Run:
    """One federated run of `cfg.method`, resumable from `cfg.out_dir/checkpoints`."""

    def __init__(self, cfg: FedRouterConfig, *, data: Optional[RunData] = None, progress: bool = True):
        data = data or prepare(cfg)
        if data.cfg is not cfg:  # prepared under another config (same model, data, seed): one config object
            data = dataclasses.replace(data, cfg=cfg)
        self.data, self.progress, self.out = data, progress, Path(cfg.out_dir)
        self.method = get_method(cfg.method)
        self.env = Env(config=cfg, model_cfg=self.data.model_cfg, n_clients=self.data.fed.n_clients)
        self.sim = Simulator(self.method, self.env, self.data.base, self.data.inputs, self.data.train_sets,
                             mesh_devices=cfg.train.client_mesh_devices)
        self.state: Optional[SimState] = None
        self.round: Optional[int] = None  # the round `state` is of (run / restore set it)

    @property
    def cfg(self) -> FedRouterConfig:
        """The run's config: the same object as `self.data.cfg` and `self.env.config`."""
        return self.env.config

    def initial_state(self) -> SimState:
        """The state before round 1 (client_setup + server_setup); also the restore target."""
        return self.sim.setup()

    def restore(self, store: CheckpointStore, step: Optional[int] = None) -> tuple[SimState, list, int]:
        """(state, history, round) of a checkpoint (default: the latest that verifies), restored
        into the structure of `initial_state` (setup is deterministic, so it rebuilds the shapes)."""
        state, extra = store.restore(step, like=self.initial_state())
        self.round = store.restored_step
        return state, extra["history"], store.restored_step

    def run(self, *, stop_after_round: Optional[int] = None) -> dict:
        """The rounds from the latest verified checkpoint on. With several processes every one
        computes them; only the primary writes (config, metrics, checkpoints) and chooses the
        checkpoint, which the others then read."""
        cfg = self.cfg
        primary = is_primary()
        if primary:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
        store = CheckpointStore(self.out / "checkpoints", keep=cfg.checkpoint.keep, read_only=not primary)
        start = 0
        if primary and store.latest_step() is not None:
            state, history, start = self.restore(store)
            print(f"[resume] from the complete checkpoint of round {start} in {self.out / 'checkpoints'}")
        start = broadcast_from_primary("start round", start)
        if start == 0:
            state, history = self.initial_state(), []
        elif not primary:
            state, history, _ = self.restore(store, start)
        if primary:
            _write_jsonl(self.out / "metrics.jsonl", history)
        rounds = cfg.train.rounds
        scalars = open_log(primary and cfg.metrics.tensorboard, self.out)
        bar = None
        if self.progress and primary:
            from tqdm.auto import tqdm

            bar = tqdm(total=rounds, initial=start, desc=f"{cfg.method} rounds", unit="round")
        for r in range(start, rounds):
            barrier(f"round {r + 1}")  # the others wait while the primary restores, saves, evaluates
            t0 = time.perf_counter()
            state, metrics = self.sim.round_step(state, r)
            rec = {"round": r + 1, **metrics, "time_s": round(time.perf_counter() - t0, 3)}
            warning = divergence_warning(history, rec)
            if warning:
                rec["warning"] = warning
                (bar.write if bar else print)(f"[warning] {warning}")
            if primary and cfg.eval.every and (r + 1) % cfg.eval.every == 0 and r + 1 < rounds:
                ev = evaluate(self.data, self.sim.eval_plan(state, cfg.eval.router), progress=self.progress)
                rec["eval"] = {k: ev[k] for k in ("rouge1", "per_client", "per_task") if k in ev}
            history.append(rec)
            if primary:
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if scalars:
                    scalars.write(rec)
            last = r + 1 == rounds
            if primary and cfg.checkpoint.every and ((r + 1) % cfg.checkpoint.every == 0 or last):
                store.save(r + 1, state, {"history": history, "config": config_to_dict(cfg)})
            self.state, self.round = state, r + 1
            if last:  # what the router compares new inputs with (export bundle), of the final state
                self.write_route_reference()
            if bar:
                bar.set_postfix(loss=f"{rec['train_loss']:.3f}")
                bar.update(1)
            if stop_after_round is not None and r + 1 >= stop_after_round:
                break
        if bar:
            bar.close()
        if scalars:
            scalars.close()
        self.state = state
        if self.round is None:
            self.round = start
        return {"state": state, "history": history}

    def write_route_reference(self, *, only_if_stale: bool = False) -> Optional[Path]:
        """out_dir/route_reference.npz: the method's `route_reference` of `self.state` (round
        `self.round`): what its router compares a new input with, from each client's own
        training data (FedDPA's dynamic mixing), for `export`. Primary only; None when the
        method needs none. only_if_stale: keep a file already of this state (final_evaluation)."""
        from fedrouter_jax.bundle import load_route_reference, route_reference_meta, save_route_reference

        if self.method.route_reference is None or not is_primary() or self.state is None or self.round is None:
            return None
        meta = json.loads(json.dumps(route_reference_meta(self.cfg, self.method, self.round)))
        if only_if_stale:
            old = load_route_reference(self.out)
            if old is not None and {k: old[1].get(k) for k in meta} == meta:
                return self.out / "route_reference.npz"
        arrays = self.method.route_reference(self.env, self.data.base, self.state.clients, self.data.inputs)
        if arrays is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        return save_route_reference(self.out, arrays, meta)

    def final_evaluation(self) -> dict:
        """Score the trained method (configured router + extra modes) and, optionally, the base.
        Also writes the route reference when it is missing or of another state (a run directory
        from before it existed: `fedrouter-jax eval` then gives `export` what it needs)."""
        cfg, data = self.cfg, self.data
        self.write_route_reference(only_if_stale=True)
        results = {"method": cfg.method, "scenario": cfg.data.scenario, "seed": cfg.seed}
        modes = [cfg.eval.router] + [m for m in cfg.eval.router_modes if m != cfg.eval.router]
        for mode in modes:
            results[mode] = evaluate(data, self.sim.eval_plan(self.state, mode), progress=self.progress)
        results["router"] = cfg.eval.router
        results["rouge1"] = results[cfg.eval.router]["rouge1"]
        if cfg.eval.include_base:
            results["base"] = evaluate(data, base_plan(data), progress=self.progress)
        if is_primary():
            (self.out / "results.json").write_text(json.dumps(results, indent=2))
            scalars = open_log(cfg.metrics.tensorboard, self.out)
            if scalars:  # the final score, at the last round's step
                scalars.write({"round": cfg.train.rounds, "eval": results[cfg.eval.router]})
                scalars.close()
        return results


def format_table(results: dict, task_names) -> str:
    """Per-task and per-client ROUGE-1 of the method (and the base model if scored)."""
    mode = results["router"]
    m = results[mode]
    rows = [("method", m)] + ([("base", results["base"])] if "base" in results else [])
    lines = [f"ROUGE-1 — {results['method']} ({results['scenario']}, router: {mode})", ""]
    head = f"{'':10s}" + "".join(f"{t:>10s}" for t in task_names) + f"{'overall':>10s}"
    lines += ["per task", head]
    for name, r in rows:
        cells = "".join(f"{(r['per_task'][t] if r['per_task'][t] is not None else float('nan')):>10.3f}" for t in task_names)
        lines.append(f"{(results['method'] if name == 'method' else 'base'):10s}{cells}{r['rouge1']:>10.3f}")
    n = len(m["per_client"])
    lines += ["", "per client", f"{'':10s}" + "".join(f"{'c' + str(c):>8s}" for c in range(n))]
    for name, r in rows:
        lines.append(f"{(results['method'] if name == 'method' else 'base'):10s}" + "".join(f"{v:>8.3f}" for v in r["per_client"]))
    if "clustering_accuracy" in m:
        lines += ["", f"local clustering accuracy (test, vs true tasks): {100 * m['clustering_accuracy']:.1f} %"]
    return "\n".join(lines)


def run_from_config(path_or_cfg, overrides=(), *, progress: bool = True, fresh: bool = False,
                    resume: bool = False) -> dict:
    """Load a config, run (resuming from the latest verified checkpoint), evaluate, print the table.

    The out_dir goes through `rundir.RunDir`: a directory holding anything a run does not write
    is refused (`fresh` removes only a run's own entries), one process at a time (lock), an
    existing run must have the same config (`resume`: the same values of the keys the saved
    state depends on, checked against the config saved with the checkpoint), a directory whose
    every checkpoint is damaged is an error, and an attempt that fails before its first
    checkpoint leaves nothing behind.
    """
    from fedrouter_jax.checkpoint import CheckpointError
    from fedrouter_jax.rundir import RunDir, check_resume_config

    cfg = path_or_cfg if isinstance(path_or_cfg, FedRouterConfig) else load_config(path_or_cfg, overrides)
    if not is_primary():  # the primary holds the directory (lock, checks, files, evaluation)
        return Run(cfg, progress=False).run()
    new = config_to_dict(cfg)
    with RunDir(cfg.out_dir, fresh=fresh, must_exist=resume) as rd:
        if not resume:
            rd.check_same_config(new)
        store = CheckpointStore(rd.out / "checkpoints", read_only=True)
        step, skipped = store.verified_steps()
        if step is None and any(store.is_damaged(s) for s, _ in skipped):
            detail = "; ".join(f"step {s}: {why}" for s, why in skipped)
            raise CheckpointError(f"{store.directory}: no usable checkpoint: every step fails verification "
                                  f"({detail}); nothing was deleted. Move them away or start over (--fresh)")
        if step is not None:
            changed = check_resume_config(store.read_extra(step).get("config"), new,
                                          where=str(rd.out / "config.yaml"), step=step)
            if changed:
                print(f"[resume] settings changed since round {step}: "
                      + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        run = Run(cfg, progress=progress)
        run.run()
        results = run.final_evaluation()
    print(format_table(results, run.data.fed.task_names))
    return results
