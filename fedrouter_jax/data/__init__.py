"""Data layer: synthetic tasks, real loaders, federated scenarios, prompts, tokenizer, batching.

Examples everywhere are dicts ``{"task", "instruction", "input", "output"}``.
"""

from fedrouter_jax.data.batching import (
    TokenizedSet,
    TruncationReport,
    encode_inputs,
    encode_prompts,
    input_texts,
    prompt_inputs,
    prompt_texts,
    sample_round_batches,
    tokenize_examples,
)
from fedrouter_jax.data.prompt import RESPONSE_SEPARATOR, format_prompt
from fedrouter_jax.data.real import (
    DataError,
    convert_rows,
    load_real_task,
    load_real_tasks,
    validate_examples,
)
from fedrouter_jax.data.scenarios import SCENARIOS, FederatedData, build_scenario
from fedrouter_jax.data.synthetic import TASKS, generate_examples, generate_task, generic_corpus
from fedrouter_jax.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = [
    "TASKS", "SCENARIOS", "RESPONSE_SEPARATOR", "DataError", "FederatedData", "TokenizedSet",
    "TruncationReport", "build_scenario", "convert_rows", "encode_inputs", "encode_prompts",
    "format_prompt", "generate_examples", "generate_task", "generic_corpus", "input_texts",
    "load_real_task", "load_real_tasks", "load_tokenizer", "prompt_inputs", "prompt_texts",
    "sample_round_batches", "save_tokenizer", "tokenize_examples", "train_tokenizer",
    "validate_examples",
]
