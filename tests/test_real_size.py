"""The CLI on a randomly initialised HF Llama of the exact Llama-3.2-1B architecture (d 2048, 16
layers, 32/8 heads, F 8192, V 128256, llama3 RoPE, tied, bf16, 3 safetensors shards): run
(embed, 1 round of 2 clients x 1 step), eval, export; the exported PEFT adapter on the HF model
(`peft`) gives our logits; each CLI process's peak RSS stays within 1.5x the weights + a bound
of this config's activations + the runtime (the same command's peak on the 4M-parameter model).
Needs ~2.5 GB of disk and ~6 GB of RAM.

  pytest -m slow -s tests/test_real_size.py       # prints time and peak RSS per command
"""
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import smoke_overrides

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "fedrouter_jax" / "assets" / "tiny-llama"  # any tokenizer: its ids are < V
CLIENTS, BATCH, SEQ = 2, 1, 96
OVERRIDES = {"data.n_clients": CLIENTS, "data.train_per_client": 2, "data.test_per_client": 1,
             "train.rounds": 1, "train.local_steps": 1, "train.batch_size": BATCH,
             "train.lr": 0.05,  # one Adam step moves B by ~lr: an adapter the logits can see
             "model.dtype": "bfloat16", "model.max_seq_len": SEQ, "model.embed_max_tokens": 32,
             "eval.max_new_tokens": 2, "eval.batch_size": 2}


def activation_bytes(d=2048, f=8192, heads=32, layers=16, vocab=128256, tokens=CLIENTS * BATCH * SEQ) -> int:
    """An upper bound of the float32 activations one round of this config keeps for its backward:
    per layer and token the normed inputs, q, k, v, o, gate, up and their product (~4D + 3F) and
    the attention rows (H x T); the LM head's logits and their gradient at every position."""
    return layers * tokens * (4 * d + 3 * f + heads * SEQ) * 4 + 2 * tokens * vocab * 4


_BUILD = """
import sys, torch, transformers
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # built in bf16: no fp32 copy of 1.2B parameters
tok = transformers.AutoTokenizer.from_pretrained(sys.argv[2])
cfg = transformers.LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    pad_token_id=tok.pad_token_id,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
model = transformers.LlamaForCausalLM(cfg)
model.save_pretrained(sys.argv[1], safe_serialization=True, max_shard_size="1GB")
"""

# The CLI's `main`, then this process's own peak RSS (VmHWM: ru_maxrss of a child would also
# count the parent's resident set at fork).
_CLI = """
import sys
from fedrouter_jax.cli import main
rc = main(sys.argv[2:])
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
open(sys.argv[1], "w").write(str(int(hwm.split()[1]) * 1024))
sys.exit(rc)
"""


def _cli(tmp_path, *args):
    """Run `fedrouter-jax ARGS`; (seconds, peak RSS bytes, stdout)."""
    hwm = tmp_path / "hwm"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CLI, str(hwm), *args], capture_output=True, text=True, cwd=ROOT,
                       timeout=1800, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, (args[0], r.stdout[-2000:], r.stderr[-4000:])
    return time.perf_counter() - t0, int(hwm.read_text()), r.stdout + r.stderr


def _cli_commands(tmp_path, model_dir, name) -> dict:
    """run (embed, 1 round), eval and export of the tiny config on `model_dir`: seconds and peak RSS."""
    out = tmp_path / f"run-{name}"
    sets = [a for o in smoke_overrides(model_dir, out, **OVERRIDES) for a in ("--set", o)]
    figures = {}
    for cmd, args in [("run", ["run", "--config", "configs/smoke.yaml", "--no-progress", *sets]),
                      ("eval", ["eval", "--out-dir", str(out)]),
                      ("export", ["export", "--out-dir", str(out), "--dest", str(tmp_path / f"export-{name}")])]:
        seconds, peak, _ = _cli(tmp_path, *args)
        figures[cmd] = {"seconds": round(seconds, 1), "peak_rss_bytes": peak}
    return figures


def test_cli_on_the_llama_3_2_1b_architecture(tmp_path, record_property):
    model_dir = tmp_path / "llama-1b"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _BUILD, str(model_dir), str(TOKENIZER)], check=True, cwd=ROOT, timeout=1800)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / f, model_dir / f)
    shards = sorted(model_dir.glob("model-*.safetensors"))
    assert len(shards) == 3 and (model_dir / "model.safetensors.index.json").exists()
    weights = sum(p.stat().st_size for p in shards)
    figures = {"weights_bytes": weights, "build_s": round(time.perf_counter() - t0, 1),
               "activation_bound_bytes": activation_bytes()}

    # the runtime (Python, JAX, XLA, the tokenizer) of the same commands on the 4M-parameter model
    figures["runtime"] = _cli_commands(tmp_path, TOKENIZER, "tiny")
    figures["llama_1b"] = _cli_commands(tmp_path, model_dir, "1b")
    print("\nreal-size figures:", json.dumps(figures, indent=1))
    record_property("real_size", figures)

    # the exported adapter: ours (fp32 weights) against transformers + peft (fp32), same tokens
    adapters = sorted(p.parent for p in (tmp_path / "export-1b").rglob("adapter_config.json"))
    assert adapters, "export wrote no PEFT adapter"
    logits, delta = _our_logits(model_dir, adapters[0])
    ref, ref_delta = _hf_logits(model_dir, adapters[0])
    rel = np.abs(logits - ref).max() / np.abs(ref).max()
    rel_delta = np.abs(delta - ref_delta).max() / np.abs(ref_delta).max()
    print(f"logits rel err {rel:.2e}; adapter's logit change rel err {rel_delta:.2e} "
          f"(change max {np.abs(ref_delta).max():.3f})")
    assert np.abs(ref_delta).max() > 1e-2  # the adapter does change the logits
    assert rel <= 1e-4 and rel_delta <= 1e-2, (rel, rel_delta)

    for cmd, got in figures["llama_1b"].items():
        bound = 1.5 * weights + activation_bytes() + figures["runtime"][cmd]["peak_rss_bytes"]
        assert got["peak_rss_bytes"] <= bound, (cmd, got["peak_rss_bytes"] / 2**30, bound / 2**30)


def _tokens():
    rng = np.random.default_rng(0)
    return rng.integers(3, 3000, size=(2, 12)).astype(np.int32), np.ones((2, 12), bool)


def _our_logits(model_dir, adapter_dir):
    """(logits with the adapter, their change from the base), [B, T, V] float32."""
    import jax
    import jax.numpy as jnp

    from fedrouter_jax import forward
    from fedrouter_jax.lora import stack_adapters
    from fedrouter_jax.models import hf_io

    cfg, params = hf_io.load_pretrained(model_dir, jnp.float32)
    stack = stack_adapters([hf_io.load_peft(adapter_dir)])
    tokens, mask = _tokens()
    with_adapter = np.asarray(forward(cfg, params, tokens, mask, lora=stack, adapter_ids=[0, 0]))
    base = np.asarray(forward(cfg, params, tokens, mask))
    del params
    jax.clear_caches()
    gc.collect()
    return with_adapter, with_adapter - base


def _hf_logits(model_dir, adapter_dir):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens, mask = (torch.tensor(x, dtype=torch.long) for x in _tokens())
    with torch.no_grad():
        base = model(input_ids=tokens, attention_mask=mask).logits.numpy()
        pm = peft.PeftModel.from_pretrained(model, adapter_dir).eval()
        with_adapter = pm(input_ids=tokens, attention_mask=mask).logits.numpy()
    return with_adapter, with_adapter - base
