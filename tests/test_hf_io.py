"""models/hf_io against files `transformers` writes: fp32, bf16 and sharded round trips, loads
into another dtype, the bounded read window, one header parse per file, the memory bound, the
errors for broken files; and `embeddings.model_fingerprint`."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fedrouter_jax import embeddings  # noqa: E402
from fedrouter_jax.models import hf_io  # noqa: E402
from fedrouter_jax.models.config import LlamaConfig  # noqa: E402

from test_llama_parity import LLAMA3_ROPE, make_hf_model, padded_batch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _hf_tensors(model) -> dict[str, np.ndarray]:
    """The HF model's weights as numpy (bf16 stays bf16), by their HF names."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach()
        out[name] = (t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy())
    return out


def _ours_by_hf_name(cfg, params) -> dict[str, np.ndarray]:
    """Our params mapped back to HF names and layouts."""
    out = {}
    for name, (path, transpose) in hf_io._hf_name_map(cfg).items():
        arr = np.asarray(params[path[0]] if len(path) == 1 else params["layers"][path[1]][path[2]])
        out[name] = arr.T if transpose else arr
    return out


def _assert_same_weights(cfg, params, model):
    ref = _hf_tensors(model)
    ours = _ours_by_hf_name(cfg, params)
    assert set(ours) <= set(ref)
    for name, arr in ours.items():
        assert arr.dtype == ref[name].dtype, name
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loads_transformers_files_bit_exactly_and_writes_files_transformers_loads(tmp_path, dtype):
    """transformers -> ours -> our save_pretrained -> transformers: every weight bit-exact,
    bf16 kept as bf16 on both sides."""
    model = make_hf_model(tmp_path / "hf", tie=True, rope=LLAMA3_ROPE, dtype=getattr(torch, dtype))
    cfg, params = hf_io.load_pretrained(tmp_path / "hf")
    assert str(params["embed"].dtype) == dtype
    _assert_same_weights(cfg, params, model)

    hf_io.save_pretrained(tmp_path / "ours", cfg, params)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours", dtype=getattr(torch, dtype))
    for name, t in model.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    with hf_io.safe_open(str(tmp_path / "ours" / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}


def test_sharded_files_load_like_the_single_file_each_shard_opened_once(tmp_path, monkeypatch):
    model = make_hf_model(tmp_path / "one", tie=False, rope=None, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) >= 3
    opened = []
    real = hf_io.safe_open
    monkeypatch.setattr(hf_io, "safe_open", lambda path, **kw: opened.append(Path(path).name) or real(path, **kw))
    cfg, params = hf_io.load_pretrained(tmp_path / "sharded")
    assert sorted(opened) == sorted(p.name for p in shards)  # each shard once
    _assert_same_weights(cfg, params, model)

    opened.clear()
    _, single = hf_io.load_pretrained(tmp_path / "one")
    assert opened == ["model.safetensors"]  # a single file: its header parsed once
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_row_chunks_and_a_small_read_window_load_the_same(tmp_path, monkeypatch):
    """Tensors read a few rows at a time (transposed ones into column blocks), the file reopened
    every window, also inside a tensor: the same params as one read of everything."""
    make_hf_model(tmp_path, tie=False, rope=None)
    _, want = hf_io.load_pretrained(tmp_path)
    opened = []
    real = hf_io.safe_open
    monkeypatch.setattr(hf_io, "safe_open", lambda path, **kw: opened.append(path) or real(path, **kw))
    monkeypatch.setattr(hf_io, "CHUNK_ELEMENTS", 1000)  # 97 x 64 embedding: 7 chunks of 15 rows
    monkeypatch.setattr(hf_io, "READ_WINDOW_BYTES", 20_000)
    _, got = hf_io.load_pretrained(tmp_path)
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size // 20_000 - 1 <= len(opened) - 1 <= size // 20_000 + 1  # one reopen per window
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loads_into_the_requested_dtype(tmp_path):
    """bf16 file -> float32 params are the exact upcast; fp32 file -> bf16 params round like jnp."""
    make_hf_model(tmp_path / "bf16", tie=False, rope=None, dtype=torch.bfloat16)
    make_hf_model(tmp_path / "fp32", tie=False, rope=None)
    _, bf = hf_io.load_pretrained(tmp_path / "bf16")
    _, up = hf_io.load_pretrained(tmp_path / "bf16", jnp.float32)
    _, fp = hf_io.load_pretrained(tmp_path / "fp32")
    _, down = hf_io.load_pretrained(tmp_path / "fp32", jnp.bfloat16)
    for a, b in zip(jax.tree.leaves(bf), jax.tree.leaves(up)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b))
    for a, b in zip(jax.tree.leaves(fp), jax.tree.leaves(down)):
        assert b.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


def test_logits_of_a_bf16_file_loaded_as_float32_match_transformers(tmp_path):
    model = make_hf_model(tmp_path, tie=True, rope=LLAMA3_ROPE, dtype=torch.bfloat16).float()
    cfg, params = hf_io.load_pretrained(tmp_path, jnp.float32)
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    from fedrouter_jax import forward

    ours = np.asarray(forward(cfg, params, tokens, mask))
    rel = np.abs(ours[mask] - ref[mask]).max() / np.abs(ref[mask]).max()
    assert rel <= 1e-4, rel


@pytest.mark.parametrize("content,why", [(b"abc", "header too small"), (None, "incomplete metadata")])
def test_broken_files_are_one_line_errors_naming_the_file(tmp_path, content, why):
    make_hf_model(tmp_path, tie=False, rope=None)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(content if content is not None else data[:-100])  # under 8 bytes / truncated
    with pytest.raises(hf_io.CheckpointFormatError) as err:
        hf_io.load_pretrained(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{f}: not a readable safetensors file") and why in msg and "\n" not in msg


def test_sharded_errors_name_the_shard_and_tensor(tmp_path):
    model = make_hf_model(tmp_path / "one", tie=False, rope=None)
    d = tmp_path / "sharded"
    model.save_pretrained(d, safe_serialization=True, max_shard_size="20KB")
    index = json.loads((d / hf_io._INDEX).read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    shard = d / index["weight_map"][name]
    tensors = hf_io.read_safetensors(shard)
    tensors.pop(name)
    hf_io.write_safetensors(shard, tensors)
    with pytest.raises(hf_io.CheckpointFormatError, match=f"^{shard}: missing tensor '{name}'$"):
        hf_io.load_pretrained(d)

    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"^{shard}: file does not exist$"):
        hf_io.load_pretrained(d)

    index["weight_map"].pop(name)
    (d / hf_io._INDEX).write_text(json.dumps(index))
    with pytest.raises(hf_io.CheckpointFormatError, match=f"{d / hf_io._INDEX}: missing tensor '{name}'"):
        hf_io.load_pretrained(d)


_PEAK = """
import json, sys
import jax, jax.numpy as jnp
from fedrouter_jax.models import hf_io

def status_kib(field):  # this process's own figures (ru_maxrss would include the parent's at exec)
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024

hf_io.READ_WINDOW_BYTES = 16 << 20
jnp.zeros(8).block_until_ready()
before = status_kib("VmRSS")
cfg, params = hf_io.load_pretrained(sys.argv[1], getattr(jnp, sys.argv[2]))
jax.block_until_ready(params)
print(json.dumps({"before": before, "peak": status_kib("VmHWM"),
                  "bytes": sum(x.nbytes for x in jax.tree.leaves(params))}))
"""


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_peak_host_memory_of_a_load_is_the_weights_plus_a_window(tmp_path, dtype):
    """A 168 MB bf16 model loaded in a fresh process: peak RSS grows by at most 1.3x the loaded
    weights (the old reader held the memory-mapped file and a stacked copy next to them: 2x)."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
    from fedrouter_jax.models.llama import param_shapes

    rng = np.random.default_rng(0)
    shapes = param_shapes(cfg)
    params = {k: rng.standard_normal(v, np.float32).astype(ml_dtypes.bfloat16) for k, v in shapes.items()
              if k != "layers"}
    params["layers"] = {k: rng.standard_normal(v, np.float32).astype(ml_dtypes.bfloat16)
                        for k, v in shapes["layers"].items()}
    hf_io.save_pretrained(tmp_path, cfg, params)
    del params
    r = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path), dtype], capture_output=True, text=True,
                       cwd=ROOT, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    n_params = sum(int(np.prod(v)) for v in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert m["bytes"] == n_params * np.dtype(dtype).itemsize
    grown = m["peak"] - m["before"]
    assert grown <= 1.3 * m["bytes"], (grown / m["bytes"], m)


# --------------------------------------------------------------------------- model fingerprint


def test_model_fingerprint_is_content_stable_bounded_and_computed_once(tmp_path, monkeypatch):
    model = make_hf_model(tmp_path / "a", tie=False, rope=None)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="20KB")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    fp = embeddings.model_fingerprint(tmp_path / "a")
    assert embeddings.model_fingerprint(tmp_path / "copy") == fp  # copies (new mtimes) share it
    assert embeddings.model_fingerprint(tmp_path / "sharded") != fp

    reads = []
    real_open = open

    def counting_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "b" in mode:
            read = f.read

            def counted(n=-1):
                data = read(n)
                reads.append(len(data))
                return data
            f.read = counted
        return f

    monkeypatch.setattr("builtins.open", counting_open)
    embeddings._fingerprint.cache_clear()
    size = (tmp_path / "a" / "model.safetensors").stat().st_size
    assert embeddings.model_fingerprint(tmp_path / "a") == fp
    first = sum(reads)
    assert 0 < first < size / 2  # a bounded sample, not the file (~450 KB here)
    assert embeddings.model_fingerprint(tmp_path / "a") == fp and sum(reads) == first  # memoised
    monkeypatch.setattr("builtins.open", real_open)

    # a changed weight anywhere under a sample changes the key (here: every weight)
    cfg, params = hf_io.load_pretrained(tmp_path / "a")
    hf_io.save_pretrained(tmp_path / "a", cfg, jax.tree.map(lambda x: np.asarray(x) * 1.5, params))
    assert embeddings.model_fingerprint(tmp_path / "a") != fp


# --------------------------------------------------------------------------- PEFT adapters


def test_load_peft_reads_peft_own_files_and_inverts_export_peft(tmp_path):
    """An adapter saved by `peft` itself loads into ours with the same logits; export_peft then
    load_peft gives back the exact factors."""
    peft = pytest.importorskip("peft")
    from fedrouter_jax import forward
    from fedrouter_jax.lora import stack_adapters

    model = make_hf_model(tmp_path / "base", tie=False, rope=LLAMA3_ROPE)
    lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, lc)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # PEFT's B = 0 would hide a wrong layout
    pm.save_pretrained(tmp_path / "peft")
    single = hf_io.load_peft(tmp_path / "peft")
    assert sorted(single.targets) == ["down_proj", "q_proj", "v_proj"] and single.alpha == 8.0
    assert single.params["down_proj"]["a"].shape == (2, 96, 4) and single.params["down_proj"]["b"].shape == (2, 4, 64)

    cfg, params = hf_io.load_pretrained(tmp_path / "base")
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = pm.eval()(input_ids=torch.tensor(tokens, dtype=torch.long),
                        attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    ours = np.asarray(forward(cfg, params, tokens, mask, lora=stack_adapters([single]), adapter_ids=[0, 0, 0]))
    rel = np.abs(ours[mask] - ref[mask]).max() / np.abs(ref[mask]).max()
    assert rel <= 1e-4, rel

    hf_io.export_peft(tmp_path / "ours", single)
    again = hf_io.load_peft(tmp_path / "ours")
    assert again.alpha == single.alpha
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(single)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileNotFoundError, match="adapter_config.json: no PEFT adapter here"):
        hf_io.load_peft(tmp_path / "base")


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_nan_weights_are_a_one_line_error_naming_file_and_tensor(tmp_path, dtype):
    model = make_hf_model(tmp_path / "hf", tie=False, rope=None)
    d = tmp_path / "hf"
    model.save_pretrained(d, safe_serialization=True)
    path = d / hf_io._SINGLE
    tensors = {k: v.astype(dtype) for k, v in hf_io.read_safetensors(path).items()}
    name = "model.layers.0.self_attn.v_proj.weight"
    tensors[name][1, 2] = np.nan
    hf_io.write_safetensors(path, tensors)
    with pytest.raises(hf_io.CheckpointFormatError, match=rf"^{path}: tensor '{name}' holds NaN/Inf \(first at \[1, 2\]\)"):
        hf_io.load_pretrained(d)
