"""Two processes x 2 CPU devices run one federation through `fedrouter-jax run --coordinator ...`
with the client axis sharded over all 4 devices: the single-process results, only process 0
writes the run directory, and a run whose process 0 is killed resumes.

Everything listens on 127.0.0.1 only: the coordinator binds the address it is given, and gloo's
collectives bind the address the host name resolves to (here 127.0.0.1). Every child has a
deadline and is killed by its PID when it passes it or when the test fails.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np

from fedrouter_jax.checkpoint import CheckpointStore
from fedrouter_jax.config import load_config, save_config
from fedrouter_jax.runner import run_from_config

from helpers import smoke_overrides

ROOT = Path(__file__).resolve().parents[1]
N_PROCESSES = 2
ROUNDS = 3
KILL_AFTER = 2
DEADLINE_S = 240

# argv: kill_after (0: never), then the CLI's arguments. kill_after k: SIGKILL this process right
# after round k's checkpoint is complete (process 0 holds the run directory).
CHILD = textwrap.dedent("""
    import os, signal, sys
    from fedrouter_jax import checkpoint, cli
    kill_after = int(sys.argv[1])
    if kill_after:
        orig = checkpoint.CheckpointStore.save
        def save(self, step, *a, **kw):
            orig(self, step, *a, **kw)
            if step == kill_after:
                print(f"SIGKILL after round {step}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.CheckpointStore.save = save
    sys.exit(cli.main(sys.argv[2:]))
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: Path, logs: Path, kill_after: int = 0):
    """Both processes of one `run`; -> [(pid, returncode, output)] per process. After process 0
    ends, the others get a few seconds, then are killed (a dead coordinator leaves them waiting)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "2",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    port = _free_port()
    procs, files = [], []
    try:
        for i in range(N_PROCESSES):
            log = open(logs.with_suffix(f".{i}.log"), "w+")
            files.append(log)
            argv = [sys.executable, "-c", CHILD, str(kill_after if i == 0 else 0), "run", "--config", str(config),
                    "--no-progress", "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(N_PROCESSES),
                    "--process-id", str(i)]
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + DEADLINE_S
        try:
            procs[0].wait(timeout=DEADLINE_S)
            for p in procs[1:]:
                p.wait(timeout=max(1.0, min(10.0, deadline - time.monotonic())) if kill_after == 0 else 1.0)
        except subprocess.TimeoutExpired:
            pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    out = []
    for p, log in zip(procs, files):
        log.seek(0)
        out.append((p.pid, p.returncode, log.read()))
        log.close()
    return out


def _final_state(out: Path):
    store = CheckpointStore(out / "checkpoints", read_only=True)
    return store.latest_step(), jax.tree.leaves(store.restore(store.latest_step())[0])


def _rounds(out: Path):
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_give_the_single_process_results_and_resume(model_dir, tmp_path):
    single = run_from_config(load_config(None, smoke_overrides(model_dir, tmp_path / "single")), progress=False)
    out = tmp_path / "multi"
    config = save_config(load_config(None, smoke_overrides(model_dir, out, **{"train.client_mesh_devices": 0})),
                         tmp_path / "multi.yaml")

    killed = _launch(config, tmp_path / "killed", kill_after=KILL_AFTER)
    assert killed[0][1] == -signal.SIGKILL and f"SIGKILL after round {KILL_AFTER}" in killed[0][2], \
        killed[0][2][-3000:] + killed[1][2][-3000:]  # not the deadline's kill
    assert _final_state(out)[0] == KILL_AFTER and _rounds(out) == [1, 2]  # written once: process 0 alone

    resumed = _launch(config, tmp_path / "resumed")
    assert [rc for _, rc, _ in resumed] == [0, 0], resumed[0][2][-3000:] + resumed[1][2][-3000:]
    assert f"[resume] from the complete checkpoint of round {KILL_AFTER}" in resumed[0][2]
    assert _rounds(out) == list(range(1, ROUNDS + 1))
    assert (out / ".fedrouter.lock").read_text().strip() == str(resumed[0][0])  # process 0 took the lock
    results = json.loads((out / "results.json").read_text())

    step, got = _final_state(out)
    ref_step, ref = _final_state(tmp_path / "single")
    assert step == ref_step == ROUNDS and len(got) == len(ref)
    for a, b in zip(ref, got):  # adapters, optimizer moments, centroids, cluster ids
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
    assert abs(results["rouge1"] - single["rouge1"]) <= 1e-3
    np.testing.assert_allclose(results["local"]["per_client"], single["local"]["per_client"], atol=1e-3)


def test_distributed_flags_all_three_or_none(model_dir, tmp_path, capsys):
    from fedrouter_jax.cli import main
    from fedrouter_jax.distributed import initialize

    initialize(None, None, None)  # one process: nothing to start
    config = save_config(load_config(None, smoke_overrides(model_dir, tmp_path / "run")), tmp_path / "c.yaml")
    for flags, says in ((["--coordinator", "127.0.0.1:1", "--num-processes", "2"], "give all three or none"),
                        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
                        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
                         "0 <= id < --num-processes")):
        assert main(["run", "--config", str(config), *flags]) == 2
        assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
