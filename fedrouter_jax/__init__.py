"""fedrouter-jax: task-centric personalized federated fine-tuning of language models (FedRouter).

Stable public API:
  load_pretrained(path) -> (config, params)      a local HF Llama directory
  forward(config, params, tokens, mask, lora=None, adapter_ids=None) -> logits [B, T, V] (float32)
"""
from __future__ import annotations

from fedrouter_jax.api import forward, load_pretrained

__all__ = ["forward", "load_pretrained"]
__version__ = "0.1.0"
