"""Llama model: config, pure apply, HF I/O, generation."""
