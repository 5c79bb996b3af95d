"""`fedrouter-jax run|resume|eval|export|methods` (also `python -m fedrouter_jax`).

`--out-dir D` names the run: its `config.yaml` is read with `out_dir` set to D, wherever the run
was first written. Every expected failure (bad config, model or data files, a damaged or locked
run directory, a diverged round) is one line on stderr naming the file and the key, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path


def _run_config(out_dir: str, overrides=()):
    """D/config.yaml with out_dir = D (the directory the user names is the run)."""
    from fedrouter_jax.config import load_config, replace_path
    from fedrouter_jax.rundir import RunDirError

    path = Path(out_dir) / "config.yaml"
    if not path.is_file():
        raise RunDirError(f"{path}: no run here (expected the config.yaml a run writes)")
    return replace_path(load_config(path, overrides), "out_dir", str(out_dir))


def _check_model_files(cfg) -> None:
    """Fails fast, before anything is written, on a broken model directory: config.json,
    tokenizer and the safetensors headers (one line naming the file and key)."""
    from fedrouter_jax.data.tokenizer import check_tokenizer_vocab, load_model_tokenizer_file
    from fedrouter_jax.models.config import LlamaConfig
    from fedrouter_jax.runner import model_directory

    model_dir = model_directory(cfg)
    model_cfg = LlamaConfig.from_json(model_dir / "config.json")
    check_tokenizer_vocab(load_model_tokenizer_file(model_dir), model_cfg.vocab_size, model_dir)
    _check_safetensors(model_dir)


def _check_safetensors(model_dir: Path) -> None:
    from safetensors import safe_open

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.path: {model_dir} holds no *.safetensors file")
    for f in files:
        try:
            with safe_open(str(f), framework="np") as st:
                st.keys()
        except Exception as e:  # noqa: BLE001 - the library's errors are untyped (SafetensorError)
            raise ValueError(f"{f}: not a readable safetensors file ({e}); re-download or re-save it") from None


def _cmd_run(args) -> int:
    from fedrouter_jax.config import load_config
    from fedrouter_jax.runner import run_from_config

    cfg = load_config(args.config, args.set)
    _check_model_files(cfg)
    run_from_config(cfg, progress=not args.no_progress, fresh=args.fresh)
    return 0


def _cmd_resume(args) -> int:
    from fedrouter_jax.runner import run_from_config

    cfg = _run_config(args.out_dir)
    _check_model_files(cfg)
    run_from_config(cfg, progress=not args.no_progress, resume=True)
    return 0


def _load_finished(out_dir: str, overrides=()):
    """(Run with its state restored, round of the checkpoint used) for D's latest verified step."""
    from fedrouter_jax.checkpoint import CheckpointStore
    from fedrouter_jax.config import config_to_dict
    from fedrouter_jax.rundir import check_resume_config
    from fedrouter_jax.runner import Run

    cfg = _run_config(out_dir, overrides)
    _check_model_files(cfg)
    store = CheckpointStore(Path(out_dir) / "checkpoints", read_only=True)
    step = store.latest_step()
    if step is None:
        raise FileNotFoundError(f"{store.directory}: no usable checkpoint"
                                + (" (every step fails verification)" if store.skipped else ""))
    check_resume_config(store.read_extra(step).get("config"), config_to_dict(cfg),
                        where=str(Path(out_dir) / "config.yaml"), step=step)
    print(f"[checkpoint] using round {step} of {store.directory}")
    run = Run(cfg, progress=False)
    run.state = run.restore(store, step)[0]
    return run, step


def _cmd_eval(args) -> int:
    from fedrouter_jax.rundir import RunDir
    from fedrouter_jax.runner import format_table

    overrides = [f"eval.router={args.router}"] if args.router else []
    with RunDir(args.out_dir, must_exist=True):  # eval rewrites results.json: not while a run writes
        run, step = _load_finished(args.out_dir, overrides)
        results = run.final_evaluation()
    print(f"(checkpoint of round {step})")
    print(format_table(results, run.data.fed.task_names))
    return 0


def _cmd_export(args) -> int:
    from fedrouter_jax.lora import take
    from fedrouter_jax.models.hf_io import export_peft

    run, step = _load_finished(args.out_dir)
    plan = run.sim.eval_plan(run.state, run.cfg.eval.router)  # every method's adapters, one stack
    stack = plan.adapters
    dest = Path(args.dest)
    n = stack.n_adapters
    for a in range(n):
        export_peft(dest / f"adapter_{a}", take(stack, a), base_model_path=str(run.data.model_dir))
    meta = {"round": step, "method": run.cfg.method, "n_adapters": n, "router": run.cfg.eval.router}
    centroids = getattr(run.state.server, "global_centroids", None)
    if centroids is not None:  # the router needs the centroids next to the adapters
        import numpy as np

        np.save(dest / "global_centroids.npy", np.asarray(centroids))
    (dest / "export.json").write_text(json.dumps(meta, indent=2))
    print(f"exported {n} PEFT adapters to {dest}")
    return 0


def _cmd_methods(args) -> int:
    from fedrouter_jax.algorithms import available

    print("\n".join(available()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrouter-jax", description="Task-centric personalized federated LoRA fine-tuning (FedRouter) in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a config (resumes when its out_dir holds a verified checkpoint)")
    r.add_argument("--config", required=True, help="YAML under configs/ (overrides of the defaults)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.rounds=3")
    r.add_argument("--fresh", action="store_true",
                   help="remove the run in out_dir (only a run's own files; anything else is refused) and start over")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("resume", help="continue the run in OUT_DIR from its latest verified checkpoint")
    s.add_argument("--out-dir", required=True, help="the run directory (its config.yaml is used, with out_dir = OUT_DIR)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_cmd_resume)
    e = sub.add_parser("eval", help="evaluate the latest verified checkpoint of OUT_DIR")
    e.add_argument("--out-dir", required=True)
    e.add_argument("--router", choices=["local", "global"])
    e.set_defaults(fn=_cmd_eval)
    x = sub.add_parser("export", help="export the adapters of OUT_DIR's latest verified checkpoint in PEFT format")
    x.add_argument("--out-dir", required=True)
    x.add_argument("--dest", required=True)
    x.set_defaults(fn=_cmd_export)
    m = sub.add_parser("methods", help="list the federated methods")
    m.set_defaults(fn=_cmd_methods)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"fedrouter-jax: warning: {message}\n"


def _expected_errors() -> tuple[type, ...]:
    """What a user can cause (bad config, files, directories, a diverged round): one line each."""
    import json as _json

    from fedrouter_jax.checkpoint import CheckpointError
    from fedrouter_jax.config import ConfigError
    from fedrouter_jax.runner import NonFiniteError

    return (ConfigError, CheckpointError, NonFiniteError, OSError, ValueError, _json.JSONDecodeError,
            UnicodeDecodeError)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    expected = _expected_errors()
    previous, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return args.fn(args)
    except expected as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        if type(e).__name__ == "NonFiniteError":  # names the round; add where its settings live
            msg += f" (config: {getattr(args, 'config', None) or Path(args.out_dir) / 'config.yaml'})"
        print(f"fedrouter-jax: error: {msg}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = previous


if __name__ == "__main__":
    sys.exit(main())
