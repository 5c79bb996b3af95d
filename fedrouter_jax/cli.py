"""`fedrouter-jax run|resume|eval|export|predict|methods` (also `python -m fedrouter_jax`).

`--out-dir D` names the run: its `config.yaml` is read with `out_dir` set to D, wherever the run
was first written. Every expected failure (bad config, model or data files, a damaged or locked
run directory, a diverged round) is one line on stderr naming the file and the key, exit code 2.
"""
from __future__ import annotations

import argparse
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
    from fedrouter_jax.distributed import initialize
    from fedrouter_jax.runner import run_from_config

    initialize(args.coordinator, args.num_processes, args.process_id)  # before anything touches a device
    cfg = load_config(args.config, args.set)
    _check_model_files(cfg)
    run_from_config(cfg, progress=not args.no_progress, fresh=args.fresh)
    return 0


def _cmd_resume(args) -> int:
    from fedrouter_jax.distributed import initialize
    from fedrouter_jax.runner import run_from_config

    initialize(args.coordinator, args.num_processes, args.process_id)
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
    from fedrouter_jax.bundle import export_run

    bundle = export_run(args.out_dir, args.dest, step=args.step)  # reads the checkpoint only
    m = bundle.meta
    print(f"exported {len(m['adapters'])} PEFT adapters and the {'/'.join(sorted(m['routers']))} routers "
          f"of {m['method']} (round {m['round']}) to {args.dest}")
    return 0


def _cmd_predict(args) -> int:
    from fedrouter_jax.predict import predict_file

    records = predict_file(args.bundle, args.input, args.output, client=args.client, router=args.router,
                           max_new_tokens=args.max_new_tokens, base_model=args.base_model)
    print(f"wrote {len(records)} predictions to {args.output}")
    return 0


def _cmd_flower(args) -> int:
    from fedrouter_jax.config import config_to_dict, load_config
    from fedrouter_jax.flower.driver import run_flower
    from fedrouter_jax.rundir import RunDir

    cfg = load_config(args.config, args.set)
    _check_model_files(cfg)
    if args.write_app:  # for real machines: `flwr run DIR <connection>`
        from fedrouter_jax.flower.driver import write_app

        write_app(Path(args.write_app), cfg, nodes=args.nodes, round_timeout=args.round_timeout,
                  setup_timeout=args.setup_timeout)
        print(f"wrote the Flower app to {args.write_app}")
        return 0
    with RunDir(cfg.out_dir, fresh=args.fresh) as rd:  # the lock: one run per out_dir
        rd.check_same_config(config_to_dict(cfg))
        return run_flower(cfg, runtime=args.runtime, nodes=args.nodes, round_timeout=args.round_timeout,
                          setup_timeout=args.setup_timeout, run_timeout=args.run_timeout)


def _cmd_methods(args) -> int:
    from fedrouter_jax.algorithms import available

    print("\n".join(available()))
    return 0


def _add_distributed_args(p: argparse.ArgumentParser) -> None:
    """One run over several processes (hosts): start the same command in each, process 0 first."""
    g = p.add_argument_group("multi-process (all three or none; devices per process: JAX_NUM_CPU_DEVICES on CPU)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator (it listens there)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes taking part")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (0 writes the run directory)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedrouter-jax", description="Task-centric personalized federated LoRA fine-tuning (FedRouter) in JAX.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a config (resumes when its out_dir holds a verified checkpoint)")
    r.add_argument("--config", required=True, help="YAML under configs/ (overrides of the defaults)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.rounds=3")
    r.add_argument("--fresh", action="store_true",
                   help="remove the run in out_dir (only a run's own files; anything else is refused) and start over")
    r.add_argument("--no-progress", action="store_true")
    _add_distributed_args(r)
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("resume", help="continue the run in OUT_DIR from its latest verified checkpoint")
    s.add_argument("--out-dir", required=True, help="the run directory (its config.yaml is used, with out_dir = OUT_DIR)")
    s.add_argument("--no-progress", action="store_true")
    _add_distributed_args(s)
    s.set_defaults(fn=_cmd_resume)
    e = sub.add_parser("eval", help="evaluate the latest verified checkpoint of OUT_DIR")
    e.add_argument("--out-dir", required=True)
    e.add_argument("--router", choices=["local", "global"])
    e.set_defaults(fn=_cmd_eval)
    x = sub.add_parser("export", help="write the bundle (PEFT adapters + routers) of OUT_DIR's latest verified checkpoint")
    x.add_argument("--out-dir", required=True)
    x.add_argument("--dest", required=True, help="bundle directory (new, empty, or an earlier bundle: replaced)")
    x.add_argument("--step", type=int, help="checkpoint round to export (default: the latest verified)")
    x.set_defaults(fn=_cmd_export)
    pr = sub.add_parser("predict", help="route and answer the inputs of a JSONL file with an exported bundle")
    pr.add_argument("--bundle", required=True, help="directory written by `export`")
    pr.add_argument("--input", required=True, help='JSONL, one {"instruction": ..., "input": ...} per line')
    pr.add_argument("--output", required=True, help="JSONL, one prediction and the adapter used per input line")
    pr.add_argument("--client", type=int, help="client whose router and adapters serve (needed by --router local)")
    pr.add_argument("--router", choices=["local", "global"], help="default: the run's eval.router")
    pr.add_argument("--max-new-tokens", type=int, help="default: the run's eval.max_new_tokens")
    pr.add_argument("--base-model", help="base model directory (default: the bundle's; checked by fingerprint)")
    pr.set_defaults(fn=_cmd_predict)
    f = sub.add_parser("flower", help="run a config as a Flower app (simulation runtime, or SuperLink + SuperNodes "
                                      "on 127.0.0.1); resumes like run")
    f.add_argument("--config", required=True, help="YAML under configs/ (overrides of the defaults)")
    f.add_argument("--runtime", required=True, choices=["simulation", "deployment"])
    f.add_argument("--nodes", type=int, required=True, help="Flower nodes; node i holds clients i, i + N, ...")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.rounds=3")
    f.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds the server waits for a round's replies; later ones count as dropped")
    f.add_argument("--setup-timeout", type=float, default=600.0, help="seconds to wait for the nodes and their setup")
    f.add_argument("--run-timeout", type=float, default=None, help="stop everything after this many seconds")
    f.add_argument("--fresh", action="store_true", help="as for run: start over in out_dir")
    f.add_argument("--write-app", metavar="DIR", help="only write the Flower app to DIR (for `flwr run` elsewhere)")
    f.set_defaults(fn=_cmd_flower)
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
