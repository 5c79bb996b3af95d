"""Where the training step's time goes: a jax.profiler trace of one jitted step, per XLA op.

Runs `training.local_steps` (S steps in one call) on the 34M model as `bench_flops.py` does,
traces one call, and prints from the trace (XLA:CPU thunk events, grouped by HLO instruction):
  * every dot with its shape, FLOPs and achieved GFLOP/s (concurrent thunks share the cores, so
    two dots running side by side each show about half the rate);
  * the time of the other op kinds (copies, scan bookkeeping, elementwise fusions);
  * how long 0, 1 or 2 thunks were running (idle gaps, concurrency).

  python experiments/bench/profile_step.py                 # 34M, B 16, T 128, head on loss positions
  python experiments/bench/profile_step.py --head all      # LM head at every position
  python experiments/bench/profile_step.py --small
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402



def _events(trace_dir: str):
    """(start_ns, end_ns, thread, name) of the XLA:CPU thunks in the newest trace under trace_dir."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1]
    out = []
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):
                continue
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "end:", "Threadpool", "while", "SlinkyThreadPool")):
                    continue
                out.append((ev.start_ns, ev.start_ns + ev.duration_ns, line.name, ev.name))
    return out


def _dot_flops(hlo: str, name: str) -> tuple[float, str]:
    """FLOPs of one call of the dot inside fusion `name`, and its shapes, from the HLO text."""
    m = re.search(r"%" + re.escape(name) + r" = \S+ fusion\(.*?calls=%([\w.\-]+)", hlo)
    if not m:
        return 0.0, ""
    comp = m.group(1)
    body = re.search(r"^%" + re.escape(comp) + r" \((.*?)\) -> .*?\{\n(.*?)\n\}", hlo, re.M | re.S)
    if not body:
        return 0.0, ""
    shapes = dict(re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", body.group(1)))
    shapes.update(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", body.group(2)))
    d = re.search(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\).*?lhs_contracting_dims=\{([\d,]*)\}",
                  body.group(2))
    if not d:
        return 0.0, ""
    dims = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    out, lhs = dims(d.group(1)), dims(shapes.get(d.group(2), ""))
    contract = int(np.prod([lhs[int(i)] for i in d.group(4).split(",")])) if lhs else 0
    return 2.0 * float(np.prod(out)) * contract, f"out {out} lhs {lhs} K {contract}"


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=1)
    common.add_shape_args(p, model="34m", steps=2)
    p.add_argument("--head", default="loss", choices=["loss", "all"])
    p.add_argument("--top", type=int, default=25, help="dots to list")
    args = p.parse_args(argv)
    if args.small:
        args.model, args.batch, args.seq, args.steps, args.top = "small", 2, 16, 2, 5
    info = common.header("Profile of one jitted training step (per XLA op)", args)
    S = args.steps
    step, step_args, _ = common.single_client_step(common.CONFIGS[args.model], S, args.batch, args.seq,
                                                   head=args.head)
    hlo = step.lower(*step_args).compile().as_text()
    jax.block_until_ready(step(*step_args))  # compile + warm
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        jax.block_until_ready(step(*step_args))
        jax.profiler.stop_trace()
        events = _events(tmp)

    t0, t1 = min(e[0] for e in events), max(e[1] for e in events)
    span = (t1 - t0) / 1e9
    busy = collections.Counter()
    points = sorted([(s, 1) for s, *_ in events] + [(e, -1) for _, e, *_ in events])
    active, last = 0, t0
    for t, delta in points:
        busy[min(active, 2)] += t - last
        last, active = t, active + delta
    per_name, calls = collections.Counter(), collections.Counter()
    for s, e, _, name in events:
        per_name[name] += e - s
        calls[name] += 1
    kinds = collections.Counter()
    for name, ns in per_name.items():
        kinds["dot (ynn_fusion)" if name.startswith("ynn_fusion") else re.sub(r"[.\d]+$", "", name)] += ns
    print(f"\ntraced call: {S} steps in {span:.3f} s ({span / S:.3f} s/step); time with 0 / 1 / 2+ thunks running: "
          + " / ".join(f"{busy[k] / 1e9:.3f}" for k in range(3)) + " s")
    print("\nthread-seconds per op kind (summed over both threads):")
    for kind, ns in kinds.most_common(14):
        print(f"  {kind:40s} {ns / 1e9:7.3f} s")
    dots = []
    for name, ns in per_name.items():
        if name.startswith("ynn_fusion"):
            flops, desc = _dot_flops(hlo, name)
            dots.append((ns, name, calls[name], flops * calls[name], desc))
    dots.sort(reverse=True)
    print(f"\ndots (top {args.top} by time): seconds, calls, GFLOP, GFLOP/s, shapes")
    for ns, name, n, flops, desc in dots[:args.top]:
        rate = flops / ns if ns else 0.0
        print(f"  {ns / 1e9:6.3f} s {n:4d} {flops / 1e9:8.1f} {rate:7.1f}  {name:16s} {desc}")
    total_flops, total_ns = sum(d[3] for d in dots), sum(d[0] for d in dots)
    print(f"all dots: {total_flops / 1e9:.1f} GFLOP in {total_ns / 1e9:.3f} thread-s")
    results = {"span_s": span, "busy_s": {k: busy[k] / 1e9 for k in range(3)},
               "kinds_s": {k: v / 1e9 for k, v in kinds.items()},
               "dots": [{"name": n, "s": ns / 1e9, "calls": c, "flops": f, "shape": d} for ns, n, c, f, d in dots]}
    common.footer(info, results, args)
    return results


if __name__ == "__main__":
    main()
