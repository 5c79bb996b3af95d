"""Tiny random models and batches shared by the tests."""
import jax
import jax.numpy as jnp
import numpy as np

from fedrouter_jax.lora import LoraStack, init_lora
from fedrouter_jax.models.config import LlamaConfig
from fedrouter_jax.models.llama import init_params

TINY = LlamaConfig(
    vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)


def tiny_model(seed=0, cfg=TINY):
    return cfg, init_params(jax.random.PRNGKey(seed), cfg, std=0.2)


def random_lora(cfg, n_adapters, seed=1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"), rank=4):
    """A stack with non-zero B (PEFT's init has B = 0, which would hide every LoRA bug)."""
    lora = init_lora(jax.random.PRNGKey(seed), cfg, n_adapters, rank=rank, alpha=8.0, targets=targets)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 2 * len(targets)))
    params = {t: {"a": p["a"], "b": 0.3 * jax.random.normal(next(keys), p["b"].shape)} for t, p in lora.params.items()}
    return LoraStack(params=params, alpha=lora.alpha)


def random_batch(shape, vocab, seed=0, prompt_len=5):
    """Right-padded token batch with response-only loss mask: leaves [..., T]."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=shape).astype(np.int32)
    lengths = rng.integers(prompt_len + 2, shape[-1] + 1, size=shape[:-1])
    pos = np.arange(shape[-1])
    mask = pos < lengths[..., None]
    loss_mask = mask & (pos >= prompt_len)
    tokens[~mask] = 0
    return tokens, mask, loss_mask


def make_tiny_model_dir(path, seed=0):
    """A tiny random Llama + a small BPE tokenizer saved in HF layout (seconds to build)."""
    from pathlib import Path

    from fedrouter_jax.data import TASKS, format_prompt, generate_examples, save_tokenizer, train_tokenizer
    from fedrouter_jax.models import hf_io
    from fedrouter_jax.models.config import LlamaConfig

    path = Path(path)
    texts = []
    for t in TASKS:
        for ex in generate_examples(t, 60, 123):
            texts.append(format_prompt(ex["instruction"], ex["input"]) + " " + ex["output"])
    tok = train_tokenizer(texts, vocab_size=400)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    params = jax.tree.map(np.asarray, init_params(jax.random.PRNGKey(seed), cfg, std=0.1))
    hf_io.save_pretrained(path, cfg, params)
    save_tokenizer(tok, path)
    return path


def smoke_overrides(model_dir, out_dir, **extra):
    """Overrides for a seconds-long end-to-end run on `make_tiny_model_dir`."""
    o = {
        "model.path": str(model_dir), "model.max_seq_len": 160, "model.embed_max_tokens": 64,
        "out_dir": str(out_dir), "data.n_clients": 4, "data.scenario": "dual", "data.train_per_client": 12,
        "data.test_per_client": 4, "train.rounds": 3, "train.local_steps": 2, "train.batch_size": 2,
        "clustering.n_local": 2, "clustering.n_global": 2, "clustering.n_init": 2, "eval.max_new_tokens": 4,
        "eval.batch_size": 8, "eval.include_base": False,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]
