"""The experiment grid: methods x scenarios x variants x seeds, resumable per cell.

    python experiments/grid.py configs/grid_cpu.yaml                  # run (or finish) the grid
    python experiments/grid.py configs/grid_cpu.yaml --dry-run        # list the cells, check every config
    python experiments/grid.py configs/grid_smoke.yaml --set model.path=/tmp/tiny --methods fedit,local

A *cell* is one federated run (`runner.Run`) of one method on one scenario (and variant) with one
seed; its config is, left to right: the grid's `base` YAML chain, the scenario's YAML
(`scenario_configs`), then the dotted overrides of `overrides`, `scenario_overrides[scenario]`,
`variants[variant]`, `method_overrides[method]`, `--set`, and finally method / seed / out_dir.
Every cell's config is built and validated BEFORE any training, so a bad grid fails at once,
naming the offending value and the valid choices.

Outputs (paths relative to the repository root unless absolute):
  <results_dir>/<name>.jsonl             one line per FINISHED cell (method, scenario, variant,
                                         seed, rouge1, per_task, per_client, clustering accuracy,
                                         per-round losses, wall time, resolved config)
  <results_dir>/<name>_table1.md         Table 1 layout (Single, Dual, All, Average; mean +- std)
  <results_dir>/<name>_generalization.md the generalization table
  <runs_dir>/<variant>/<scenario>/<method>/seed<k>/  the cell's run dir (checkpoints, metrics)

Resuming: a cell already in the jsonl (same key and same resolved config) is skipped; an
unfinished cell resumes from its run dir's last complete checkpoint (`runner.Run`). A run dir
holding a different config is an error (pass --fresh-cells to start such cells over).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from fedrouter_jax.algorithms import available  # noqa: E402
from fedrouter_jax.config import ConfigError, config_to_dict, load_config, load_yaml  # noqa: E402

SCENARIO_CONFIGS = {
    "single": "configs/single.yaml",
    "dual": "configs/dual.yaml",
    "all": "configs/all.yaml",
    "generalization": "configs/generalization.yaml",
}
GRID_KEYS = ("name", "results_dir", "runs_dir", "base", "methods", "scenarios", "seeds", "variants",
             "overrides", "scenario_configs", "scenario_overrides", "method_overrides", "description",
             "generalization_from")


class GridError(ValueError):
    """An invalid grid config or selection; the message names the value and the valid choices."""


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    scenario: str
    variant: str
    seed: int
    cfg: object  # FedRouterConfig
    sources: tuple = ()  # (config files, dotted overrides) the config was built from

    @property
    def key(self) -> tuple:
        return (self.method, self.scenario, self.variant, self.seed)

    @property
    def name(self) -> str:
        v = "" if self.variant == "default" else f"{self.variant}/"
        return f"{v}{self.scenario}/{self.method}/seed{self.seed}"


@dataclasses.dataclass
class Grid:
    name: str
    results_dir: Path
    runs_dir: Path
    cells: list
    # evaluate the trained cells of this scenario (e.g. "single") on every task with the global
    # router, as scenario "generalization" (the paper's Table 3: no retraining)
    generalization_from: Optional[str] = None

    @property
    def jsonl(self) -> Path:
        return self.results_dir / f"{self.name}.jsonl"


def _path(p) -> Path:
    p = Path(p)
    return p if p.is_absolute() else ROOT / p


def _dotted(d, where: str) -> list[str]:
    """{"train.rounds": 3, "data": {"n_clients": 8}} -> ["train.rounds=3", "data.n_clients=8"]."""
    if d is None:
        return []
    if not isinstance(d, dict):
        raise GridError(f"{where}: expected a mapping of dotted config keys to values, got {d!r}")
    out = []

    def rec(prefix, x):
        for k, v in x.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                rec(key, v)
            else:
                out.append(f"{key}={json.dumps(v)}")

    rec("", d)
    return out


def _choices(value, valid, what: str) -> None:
    if value not in valid:
        raise GridError(f"{what}: unknown value {value!r}; valid choices are {', '.join(map(str, valid))}")


def _list(spec: dict, key: str, path: str) -> list:
    v = spec.get(key)
    if not isinstance(v, list) or not v:
        raise GridError(f"{path}: {key}: expected a non-empty list, got {v!r}")
    dups = sorted({str(x) for x in v if v.count(x) > 1})
    if dups:
        raise GridError(f"{path}: {key}: duplicated value(s) {', '.join(dups)}")
    return v


def load_grid(path, *, sets=(), methods: Optional[list] = None, scenarios: Optional[list] = None,
              seeds: Optional[list] = None, variants: Optional[list] = None, results_dir=None,
              runs_dir=None) -> Grid:
    """Read a grid YAML and build + validate every cell's config (no training)."""
    path = _path(path)
    try:
        spec = load_yaml(path)
    except ConfigError as e:
        raise GridError(str(e)) from None
    unknown = [k for k in spec if k not in GRID_KEYS]
    if unknown:
        raise GridError(f"{path}: unknown key {unknown[0]!r}; valid keys are {', '.join(GRID_KEYS)}")
    name = spec.get("name") or path.stem
    g_methods = _list(spec, "methods", str(path))
    for m in g_methods:
        _choices(m, available(), f"{path}: methods")
    scenario_files = {**SCENARIO_CONFIGS, **(spec.get("scenario_configs") or {})}
    g_scenarios = _list(spec, "scenarios", str(path))
    for s in g_scenarios:
        _choices(s, list(scenario_files), f"{path}: scenarios")
    g_seeds = _list(spec, "seeds", str(path))
    for s in g_seeds:
        if not isinstance(s, int) or isinstance(s, bool) or s < 0:
            raise GridError(f"{path}: seeds: {s!r} is not a non-negative integer")
    g_variants = spec.get("variants") or {"default": {}}
    if not isinstance(g_variants, dict):
        raise GridError(f"{path}: variants: expected a mapping name -> overrides, got {g_variants!r}")
    for key, valid in (("scenario_overrides", scenario_files), ("method_overrides", available())):
        for k in spec.get(key) or {}:
            _choices(k, list(valid), f"{path}: {key}")

    def pick(sel, full, what):
        if sel is None:
            return list(full)
        for x in sel:
            _choices(x, list(full), f"--{what} (grid {path.name} has)")
        return [x for x in full if x in sel]

    sel_methods = pick(methods, g_methods, "methods")
    sel_scenarios = pick(scenarios, g_scenarios, "scenarios")
    sel_seeds = pick(seeds, g_seeds, "seeds")
    sel_variants = pick(variants, list(g_variants), "variants")

    base = spec.get("base") or []
    base = [base] if isinstance(base, str) else list(base)
    base_files = [_path(b) for b in base]
    for b in base_files:
        if not b.is_file():
            raise GridError(f"{path}: base: config file {b} does not exist")
    runs_dir = _path(runs_dir or spec.get("runs_dir") or f"runs/{name}")
    results_dir = _path(results_dir or spec.get("results_dir") or "results")
    common = _dotted(spec.get("overrides"), f"{path}: overrides")
    cells = []
    for variant in sel_variants:
        for scenario in sel_scenarios:
            scen_file = _path(scenario_files[scenario])
            if not scen_file.is_file():
                raise GridError(f"{path}: scenario {scenario!r}: config file {scen_file} does not exist")
            for seed in sel_seeds:
                for method in sel_methods:
                    out_dir = runs_dir / variant / scenario / method / f"seed{seed}"
                    ov = (common + _dotted((spec.get("scenario_overrides") or {}).get(scenario), f"{path}: scenario_overrides")
                          + _dotted(g_variants[variant], f"{path}: variants.{variant}")
                          + _dotted((spec.get("method_overrides") or {}).get(method), f"{path}: method_overrides")
                          + list(sets) + [f"method={method}", f"seed={seed}", f"out_dir={out_dir}"])
                    try:
                        cfg = load_config(base_files + [scen_file], ov)
                    except ConfigError as e:
                        raise GridError(f"cell {variant}/{scenario}/{method}/seed{seed}: {e}") from None
                    cells.append(Cell(method, scenario, variant, int(seed), cfg,
                                      (tuple(base_files + [scen_file]), tuple(ov))))
    gen_from = spec.get("generalization_from")
    if gen_from is not None:
        _choices(gen_from, g_scenarios, f"{path}: generalization_from")
        if "generalization" in g_scenarios:
            raise GridError(f"{path}: generalization_from: the grid also trains a 'generalization' "
                            "scenario; use one or the other")
    return Grid(name=name, results_dir=results_dir, runs_dir=runs_dir, cells=cells, generalization_from=gen_from)


def config_hash(cfg) -> str:
    d = config_to_dict(cfg)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _prune_new_defaults(current, stored, default):
    """`current` without the keys that `stored` lacks and whose value is the default (keys added
    to the config after the cell ran); every other key is kept, so a real difference stays one."""
    out = {}
    for k, v in current.items():
        if k not in stored:
            if isinstance(default, dict) and default.get(k) == v:
                continue
            out[k] = v
        elif isinstance(v, dict) and isinstance(stored[k], dict):
            out[k] = _prune_new_defaults(v, stored[k], default.get(k, {}) if isinstance(default, dict) else {})
        else:
            out[k] = v
    return out


def same_config(stored: Optional[dict], cfg) -> bool:
    """Whether a finished cell's recorded config is `cfg`'s: equal, except for config keys added
    since (at their default value), so that a new option does not rerun hours of finished cells,
    and for `out_dir` (where the run dir was changes no number: a cell run with --runs-dir
    elsewhere, or on another machine, counts)."""
    if stored is None:
        return False
    stored = {k: v for k, v in stored.items() if k != "out_dir"}
    current = {k: v for k, v in config_to_dict(cfg).items() if k != "out_dir"}
    return _prune_new_defaults(current, stored, config_to_dict(load_config(None))) == stored


def read_cells(path: Path) -> list[dict]:
    """Finished cells of a jsonl (a torn last line from a crash is ignored)."""
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def cell_record(cell: Cell, results: dict, history: list, wall_s: float, cpu_s: float = float("nan")) -> dict:
    mode = results["router"]
    m = results[mode]
    rec = {
        "method": cell.method, "scenario": cell.scenario, "variant": cell.variant, "seed": cell.seed,
        "rouge1": m["rouge1"], "per_task": m["per_task"], "per_client": m["per_client"], "router": mode,
        "train_loss": [h["train_loss"] for h in history],
        "rouge1_per_round": [[h["round"], h["eval"]["rouge1"]] for h in history if "eval" in h],
        "wall_time_s": round(wall_s, 2), "cpu_time_s": round(cpu_s, 2), "n_clients": cell.cfg.data.n_clients,
        "config_hash": config_hash(cell.cfg), "config": config_to_dict(cell.cfg),
    }
    for k in ("clustering_accuracy", "clustering_accuracy_per_client"):
        if k in m:
            rec[k] = m[k]
    for other in ("local", "global"):
        if other != mode and other in results:
            rec[f"rouge1_{other}"] = results[other]["rouge1"]
    return rec


def generalization_record(cell: Cell, *, progress: bool = False) -> dict:
    """The paper's test-time generalization (Table 3) of a finished cell, without retraining:
    its final checkpoint, restored into a run of the same config on the "generalization"
    scenario (the same training partition, every task in each client's test set), scored
    with the global router. Writes only under <cell out_dir>/generalization."""
    from fedrouter_jax.checkpoint import CheckpointStore
    from fedrouter_jax.runner import Run

    files, overrides = cell.sources
    out = Path(cell.cfg.out_dir) / "generalization"
    gen_cfg = load_config(list(files), list(overrides) + [
        "data.scenario=generalization", "eval.router=global", "eval.router_modes=[]", f"out_dir={out}"])
    t0, c0 = time.perf_counter(), time.process_time()
    run = Run(gen_cfg, progress=progress)
    store = CheckpointStore(Path(cell.cfg.out_dir) / "checkpoints", keep=1, read_only=True)
    state, history, step = run.restore(store)
    if step != cell.cfg.train.rounds:
        raise GridError(f"cell {cell.name}: its last checkpoint is round {step}, not the final round "
                        f"{cell.cfg.train.rounds}; rerun the cell")
    run.state = state
    out.mkdir(parents=True, exist_ok=True)
    results = run.final_evaluation()
    gen_cell = dataclasses.replace(cell, scenario="generalization", cfg=gen_cfg)
    rec = cell_record(gen_cell, results, history, time.perf_counter() - t0, time.process_time() - c0)
    rec["rouge1_per_round"] = []  # the trained cell's curve is on its own test sets, not these
    rec["trained_in"] = cell.name
    return rec


def _data_key(cfg) -> str:
    d = config_to_dict(cfg)
    return json.dumps({"model": d["model"], "data": d["data"], "seed": d["seed"]}, sort_keys=True)


def run_cell(cell: Cell, data=None, *, progress: bool = False, fresh: bool = False):
    """Train + evaluate one cell (resuming its run dir). -> (record, RunData)."""
    from fedrouter_jax.runner import Run, prepare

    cfg = cell.cfg
    out = Path(cfg.out_dir)
    saved = out / "config.yaml"
    if saved.exists():
        if fresh:
            shutil.rmtree(out)
        elif config_to_dict(load_config(saved)) != config_to_dict(cfg):
            raise GridError(f"cell {cell.name}: {out} holds a run with a different config; "
                            "pass --fresh-cells to start such cells over")
    if data is None:
        data = prepare(cfg, progress=progress)
    else:  # same model / data / seed: reuse the tokens and embeddings, swap in this cell's config
        data = dataclasses.replace(data, cfg=cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    run = Run(cfg, data=data, progress=progress)
    out_run = run.run()
    results = run.final_evaluation()
    rec = cell_record(cell, results, out_run["history"], time.perf_counter() - t0, time.process_time() - c0)
    return rec, data


def run_grid(grid: Grid, *, progress: bool = False, fresh_cells: bool = False, log=print) -> list[dict]:
    """Run every unfinished cell in order; append each finished cell to the jsonl; write tables."""
    from report import write_tables

    grid.results_dir.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["scenario"], r.get("variant", "default"), r["seed"]): r
            for r in read_cells(grid.jsonl)}

    def finished(cell) -> bool:
        r = done.get(cell.key)
        return r is not None and (r.get("config_hash") == config_hash(cell.cfg) or same_config(r.get("config"), cell.cfg))

    todo = [c for c in grid.cells if not finished(c)]
    gen_todo = [c for c in grid.cells if c.scenario == grid.generalization_from
                and (c.method, "generalization", c.variant, c.seed) not in done]
    log(f"[grid {grid.name}] {len(grid.cells)} cells, {len(grid.cells) - len(todo)} finished, {len(todo)} to run "
        f"-> {grid.jsonl}")
    data, data_key, records = None, None, []
    t_all = time.perf_counter()
    for i, cell in enumerate(todo):
        key = _data_key(cell.cfg)
        if key != data_key:
            data, data_key = None, key
        t0 = time.perf_counter()
        rec, data = run_cell(cell, data, progress=progress, fresh=fresh_cells)
        with open(grid.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
        records.append(rec)
        write_tables(grid.jsonl, grid.results_dir / grid.name)
        log(f"[grid {grid.name}] {i + 1}/{len(todo)} {cell.name}: rouge1 {rec['rouge1']:.4f} "
            f"({time.perf_counter() - t0:.1f} s, total {time.perf_counter() - t_all:.0f} s)")
        if cell in gen_todo:
            _append_generalization(grid, cell, progress, log)
            gen_todo.remove(cell)
    for cell in gen_todo:  # trained before (e.g. by a run that stopped between the two steps)
        _append_generalization(grid, cell, progress, log)
    write_tables(grid.jsonl, grid.results_dir / grid.name)
    return records


def _append_generalization(grid: Grid, cell: Cell, progress: bool, log) -> None:
    rec = generalization_record(cell, progress=progress)
    with open(grid.jsonl, "a") as f:
        f.write(json.dumps(rec) + "\n")
    from report import write_tables

    write_tables(grid.jsonl, grid.results_dir / grid.name)
    log(f"[grid {grid.name}] generalization of {cell.name}: rouge1 {rec['rouge1']:.4f} ({rec['wall_time_s']:.1f} s)")


def _csv(s: Optional[str], cast=str):
    return None if s is None else [cast(x.strip()) for x in s.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("grid", help="grid YAML, e.g. configs/grid_cpu.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to every cell, e.g. model.path=/tmp/tiny")
    p.add_argument("--methods", help="comma-separated subset of the grid's methods")
    p.add_argument("--scenarios", help="comma-separated subset of the grid's scenarios")
    p.add_argument("--seeds", help="comma-separated subset of the grid's seeds")
    p.add_argument("--variants", help="comma-separated subset of the grid's variants")
    p.add_argument("--results-dir", help="where the jsonl and tables go (default: the grid's results_dir)")
    p.add_argument("--runs-dir", help="where the cells' run dirs go (default: the grid's runs_dir)")
    p.add_argument("--dry-run", action="store_true", help="build and validate every cell, list them, train nothing")
    p.add_argument("--fresh-cells", action="store_true", help="restart cells whose run dir holds another config")
    p.add_argument("--progress", action="store_true", help="per-round progress bars")
    a = p.parse_args(argv)
    try:
        grid = load_grid(a.grid, sets=a.set, methods=_csv(a.methods), scenarios=_csv(a.scenarios),
                         seeds=_csv(a.seeds, int), variants=_csv(a.variants), results_dir=a.results_dir,
                         runs_dir=a.runs_dir)
    except (GridError, ConfigError) as e:
        print(f"grid: error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        done = {(r["method"], r["scenario"], r.get("variant", "default"), r["seed"]) for r in read_cells(grid.jsonl)}
        for c in grid.cells:
            print(f"{'done ' if c.key in done else 'todo '} {c.name}  -> {c.cfg.out_dir}")
        print(f"{len(grid.cells)} cells; results -> {grid.jsonl}")
        return 0
    run_grid(grid, progress=a.progress, fresh_cells=a.fresh_cells)
    return 0


if __name__ == "__main__":
    sys.exit(main())
