"""Typed, frozen configuration for FedRouter runs, loaded from YAML overrides.

The dataclass defaults *are* the paper's setup (Llama-3.2-style model, LoRA rank 8 / alpha 16,
8 clients x 25 rounds x 10 local steps, batch 16, lr 5e-4, 600 train / 300 test samples per
client). YAML files under ``configs/`` hold only overrides of these defaults, and may be chained:
``load_config(["configs/default.yaml", "configs/single.yaml"], ["train.rounds=3"])`` applies the
files left to right, then the dotted ``key=value`` overrides (values are parsed as YAML).

The sections are frozen pydantic dataclasses; pydantic checks the types (strict JSON mode: YAML
data is JSON-shaped, so only int -> float is converted, and lists become tuples). Sections used
by one method live with that method (`clustering` in algorithms/fedrouter.py, `fedcluster` and
`feddpa` in algorithms/baselines.py): a method registers `config_section=(key, cls)` on its
`Method` record, every registered section is a top-level key (`cfg.feddpa`, `feddpa.variant`),
and only the chosen method's section's cross-field check (`cls.problems(cfg)`) runs.

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
import functools
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import pydantic.dataclasses
import pydantic_core
import yaml

__all__ = [
    "ConfigError",
    "section",
    "ModelConfig",
    "LoraConfig",
    "DataConfig",
    "TrainConfig",
    "EvalConfig",
    "CheckpointConfig",
    "FederationConfig",
    "MetricsConfig",
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

# strict: no coercion (3.0 is not an int, 1 is not a bool); unknown keys and inf / nan are errors
_STRICT = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


def section(cls: type) -> type:
    """A config section: a frozen, hashable, strictly typed pydantic dataclass.

    A method's own section is one of these, registered on its record, e.g. in the method's module:

        @section
        class FedAvgMConfig:
            beta: float = 0.9
            def problems(self, cfg) -> list[str]:      # optional cross-field checks, run only
                return [] if 0 <= self.beta < 1 else [f"fedavgm.beta: expected in [0, 1), got {self.beta}"]

        register(Method(..., config_section=("fedavgm", FedAvgMConfig)))   # cfg.fedavgm.beta
    """
    return pydantic.dataclasses.dataclass(cls, frozen=True, config=_STRICT)


# ---------------------------------------------------------------------------------------------
# Schema. Defaults = the paper's setup (section 4, "Model Setup" and "Federated Setup").
# ---------------------------------------------------------------------------------------------


@section
class ModelConfig:
    path: str = EMBEDDED_MODEL  # "embedded" = packaged tiny Llama; else a local HF dir (config.json)
    dtype: Literal["float32", "bfloat16"] = "float32"
    max_seq_len: int = 256  # prompt + response tokens for training / generation
    embed_max_tokens: int = 1024  # tokens fed to the base model when embedding a sample


@section
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # subset of LORA_TARGETS
    # dropout on the adapter's input while training (PEFT's lora_dropout; none at evaluation);
    # 0.05 = the FedRouter authors' LoraConfig (docs/FAITHFULNESS.md section 2)
    dropout: float = 0.05


@section
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


@section
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


@section
class EvalConfig:
    router: Literal["local", "global"] = "local"
    batching: Literal["grouped", "mixed"] = "grouped"
    max_new_tokens: int = 32
    batch_size: int = 64
    every: int = 0  # evaluate every N rounds; 0 = only after the last round
    include_base: bool = True  # also score the untrained base model (the table's reference row)
    router_modes: tuple[str, ...] = ()  # extra routing modes scored at the end, e.g. [global]


@section
class CheckpointConfig:
    keep: int = 3  # keep the last N complete checkpoints
    every: int = 1  # save every N rounds (the last round is always saved); 0 = never


@section
class FederationConfig:
    """Who takes part in a round and what happens to replies that fail."""

    clients_per_round: Optional[int] = None  # clients sampled each round (seeded); None = all
    dropout_rate: float = 0.0  # probability that a sampled client's reply never arrives (seeded)
    # a reply with a NaN/Inf loss, gradient or adapter: "drop" it (the round goes on with the
    # others; the run stops only when every reply of a round is dropped) or "stop" the run
    on_nonfinite: Literal["drop", "stop"] = "drop"


@section
class MetricsConfig:
    """What a run logs besides metrics.jsonl (which stays the source of truth)."""

    tensorboard: bool = False  # also write TensorBoard scalars to out_dir/tensorboard



@section
class FedRouterConfig:
    """The run's one config object. Besides these fields it holds one section per registered
    method that has one (`sections`, in registration order), read as attributes: `cfg.feddpa`.
    `FedRouterConfig(feddpa=...)` and `dataclasses.replace(cfg, feddpa=...)` set one."""

    method: str = "fedrouter"  # a registered method (fedrouter_jax.algorithms.available())
    seed: int = 0
    out_dir: str = "runs/default"
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    federation: FederationConfig = dataclasses.field(default_factory=FederationConfig)
    metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)
    # ((key, section), ...) of the registered methods; filled in (defaults) by _with_sections
    sections: tuple[tuple[str, Any], ...] = ()

    @pydantic.model_validator(mode="before")
    @classmethod
    def _with_sections(cls, data: Any) -> Any:
        """Moves `feddpa=...` style arguments into `sections`, defaults the missing ones."""
        if not isinstance(data, pydantic_core.ArgsKwargs):
            return data
        kwargs = dict(data.kwargs or {})
        given = dict(kwargs.pop("sections", ()))
        registered = method_sections()
        for key in [k for k in kwargs if k in registered]:
            given[key] = kwargs.pop(key)
        for key, value in given.items():
            if key in registered and not isinstance(value, registered[key]):
                raise TypeError(f"{key}: expected a {registered[key].__name__}, got {_describe(value)}")
        kwargs["sections"] = tuple((key, given.pop(key) if key in given else sec()) for key, sec in registered.items()) + tuple(
            given.items())  # a section whose method is not registered (any more) is kept as it is
        return pydantic_core.ArgsKwargs(data.args, kwargs)

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields: the sections
        for key, value in self.__dict__.get("sections", ()):
            if key == name:
                return value
        raise AttributeError(f"{type(self).__name__!r} has no field or method section {name!r}")

    def validate(self) -> "FedRouterConfig":
        """Cross-field checks; raises ConfigError listing every problem. Returns self."""
        validate(self)
        return self


_CORE_KEYS = tuple(f.name for f in dataclasses.fields(FedRouterConfig) if f.name != "sections")


def method_sections() -> dict[str, type]:
    """{key: section class} of every registered method's own section (registration order)."""
    from fedrouter_jax.algorithms import base  # here, not at import: the algorithms import config

    out = base.config_sections()
    clash = sorted(set(out) & set(_CORE_KEYS + ("sections",)))
    if clash:
        raise TypeError(f"method config section(s) {', '.join(clash)}: the name of a core config key")
    return out


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
# Nested dict -> FedRouterConfig: pydantic checks the types; the messages name the dotted key.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _input_schema(sections: tuple[tuple[str, type], ...]) -> pydantic.TypeAdapter:
    """What a config file may hold: the core keys plus one key per registered method section."""
    fields = {f.name: (f.type, pydantic.Field(default_factory=f.default_factory)
                       if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(FedRouterConfig) if f.name != "sections"}
    fields.update({key: (cls, pydantic.Field(default_factory=cls)) for key, cls in sections})
    model = pydantic.create_model("FedRouterConfigInput", __config__=_STRICT, __module__=__name__, **fields)
    model.model_rebuild(_types_namespace=globals())
    return pydantic.TypeAdapter(model)


def _keys(tp: Any) -> dict[str, Any] | None:
    """{key: annotation} of a section type (None for a leaf type)."""
    if not dataclasses.is_dataclass(tp):
        return None
    return {f.name: typing.get_type_hints(tp)[f.name] for f in dataclasses.fields(tp)}


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
        return f"a list of {_type_name(args[0] if args else Any)}"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    return f"{value!r} ({type(value).__name__})"


def _suggest(word: Any, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_MAPPING_ERRORS = ("dataclass_type", "dataclass_exact_type", "model_type", "model_attributes_type", "dict_type")


def _message(error: dict, top: dict[str, Any]) -> str:
    """One pydantic error as `dotted.key: what was expected, got what` (its `loc` is the path)."""
    keys, tp, path, cls_name = top, None, "", "FedRouterConfig"
    for part in error["loc"]:
        if keys is not None and isinstance(part, str):
            dotted = f"{path}.{part}" if path else part
            if part not in keys:  # extra_forbidden / unexpected_keyword_argument
                return (f"{dotted}: unknown key{_suggest(part, list(keys)) or '.'} Valid keys under "
                        f"{path or 'the top level'}: " + ", ".join(keys))
            path, tp = dotted, keys[part]
            keys, cls_name = _keys(tp), getattr(tp, "__name__", "")
        elif isinstance(part, int) and typing.get_origin(tp) is tuple:
            path, tp, keys = f"{path}[{part}]", typing.get_args(tp)[0], None
        else:  # the tag of a union's arm: the message is about the whole field
            break
    kind, value = error["type"], error["input"]
    if kind in _MAPPING_ERRORS:
        return f"{path or 'the top level'}: expected a mapping of {cls_name} keys, got {_describe(value)}"
    if kind == "literal_error" and typing.get_origin(tp) is Literal:
        args = typing.get_args(tp)
        return (f"{path}: {_describe(value)} is not a valid choice; expected one of "
                + ", ".join(repr(a) for a in args) + _suggest(value, [str(a) for a in args]))
    if kind == "finite_number":
        return f"{path}: expected a finite number, got {value!r}"
    if kind.endswith("_type") or _is_union(tp):
        return f"{path}: expected {_type_name(tp)}, got {_describe(value)}"
    return f"{path}: {error['msg']}, got {_describe(value)}"  # a section's own constraint (Field(ge=...))


def _plain(x: Any, path: str) -> Any:
    """Nested dicts / lists / scalars; a YAML value JSON lacks (a date) is an error naming its key."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return config_to_dict(x)
    if isinstance(x, Mapping):
        return {str(k): _plain(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if x is None or isinstance(x, (str, int, float)):
        return x
    raise ConfigError(f"{path}: {_describe(x)} is not a config value (quote it to make it a string)")


def config_from_dict(d: Mapping | None, *, check: bool = True) -> FedRouterConfig:
    """Builds a FedRouterConfig from a (partial) nested dict; missing keys take the defaults.

    Unknown keys, wrong types and bad choices are all reported in one ConfigError; then the
    cross-field `validate` runs (unless check=False).
    """
    sections = method_sections()
    adapter = _input_schema(tuple(sections.items()))
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise ConfigError(f"the top level: expected a mapping of FedRouterConfig keys, got {_describe(d)}")
    try:  # YAML data is JSON-shaped: pydantic's strict JSON mode is YAML's typing
        parsed = adapter.validate_json(json.dumps(_plain(d, "")))
    except pydantic.ValidationError as e:
        top = {**{k: typing.get_type_hints(FedRouterConfig)[k] for k in _CORE_KEYS}, **sections}
        raise ConfigError(_join(list(dict.fromkeys(_message(err, top) for err in e.errors())))) from None
    cfg = FedRouterConfig(**{key: getattr(parsed, key) for key in (*_CORE_KEYS, *sections)})
    if check:
        validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts/lists/scalars (YAML- and JSON-safe); the method
    sections are top-level keys like the others."""

    def conv(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            out = {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x) if f.name != "sections"}
            if isinstance(x, FedRouterConfig):
                out.update((key, conv(value)) for key, value in x.sections)
            return out
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


def _set_path(d: Mapping, key: str, value: Any, what: str, *, merge: bool = False) -> dict:
    """`d` with the dotted `key` set to `value` (merge: a mapping value is merged into a section)."""
    parts = key.split(".")
    out = dict(d)
    node = out
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ConfigError(f"{what}: {'.'.join(parts[:i + 1])} is not a section "
                              f"(it is set to {_describe(child)})")
        node[part] = child = dict(child)
        node = child
    last = parts[-1]
    merge = merge and isinstance(value, Mapping) and isinstance(node.get(last), Mapping)
    node[last] = _deep_merge(node[last], value) if merge else value
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
        out = _set_path(out, key, value, f"override {item!r}")
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


def replace_path(cfg: FedRouterConfig, path: str, value: Any, *, check: bool = True) -> FedRouterConfig:
    """Functional update of one dotted field, type-checked like YAML input: e.g.
    `replace_path(cfg, "train.rounds", 3)`. Sections accept a dict of overrides.
    Cross-field `validate` runs afterwards (unless check=False).
    """
    return config_from_dict(_set_path(config_to_dict(cfg), path, value, path, merge=True), check=check)


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
    """Cross-field checks; raises one ConfigError listing every problem found. Of the method
    sections only the chosen method's is checked (`problems(cfg)`): a valid fedrouter run is
    not refused over fedcluster's defaults."""
    e: list[str] = []

    def need(ok: bool, msg: str) -> None:
        if not ok:
            e.append(msg)

    m, lo, d, t = cfg.model, cfg.lora, cfg.data, cfg.train
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

    from fedrouter_jax.algorithms import available, get_method

    methods = available()
    need(cfg.method in methods, f"method: unknown method {cfg.method!r}; expected one of "
                                + ", ".join(methods) + _suggest(cfg.method, methods))
    ev = cfg.eval
    need(ev.max_new_tokens >= 1, f"eval.max_new_tokens: expected >= 1, got {ev.max_new_tokens}")
    need(ev.max_new_tokens < m.max_seq_len,
         f"eval.max_new_tokens: expected < model.max_seq_len ({m.max_seq_len}), got "
         f"{ev.max_new_tokens}")
    need(ev.batch_size >= 1, f"eval.batch_size: expected >= 1, got {ev.batch_size}")
    need(ev.every >= 0, f"eval.every: expected >= 0 (0 = only at the end), got {ev.every}")
    for i, mode in enumerate(ev.router_modes):
        need(mode in ROUTER_MODES, f"eval.router_modes[{i}]: {mode!r} is not a routing mode; expected one of "
                                   + ", ".join(ROUTER_MODES) + _suggest(mode, ROUTER_MODES))

    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep: expected >= 1, got {cfg.checkpoint.keep}")
    need(cfg.checkpoint.every >= 0,
         f"checkpoint.every: expected >= 0 (0 = never), got {cfg.checkpoint.every}")

    own = get_method(cfg.method).config_section if cfg.method in methods else None
    if own is not None and hasattr(getattr(cfg, own[0]), "problems"):
        e.extend(getattr(cfg, own[0]).problems(cfg))

    if e:
        raise ConfigError(_join(e))
