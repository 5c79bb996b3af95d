"""Every GPU check and benchmark of the issue in one run, within a total time limit, into ONE JSON.

Each step runs in a fresh process, so one failure, hang or out-of-memory does not stop the
others and each step's device memory (peak included) is its own. A step gets its own limit or
what is left of the total, whichever is less; one that runs out is killed and recorded as timed
out with the end of its output. This process never initialises JAX: on a GPU that would hold
the device memory the steps need.

  steps       checks (gpu_checks.py: attention, bf16, client groups from memory), flops (MFU of
              the Llama-3.2-1B-shaped bf16 step), clients (mapped round vs loop), torch (vs
              PyTorch + PEFT on the same GPU), clustering, scale
  --dry-run   on CPU: every step's GPU command line is parsed by its script (no work done) and
              the checks run at tiny shapes (tests/test_bench_smoke.py)

  python experiments/bench/bench_gpu.py                   # via experiments/bench/gpu.sh
  python experiments/bench/bench_gpu.py --dry-run --json /tmp/gpu.json
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parents[1]
TOTAL_S = 570  # the 10 minutes, less start-up and slack

# (name, script, GPU arguments, limit in seconds, extra environment)
STEPS = [
    ("checks", "gpu_checks.py", [], 170, {}),
    # >= 40 % MFU: Llama-3.2-1B-shaped random bf16 base, LoRA r8 q,k,v,o, B 16 x T 512
    ("flops", "bench_flops.py", ["--model", "1b", "--dtype", "bfloat16", "--batch", "16", "--seq", "512",
                                 "--mm", "8192", "--mem-clients", "1", "--mem-batch", "16", "--mem-seq", "512",
                                 "--repeats", "3"], 110, {}),
    # client-mapped round >= 5x the loop at C = 128 (embedded-size model)
    ("clients", "bench_clients.py", ["--clients", "8", "32", "128", "--batch", "4", "4", "2",
                                     "--seq", "64", "64", "32", "--repeats", "2"], 80, {}),
    # >= 3x the lean PyTorch + PEFT loop on the same GPU (needs a CUDA build of torch); JAX must
    # not take 75 % of the device up front when torch shares it
    ("torch", "bench_torch_peers.py", ["--device", "cuda", "--repeats", "2"], 80,
     {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}),
    # clustering >= 20x scikit-learn
    ("clustering", "bench_clustering.py", ["--repeats", "3"], 40, {}),
    ("scale", "bench_scale.py", ["--clients", "8", "32", "128", "512", "2048"], 60, {}),
]
TAIL = 3000


class _Parsed(Exception):
    pass


def parse_only(script: str, argv: list[str]) -> dict:
    """The arguments `script`'s main parses from `argv`, without running anything after that."""
    spec = importlib.util.spec_from_file_location(f"_gpu_dry_{Path(script).stem}", BENCH / script)
    mod = importlib.util.module_from_spec(spec)
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(mod)
    real = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(vars(real(self, args, namespace)))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop):
        try:
            mod.main(argv)
        except _Parsed as parsed:
            return parsed.args[0]
    raise RuntimeError(f"{script}: main() returned without parsing its arguments")


def run_step(name: str, script: str, argv: list[str], limit: float, env: dict, workdir: Path) -> dict:
    """Run one step in a fresh process with `--json`; its results, or why there are none."""
    out_json = workdir / f"{name}.json"
    cmd = [sys.executable, str(BENCH / script), *argv, "--json", str(out_json)]
    t0 = time.perf_counter()
    rec = {"cmd": " ".join(cmd[1:]), "limit_s": round(limit, 1)}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=limit)
        rec.update(rc=proc.returncode, timed_out=False)
        output = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        rec.update(rc=None, timed_out=True)
        output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (err.stdout, err.stderr))
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    if out_json.exists():
        rec["results"] = json.loads(out_json.read_text()).get("results")
    if rec["rc"] != 0 or "results" not in rec:
        rec["tail"] = output[-TAIL:]
    return rec


def machine() -> dict:
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "host_cores": os.cpu_count()}
    try:
        info["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["gpu"] = None
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                        timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(ROOT / "results" / "bench" / "gpu.json"))
    p.add_argument("--dry-run", action="store_true", help="CPU: parse every step's arguments, checks at tiny shapes")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    p.add_argument("--total-s", type=float, default=TOTAL_S, help="time limit of the whole run")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    report = {"machine": machine(), "dry_run": args.dry_run, "total_limit_s": args.total_s, "steps": {}}
    steps = [s for s in STEPS if args.only is None or s[0] in args.only]
    with tempfile.TemporaryDirectory() as tmp:
        for name, script, gpu_argv, limit, env in steps:
            left = args.total_s - (time.perf_counter() - t0)
            if args.dry_run:
                rec = {"parsed": parse_only(script, gpu_argv)}
                if name == "checks":
                    rec.update(run_step(name, script, ["--small"], left, {"JAX_PLATFORMS": "cpu", **env}, Path(tmp)))
            elif left < 10:
                rec = {"skipped": f"out of time ({left:.0f} s of {args.total_s:.0f} s left)"}
            else:
                rec = run_step(name, script, gpu_argv, min(limit, left), env, Path(tmp))
            report["steps"][name] = rec
            status = "skipped" if "skipped" in rec else (
                "parsed" if "rc" not in rec else "timed out" if rec["timed_out"] else f"rc {rec['rc']}")
            print(f"{name:10s} {status:10s} {rec.get('wall_s', 0):7.1f} s  {rec.get('cmd', '')}", flush=True)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {args.json} ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
