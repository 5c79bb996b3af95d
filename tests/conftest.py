import gc
import os

# Tests run on the CPU with deterministic float32 matmuls.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama + tokenizer in HF layout, shared by the end-to-end tests."""
    from helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops every compiled program after each test module. XLA:CPU keeps each executable's code
    in its own memory maps until it is freed; the whole suite in one process compiles enough of
    them to pass the kernel's per-process limit (vm.max_map_count, 65530 by default), and then
    LLVM segfaults inside a compile."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def _embedding_cache(tmp_path_factory, monkeypatch):
    """Keep the embedding cache inside pytest's temp dir (never the user's ~/.cache)."""
    monkeypatch.setenv("FEDROUTER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
