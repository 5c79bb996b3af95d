"""`fedrouter-jax run|resume|eval|export|methods` (also `python -m fedrouter_jax`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _cmd_run(args) -> int:
    from fedrouter_jax.runner import run_from_config

    run_from_config(args.config, args.set, progress=not args.no_progress, fresh=args.fresh)
    return 0


def _cmd_resume(args) -> int:
    from fedrouter_jax.runner import run_from_config

    cfg_path = Path(args.out_dir) / "config.yaml"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path}: no run to resume here (expected the config.yaml a run writes)")
    run_from_config(cfg_path, progress=not args.no_progress)
    return 0


def _load_finished(out_dir: str, overrides=()):
    from fedrouter_jax.checkpoint import CheckpointStore
    from fedrouter_jax.config import load_config
    from fedrouter_jax.runner import Run

    cfg = load_config(Path(out_dir) / "config.yaml", overrides)
    store = CheckpointStore(Path(out_dir) / "checkpoints", read_only=True)
    step = store.latest_step()
    if step is None:
        raise FileNotFoundError(f"{out_dir}/checkpoints: no complete checkpoint")
    run = Run(cfg, progress=False)
    tree, _ = store.restore(step)
    run.state = tree["state"]
    return run, step


def _cmd_eval(args) -> int:
    from fedrouter_jax.runner import format_table

    overrides = [f"eval.router={args.router}"] if args.router else []
    run, step = _load_finished(args.out_dir, overrides)
    results = run.final_evaluation()
    print(f"(checkpoint of round {step})")
    print(format_table(results, run.data.fed.task_names))
    return 0


def _cmd_export(args) -> int:
    from fedrouter_jax.lora import take
    from fedrouter_jax.models.hf_io import export_peft

    run, step = _load_finished(args.out_dir)
    stack = run.data.ctx.stack(run.state["adapters"])
    dest = Path(args.dest)
    n = stack.n_adapters
    for a in range(n):
        export_peft(dest / f"adapter_{a}", take(stack, a), base_model_path=str(run.data.model_dir))
    meta = {"round": step, "method": run.cfg.method, "n_adapters": n}
    if "global_centroids" in run.state:  # the router needs the centroids next to the adapters
        import numpy as np

        np.save(dest / "global_centroids.npy", np.asarray(run.state["global_centroids"]))
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
    r = sub.add_parser("run", help="run a config (resumes when its out_dir holds a complete checkpoint)")
    r.add_argument("--config", required=True, help="YAML under configs/ (overrides of the defaults)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, e.g. train.rounds=3")
    r.add_argument("--fresh", action="store_true", help="delete out_dir and start over")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=_cmd_run)
    s = sub.add_parser("resume", help="continue the run in OUT_DIR from its latest complete checkpoint")
    s.add_argument("--out-dir", required=True)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_cmd_resume)
    e = sub.add_parser("eval", help="evaluate the latest checkpoint of OUT_DIR")
    e.add_argument("--out-dir", required=True)
    e.add_argument("--router", choices=["local", "global"])
    e.set_defaults(fn=_cmd_eval)
    x = sub.add_parser("export", help="export the adapters of OUT_DIR's latest checkpoint in PEFT format")
    x.add_argument("--out-dir", required=True)
    x.add_argument("--dest", required=True)
    x.set_defaults(fn=_cmd_export)
    m = sub.add_parser("methods", help="list the federated methods")
    m.set_defaults(fn=_cmd_methods)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from fedrouter_jax.config import ConfigError

    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"fedrouter-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
