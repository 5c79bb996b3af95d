"""Re-make the embedded default base model: a byte-level BPE tokenizer and a tiny Llama
pretrained on generic text of the synthetic world (not on the tasks' instruction -> output maps).

    python experiments/pretrain_tiny_base.py                 # writes fedrouter_jax/assets/tiny-llama
    python experiments/pretrain_tiny_base.py --steps 20 --out /tmp/x   # quick check

Deterministic given --seed (same corpus, tokenizer, init and batches); budgeted to finish in
< 10 min on 2 CPU cores. The committed model was made with the defaults below.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedrouter_jax.data import TASKS, format_prompt, generate_examples, generic_corpus, save_tokenizer, train_tokenizer
from fedrouter_jax.models import hf_io, llama
from fedrouter_jax.models.config import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "fedrouter_jax" / "assets" / "tiny-llama"


def model_config(vocab_size: int, bos: int, eos: int, pad: int) -> LlamaConfig:
    """~4M parameters: d 256, 4 layers, 8 heads (hd 32), 4 kv heads (GQA), tied embeddings,
    llama3 RoPE scaling (so the embedded default exercises the Llama-3.2 code path)."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 512}.items())),
        tie_word_embeddings=True, max_position_embeddings=1024, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad,
    )


def tokenizer_texts(corpus: list[str], seed: int) -> list[str]:
    """Corpus + prompt *headers* so the template tokenizes compactly. Vocabulary only: the
    model never sees an instruction paired with its output."""
    headers = []
    for task in TASKS:
        for ex in generate_examples(task, 50, seed + 999):
            headers.append(format_prompt(ex["instruction"], ""))
    return corpus + headers


def pack(corpus: list[str], tok, seq: int) -> np.ndarray:
    """BOS doc EOS BOS doc EOS ... cut into rows of `seq` tokens: [N, seq]."""
    ids = tok(corpus, add_special_tokens=False)["input_ids"]
    stream = []
    for x in ids:
        stream += [tok.bos_token_id] + x + [tok.eos_token_id]
    n = len(stream) // seq
    return np.asarray(stream[: n * seq], np.int32).reshape(n, seq)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=60000)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=420)
    p.add_argument("--lr", type=float, default=3e-3)
    args = p.parse_args(argv)
    t0 = time.perf_counter()

    corpus = generic_corpus(args.docs, args.seed)
    tok = train_tokenizer(tokenizer_texts(corpus, args.seed), vocab_size=args.vocab)
    data = pack(corpus, tok, args.seq)
    cfg = model_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    print(f"corpus {len(corpus)} docs -> {data.size} tokens in {data.shape[0]} rows; vocab {len(tok)}; "
          f"{time.perf_counter() - t0:.1f}s")

    key = jax.random.PRNGKey(args.seed)
    params = llama.init_params(key, cfg, std=0.02)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(100, args.steps // 10 + 1), args.steps, args.lr * 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = opt.init(params)
    mask = jnp.ones((args.batch, args.seq), bool)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens):
        def loss_fn(p):
            logits = llama.apply(p, tokens, mask, cfg=cfg)
            logp = jax.nn.log_softmax(logits[:, :-1], -1)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, upd), opt_state, loss

    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(len(data)) for _ in range(math.ceil(args.steps * args.batch / len(data)) + 1)])
    losses = []
    for s in range(args.steps):
        rows = order[s * args.batch:(s + 1) * args.batch]
        params, opt_state, loss = step(params, opt_state, jnp.asarray(data[rows]))
        if s % 50 == 0 or s == args.steps - 1:
            losses.append((s, float(loss)))
            print(f"step {s:5d}  loss {float(loss):.3f}  {time.perf_counter() - t0:.0f}s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    hf_io.save_pretrained(args.out, cfg, jax.tree.map(np.asarray, params))
    save_tokenizer(tok, args.out)
    info = {"seed": args.seed, "docs": args.docs, "vocab": len(tok), "seq": args.seq, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "parameters": int(n_params), "final_loss": losses[-1][1],
            "tokens_seen": args.steps * args.batch * args.seq, "seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "pretrain_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
