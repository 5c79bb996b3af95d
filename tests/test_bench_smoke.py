"""Every benchmark script's main runs in --small mode (tiny sizes), so the scripts never rot."""
import importlib.util
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench")


def _main(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    file = f"{name}.py" if name.startswith("profile") else f"bench_{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}_smoke", os.path.join(BENCH, file))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def test_bench_clients():
    r = _main("clients")(["--small"])
    run = r["runs"][0]
    assert run["mapped"]["client_steps_per_s"] > 0 and run["loop"]["client_steps_per_s"] > 0


def test_bench_flops():
    r = _main("flops")(["--small"])
    assert len(r["memory"]) == 2 and r["head_tokens"] < r["B"] * r["T"]
    for name in ("step", "step_all"):
        assert 0 < r[name]["fraction_of_peak"] and r[name]["step_flops"]["total"] > 0
    assert r["step"]["step_flops"]["total"] < r["step_all"]["step_flops"]["total"]  # head on loss tokens only


def test_bench_clustering():
    r = _main("clustering")(["--small", "--repeats", "1"])
    assert r["single"][0]["inertia_rel_diff"] < 1e-4 and r["single"][0]["labels_agree"] == 1.0
    assert r["clients"][0]["n_iter_mean"][0] > 0


def test_bench_routing():
    r = _main("routing")(["--small"])
    assert r["agreement"] == {"grouped==loop": 1.0, "mixed==loop": 1.0}


def test_bench_scale():
    r = _main("scale")(["--small"])
    assert [m["C"] for m in r["runs"]] == [2, 4] and all(m["loss_finite"] for m in r["runs"])


def test_bench_torch_peers():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    r = _main("torch_peers")(["--small"])
    assert r["jax"]["client_steps_per_s"] > 0 and r["torch_lean"]["client_steps_per_s"] > 0
    assert r["jax_all"]["client_steps_per_s"] > 0


def test_profile_step():
    r = _main("profile_step")(["--small"])
    assert r["span_s"] > 0 and any(d["flops"] > 0 for d in r["dots"])


def test_bench_attention():
    r = _main("attention")(["--small"])
    assert r["op"]["ratio fwd+bwd"] > 0 and set(r["step_s"]) == {"xla", "fused"}


def test_bench_real_size():
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    r = _main("real_size")(["--small"])
    assert r["jax"]["s_per_step"] > 0 and r["torch_lean"]["s_per_step"] > 0 and r["ratio"] > 0
    assert r["head_tokens"] < r["config"]["seq"] and r["weights_bytes"] > 0


def test_gpu_sh_dry_run(tmp_path):
    """`bash experiments/bench/gpu.sh --dry-run`: every GPU step's arguments parse, the GPU checks
    run at tiny shapes on CPU, one JSON comes out."""
    import json
    import subprocess

    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run(["bash", os.path.join(BENCH, "gpu.sh"), "--dry-run", "--json", str(out)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["steps"]) == {"checks", "flops", "clients", "torch", "clustering", "scale"}
    assert report["steps"]["flops"]["parsed"]["model"] == "1b"
    checks = report["steps"]["checks"]
    assert checks["rc"] == 0 and "error" not in json.dumps(checks["results"]), checks.get("tail")
    assert checks["results"]["attention"]["op"]["by_T"][0]["out_rel_err"] < 1e-5
    assert checks["results"]["memory"]["forced"]["fits"]
