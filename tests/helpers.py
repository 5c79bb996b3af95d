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
