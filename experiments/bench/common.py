"""Shared pieces of the benchmarks: model sizes, synthetic batches, FLOP counts, timing, machine info.

Every benchmark measures the things it compares in ONE process and ONE run, alternating between
them (A B C A B C ...) after a warm-up, and reports medians, so a load change on a shared machine
hits all sides alike. Wall time is what is reported; process CPU time is printed next to it as a
load indicator (cpu/wall well below the core count means other processes took the cores).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax.lora import LoraStack, init_lora  # noqa: E402
from fedrouter_jax.models.config import LlamaConfig  # noqa: E402
from fedrouter_jax.models.llama import init_params  # noqa: E402
from fedrouter_jax.training import Batch  # noqa: E402

# The model sizes of the issue. "tiny" is the embedded model's size (random weights: timings do
# not depend on the values); "34m" the size of the torch comparison (33.7M parameters: 8 heads
# of 64 without GQA, untied 8192-token embedding and head); "small" is for --small runs.
CONFIGS = {
    "small": LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "tiny": LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    "34m": LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8, head_dim=64,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Llama-3.2-1B's shapes (1.24B params, tied head, llama3 RoPE), for the GPU targets: random
    # weights, so nothing is downloaded
    "1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                      rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                    ("original_max_position_embeddings", 8192), ("rope_type", "llama3")),
                      tie_word_embeddings=True, max_position_embeddings=131072,
                      bos_token_id=128000, eos_token_id=128001, pad_token_id=128004),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the LoRA targets, rank 8
RANK, ALPHA = 8, 16.0


def base_params(cfg: LlamaConfig, seed: int = 0, dtype: str = "float32") -> dict:
    """Random base weights (HF's init: normal(0, 0.02)) in `dtype`."""
    return init_params(jax.random.PRNGKey(seed), cfg, dtype=jnp.dtype(dtype))


def adapters(cfg: LlamaConfig, n: int, seed: int = 1) -> LoraStack:
    """n adapters (PEFT init) with a small non-zero B so every LoRA path does real work."""
    lora = init_lora(jax.random.PRNGKey(seed), cfg, n, rank=RANK, alpha=ALPHA, targets=TARGETS)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(TARGETS)))
    params = {t: {"a": p["a"], "b": 0.01 * jax.random.normal(next(keys), p["b"].shape)}
              for t, p in lora.params.items()}
    return LoraStack(params=params, alpha=lora.alpha)


def token_batches(shape, vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-padded instruction-tuning-like batches, leaves `[..., T]`: a prompt of T/8..T/3
    tokens, a response to a length in [T/2, T] (so some rows are padded), response-only loss."""
    rng = np.random.default_rng(seed)
    t = shape[-1]
    tokens = rng.integers(3, vocab, size=shape).astype(np.int32)
    lengths = rng.integers(max(t // 2, 2), t + 1, size=shape[:-1])
    prompt = rng.integers(max(t // 8, 1), max(t // 3, 2), size=shape[:-1])
    pos = np.arange(t)
    mask = pos < lengths[..., None]
    loss_mask = mask & (pos >= prompt[..., None])
    tokens[~mask] = 0
    tokens[..., 0] = 1  # BOS
    return tokens, mask, loss_mask


def jax_batches(shape, vocab: int, seed: int = 0) -> Batch:
    return Batch(*(jnp.asarray(x) for x in token_batches(shape, vocab, seed)))


# ---------------------------------------------------------------------------------------------
# FLOP count of one LoRA training step (what the step must do, not what XLA happens to do)
# ---------------------------------------------------------------------------------------------
def train_step_flops(cfg: LlamaConfig, batch: int, seq: int, *, rank: int = RANK,
                     targets=TARGETS, head_tokens: Optional[int] = None) -> dict:
    """Matmul FLOPs of one step (forward + backward) of LoRA training on a frozen base.

    * frozen base matmuls (q,k,v,o,gate,up,down per layer and the lm_head; N params):
      forward 2N per token + backward w.r.t. activations 2N per token = 4N per token; the base
      gets no weight gradient. (The embedding lookup is a gather, no matmul.) With
      `head_tokens` (the LM head computed only on the positions that predict a response token,
      `train.lm_head_on: loss_tokens`), the head's 4 D V counts for those positions only: work
      not done is not counted.
    * attention (QK^T and PV, full T x T as computed): forward 2 * 2 * B*H*T*T*hd, backward
      twice the forward (gradients w.r.t. both operands of each product).
    * LoRA per target (x @ a @ b, d_in x R and R x d_out): forward 2R(d_in + d_out) per token,
      backward 2x that for the activation gradients and 2x for the weight gradients
      (= 3x forward).
    Elementwise work (norms, softmax, RoPE, SiLU, the cross-entropy) is not counted.
    """
    from fedrouter_jax.lora import target_dims

    tokens = batch * seq
    d, f, h, k, hd = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                      cfg.num_key_value_heads, cfg.head_dim)
    per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
    n_body = cfg.num_hidden_layers * per_layer
    n_base = n_body + d * cfg.vocab_size
    head_positions = tokens if head_tokens is None else head_tokens
    base = 4 * n_body * tokens + 4 * d * cfg.vocab_size * head_positions
    attn_fwd = cfg.num_hidden_layers * 2 * 2 * batch * h * seq * seq * hd
    attn = 3 * attn_fwd
    lora_fwd = sum(2 * rank * sum(target_dims(cfg, t)) for t in targets) * cfg.num_hidden_layers * tokens
    lora = 3 * lora_fwd
    return {"base": base, "attention": attn, "lora": lora, "total": base + attn + lora,
            "n_base_matmul_params": n_base, "head_positions": head_positions}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def _block(x):
    return jax.block_until_ready(x)


def alternate(fns: Mapping[str, Callable[[], object]], *, repeats: int, warmup: int = 1,
              rotate: bool = False) -> dict:
    """Run each zero-argument callable `warmup` times, then `repeats` rounds of A, B, C, ...

    `rotate` starts round r at the r-th variant (A B C, B C A, C A B, ...), so no variant always
    runs right after the same other one: a torch run leaves the next JAX call in the same process
    about 5 % slower (measured; not the OpenMP threads' spinning, a 1 s pause did not remove it).

    Returns {name: {"wall": [s...], "cpu": [s...], "median": s, "min": s}}. Each call's result
    is blocked on (jax) before the clock stops; torch code is synchronous on the CPU.
    """
    for _ in range(warmup):
        for f in fns.values():
            _block(f())
    out = {n: {"wall": [], "cpu": []} for n in fns}
    names = list(fns)
    for r in range(repeats):
        shift = r % len(names) if rotate else 0
        for n in names[shift:] + names[:shift]:
            f = fns[n]
            t0, c0 = time.perf_counter(), time.process_time()
            _block(f())
            out[n]["wall"].append(time.perf_counter() - t0)
            out[n]["cpu"].append(time.process_time() - c0)
    for r in out.values():
        r["median"] = float(np.median(r["wall"]))
        r["min"] = float(np.min(r["wall"]))
        r["cpu_median"] = float(np.median(r["cpu"]))
    return out


def device_peak_memory() -> Optional[int]:
    """Peak bytes in use on the default device (GPU/TPU), None where not reported (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def matmul_peak(n: int = 2048, repeats: int = 7, dtype: str = "float32") -> dict:
    """Jitted `n x n @ n x n` FLOP/s in `dtype` (median and best of `repeats`)."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    r = alternate({"mm": lambda: f(a, b)}, repeats=repeats, warmup=2)["mm"]
    flops = 2 * n**3
    return {"n": n, "median_flops": flops / r["median"], "best_flops": flops / r["min"],
            "median_s": r["median"]}


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tree_bytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0],
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "python": platform.python_version(),
        "huge_pages": huge_pages_requested(),
    }
    return info


def huge_pages_requested() -> bool:
    """Whether this process's malloc asks for transparent huge pages (`GLIBC_TUNABLES` with
    `glibc.malloc.hugetlb=1`, as scripts/run.sh and the BENCHMARKS.md commands set it)."""
    return "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", "")


def header(title: str, args) -> dict:
    info = machine()
    print(f"# {title}")
    print(f"# {info['date']}  cpu={info['cpu']} x{info['cores']}  load(1m)={info['loadavg_1m']:.2f}  "
          f"jax {info['jax']} ({info['backend']})  huge_pages={info['huge_pages']}  args={vars(args)}")
    return info


def footer(info: dict, results: dict, args) -> None:
    """Print the load at the end and write results as JSON if --json was given."""
    info["loadavg_1m_end"] = os.getloadavg()[0]
    print(f"# load(1m) at end: {info['loadavg_1m_end']:.2f}")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "results": results},
                                              indent=2, default=float))


def fmt_rate(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def add_shape_args(p, *, model: str, steps: int, batch: int = 16, seq: int = 128, steps_help: str = None):
    """--model, --steps, --batch, --seq with a script's defaults."""
    p.add_argument("--model", default=model, choices=sorted(CONFIGS))
    p.add_argument("--steps", type=int, default=steps, help=steps_help)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    return p


def single_client_step(cfg: LlamaConfig, steps: int, batch: int, seq: int, *, head: str = "loss",
                       dtype: str = "float32") -> tuple[Callable, tuple, Optional[int]]:
    """One client's `local_steps` as the runner trains it: (jitted fn, its args, head tokens).

    Random base in `dtype`, one adapter, fresh AdamW (lr 5e-4), batches `[steps, batch, seq]`;
    head "loss" sizes the LM head as the runner does (`head_tokens_for_batches`), "all" = None.
    """
    from functools import partial

    from fedrouter_jax.data.batching import head_tokens_for_batches
    from fedrouter_jax.training import local_steps, make_optimizer, set_learning_rate

    base = base_params(cfg, dtype=dtype)
    lora = jax.tree.map(lambda x: x[0], adapters(cfg, 1))
    opt = make_optimizer()
    state = set_learning_rate(opt.init(lora), 5e-4)
    batches = jax_batches((steps, batch, seq), cfg.vocab_size)
    head_tokens = head_tokens_for_batches(0, np.asarray(batches.loss_mask)) if head == "loss" else None
    fn = jax.jit(partial(local_steps, cfg=cfg, optimizer=opt, head_tokens=head_tokens))
    return fn, (base, lora, state, batches, jax.random.PRNGKey(0)), head_tokens


def add_common_args(p, default_repeats: int = 5):
    p.add_argument("--small", action="store_true", help="tiny sizes: a few seconds (smoke test)")
    p.add_argument("--repeats", type=int, default=default_repeats, help="timed rounds per variant")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    return p
