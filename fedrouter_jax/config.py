"""Typed, frozen configuration for FedRouter runs, loaded from YAML overrides.

The dataclass defaults *are* the paper's setup (Llama-3.2-style model, LoRA rank 8 / alpha 16,
8 clients x 25 rounds x 10 local steps, batch 16, lr 5e-4, 600 train / 300 test samples per
client). YAML files under ``configs/`` hold only overrides of these defaults, and may be chained:
``load_config(["configs/default.yaml", "configs/single.yaml"], ["train.rounds=3"])`` applies the
files left to right, then the dotted ``key=value`` overrides (values are parsed as YAML).

Every problem is a :class:`ConfigError` (a ``ValueError``) whose message names the full dotted
path of the field and what was expected; all problems found in one pass are reported together.

    cfg = load_config("configs/smoke.yaml", ["train.rounds=3", "lora.targets=[q_proj, o_proj]"])
    cfg.train.rounds                                  # 3
    cfg2 = replace_path(cfg, "clustering.n_local", "auto")
    save_config(cfg2, "runs/x/config.yaml")           # the resolved config saved with each run
    assert load_config("runs/x/config.yaml") == cfg2
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "LoraConfig",
    "DataConfig",
    "TrainConfig",
    "ClusterConfig",
    "EvalConfig",
    "CheckpointConfig",
    "FederationConfig",
    "MetricsConfig",
    "FedClusterConfig",
    "FedDPAConfig",
    "FedRouterConfig",
    "LORA_TARGETS",
    "METHODS",
    "load_config",
    "load_yaml",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "replace_path",
    "validate",
]


class ConfigError(ValueError):
    """A config problem; the message names the dotted field path and what was expected."""


# The methods shipped with the package; `method:` accepts any registered one
# (fedrouter_jax.algorithms.available(): a new method registers itself, config.py is untouched).
METHODS: tuple[str, ...] = ("fedrouter", "fedrouter_star", "fedit", "local", "fedcluster", "fedsa", "feddpa")
LORA_TARGETS: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
EMBEDDED_MODEL = "embedded"
ROUTER_MODES: tuple[str, ...] = ("local", "global")  # eval.router / eval.router_modes


# ---------------------------------------------------------------------------------------------
# Schema. Defaults = the paper's setup (section 4, "Model Setup" and "Federated Setup").
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    path: str = EMBEDDED_MODEL  # "embedded" = packaged tiny Llama; else a local HF dir (config.json)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_seq_len: int = 256  # prompt + response tokens for training / generation
    embed_max_tokens: int = 1024  # tokens fed to the base model when embedding a sample


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # subset of LORA_TARGETS
    # dropout on the adapter's input while training (PEFT's lora_dropout; none at evaluation);
    # 0.05 = the FedRouter authors' LoraConfig (docs/FAITHFULNESS.md section 2)
    dropout: float = 0.05


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: Literal["synthetic", "hf"] = "synthetic"
    hf_dir: Optional[str] = None  # local directory with the real datasets (source: hf)
    scenario: Literal["single", "dual", "all", "generalization", "dirichlet"] = "all"
    n_clients: int = 8
    train_per_client: int = 600
    test_per_client: int = 300
    dirichlet_alpha: float = 0.5  # only for scenario: dirichlet
    # prompt of the synthetic tasks: "alpaca" = task instruction + input (Alpaca with-input
    # template), "raw_input" = the input alone in the authors' no-input template (their task
    # instructions are commented out; docs/FAITHFULNESS.md section 4)
    prompt: Literal["alpaca", "raw_input"] = "alpaca"
    # task shares of a multi-task client (dual, all): "even" splits, or "pool_sizes" = the
    # shares of the authors' pools (data.scenarios.AUTHORS_POOL_SIZES)
    mix: Literal["even", "pool_sizes"] = "even"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rounds: int = 25
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 5e-4
    lr_min: float = 1e-5  # end of the cosine schedule
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.0
    # AdamW moments and epsilon, and gradient clipping at this global norm (0 = off): the
    # HF TrainingArguments defaults the authors train with (docs/FAITHFULNESS.md section 2)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    reset_optimizer_each_round: bool = True
    client_mesh_devices: int = 1  # >1 shards the client axis over that many devices; 0 = all
    # clients trained together (vmapped) inside the round's one call: "auto" = a token budget per
    # group (training.AUTO_CHUNK_TOKENS_CPU / _ACCELERATOR), "all" = every client at once, or
    # clients per group
    client_chunk: Union[int, Literal["auto", "all"]] = "auto"
    # where the LM head (D x V matmul + softmax) is computed while training: only at positions
    # that predict a response token (same loss, less work), or at every position
    lm_head_on: Literal["loss_tokens", "all_tokens"] = "loss_tokens"
    # train each round on batches cut to their longest row (rounded up to 32) instead of
    # model.max_seq_len: the same result, less work where examples are short
    trim_padding: bool = True
    # how the training step runs the decoder layers: "auto" = a Python loop (unrolled) on CPU,
    # where the scan's stacked residuals cost memory passes, and `lax.scan` on accelerators
    # (models.llama.unroll_layers); "scan" also keeps a long model's compile time down on CPU
    layer_loop: Literal["auto", "scan", "unroll"] = "auto"


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    n_local: Union[int, Literal["auto"]] = 4  # "auto" = silhouette over [k_min, k_max]
    n_global: Union[int, Literal["auto"]] = 4
    k_min: int = 2
    k_max: int = 8
    n_init: int = 10
    max_iter: int = 300
    tol: float = 1e-4
    min_silhouette: float = 0.0  # best silhouette below this => a single cluster
    schedule: Literal["global", "local_index"] = "global"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    router: Literal["local", "global"] = "local"
    batching: Literal["grouped", "mixed"] = "grouped"
    max_new_tokens: int = 32
    batch_size: int = 64
    every: int = 0  # evaluate every N rounds; 0 = only after the last round
    include_base: bool = True  # also score the untrained base model (the table's reference row)
    router_modes: tuple[str, ...] = ()  # extra routing modes scored at the end, e.g. [global]


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    keep: int = 3  # keep the last N complete checkpoints
    every: int = 1  # save every N rounds (the last round is always saved); 0 = never


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """Who takes part in a round and what happens to replies that fail."""

    clients_per_round: Optional[int] = None  # clients sampled each round (seeded); None = all
    dropout_rate: float = 0.0  # probability that a sampled client's reply never arrives (seeded)
    # a reply with a NaN/Inf loss, gradient or adapter: "drop" it (the round goes on with the
    # others; the run stops only when every reply of a round is dropped) or "stop" the run
    on_nonfinite: Literal["drop", "stop"] = "drop"


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    """What a run logs besides metrics.jsonl (which stays the source of truth)."""

    tensorboard: bool = False  # also write TensorBoard scalars to out_dir/tensorboard


@dataclasses.dataclass(frozen=True)
class FedClusterConfig:
    n_clusters: int = 4
    cluster_round: int = 1  # round after which clients are clustered
    similarity_on: Literal["b", "a", "ab"] = "b"  # LoRA factor(s) whose updates are compared (authors: B)
    similarity_layers: Literal["all", "last"] = "all"  # "last" = the authors' last LoRA tensor only


@dataclasses.dataclass(frozen=True)
class FedDPAConfig:
    # "reference" = the released FedDPA code (Lydia-yang/FedDPA): local adapter trained as
    # a L + (1 - a) sg(G); at test time w sim(x) on the GLOBAL adapter, 1 - w sim(x) on the
    # local one, sim from the last prompt token of base + local adapter; uniform FedAvg.
    # "pre_issue16" = this repository's first port: local trained as L + a G, weight
    # clip(w sim(x), 0, w) on the LOCAL adapter (blend (1 - s) G + s / (1 - a) L), sim from the
    # base model's mean-pooled input embeddings, sample-weighted FedAvg (docs/FAITHFULNESS.md 1).
    variant: Literal["reference", "pre_issue16"] = "reference"
    mixing: Literal["dynamic", "fixed"] = "dynamic"
    fixed_weight: float = 0.5  # weight of the global adapter when mixing: fixed
    train_weight: float = 0.5  # a: weight of the local adapter (reference) / of the frozen global one (pre_issue16) while training the local one
    max_weight: float = 0.5  # dynamic: w, the weight = w * mean cosine similarity
    instance_num: int = 5  # dynamic: local training samples compared per test sample (0 = all)


@dataclasses.dataclass(frozen=True)
class FedRouterConfig:
    method: str = "fedrouter"  # a registered method (fedrouter_jax.algorithms.available())
    seed: int = 0
    out_dir: str = "runs/default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    clustering: ClusterConfig = dataclasses.field(default_factory=ClusterConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    fedcluster: FedClusterConfig = dataclasses.field(default_factory=FedClusterConfig)
    feddpa: FedDPAConfig = dataclasses.field(default_factory=FedDPAConfig)

    def validate(self) -> "FedRouterConfig":
        """Cross-field checks; raises ConfigError listing every problem. Returns self."""
        validate(self)
        return self


# ---------------------------------------------------------------------------------------------
# YAML: a SafeLoader that rejects duplicated keys and reads 1e-4 as a float.
# ---------------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader + duplicated keys are errors (with dotted path) + YAML-1.2 style floats."""

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, "")
        return self.construct_document(node)


# YAML 1.1 (PyYAML) reads "5e-4" as a string; accept exponent floats without a dot.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _check_duplicate_keys(node: yaml.Node, path: str) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            dotted = f"{path}.{key}" if path else str(key)
            if key is not None and key != "<<":
                if key in seen:
                    raise ConfigError(
                        f"{dotted}: duplicated key (line {line}; first defined at line "
                        f"{seen[key]}); each key may appear only once"
                    )
                seen[key] = line
            _check_duplicate_keys(value_node, dotted)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, f"{path}[{i}]")


def _yaml_loads(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {e}") from None


def load_yaml(path: str | os.PathLike) -> dict:
    """Reads one YAML override file into a (possibly empty) dict; duplicated keys are errors."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot be read ({e.strerror})") from None
    data = _yaml_loads(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of config keys at the top level, got "
            f"{type(data).__name__}"
        )
    return data


# ---------------------------------------------------------------------------------------------
# Generic dict -> frozen dataclass builder with type checking.
# ---------------------------------------------------------------------------------------------


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        inner = args[0] if args else Any
        return f"a list of {_type_name(inner)}"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


def _suggest(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Checks `value` against annotation `tp`; returns the converted value (or None on error)."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        if not isinstance(value, bool) and not isinstance(value, str) and value in args:
            return value
        choices = ", ".join(repr(a) for a in args)
        errors.append(
            f"{path}: {_describe(value)} is not a valid choice; expected one of {choices}"
            + _suggest(value, [str(a) for a in args])
        )
        return None
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            arm_errors: list[str] = []
            out = _coerce(value, arm, path, arm_errors)
            if not arm_errors:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
        return None
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            errors.append(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
            return None
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                errors.append(
                    f"{path}: expected a list of {len(args)} items, got {len(value)}"
                )
                return None
            items = [_coerce(v, a, f"{path}[{i}]", errors) for i, (v, a) in
                     enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else list(items)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # .inf / .nan pass YAML but break training at round 1
                errors.append(f"{path}: expected a finite number, got {value!r}")
                return None
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"{path}: unsupported annotation {tp!r} in the config schema")
    errors.append(f"{path}: expected {_type_name(tp)}, got {_describe(value)}")
    return None


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    where = path or "the top level"
    if data is None:
        data = {}
    if dataclasses.is_dataclass(data) and type(data) is cls:
        return data
    if not isinstance(data, Mapping):
        errors.append(f"{where}: expected a mapping of {cls.__name__} keys, got {_describe(data)}")
        return None
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if key not in names:
            errors.append(
                f"{dotted}: unknown key{_suggest(key, names) or '.'} Valid keys under {where}: "
                + ", ".join(names)
            )
            continue
        kwargs[key] = _coerce(value, hints[key], dotted, errors)
    if errors:
        return None
    return cls(**kwargs)


def config_from_dict(d: Mapping | None, *, check: bool = True) -> FedRouterConfig:
    """Builds a FedRouterConfig from a (partial) nested dict; missing keys take the defaults.

    Unknown keys, wrong types and bad choices are all reported in one ConfigError; then the
    cross-field `validate` runs (unless check=False).
    """
    errors: list[str] = []
    cfg = _build(FedRouterConfig, d, "", errors)
    if errors:
        raise ConfigError(_join(errors))
    if check:
        validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists/scalars (YAML- and JSON-safe)."""

    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        return x

    return conv(cfg)


def _join(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    return f"{len(errors)} config problems:\n  " + "\n  ".join(errors)


# ---------------------------------------------------------------------------------------------
# Overrides, loading, saving, functional updates.
# ---------------------------------------------------------------------------------------------


def _deep_merge(base: dict, override: Mapping) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_overrides(d: Mapping, overrides: Sequence[str]) -> dict:
    """Applies dotted `key=value` strings (value parsed as YAML) to a nested dict, left to right."""
    if isinstance(overrides, str):
        overrides = [overrides]
    out = dict(d)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r}: expected 'dotted.key=value', e.g. 'train.rounds=3'"
            )
        value = _yaml_loads(raw.strip(), f"override {item!r}") if raw.strip() else None
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section "
                    f"(it is set to {_describe(child)})"
                )
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return out


def load_config(
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: Sequence[str] = (),
) -> FedRouterConfig:
    """Defaults <- YAML file(s) (left to right) <- dotted `key=value` overrides; validated."""
    if path is None:
        paths: list = []
    elif isinstance(path, (str, os.PathLike)):
        paths = [path]
    else:
        paths = list(path)
    merged: dict = {}
    for p in paths:
        merged = _deep_merge(merged, load_yaml(p))
    merged = apply_overrides(merged, overrides)
    try:
        return config_from_dict(merged)
    except ConfigError as e:
        if paths:
            src = ", ".join(str(p) for p in paths)
            raise ConfigError(f"{e}\n(while loading {src}"
                              f"{' with overrides' if overrides else ''})") from None
        raise


def save_config(cfg: FedRouterConfig, path: str | os.PathLike) -> Path:
    """Writes the fully resolved config as YAML (loadable by `load_config`), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = ("# Resolved fedrouter-jax config (all fields; load with load_config).\n"
            + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def replace_path(cfg: Any, path: str, value: Any, *, check: bool = True) -> Any:
    """Functional update of one dotted field, type-checked like YAML input: e.g.
    `replace_path(cfg, "train.rounds", 3)`. Sections accept a dict of overrides.
    Cross-field `validate` runs afterwards when `cfg` is a FedRouterConfig (unless check=False).
    """
    parts = path.split(".")

    def rec(node: Any, i: int) -> Any:
        prefix = ".".join(parts[:i])
        names = [f.name for f in dataclasses.fields(node)]
        name = parts[i]
        dotted = ".".join(parts[: i + 1])
        if name not in names:
            raise ConfigError(
                f"{dotted}: unknown key{_suggest(name, names) or '.'} Valid keys under "
                f"{prefix or 'the top level'}: " + ", ".join(names)
            )
        tp = _hints(type(node))[name]
        if i + 1 < len(parts):
            child = getattr(node, name)
            if not dataclasses.is_dataclass(child):
                raise ConfigError(f"{dotted}: is a {_type_name(tp)}, not a section")
            new = rec(child, i + 1)
        else:
            errors: list[str] = []
            if dataclasses.is_dataclass(tp) and isinstance(value, Mapping):
                current = config_to_dict(getattr(node, name))
                new = _build(tp, _deep_merge(current, value), dotted, errors)
            else:
                new = _coerce(value, tp, dotted, errors)
            if errors:
                raise ConfigError(_join(errors))
        return dataclasses.replace(node, **{name: new})

    out = rec(cfg, 0)
    if check and isinstance(out, FedRouterConfig):
        validate(out)
    return out


# ---------------------------------------------------------------------------------------------
# Cross-field validation.
# ---------------------------------------------------------------------------------------------


def _check_model_path(path: str) -> str | None:
    if path == EMBEDDED_MODEL:
        return None
    p = Path(path).expanduser()
    if not p.is_dir():
        return (f"model.path: directory {str(p)!r} does not exist; expected "
                f"{EMBEDDED_MODEL!r} or a local Hugging Face model directory with config.json")
    if not (p / "config.json").is_file():
        return (f"model.path: directory {str(p)!r} has no config.json; expected "
                f"{EMBEDDED_MODEL!r} or a local Hugging Face model directory with config.json")
    return None


def validate(cfg: FedRouterConfig) -> None:
    """Cross-field checks; raises one ConfigError listing every problem found."""
    e: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            e.append(msg)

    m, lo, d, t, c = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.clustering
    need(bool(cfg.out_dir), "out_dir: expected a non-empty directory path")
    need(cfg.seed >= 0, f"seed: expected an integer >= 0, got {cfg.seed}")

    if (msg := _check_model_path(m.path)) is not None:
        e.append(msg)
    need(m.max_seq_len >= 8, f"model.max_seq_len: expected >= 8, got {m.max_seq_len}")
    need(m.embed_max_tokens >= 1,
         f"model.embed_max_tokens: expected >= 1, got {m.embed_max_tokens}")

    need(lo.rank >= 1, f"lora.rank: expected >= 1, got {lo.rank}")
    need(lo.alpha > 0, f"lora.alpha: expected > 0, got {lo.alpha}")
    need(0.0 <= lo.dropout < 1.0, f"lora.dropout: expected in [0, 1), got {lo.dropout}")
    need(len(lo.targets) >= 1, "lora.targets: expected at least one target module")
    for i, tgt in enumerate(lo.targets):
        need(tgt in LORA_TARGETS,
             f"lora.targets[{i}]: {tgt!r} is not a LoRA target; expected one of "
             + ", ".join(LORA_TARGETS) + _suggest(tgt, LORA_TARGETS))
    dups = sorted({x for x in lo.targets if lo.targets.count(x) > 1})
    need(not dups, f"lora.targets: duplicated target(s) {', '.join(dups)}")

    need(d.n_clients >= 1, f"data.n_clients: expected >= 1, got {d.n_clients}")
    need(d.train_per_client >= 1,
         f"data.train_per_client: expected >= 1, got {d.train_per_client}")
    need(d.test_per_client >= 1, f"data.test_per_client: expected >= 1, got {d.test_per_client}")
    need(d.dirichlet_alpha > 0, f"data.dirichlet_alpha: expected > 0, got {d.dirichlet_alpha}")
    if d.source == "hf":
        if d.hf_dir is None:
            e.append("data.hf_dir: required when data.source is 'hf' (a local dataset directory)")
        elif not Path(d.hf_dir).expanduser().is_dir():
            e.append(f"data.hf_dir: directory {d.hf_dir!r} does not exist; expected a local "
                     "dataset directory (data.source: hf)")

    fe = cfg.federation
    if fe.clients_per_round is not None:
        need(1 <= fe.clients_per_round <= d.n_clients,
             f"federation.clients_per_round: expected in [1, data.n_clients={d.n_clients}] or null (all), "
             f"got {fe.clients_per_round}")
    need(0.0 <= fe.dropout_rate < 1.0, f"federation.dropout_rate: expected in [0, 1), got {fe.dropout_rate}")

    need(t.rounds >= 1, f"train.rounds: expected >= 1, got {t.rounds}")
    need(t.local_steps >= 1, f"train.local_steps: expected >= 1, got {t.local_steps}")
    need(t.batch_size >= 1, f"train.batch_size: expected >= 1, got {t.batch_size}")
    need(t.lr > 0, f"train.lr: expected > 0, got {t.lr}")
    need(t.lr_min >= 0, f"train.lr_min: expected >= 0, got {t.lr_min}")
    need(t.lr_min <= t.lr, f"train.lr_min: expected <= train.lr ({t.lr}), got {t.lr_min}")
    need(t.weight_decay >= 0, f"train.weight_decay: expected >= 0, got {t.weight_decay}")
    need(0.0 < t.adam_b1 < 1.0, f"train.adam_b1: expected in (0, 1), got {t.adam_b1}")
    need(0.0 < t.adam_b2 < 1.0, f"train.adam_b2: expected in (0, 1), got {t.adam_b2}")
    need(0.0 < t.adam_eps <= 1.0, f"train.adam_eps: expected in (0, 1], got {t.adam_eps}")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm: expected >= 0 (0 = no clipping), got {t.max_grad_norm}")
    need(t.client_mesh_devices >= 0,
         f"train.client_mesh_devices: expected >= 0 (0 = all devices), got "
         f"{t.client_mesh_devices}")
    if not isinstance(t.client_chunk, str):
        need(t.client_chunk >= 1, f"train.client_chunk: expected 'auto', 'all' or an int >= 1, got "
                                  f"{t.client_chunk}")
    if t.client_mesh_devices > 1:
        need(d.n_clients % t.client_mesh_devices == 0,
             f"train.client_mesh_devices: data.n_clients ({d.n_clients}) must be divisible by "
             f"the number of devices the client axis is sharded over ({t.client_mesh_devices})")

    from fedrouter_jax.algorithms import available

    methods = available()
    need(cfg.method in methods, f"method: unknown method {cfg.method!r}; expected one of "
                                + ", ".join(methods) + _suggest(cfg.method, methods))
    # Each method's own section is checked only when that method runs (item: a valid fedrouter
    # run must not be refused over fedcluster's defaults).
    if cfg.method in ("fedrouter", "fedrouter_star"):
        _validate_clustering(cfg, need)
    ev = cfg.eval
    need(ev.max_new_tokens >= 1, f"eval.max_new_tokens: expected >= 1, got {ev.max_new_tokens}")
    need(ev.max_new_tokens < m.max_seq_len,
         f"eval.max_new_tokens: expected < model.max_seq_len ({m.max_seq_len}), got "
         f"{ev.max_new_tokens}")
    need(ev.batch_size >= 1, f"eval.batch_size: expected >= 1, got {ev.batch_size}")
    need(ev.every >= 0, f"eval.every: expected >= 0 (0 = only at the end), got {ev.every}")

    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep: expected >= 1, got {cfg.checkpoint.keep}")
    need(cfg.checkpoint.every >= 0,
         f"checkpoint.every: expected >= 0 (0 = never), got {cfg.checkpoint.every}")

    if cfg.method == "fedcluster":
        _validate_fedcluster(cfg, need)
    if cfg.method == "feddpa":
        _validate_feddpa(cfg, need)
    for i, mode in enumerate(ev.router_modes):
        need(mode in ROUTER_MODES, f"eval.router_modes[{i}]: {mode!r} is not a routing mode; expected one of "
                                   + ", ".join(ROUTER_MODES) + _suggest(mode, ROUTER_MODES))

    if e:
        raise ConfigError(_join(e))


def _validate_clustering(cfg: FedRouterConfig, need) -> None:
    """clustering.*: used by fedrouter and fedrouter_star only."""
    c, d = cfg.clustering, cfg.data
    need(c.k_min >= 2, f"clustering.k_min: expected >= 2 (silhouette needs 2+ clusters), "
                       f"got {c.k_min}")
    need(c.k_min <= c.k_max,
         f"clustering.k_min: expected <= clustering.k_max ({c.k_max}), got {c.k_min}")
    for name in ("n_local", "n_global"):
        v = getattr(c, name)
        if v != "auto":
            need(v >= 1, f"clustering.{name}: expected >= 1 or 'auto', got {v}")
    local_max = c.n_local if c.n_local != "auto" else c.k_max
    need(local_max <= d.train_per_client,
         f"clustering.{'n_local' if c.n_local != 'auto' else 'k_max'}: expected <= "
         f"data.train_per_client ({d.train_per_client}) (k-means needs a sample per cluster), "
         f"got {local_max}")
    if c.n_global != "auto":
        need(c.n_global <= d.n_clients * local_max,
             f"clustering.n_global: expected <= the number of local centroids "
             f"(data.n_clients x local clusters = {d.n_clients * local_max}), got {c.n_global}")
    need(c.n_init >= 1, f"clustering.n_init: expected >= 1, got {c.n_init}")
    need(c.max_iter >= 1, f"clustering.max_iter: expected >= 1, got {c.max_iter}")
    need(c.tol >= 0, f"clustering.tol: expected >= 0, got {c.tol}")
    need(-1.0 <= c.min_silhouette <= 1.0,
         f"clustering.min_silhouette: expected in [-1, 1], got {c.min_silhouette}")


def _validate_fedcluster(cfg: FedRouterConfig, need) -> None:
    fc, d, t = cfg.fedcluster, cfg.data, cfg.train
    need(1 <= fc.n_clusters <= d.n_clients,
         f"fedcluster.n_clusters: expected in [1, data.n_clients={d.n_clients}], got "
         f"{fc.n_clusters}")
    need(0 <= fc.cluster_round <= t.rounds,
         f"fedcluster.cluster_round: expected in [0, train.rounds={t.rounds}], got "
         f"{fc.cluster_round}")


def _validate_feddpa(cfg: FedRouterConfig, need) -> None:
    need(0.0 <= cfg.feddpa.fixed_weight <= 1.0,
         f"feddpa.fixed_weight: expected in [0, 1], got {cfg.feddpa.fixed_weight}")
    need(0.0 <= cfg.feddpa.train_weight < 1.0,
         f"feddpa.train_weight: expected in [0, 1), got {cfg.feddpa.train_weight}")
    need(0.0 <= cfg.feddpa.max_weight <= 1.0,
         f"feddpa.max_weight: expected in [0, 1], got {cfg.feddpa.max_weight}")
    need(cfg.feddpa.instance_num >= 0,
         f"feddpa.instance_num: expected >= 0 (0 = all training samples), got {cfg.feddpa.instance_num}")
