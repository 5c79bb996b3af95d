"""Typed config: paper defaults, shipped YAMLs, overrides, and errors that name the field."""

import dataclasses
from pathlib import Path

import pytest

from fedrouter_jax.config import (
    ConfigError,
    FedRouterConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    replace_path,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("grid_"))  # grid_*: experiments/grid.py


def test_defaults_are_the_paper_setup():
    cfg = FedRouterConfig()
    assert cfg.method == "fedrouter"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (8, 16.0, ("q_proj", "v_proj"))
    assert (cfg.data.n_clients, cfg.data.train_per_client, cfg.data.test_per_client) == (8, 600, 300)
    assert cfg.data.scenario == "all"
    t = cfg.train
    assert (t.rounds, t.local_steps, t.batch_size, t.lr) == (25, 10, 16, 5e-4)
    assert (cfg.clustering.n_local, cfg.clustering.n_global) == (4, 4)
    assert cfg.model.path == "embedded"
    cfg.validate()
    assert load_config() == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.rounds = 3  # type: ignore[misc]


def test_shipped_yamls():
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "paper.yaml", "single.yaml", "dual.yaml", "all.yaml",
            "generalization.yaml", "smoke.yaml"} <= names
    cfgs = {p.stem: load_config(p) for p in SHIPPED}
    assert cfgs["paper"] == dataclasses.replace(FedRouterConfig(), out_dir="runs/paper")
    d = cfgs["default"]
    assert (d.data.scenario, d.data.n_clients, d.train.rounds) == ("all", 8, 12)
    assert cfgs["single"].data.scenario == "single" and cfgs["dual"].data.scenario == "dual"
    g = cfgs["generalization"]
    assert (g.data.scenario, g.eval.router) == ("generalization", "global")
    s = cfgs["smoke"]
    assert (s.train.rounds, s.train.local_steps, s.train.batch_size) == (2, 2, 4)
    assert (s.data.train_per_client, s.data.test_per_client) == (16, 8)
    assert (s.eval.max_new_tokens, s.model.max_seq_len) == (8, 128)
    # chained: CPU scale from default.yaml, scenario from single.yaml
    c = load_config([CONFIGS / "default.yaml", CONFIGS / "single.yaml"])
    assert (c.data.scenario, c.train.rounds, c.data.train_per_client) == ("single", 12, 160)


def test_overrides():
    cfg = load_config(CONFIGS / "smoke.yaml", [
        "train.rounds=3", "train.lr=1e-3", "lora.targets=[q_proj, o_proj]",
        "clustering.n_local=auto", "data.hf_dir=null", "method=fedit", "train.weight_decay=0",
    ])
    assert cfg.train.rounds == 3 and cfg.train.lr == 1e-3  # "1e-3" is a float, not a string
    assert cfg.lora.targets == ("q_proj", "o_proj")
    assert cfg.clustering.n_local == "auto" and cfg.method == "fedit"
    assert isinstance(cfg.train.weight_decay, float)  # int accepted for float
    assert cfg.data.train_per_client == 16  # untouched YAML value kept
    with pytest.raises(ConfigError, match="expected 'dotted.key=value'"):
        load_config(None, ["train.rounds"])
    with pytest.raises(ConfigError, match="train.rounds: expected int, got 'ten'"):
        load_config(None, ["train.rounds=ten"])


def _err(tmp_path, text: str) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    return str(e.value)


def test_unknown_key_names_path_and_suggests(tmp_path):
    msg = _err(tmp_path, "train:\n  lrr: 0.1\n")
    assert "train.lrr" in msg and "did you mean 'lr'" in msg
    assert "rounds" in msg and "local_steps" in msg  # lists the valid keys
    msg = _err(tmp_path, "modle:\n  path: embedded\n")
    assert "modle" in msg and "did you mean 'model'" in msg


def test_duplicated_key(tmp_path):
    msg = _err(tmp_path, "train:\n  rounds: 3\n  lr: 0.1\n  rounds: 4\n")
    assert "train.rounds" in msg and "duplicated key" in msg and "line 4" in msg


def test_wrong_types(tmp_path):
    msg = _err(tmp_path, 'train:\n  rounds: "ten"\n')
    assert "train.rounds" in msg and "expected int" in msg and "'ten'" in msg
    assert "expected bool" in _err(tmp_path, "train:\n  reset_optimizer_each_round: 1\n")
    assert "expected int, got True" in _err(tmp_path, "seed: true\n")
    msg = _err(tmp_path, "clustering:\n  n_global: many\n")
    assert "clustering.n_global" in msg and "int or one of 'auto'" in msg
    assert "lora.targets: expected a list of str" in _err(tmp_path, "lora:\n  targets: q_proj\n")
    assert "train: expected a mapping" in _err(tmp_path, "train: 3\n")
    msg = _err(tmp_path, "train:\n  rounds: x\n  batch_size: y\n")  # every problem reported
    assert "train.rounds" in msg and "train.batch_size" in msg


def test_bad_literal(tmp_path):
    msg = _err(tmp_path, "eval:\n  router: globl\n")
    assert "eval.router" in msg and "'globl'" in msg and "'local', 'global'" in msg
    assert "did you mean 'global'" in msg


def test_cross_field_checks(tmp_path):
    msg = _err(tmp_path, "clustering:\n  k_min: 9\n  k_max: 4\n")
    assert "clustering.k_min" in msg and "k_max" in msg
    assert "train.lr: expected > 0" in _err(tmp_path, "train:\n  lr: 0\n")
    assert "train.rounds: expected >= 1" in _err(tmp_path, "train:\n  rounds: 0\n")
    msg = _err(tmp_path, "data:\n  train_per_client: 3\n")
    assert "clustering.n_local" in msg and "data.train_per_client" in msg
    msg = _err(tmp_path, "lora:\n  targets: [q_proj, qk_proj]\n")
    assert "lora.targets[1]" in msg and "'qk_proj'" in msg
    assert "data.hf_dir: required" in _err(tmp_path, "data:\n  source: hf\n")
    assert "train.client_chunk: expected 'auto', 'all' or an int >= 1" in _err(tmp_path, "train:\n  client_chunk: 0\n")
    assert "train.client_chunk" in _err(tmp_path, "train:\n  client_chunk: some\n")
    assert load_config(None, ["train.client_chunk=16"]).train.client_chunk == 16
    assert load_config(None, ["train.client_chunk=all"]).train.client_chunk == "all"


def test_model_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"model.path: directory .*nope.* does not exist"):
        load_config(None, [f"model.path={missing}"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"model.path: directory .*empty.* has no config.json"):
        load_config(None, [f"model.path={empty}"])
    (empty / "config.json").write_text("{}")
    assert load_config(None, [f"model.path={empty}"]).model.path == str(empty)


def test_round_trip_and_save(tmp_path):
    cfg = load_config(CONFIGS / "default.yaml", ["clustering.n_global=auto",
                                                 "lora.targets=[q_proj,k_proj,v_proj]"])
    d = config_to_dict(cfg)
    assert d["lora"]["targets"] == ["q_proj", "k_proj", "v_proj"]
    assert config_from_dict(d) == cfg
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(path) == cfg
    assert "train:" in path.read_text()


def test_replace_path():
    cfg = FedRouterConfig()
    new = replace_path(cfg, "train.rounds", 3)
    assert new.train.rounds == 3 and cfg.train.rounds == 25 and new.lora == cfg.lora
    assert replace_path(cfg, "lora.targets", ["q_proj"]).lora.targets == ("q_proj",)
    assert replace_path(cfg, "train", {"rounds": 2}).train == dataclasses.replace(cfg.train, rounds=2)
    with pytest.raises(ConfigError, match="train.lrr: unknown key; did you mean 'lr'"):
        replace_path(cfg, "train.lrr", 0.1)
    with pytest.raises(ConfigError, match="train.rounds: expected int"):
        replace_path(cfg, "train.rounds", "3")
    with pytest.raises(ConfigError, match="clustering.k_min"):
        replace_path(cfg, "clustering.k_min", 99)
