"""Our Flax/JAX Llama against transformers' PyTorch Llama on the same saved weights."""
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fedrouter_jax
from fedrouter_jax.models import hf_io

LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def make_hf_model(tmp_path, *, tie, rope, dtype=torch.float32, kv_heads=2, seed=0):
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    if rope is not None:
        kwargs["rope_parameters"] = {"rope_theta": 500000.0, **rope}
    cfg = transformers.LlamaConfig(**kwargs)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1: perturb so the test sees them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model = model.to(dtype)
    model.save_pretrained(tmp_path, safe_serialization=True)
    return model


def padded_batch(vocab=97):
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, vocab, size=(3, 20)).astype(np.int32)
    mask = np.ones_like(tokens, dtype=bool)
    mask[1, 13:] = False  # right padding
    mask[2, 7:] = False
    tokens[~mask] = 0
    return tokens, mask


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE], ids=["rope-default", "rope-llama3"])
def test_logits_match_transformers(tmp_path, tie, rope):
    model = make_hf_model(tmp_path, tie=tie, rope=rope)
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    cfg, params = fedrouter_jax.load_pretrained(tmp_path)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA exercised
    assert ("lm_head" in params) == (not tie)
    ours = np.asarray(fedrouter_jax.forward(cfg, params, tokens, mask))
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    valid = mask  # padded positions are unspecified in both implementations
    rel = np.abs(ours[valid] - ref[valid]).max() / np.abs(ref[valid]).max()
    assert rel <= 1e-4, rel


def test_bf16_checkpoint_loads(tmp_path):
    model = make_hf_model(tmp_path, tie=False, rope=LLAMA3_ROPE, dtype=torch.bfloat16)
    cfg, params = fedrouter_jax.load_pretrained(tmp_path)
    assert str(params["embed"].dtype) == "bfloat16"
    ref = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), ref)
    tokens, mask = padded_batch()
    logits = np.asarray(fedrouter_jax.forward(cfg, params, tokens, mask))
    assert logits.dtype == np.float32 and np.isfinite(logits).all()


def test_sharded_checkpoint(tmp_path):
    model = make_hf_model(tmp_path / "one", tie=False, rope=None)
    model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    c1, p1 = fedrouter_jax.load_pretrained(tmp_path / "one")
    c2, p2 = fedrouter_jax.load_pretrained(tmp_path / "sharded")
    assert c1 == c2
    for a, b in zip(*(map(lambda p: __import__("jax").tree.leaves(p), (p1, p2)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path):
    model = make_hf_model(tmp_path / "hf", tie=False, rope=LLAMA3_ROPE)
    cfg, params = fedrouter_jax.load_pretrained(tmp_path / "hf")
    hf_io.save_pretrained(tmp_path / "ours", cfg, params)
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens, mask = padded_batch()
    with torch.no_grad():
        a = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits
        b = again(input_ids=torch.tensor(tokens, dtype=torch.long)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _rewrite(path, fn):
    tensors = dict(hf_io.read_safetensors(path))
    tensors = {k: np.array(v) for k, v in tensors.items()}
    fn(tensors)
    hf_io.write_safetensors(path, tensors)


def test_loader_errors_name_tensor_file_and_shapes(tmp_path):
    make_hf_model(tmp_path, tie=False, rope=None)
    f = tmp_path / "model.safetensors"
    original = {k: np.array(v) for k, v in hf_io.read_safetensors(f).items()}

    _rewrite(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(hf_io.CheckpointFormatError, match=r"model.safetensors: missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        fedrouter_jax.load_pretrained(tmp_path)

    hf_io.write_safetensors(f, original)
    _rewrite(f, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((64, 64), np.float32)))
    with pytest.raises(hf_io.CheckpointFormatError, match=r"model.safetensors: tensor 'model.layers.0.self_attn.k_proj.weight' has shape \(64, 64\), expected \(32, 64\)"):
        fedrouter_jax.load_pretrained(tmp_path)

    hf_io.write_safetensors(f, original)
    _rewrite(f, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", np.zeros((64,), np.float32)))
    with pytest.raises(hf_io.CheckpointFormatError, match=r"model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"):
        fedrouter_jax.load_pretrained(tmp_path)

    with pytest.raises(FileNotFoundError, match="does not exist"):
        fedrouter_jax.load_pretrained(tmp_path / "nope")


def test_peft_export_loads_in_peft_and_matches(tmp_path):
    peft = pytest.importorskip("peft")
    import jax

    from fedrouter_jax.lora import LoraStack, take
    from helpers import random_lora

    model = make_hf_model(tmp_path / "base", tie=False, rope=LLAMA3_ROPE)
    cfg, params = fedrouter_jax.load_pretrained(tmp_path / "base")
    stack = random_lora(cfg, 2, targets=("q_proj", "v_proj", "down_proj"), rank=4)
    hf_io.export_peft(tmp_path / "adapter", take(stack, 1), base_model_path=str(tmp_path / "base"))
    peft_model = peft.PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    tokens, mask = padded_batch()
    with torch.no_grad():
        ref = peft_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                         attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    ours = np.asarray(fedrouter_jax.forward(cfg, params, tokens, mask, lora=stack, adapter_ids=[1, 1, 1]))
    rel = np.abs(ours[mask] - ref[mask]).max() / np.abs(ref[mask]).max()
    assert rel <= 1e-4, rel
