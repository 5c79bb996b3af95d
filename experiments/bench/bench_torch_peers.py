"""Our client-mapped round against the way the peers' PyTorch + PEFT code simulates clients.

One federated round = C clients x S local AdamW steps from the same global adapter, then FedAvg.
Same Llama (built as `transformers.LlamaForCausalLM` from our config, saved with `save_pretrained`,
loaded by us with `fedrouter_jax.load_pretrained`), same LoRA (q,k,v,o, rank 8, alpha 16, PEFT
init), same batches, same response-only loss, same steps. Variants, alternated in one process
(the order rotated each repeat):

  jax        `training.clients_local_steps` as the runner calls it: all clients' S steps in one
             jitted call (`client_chunk: auto`), the LM head only at positions that predict a
             response token (`lm_head_on: loss_tokens`; same loss), + FedAvg.
  jax_all    the same with the LM head at every position (`lm_head_on: all_tokens`), as torch.
  torch_lean a skilled user's loop: the PEFT model is created once; per client load the global
             adapter (`set_peft_model_state_dict`), a plain `torch.optim.AdamW` loop of S steps
             (`model.train()`, base frozen by PEFT, fused AdamW), read the adapter back; FedAvg.
             `torch.set_num_threads(os.cpu_count())`.
  torch_hf   OpenFedLLM-style: per client per round set the global adapter state dict, build an
             HF `Trainer` for S steps (`max_steps`, constant LR, no saving/logging), `train()`,
             read the state dict back; then FedAvg. (OpenFedLLM builds a TRL `SFTTrainer`, a
             `Trainer` subclass; trl is not installed here, so the plain `Trainer` is used.)

Reports client-steps/s, seconds per step and the ratios to ours.

  python experiments/bench/bench_torch_peers.py                # 34M model, B 16, T 128
  python experiments/bench/bench_torch_peers.py --small        # seconds (smoke test)
  python experiments/bench/bench_torch_peers.py --device cuda  # on a GPU (both frameworks on it)
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from fedrouter_jax import lora as lora_lib  # noqa: E402
from fedrouter_jax.api import load_pretrained  # noqa: E402
from fedrouter_jax.data.batching import head_tokens_for_batches  # noqa: E402
from fedrouter_jax.training import (Batch, client_chunk_size, clients_local_steps, init_opt_states,  # noqa: E402
                                    make_optimizer)

LR = 5e-4


def build_torch_model(cfg, directory: Path):
    """A random `LlamaForCausalLM` of our config, saved as an HF checkpoint; returns the model."""
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = HFConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "torch_dtype")})
    model = LlamaForCausalLM(hf_cfg).float()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def peft_wrap(model):
    from peft import LoraConfig, get_peft_model

    lc = LoraConfig(r=common.RANK, lora_alpha=common.ALPHA, target_modules=list(common.TARGETS),
                    lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lc)


def jax_global_from_peft(peft_model, cfg) -> lora_lib.LoraStack:
    """The PEFT model's initial adapter as our single adapter (leaves [L, d_in, R])."""
    sd = {k: v.detach().cpu().numpy() for k, v in peft_model.state_dict().items() if "lora_" in k}
    params = {}
    for t in common.TARGETS:
        a, b = [], []
        for i in range(cfg.num_hidden_layers):
            mod = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{i}.{mod}.{t}"
            a.append(sd[f"{prefix}.lora_A.default.weight"].T)
            b.append(sd[f"{prefix}.lora_B.default.weight"].T)
        params[t] = {"a": jnp.asarray(np.stack(a)), "b": jnp.asarray(np.stack(b))}
    return lora_lib.LoraStack(params=params, alpha=common.ALPHA)


def main(argv=None) -> dict:
    p = common.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), default_repeats=3)
    common.add_shape_args(p, model="34m", steps=10)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--no-trainer", action="store_true", help="skip the HF Trainer variant")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="torch device (JAX uses its default backend; run on a GPU machine for cuda)")
    args = p.parse_args(argv)
    if args.small:
        args.model, args.clients, args.steps, args.batch, args.seq, args.repeats = "small", 1, 2, 2, 16, 1
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    dev = torch.device(args.device)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count())
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    info = common.header("JAX client-mapped round vs PyTorch + PEFT sequential clients", args)
    cfg0 = common.CONFIGS[args.model]
    C, S, B, T = args.clients, args.steps, args.batch, args.seq

    tmp = tempfile.TemporaryDirectory()
    torch_model = build_torch_model(cfg0, Path(tmp.name)).to(dev)
    cfg, base = load_pretrained(tmp.name)  # ours, from the torch model's checkpoint
    peft_model = peft_wrap(torch_model)
    peft_model.train()
    global_jax = jax_global_from_peft(peft_model, cfg)
    global_sd = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}

    tokens, mask, loss_mask = common.token_batches((C, S, B, T), cfg.vocab_size, seed=0)
    batches = Batch(jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(loss_mask))
    t_tok = torch.from_numpy(tokens.astype(np.int64)).to(dev)
    t_mask = torch.from_numpy(mask.astype(np.int64)).to(dev)
    t_labels = torch.where(torch.from_numpy(loss_mask).to(dev), t_tok, torch.full_like(t_tok, -100))

    # --- ours -------------------------------------------------------------------------------
    opt = make_optimizer()
    keys = jax.random.split(jax.random.PRNGKey(0), C)

    chunk = client_chunk_size("auto", C, B * T)
    head = head_tokens_for_batches(0, loss_mask)

    def jax_round(head=head):
        loras = lora_lib.broadcast(global_jax, C)
        states = init_opt_states(opt, loras, LR)
        loras, _, metrics = clients_local_steps(base, loras, states, batches, keys, cfg=cfg, optimizer=opt,
                                                client_chunk=chunk, head_tokens=head)
        return jax.tree.map(lambda x: x.mean(axis=0), loras), metrics

    # --- torch, lean --------------------------------------------------------------------------
    trainable = [q for q in peft_model.parameters() if q.requires_grad]

    def fedavg(dicts):
        return {k: torch.stack([d[k] for d in dicts]).mean(0) for k in dicts[0]}

    def torch_lean_round():
        out, losses = [], []
        for c in range(C):
            set_peft_model_state_dict(peft_model, global_sd)
            optim = torch.optim.AdamW(trainable, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                      fused=True)
            for s in range(S):
                loss = peft_model(input_ids=t_tok[c, s], attention_mask=t_mask[c, s], labels=t_labels[c, s]).loss
                loss.backward()
                optim.step()
                optim.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            out.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()})
        with torch.inference_mode():
            avg = fedavg(out), torch.stack(losses)
        sync()
        return avg

    # --- torch, HF Trainer per client (OpenFedLLM-style) --------------------------------------
    def torch_hf_round():
        from transformers import PrinterCallback, Trainer, TrainingArguments, default_data_collator

        out = []
        for c in range(C):
            set_peft_model_state_dict(peft_model, global_sd)
            rows = [{"input_ids": t_tok[c, s, b], "attention_mask": t_mask[c, s, b], "labels": t_labels[c, s, b]}
                    for s in range(S) for b in range(B)]
            targs = TrainingArguments(
                output_dir=tmp.name + "/trainer", max_steps=S, per_device_train_batch_size=B,
                learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, adam_epsilon=1e-8,
                logging_strategy="no", save_strategy="no", report_to=[], use_cpu=args.device == "cpu",
                disable_tqdm=True, dataloader_num_workers=0, seed=c,
            )
            trainer = Trainer(model=peft_model, args=targs, train_dataset=rows, data_collator=default_data_collator)
            trainer.remove_callback(PrinterCallback)  # only silences the end-of-train metrics print
            trainer.train()
            out.append({k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()})
        avg = fedavg(out)
        sync()
        return avg

    # Sanity: the first step's loss agrees between the two frameworks (same weights and data).
    jax_loss = float(jax_round()[1]["loss"][0, 0])
    with torch.no_grad():
        set_peft_model_state_dict(peft_model, global_sd)
        torch_loss = float(peft_model(input_ids=t_tok[0, 0], attention_mask=t_mask[0, 0], labels=t_labels[0, 0]).loss)
    print(f"first-step loss: jax {jax_loss:.5f}  torch {torch_loss:.5f}")
    assert abs(jax_loss - torch_loss) < 1e-3 * max(1.0, abs(torch_loss)), (jax_loss, torch_loss)

    variants = {"jax": jax_round, "jax_all": lambda: jax_round(None), "torch_lean": torch_lean_round}
    if not args.no_trainer:
        variants["torch_hf"] = torch_hf_round
    r = common.alternate(variants, repeats=args.repeats, warmup=1, rotate=True)
    flops = common.train_step_flops(cfg, B, T)  # the head at every position (as torch computes)
    flops_ours = common.train_step_flops(cfg, B, T, head_tokens=head)["total"]
    results = {"config": {"model": args.model, "clients": C, "steps": S, "batch": B, "seq": T},
               "flops_per_step": flops["total"], "flops_per_step_loss_tokens_head": flops_ours, "head_tokens": head}
    print(f"LM head positions: {head} of {B * T} in `jax` (each batch's loss positions, rounded up to 64)")
    print(f"\nmodel {args.model} ({sum(x.size for x in jax.tree.leaves(base)) / 1e6:.1f}M params), "
          f"C={C} clients x S={S} steps, B={B}, T={T}, LoRA r{common.RANK} on {','.join(common.TARGETS)}")
    print(f"{'variant':12s} {'round s (med)':>14s} {'client-steps/s':>15s} {'s/step':>8s} {'GFLOP/s':>8s} "
          f"{'cpu/wall':>8s} {'ours is x faster':>17s}")
    for name, v in r.items():
        steps_per_s = C * S / v["median"]
        speedup = v["median"] / r["jax"]["median"]
        f = flops_ours if name == "jax" else flops["total"]
        results[name] = {"round_s": v["median"], "round_s_all": v["wall"], "client_steps_per_s": steps_per_s,
                         "s_per_step": 1 / steps_per_s, "gflops": f * steps_per_s / 1e9,
                         "ours_speedup": speedup}
        print(f"{name:12s} {v['median']:14.3f} {steps_per_s:15.3f} {1 / steps_per_s:8.3f} "
              f"{f * steps_per_s / 1e9:8.1f} {v['cpu_median'] / v['median']:8.2f} {speedup:17.2f}")
    common.footer(info, results, args)
    tmp.cleanup()
    return results


if __name__ == "__main__":
    main()
