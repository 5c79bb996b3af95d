"""Export bundle + `fedrouter-jax predict` for every method in both router modes; the README's
HF/PEFT snippet gives predict's greedy outputs; bad input lines are one-line errors.

Each method's checkpoint is its state after setup with every LoRA B made non-zero (PEFT's
B = 0 would make every adapter the base model and hide routing bugs) and, for FedCluster and
FedRouter, clients spread over both clusters: what a trained run holds, minus the training.
One method is also trained for a round through the runner (`test_export_of_a_trained_run`).
"""
import dataclasses
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

from fedrouter_jax.algorithms import available
from fedrouter_jax.bundle import read_bundle
from fedrouter_jax.checkpoint import CheckpointStore
from fedrouter_jax.cli import main
from fedrouter_jax.config import config_to_dict, load_config, save_config
from fedrouter_jax.routing import generate_routed
from fedrouter_jax.runner import Run, prepare

from helpers import smoke_overrides

ROOT = Path(__file__).resolve().parents[1]
CLIENT = 1
EXTRA = {"fedcluster.n_clusters": 2, "feddpa.mixing": "fixed", "eval.max_new_tokens": 5}


@pytest.fixture(scope="module")
def data(model_dir, tmp_path_factory):
    """Model, tokenizer, scenario and embeddings once for every method (they do not depend on it)."""
    return prepare(load_config(None, smoke_overrides(model_dir, tmp_path_factory.mktemp("prep"), **EXTRA)))


def _nonzero_b(tree, seed: int):
    """Every LoRA B leaf (dict key "b") replaced by N(0, 0.5^2) values of the same shape."""
    rng = np.random.default_rng(seed)

    def fill(path, x):
        last = path[-1]
        if getattr(last, "key", None) == "b":
            return (0.5 * rng.standard_normal(np.shape(x))).astype(np.float32)
        return x

    return jax.tree_util.tree_map_with_path(fill, tree)


def _checkpointed(method: str, data, out: Path, **extra) -> Run:
    """A run directory of `method` whose round-1 checkpoint is its (non-zero B) setup state."""
    cfg = load_config(None, smoke_overrides(data.cfg.model.path, out, **{**EXTRA, "method": method, **extra}))
    run = Run(cfg, data=dataclasses.replace(data, cfg=cfg), progress=False)
    state = _nonzero_b(run.initial_state(), seed=len(method))
    if method == "fedcluster":
        state = state.replace(server=state.server.replace(cluster_of=np.array([0, 1, 1, 0], np.int32)))
    if method.startswith("fedrouter"):  # each client's 2 local clusters on the 2 global ones (the tiny
        # random model's K-Means puts one outlier centroid alone, so one adapter would serve almost all)
        state = state.replace(server=state.server.replace(local_to_global=np.tile(np.arange(2, dtype=np.int32), (4, 1))))
    save_config(cfg, out / "config.yaml")
    CheckpointStore(out / "checkpoints").save(1, state, {"history": [], "config": config_to_dict(cfg)})
    run.state = state
    return run


@pytest.fixture(scope="module")
def exported(data, tmp_path_factory):
    """method -> (run with its state, bundle dir), exported through the CLI once per method."""
    cache = {}

    def get(method):
        if method not in cache:
            root = tmp_path_factory.mktemp(method)
            run = _checkpointed(method, data, root / "run")
            assert main(["export", "--out-dir", str(root / "run"), "--dest", str(root / "bundle")]) == 0
            cache[method] = run, root / "bundle"
        return cache[method]

    return get


def _write_inputs(path: Path, examples) -> Path:
    path.write_text("".join(json.dumps({"instruction": e["instruction"], "input": e["input"]}) + "\n"
                            for e in examples))
    return path


def _predict(bundle, inputs, out, *args) -> list[dict]:
    assert main(["predict", "--bundle", str(bundle), "--input", str(inputs), "--output", str(out), *args]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def _simulated(run, mode):
    """(plan, per-client generated tokens) of the simulator's own routed evaluation."""
    plan = run.sim.eval_plan(run.state, mode)
    cfg, tok = run.cfg, run.data.tokenizer
    gens = generate_routed(run.data.base, run.data.model_cfg, plan, run.data.test_prompts,
                           batching=cfg.eval.batching, batch_size=cfg.eval.batch_size,
                           max_new_tokens=cfg.eval.max_new_tokens, eos_ids=(tok.eos_token_id,),
                           pad_id=tok.pad_token_id)
    return plan, gens


@pytest.mark.parametrize("method", available())
def test_predict_equals_the_simulators_routed_generations(method, exported, tmp_path):
    run, bundle_dir = exported(method)
    bundle = read_bundle(bundle_dir)
    assert bundle.method == method and bundle.meta["round"] == 1
    assert len(bundle.meta["adapters"]) == run.sim.eval_plan(run.state, "local").adapters.n_adapters
    inputs = _write_inputs(tmp_path / "in.jsonl", run.data.fed.test[CLIENT])
    for mode in ("local", "global"):
        plan, gens = _simulated(run, mode)
        got = _predict(bundle_dir, inputs, tmp_path / f"{mode}.jsonl", "--client", str(CLIENT), "--router", mode)
        assert [r["line"] for r in got] == [1, 2, 3, 4]
        np.testing.assert_array_equal([r["adapter"] for r in got], plan.adapter_ids[CLIENT], err_msg=mode)
        if plan.mix_ids is not None:  # FedDPA's blend: the same partner adapter and weights
            np.testing.assert_array_equal([r["mix_adapter"] for r in got], plan.mix_ids[CLIENT])
            np.testing.assert_allclose([r["mix_weight"] for r in got], plan.mix_weight[CLIENT], rtol=1e-6)
            np.testing.assert_allclose([r["self_weight"] for r in got], plan.self_weight[CLIENT], rtol=1e-6)
        assert [r["tokens"] for r in got] == [g.tolist() for g in gens[CLIENT]], mode


def test_routing_and_adapters_are_exercised(exported):
    """The fixture is not degenerate: FedRouter's clients use both adapters, and adapters differ."""
    run, _ = exported("fedrouter")
    plan, gens = _simulated(run, "local")
    assert set(np.concatenate(plan.adapter_ids).tolist()) == {0, 1}
    base = generate_routed(run.data.base, run.data.model_cfg, dataclasses.replace(
        plan, adapters=None, adapter_ids=[np.full(len(i), -1) for i in plan.adapter_ids]), run.data.test_prompts,
        batch_size=8, max_new_tokens=5, eos_ids=(run.data.tokenizer.eos_token_id,))
    assert [g.tolist() for c in gens for g in c] != [g.tolist() for c in base for g in c]


def test_global_router_needs_no_client_where_the_method_has_one(exported, tmp_path, capsys):
    run, bundle_dir = exported("fedrouter")
    inputs = _write_inputs(tmp_path / "in.jsonl", run.data.fed.test[2] + run.data.fed.test[3])
    got = _predict(bundle_dir, inputs, tmp_path / "out.jsonl", "--router", "global")
    plan, _ = _simulated(run, "global")
    np.testing.assert_array_equal([r["adapter"] for r in got], np.concatenate(plan.adapter_ids[2:]))
    short = _predict(bundle_dir, inputs, tmp_path / "short.jsonl", "--router", "global", "--max-new-tokens", "2")
    assert [r["tokens"] for r in short] == [r["tokens"][:2] for r in got]  # greedy: a prefix
    assert main(["predict", "--bundle", str(bundle_dir), "--input", str(inputs), "--output",
                 str(tmp_path / "x.jsonl"), "--router", "local"]) == 2
    assert "--router local needs --client" in capsys.readouterr().err
    _, local_bundle = exported("local")
    assert main(["predict", "--bundle", str(local_bundle), "--input", str(inputs), "--output",
                 str(tmp_path / "x.jsonl"), "--router", "global"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--router global needs --client" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, where", [
    ('{"instruction": "a", "input": "b"}\n{"instruction": "a", "input": \n', "in.jsonl:2: not a JSON object"),
    ('{"instruction": "a", "input": "b"}\n\n["a", "b"]\n', "in.jsonl:3: expected a JSON object"),
    ('{"instruction": "a"}\n', "in.jsonl:1: field 'input' is missing"),
    ('{"instruction": 3, "input": "b"}\n', "in.jsonl:1: field 'instruction' is int, expected a string"),
])
def test_bad_input_lines_are_one_line_errors(exported, tmp_path, capsys, content, where):
    _, bundle_dir = exported("fedrouter")
    (tmp_path / "in.jsonl").write_text(content)
    code = main(["predict", "--bundle", str(bundle_dir), "--input", str(tmp_path / "in.jsonl"),
                 "--output", str(tmp_path / "out.jsonl"), "--client", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and where in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def _readme_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- bundle-hf-snippet -->\n```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.parametrize("mode, client", [("local", CLIENT), ("global", None)])
def test_readme_hf_peft_snippet_equals_predict(exported, tmp_path, mode, client):
    pytest.importorskip("peft")
    run, bundle_dir = exported("fedrouter")
    examples = run.data.fed.test[CLIENT] + run.data.fed.test[2]
    inputs = _write_inputs(tmp_path / "in.jsonl", examples)
    expected = _predict(bundle_dir, inputs, tmp_path / "out.jsonl", "--router", mode,
                        *([] if client is None else ["--client", str(client)]))
    code = _readme_snippet()
    setup = (f"bundle_dir = Path({str(bundle_dir)!r})\n"
             f"examples = {[{'instruction': e['instruction'], 'input': e['input']} for e in examples]!r}\n"
             f"client, mode = {client!r}, {mode!r}\n")
    code = re.sub(r"^bundle_dir = .*\nexamples = .*\nclient, mode = .*\n", lambda _: setup, code, count=1, flags=re.M)
    assert setup in code
    scope: dict = {}
    exec(compile(code, "README.md:bundle-hf-snippet", "exec"), scope)  # noqa: S102 - our own README
    assert scope["routes"] == [r["adapter"] for r in expected]
    assert len(set(scope["routes"])) == 2  # several adapters on one model, set_adapter between them
    assert scope["predictions"] == [r["prediction"] for r in expected]


def _dynamic(data, out: Path, variant: str) -> Run:
    return _checkpointed("feddpa", data, out, **{"feddpa.mixing": "dynamic", "feddpa.variant": variant})


@pytest.mark.parametrize("variant", ["reference", "pre_issue16"])
def test_feddpa_dynamic_mixing_serves_as_the_run_evaluates(variant, data, tmp_path):
    """The run's route reference (written as after its last round) goes into the bundle; predict
    on client CLIENT's own test inputs gives the per-input weights and greedy tokens of the
    simulator's routed evaluation of that client, in both modes."""
    run = _dynamic(data, tmp_path / "run", variant)
    run.round = 1  # the checkpointed state's round (Run.run sets it)
    assert run.write_route_reference() == tmp_path / "run" / "route_reference.npz"
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--dest", str(tmp_path / "bundle")]) == 0
    bundle = read_bundle(tmp_path / "bundle")
    mixing = bundle.router("local")["mixing"]
    assert mixing["servable"] and mixing["kind"] == "dynamic" and mixing["variant"] == variant
    assert (mixing["instance_num"], mixing["seed"]) == (5, run.cfg.seed)
    assert bundle.router("global") == bundle.router("local")  # FedDPA's global mode blends as its local one
    n_train = np.asarray(data.inputs.train_mask).sum(axis=1).tolist()
    feats = bundle.arrays[mixing["features"]]
    assert mixing["train_count"] == n_train and feats.shape == (4, max(n_train), run.data.model_cfg.hidden_size)
    if variant == "pre_issue16":  # the base embeddings of the client's training inputs
        np.testing.assert_array_equal(feats[CLIENT, : n_train[CLIENT]], data.train_emb[CLIENT])
    else:  # last-token states under base + the client's local adapter: not the base embeddings
        assert np.abs(feats[CLIENT, : n_train[CLIENT]] - data.train_emb[CLIENT]).max() > 0.1
    inputs = _write_inputs(tmp_path / "in.jsonl", data.fed.test[CLIENT])
    for mode in ("local", "global"):
        plan, gens = _simulated(run, mode)
        got = _predict(tmp_path / "bundle", inputs, tmp_path / f"{mode}.jsonl", "--client", str(CLIENT),
                       "--router", mode)
        np.testing.assert_array_equal([r["adapter"] for r in got], plan.adapter_ids[CLIENT])
        np.testing.assert_array_equal([r["mix_adapter"] for r in got], plan.mix_ids[CLIENT])
        np.testing.assert_allclose([r["self_weight"] for r in got], plan.self_weight[CLIENT], rtol=0, atol=1e-6)
        np.testing.assert_allclose([r["mix_weight"] for r in got], plan.mix_weight[CLIENT], rtol=0, atol=1e-6)
        assert [r["tokens"] for r in got] == [g.tolist() for g in gens[CLIENT]], mode
    # per input, not one weight for all; max_weight * sim(x) (reference: on the global adapter,
    # pre_issue16: alpha(x) on the local one, self_weight = 1 - alpha)
    w = np.asarray(plan.self_weight[CLIENT]) if variant == "reference" else 1.0 - np.asarray(plan.self_weight[CLIENT])
    assert len(np.unique(np.round(w, 5))) == len(w) and np.all(np.abs(w) <= mixing["max_weight"] + 1e-6), w


def test_feddpa_dynamic_without_the_route_reference_is_exported_but_not_served(data, tmp_path, capsys):
    """A run directory from before route_reference.npz (or of another round) exports a rule that
    says why it cannot serve and what writes the file; `fedrouter-jax eval` writes it, then it serves."""
    run = _dynamic(data, tmp_path / "run", "reference")
    bundle_dir, inputs = tmp_path / "bundle", _write_inputs(tmp_path / "in.jsonl", data.fed.test[0])
    predict_args = ["predict", "--bundle", str(bundle_dir), "--input", str(inputs), "--output",
                    str(tmp_path / "out.jsonl"), "--client", "0"]
    for problem in ("route_reference.npz is missing", "is of another state: round 2 (checkpoint: 1)"):
        if "round 2" in problem:
            run.round = 2
            run.write_route_reference()
        assert main(["export", "--out-dir", str(tmp_path / "run"), "--dest", str(bundle_dir)]) == 0
        rule = read_bundle(bundle_dir).router("local")
        assert rule["rule"] == "blend" and rule["mixing"]["kind"] == "dynamic" and not rule["mixing"]["servable"]
        assert rule["mix_adapter_of_client"] == [1, 2, 3, 4]  # [global | local of client 0 | ...]
        assert problem in rule["mixing"]["why"] and "fedrouter-jax eval --out-dir" in rule["mixing"]["why"]
        assert main(predict_args) == 2
        err = capsys.readouterr().err
        assert "cannot serve from this bundle" in err and problem in err and len(err.strip().splitlines()) == 1
    (tmp_path / "run" / "route_reference.npz").unlink()  # an old run directory: `eval` writes the file
    assert main(["eval", "--out-dir", str(tmp_path / "run")]) == 0
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--dest", str(bundle_dir)]) == 0
    assert read_bundle(bundle_dir).router("local")["mixing"]["servable"]
    got = _predict(bundle_dir, inputs, tmp_path / "out.jsonl", "--client", "0")
    np.testing.assert_allclose([r["self_weight"] for r in got], run.sim.eval_plan(run.state, "local").self_weight[0],
                               rtol=0, atol=1e-6)


def test_export_refuses_a_foreign_directory_and_replaces_a_bundle(exported, tmp_path, capsys):
    run, bundle_dir = exported("fedit")
    out = Path(run.cfg.out_dir)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["export", "--out-dir", str(out), "--dest", str(tmp_path / "other")]) == 2
    assert "holds no bundle" in capsys.readouterr().err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    assert main(["export", "--out-dir", str(out), "--dest", str(bundle_dir)]) == 0
    assert read_bundle(bundle_dir).router("global") == {"rule": "fixed", "adapter": 0, "needs_client": False,
                                                        "embeds": False}


def test_export_reads_the_checkpoint_only(exported, tmp_path, monkeypatch, capsys):
    """No model weights, data or embeddings: export works with them all made to fail."""
    import fedrouter_jax.data as data_pkg
    import fedrouter_jax.embeddings as embeddings
    import fedrouter_jax.models.hf_io as hf_io
    import fedrouter_jax.runner as runner

    def refuse(*a, **k):
        raise AssertionError("export must not call this")

    for module, name in [(runner, "prepare"), (hf_io, "load_params"), (embeddings, "embed_tokens"),
                         (embeddings, "cached_embeddings"), (data_pkg, "build_scenario"), (runner, "build_scenario")]:
        monkeypatch.setattr(module, name, refuse)
    run, bundle_dir = exported("fedrouter")
    assert main(["export", "--out-dir", run.cfg.out_dir, "--dest", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "bundle.json").read_text()) == json.loads((bundle_dir / "bundle.json").read_text())
    assert main(["export", "--out-dir", str(tmp_path / "none"), "--dest", str(tmp_path / "c")]) == 2
    assert "no checkpoints here" in capsys.readouterr().err


@pytest.mark.slow  # a trained round (~70 s on loaded cores); the fixtures' states have the same structure
def test_export_of_a_trained_run(data, tmp_path):
    """A round through the runner, then export + predict: the bundle serves a real checkpoint."""
    cfg = load_config(None, smoke_overrides(data.cfg.model.path, tmp_path / "run",
                                            **{**EXTRA, "train.rounds": 1}))
    run = Run(cfg, data=dataclasses.replace(data, cfg=cfg), progress=False)
    run.run()
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--dest", str(tmp_path / "bundle")]) == 0
    inputs = _write_inputs(tmp_path / "in.jsonl", data.fed.test[0])
    got = _predict(tmp_path / "bundle", inputs, tmp_path / "out.jsonl", "--client", "0")
    np.testing.assert_array_equal([r["adapter"] for r in got], run.sim.eval_plan(run.state, "local").adapter_ids[0])


@pytest.mark.slow  # a trained round (~70 s on loaded cores); the fast test above writes the file as the run does
def test_feddpa_dynamic_export_of_a_trained_run(data, tmp_path):
    """A FedDPA round through the runner writes route_reference.npz after its last round; the
    bundle then serves the run's own per-input weights."""
    cfg = load_config(None, smoke_overrides(data.cfg.model.path, tmp_path / "run", **{
        **EXTRA, "method": "feddpa", "feddpa.mixing": "dynamic", "train.rounds": 1}))
    run = Run(cfg, data=dataclasses.replace(data, cfg=cfg), progress=False)
    run.run()
    assert (tmp_path / "run" / "route_reference.npz").is_file()
    assert main(["export", "--out-dir", str(tmp_path / "run"), "--dest", str(tmp_path / "bundle")]) == 0
    inputs = _write_inputs(tmp_path / "in.jsonl", data.fed.test[CLIENT])
    got = _predict(tmp_path / "bundle", inputs, tmp_path / "out.jsonl", "--client", str(CLIENT))
    plan = run.sim.eval_plan(run.state, "local")
    np.testing.assert_allclose([r["self_weight"] for r in got], plan.self_weight[CLIENT], rtol=0, atol=1e-6)
