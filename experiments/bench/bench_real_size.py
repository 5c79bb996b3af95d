"""One LoRA step at the Llama-3.2-1B architecture on CPU: ours against a lean PyTorch + PEFT step.

Same model (a random `transformers.LlamaForCausalLM` of the 1B shapes, saved with
`save_pretrained` and loaded by us with `load_pretrained`), same LoRA (q, v rank 8, alpha 16;
PEFT's initial adapter, read by `hf_io.load_peft`), one batch of B 1 x T 256 whose last 64
tokens are the response (response-only loss), one AdamW step each, alternated in one process:

  jax         `training.local_steps` (one step) as the runner trains: the LM head only at the
              positions that predict a response token (64 of 256 rows of the 128k-vocabulary head).
  torch_lean  `peft_model(input_ids, attention_mask, labels).loss.backward()` + fused AdamW step
              (`torch.set_num_threads(os.cpu_count())`), the head at every position.

Reports seconds per step, the ratio (torch / ours: > 1 means ours is faster) and the memory of
both: the resident bytes each framework's weights added and each step's transient peak above
that (VmHWM reset through /proc/self/clear_refs before each measured step).

  python experiments/bench/bench_real_size.py                   # 1B, fp32: ~16 GB resident at its peak
  python experiments/bench/bench_real_size.py --dtype bfloat16  # bf16 frozen base (not measured at 1B)
  python experiments/bench/bench_real_size.py --small           # seconds (smoke test)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax.data.batching import head_tokens_for_batches  # noqa: E402
from fedrouter_jax.models import hf_io  # noqa: E402
from fedrouter_jax.training import Batch, local_steps, make_optimizer, set_learning_rate  # noqa: E402

LR = 5e-4
TARGETS = ("q_proj", "v_proj")


def response_batch(batch: int, seq: int, response: int, vocab: int, seed: int = 0):
    """tokens, mask, loss_mask `[B, T]`: no padding, the last `response` tokens carry the loss."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(batch, seq)).astype(np.int32)
    tokens[:, 0] = 1  # BOS
    mask = np.ones((batch, seq), bool)
    loss_mask = np.zeros((batch, seq), bool)
    loss_mask[:, seq - response:] = True
    return tokens, mask, loss_mask


def _status_bytes(field: str) -> int:
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def transient_peak(fn) -> int:
    """Bytes above the current resident set that `fn()` peaks at (VmHWM reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets this process's peak resident set to the current one
    before = _status_bytes("VmRSS")
    common._block(fn())
    return _status_bytes("VmHWM") - before


def build_models(cfg, directory: Path, dtype: str):
    """The HF model (saved to `directory`), its PEFT wrapper (train mode) and PEFT's initial
    adapter saved under `directory/adapter`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, dtype))  # built in the benchmark's dtype: no fp32 copy
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
    model = LlamaForCausalLM(hf_cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    lc = LoraConfig(r=common.RANK, lora_alpha=common.ALPHA, target_modules=list(TARGETS), lora_dropout=0.0,
                    bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lc)
    peft_model.save_pretrained(directory / "adapter")
    peft_model.train()
    return peft_model


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the frozen base's dtype")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--response", type=int, default=64, help="response tokens (the loss positions) per row")
    args = p.parse_args(argv)
    model = "1b"
    if args.small:
        model, args.seq, args.response, args.repeats = "small", 32, 8, 1
    import peft  # noqa: F401  imported before the first RSS reading: not counted as weights
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(os.cpu_count())
    info = common.header("One LoRA step at the Llama-3.2-1B architecture: JAX vs PyTorch + PEFT", args)
    cfg0 = common.CONFIGS[model]
    B, T = args.batch, args.seq

    tmp = tempfile.TemporaryDirectory()
    rss0 = common.current_rss_bytes()
    peft_model = build_models(cfg0, Path(tmp.name), args.dtype)
    rss_torch = common.current_rss_bytes()
    cfg, base = hf_io.load_pretrained(tmp.name, jnp.dtype(args.dtype))  # ours, from the torch model's files
    rss_jax = common.current_rss_bytes()
    lora = hf_io.load_peft(Path(tmp.name) / "adapter")

    tokens, mask, loss_mask = response_batch(B, T, args.response, cfg.vocab_size)
    head = head_tokens_for_batches(0, loss_mask[None])
    opt = make_optimizer()
    state = set_learning_rate(opt.init(lora), LR)
    batches = Batch(*(jnp.asarray(x)[None] for x in (tokens, mask, loss_mask)))  # [S=1, B, T]
    step = jax.jit(partial(local_steps, cfg=cfg, optimizer=opt, head_tokens=head))
    key = jax.random.PRNGKey(0)

    def jax_step():
        return step(base, lora, state, batches, key)

    trainable = [q for q in peft_model.parameters() if q.requires_grad]
    optim = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    t_tok = torch.from_numpy(tokens.astype(np.int64))
    t_mask = torch.from_numpy(mask.astype(np.int64))
    t_labels = torch.where(torch.from_numpy(loss_mask), t_tok, torch.full_like(t_tok, -100))

    def torch_step():
        loss = peft_model(input_ids=t_tok, attention_mask=t_mask, labels=t_labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        return loss.detach()

    # Sanity: the same first-step loss (same weights, adapter and tokens).
    jax_loss = float(jax_step()[2]["loss"][0])
    torch_loss = float(torch_step())
    print(f"first-step loss: jax {jax_loss:.5f}  torch {torch_loss:.5f}")
    tol = 2e-2 if args.dtype == "bfloat16" else 1e-3
    assert abs(jax_loss - torch_loss) < tol * max(1.0, abs(torch_loss)), (jax_loss, torch_loss)

    peaks = {"jax": transient_peak(jax_step), "torch_lean": transient_peak(torch_step)}
    r = common.alternate({"jax": jax_step, "torch_lean": torch_step}, repeats=args.repeats, warmup=1, rotate=True)
    flops = common.train_step_flops(cfg, B, T, targets=TARGETS)
    flops_ours = common.train_step_flops(cfg, B, T, targets=TARGETS, head_tokens=head)["total"]
    weights = {"torch_lean": rss_torch - rss0, "jax": rss_jax - rss_torch}
    n_params = sum(x.size for x in jax.tree.leaves(base))
    results = {"config": {"model": model, "dtype": args.dtype, "batch": B, "seq": T, "response": args.response,
                          "targets": list(TARGETS), "rank": common.RANK},
               "params": n_params, "weights_bytes": common.tree_bytes(base), "head_tokens": head,
               "ratio": r["torch_lean"]["median"] / r["jax"]["median"]}
    print(f"\nmodel {model} ({n_params / 1e6:.1f}M params, {args.dtype}), B={B}, T={T}, response {args.response}, "
          f"LoRA r{common.RANK} on {','.join(TARGETS)}; LM head rows: jax {head}, torch {B * T}")
    print(f"{'variant':11s} {'s/step (med)':>13s} {'GFLOP/s':>8s} {'cpu/wall':>8s} {'weights GiB':>12s} "
          f"{'step peak GiB':>14s}")
    for name, v in r.items():
        f = flops_ours if name == "jax" else flops["total"]
        results[name] = {"s_per_step": v["median"], "s_all": v["wall"], "gflops": f / v["median"] / 1e9,
                         "weights_rss_bytes": weights[name], "step_peak_bytes": peaks[name]}
        print(f"{name:11s} {v['median']:13.3f} {f / v['median'] / 1e9:8.1f} {v['cpu_median'] / v['median']:8.2f} "
              f"{weights[name] / 2**30:12.2f} {peaks[name] / 2**30:14.2f}")
    print(f"ours is {results['ratio']:.2f}x the lean torch + PEFT step (target >= 1.2x)")
    common.footer(info, results, args)
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
