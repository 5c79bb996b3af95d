"""The experiment grid: smoke grid end to end, resumption, validation before training, tables."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import grid as grid_mod  # noqa: E402
import report  # noqa: E402

SMOKE = ROOT / "configs" / "grid_smoke.yaml"


def test_smoke_grid_runs_writes_results_and_resumes(model_dir, tmp_path, capsys):
    args = [str(SMOKE), "--set", f"model.path={model_dir}", "--results-dir", str(tmp_path / "results"),
            "--runs-dir", str(tmp_path / "runs")]
    assert grid_mod.main(args) == 0
    lines = (tmp_path / "results" / "grid_smoke.jsonl").read_text().splitlines()
    recs = [json.loads(l) for l in lines]
    assert [(r["method"], r["scenario"], r["seed"]) for r in recs] == [("fedit", "dual", 0), ("fedrouter", "dual", 0)]
    for r in recs:
        assert 0.0 <= r["rouge1"] <= 1.0 and len(r["per_client"]) == 4
        assert len(r["train_loss"]) == 2 and np.isfinite(r["train_loss"]).all()
        assert set(r["per_task"]) == {"qqp", "gigaword", "samsum", "webnlg"} and r["wall_time_s"] > 0
    assert "clustering_accuracy" in recs[1] and "clustering_accuracy" not in recs[0]
    table = (tmp_path / "results" / "grid_smoke_table1.md").read_text()
    assert "| FedIT |" in table and "| FedRouter |" in table
    # resumable: a second call finds every cell finished and trains nothing
    capsys.readouterr()
    assert grid_mod.main(args) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out
    assert len((tmp_path / "results" / "grid_smoke.jsonl").read_text().splitlines()) == 2


def _write(tmp_path, text, name="g.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize("text, match", [
    ("methods: [fedit, fedx]\nscenarios: [dual]\nseeds: [0]\n", r"methods: unknown value 'fedx'; valid choices are .*fedrouter"),
    ("methods: [fedit]\nscenarios: [duel]\nseeds: [0]\n", r"scenarios: unknown value 'duel'; valid choices are single, dual, all, generalization"),
    ("methods: [fedit]\nscenarios: [dual]\nseeds: [0]\nrounds: 3\n", r"unknown key 'rounds'; valid keys are"),
    ("methods: [fedit]\nscenarios: [dual]\nseeds: [-1]\n", r"seeds: -1 is not a non-negative integer"),
    ("methods: []\nscenarios: [dual]\nseeds: [0]\n", r"methods: expected a non-empty list"),
    ("methods: [fedit, fedit]\nscenarios: [dual]\nseeds: [0]\n", r"duplicated value"),
    ("methods: [fedit]\nscenarios: [dual]\nseeds: [0]\noverrides: {train: {rounds: 0}}\n",
     r"(?s)cell default/dual/fedit/seed0: .*train.rounds: expected >= 1, got 0"),
])
def test_invalid_grid_fails_before_training(tmp_path, text, match, monkeypatch):
    monkeypatch.setattr(grid_mod, "run_cell", lambda *a, **k: pytest.fail("trained despite an invalid grid"))
    with pytest.raises(grid_mod.GridError, match=match):
        grid_mod.load_grid(_write(tmp_path, text))
    assert grid_mod.main([str(tmp_path / "g.yaml")]) == 2


def test_unknown_selection_names_valid_choices(tmp_path):
    with pytest.raises(grid_mod.GridError, match=r"--methods .*unknown value 'feddpa'; valid choices are fedit, fedrouter"):
        grid_mod.load_grid(SMOKE, methods=["feddpa"])


def test_dry_run_lists_cells_of_the_cpu_grid(capsys):
    assert grid_mod.main([str(ROOT / "configs" / "grid_cpu.yaml"), "--dry-run", "--results-dir", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    g = grid_mod.load_grid(ROOT / "configs" / "grid_cpu.yaml")
    assert {c.method for c in g.cells} == {"fedit", "local", "fedcluster", "fedsa", "feddpa", "fedrouter", "fedrouter_star"}
    assert {c.scenario for c in g.cells} == {"single", "dual", "all", "generalization"}
    gen = [c for c in g.cells if c.scenario == "generalization" and c.method == "fedrouter"][0]
    assert gen.cfg.eval.router == "global" and gen.cfg.data.scenario == "generalization"
    assert f"{len(g.cells)} cells" in out


def rec(method, scenario, seed, rouge, variant="default"):
    return {"method": method, "scenario": scenario, "seed": seed, "rouge1": rouge, "variant": variant,
            "per_task": {}, "per_client": [], "wall_time_s": 1.0}


def test_table1_mean_std_average_and_bold_by_hand(tmp_path):
    recs = [rec("fedit", "single", 0, 0.5), rec("fedit", "single", 1, 0.7), rec("fedit", "dual", 0, 0.4),
            rec("fedit", "all", 0, 0.3), rec("fedrouter", "single", 0, 0.55), rec("fedrouter", "dual", 0, 0.45),
            rec("fedrouter", "all", 0, 0.5), rec("fedrouter", "generalization", 0, 0.6),
            rec("fedit", "generalization", 0, 0.58)]
    t = report.table1(recs)
    # FedIT single: mean 0.6, sample std 0.1414; average (0.6 + 0.4 + 0.3) / 3 = 0.433
    assert "| FedIT | **0.600** ± 0.141 | 0.400 ± 0.000 | 0.300 ± 0.000 | 0.433 |" in t
    assert "| FedRouter | 0.550 ± 0.000 | **0.450** ± 0.000 | **0.500** ± 0.000 | **0.500** |" in t
    g = report.generalization_table(recs)
    assert "| FedRouter | **0.600** ± 0.000 |" in g and "| FedIT | 0.580 ± 0.000 |" in g
    # a re-run cell (same key) replaces the earlier line
    p = tmp_path / "r.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs + [rec("fedit", "dual", 0, 0.1)]) + "\n{torn")
    loaded = report.load_records(p)
    assert len(loaded) == len(recs)
    assert [r["rouge1"] for r in loaded if r["method"] == "fedit" and r["scenario"] == "dual"] == [0.1]


@pytest.mark.parametrize("name", ["grid_main", "grid_cpu", "grid_paper", "grid_smoke", "grid_clients"])
def test_shipped_grids_are_valid(name):
    g = grid_mod.load_grid(ROOT / "configs" / f"{name}.yaml")
    assert g.cells and len({c.cfg.out_dir for c in g.cells}) == len(g.cells)


def test_a_new_config_key_at_its_default_keeps_finished_cells(tmp_path):
    cell = grid_mod.load_grid(SMOKE).cells[0]
    stored = grid_mod.config_to_dict(cell.cfg)
    del stored["metrics"]  # a cell recorded before the metrics section existed
    assert grid_mod.same_config(stored, cell.cfg)
    changed = json.loads(json.dumps(stored))
    changed["train"]["rounds"] += 1
    assert not grid_mod.same_config(changed, cell.cfg)
    del changed["train"]["max_grad_norm"]  # missing, but the cell's value (1.0) is the default
    changed["train"]["rounds"] -= 1
    assert grid_mod.same_config(changed, cell.cfg)
    changed["train"]["lr"] = 0.1  # a recorded value that differs is a different cell
    assert not grid_mod.same_config(changed, cell.cfg)
    moved = dict(stored, out_dir="/elsewhere/runs/all/fedit/seed0")  # run with another --runs-dir
    assert grid_mod.same_config(moved, cell.cfg)


def test_generalization_from_single_equals_training_the_generalization_scenario(model_dir, tmp_path):
    """Table 3 without retraining: the Single cell's checkpoint scored on every task with the
    global router gives exactly what training on the generalization scenario (the same training
    partition) gives."""
    base = _write(tmp_path, SMOKE.read_text().replace("scenarios: [dual]", "scenarios: [single]")
                  .replace("methods: [fedit, fedrouter]", "methods: [fedrouter]")
                  .replace("n_local: 2,", "n_local: 1,") + "generalization_from: single\n")
    trained = _write(tmp_path, SMOKE.read_text().replace("scenarios: [dual]", "scenarios: [generalization]")
                     .replace("methods: [fedit, fedrouter]", "methods: [fedrouter]")
                     .replace("n_local: 2,", "n_local: 1,"), name="trained.yaml")
    for path, sub in ((base, "a"), (trained, "b")):
        assert grid_mod.main([str(path), "--set", f"model.path={model_dir}", "--results-dir", str(tmp_path / sub),
                              "--runs-dir", str(tmp_path / sub / "runs")]) == 0
    a = [json.loads(l) for l in next((tmp_path / "a").glob("*.jsonl")).read_text().splitlines()]
    b = [json.loads(l) for l in next((tmp_path / "b").glob("*.jsonl")).read_text().splitlines()]
    assert [r["scenario"] for r in a] == ["single", "generalization"] and a[1]["trained_in"] == "single/fedrouter/seed0"
    assert a[1]["router"] == "global" and set(a[1]["per_task"]) == {"qqp", "gigaword", "samsum", "webnlg"}
    assert [r["scenario"] for r in b] == ["generalization"]
    assert a[1]["rouge1"] == b[0]["rouge1"] and a[1]["per_client"] == b[0]["per_client"]
    assert a[1]["train_loss"] == b[0]["train_loss"] == a[0]["train_loss"]


def test_plateau_verdict_by_hand():
    import plateau

    rising = [(4, 0.10), (8, 0.20), (12, 0.30), (16, 0.35)]
    assert plateau.verdict(rising, 16) == ("still rising", pytest.approx(0.05))  # 0.35 - 0.30 (round 12)
    flat = [(4, 0.10), (8, 0.20), (12, 0.345), (16, 0.35)]
    assert plateau.verdict(flat, 16)[0] == "plateaued"
    assert plateau.verdict(rising[:3], 16) == ("unfinished", None)
