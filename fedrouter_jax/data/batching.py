"""Token arrays for training, generation and embeddings (numpy only; shapes per CONVENTIONS.md).

Layout of one training example (right-padded to T)::

    [BOS] tok(format_prompt(instruction, input)) | tok(" " + output) [EOS] | PAD ...
    `----------------- prompt ------------------'  `---- response ----'

The prompt and the response are tokenized *separately* and concatenated, so the prompt/response
boundary is exact (no BPE merge across it); the separator, a single space
(``prompt.RESPONSE_SEPARATOR``, as in the authors' template ``### Response: {response}``), is the
first character of the response text, so a byte-level BPE glues it to the response's first word.
Generation prompts are exactly the prompt part, left-padded, so a model generates the response
tokens it was trained on. ``loss_mask`` is 1 on the response tokens including EOS (token t is a
response token predicted from tokens < t).

Truncation rule (never silent): if prompt + response exceed T, the whole response is kept and the
prompt is cut from the *left*, keeping BOS and the prompt's tail (which holds the end of the input
and "### Response:"); the instruction header is what goes first. If the response alone leaves
fewer than ``min(len(prompt), T // 2)`` tokens for the prompt, the prompt keeps that many tokens
(BOS + tail) and the response is cut on the right (its EOS is then lost). Both kinds of cut are
counted in a :class:`TruncationReport` and announced with ``warnings.warn``.

The authors' code right-truncates the *concatenated* text at 512/1024 tokens (TRL SFT), which can
drop the response; we keep responses because ROUGE targets must be trained on.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from fedrouter_jax.data.prompt import RESPONSE_SEPARATOR, format_prompt


@dataclasses.dataclass(frozen=True)
class TruncationReport:
    """How many of ``n_examples`` had their prompt cut (from the left) or response cut."""

    n_examples: int
    prompts_cut: int
    responses_cut: int

    @property
    def n_truncated(self) -> int:
        return self.prompts_cut + self.responses_cut

    def warn(self, what: str) -> None:
        if self.n_truncated:
            warnings.warn(
                f"{what}: {self.prompts_cut} of {self.n_examples} prompts cut from the left, "
                f"{self.responses_cut} responses cut on the right (raise max_len to avoid)",
                stacklevel=3,
            )


@dataclasses.dataclass(frozen=True)
class TokenizedSet:
    """Right-padded training tokens for N examples.

    Attributes:
      tokens: [N, T] int32, pad id after the real tokens.
      mask: [N, T] bool, 1 = real token.
      loss_mask: [N, T] bool, 1 on response tokens incl. EOS.
      lengths: [N] int32, number of real tokens.
      prompt_lengths: [N] int32, tokens before the response (BOS + prompt after truncation).
      report: truncation counts.
    """

    tokens: np.ndarray
    mask: np.ndarray
    loss_mask: np.ndarray
    lengths: np.ndarray
    prompt_lengths: np.ndarray
    report: TruncationReport

    @property
    def n_truncated(self) -> int:
        return self.report.n_truncated

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def _special_ids(tokenizer) -> tuple[int, int, int]:
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if any(i is None for i in ids):
        raise ValueError(f"tokenizer needs bos/eos/pad tokens, got ids (bos, eos, pad) = {ids}")
    return ids


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _field(ex, name: str, i: int) -> str:
    try:
        v = ex[name]
    except (KeyError, TypeError) as e:
        raise KeyError(f"example {i} has no field {name!r}") from e
    if not isinstance(v, str):
        raise TypeError(f"example {i} field {name!r} is {type(v).__name__}, expected str")
    return v


def prompt_texts(examples: Sequence[dict]) -> list[str]:
    """``format_prompt(instruction, input)`` per example."""
    return [format_prompt(_field(e, "instruction", i), _field(e, "input", i))
            for i, e in enumerate(examples)]


def input_texts(examples: Sequence[dict]) -> list[str]:
    """The raw task input per example: what FedRouter embeds for clustering and routing.

    The authors embed their ``instruction`` column, which for the FLAN subset is the raw task
    data alone (no template, no task instruction, no response); our ``input`` field holds that
    data (``real.py`` puts it there in both styles).
    """
    return [_field(e, "input", i) for i, e in enumerate(examples)]


def _prompt_tail(p: list[int], keep: int, bos: int) -> list[int]:
    # keep BOS + the last (keep - 1) prompt tokens
    return [bos] + (p[len(p) - (keep - 1):] if keep > 1 else [])


def tokenize_examples(examples: Sequence[dict], tokenizer, max_len: int, *,
                      warn: bool = True) -> TokenizedSet:
    """Right-padded training arrays for ``examples`` (dicts with instruction, input, output).

    Args:
      examples: N examples.
      tokenizer: HF tokenizer with bos/eos/pad.
      max_len: T.

    Returns:
      :class:`TokenizedSet` with tokens/mask/loss_mask [N, T].
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    bos, eos, pad = _special_ids(tokenizer)
    n = len(examples)
    prompts = _encode(tokenizer, prompt_texts(examples))
    responses = _encode(tokenizer, [RESPONSE_SEPARATOR + _field(e, "output", i)
                                    for i, e in enumerate(examples)])
    tokens = np.full((n, max_len), pad, np.int32)
    loss_mask = np.zeros((n, max_len), bool)
    lengths = np.zeros(n, np.int32)
    plens = np.zeros(n, np.int32)
    p_cut = r_cut = 0
    for i, (p, r) in enumerate(zip(prompts, responses)):
        p = [bos] + list(p)
        r = list(r) + [eos]
        if len(p) + len(r) > max_len:
            min_prompt = min(len(p), max_len // 2)
            if len(r) <= max_len - min_prompt:
                keep = max_len - len(r)
            else:
                keep = min_prompt
                r = r[: max_len - keep]
                r_cut += 1
            if keep < len(p):
                p = _prompt_tail(p[1:], keep, bos)
                p_cut += 1
        seq = p + r
        tokens[i, : len(seq)] = seq
        loss_mask[i, len(p): len(seq)] = True
        lengths[i], plens[i] = len(seq), len(p)
    mask = np.arange(max_len)[None, :] < lengths[:, None]
    report = TruncationReport(n, p_cut, r_cut)
    if warn:
        report.warn("tokenize_examples")
    return TokenizedSet(tokens, mask, loss_mask, lengths, plens, report)


def encode_prompts(examples: Sequence[dict], tokenizer, max_len: int, *, warn: bool = True
                   ) -> tuple[np.ndarray, np.ndarray, TruncationReport]:
    """Left-padded generation prompts ``BOS + tok(format_prompt(...))``.

    Same encoding as the prompt part of :func:`tokenize_examples`; a prompt longer than
    ``max_len`` keeps BOS and its last ``max_len - 1`` tokens (the same left cut).

    Returns:
      tokens: [N, T] int32 (pad on the left), mask: [N, T] bool, report (responses_cut = 0).
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    bos, _, pad = _special_ids(tokenizer)
    prompts = _encode(tokenizer, prompt_texts(examples))
    n = len(prompts)
    tokens = np.full((n, max_len), pad, np.int32)
    mask = np.zeros((n, max_len), bool)
    cut = 0
    for i, p in enumerate(prompts):
        p = [bos] + list(p)
        if len(p) > max_len:
            p = _prompt_tail(p[1:], max_len, bos)
            cut += 1
        tokens[i, max_len - len(p):] = p
        mask[i, max_len - len(p):] = True
    report = TruncationReport(n, cut, 0)
    if warn:
        report.warn("encode_prompts")
    return tokens, mask, report


def encode_inputs(examples: Sequence[dict], tokenizer, max_len: int = 1024, *, pad_multiple: int = 16
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded raw task inputs (:func:`input_texts`) for mean-pooled embeddings.

    As the authors' ``get_embeddings_model``: the raw input only, truncated on the right at
    ``max_len`` (1024 there), BOS first (their Llama tokenizer adds it). They left-pad; with
    masked mean pooling and relative (RoPE) positions the padding side does not change the
    embedding, and right padding keeps positions 0-based. T is the longest sequence rounded up
    to ``pad_multiple`` (to limit recompiles), capped at ``max_len``.

    Returns:
      tokens: [N, T] int32, mask: [N, T] bool.
    """
    bos, _, pad = _special_ids(tokenizer)
    ids = _encode(tokenizer, input_texts(examples))
    ids = [[bos] + list(x) for x in ids]
    ids = [x[:max_len] for x in ids]
    longest = max((len(x) for x in ids), default=1)
    t = min(max_len, -(-longest // pad_multiple) * pad_multiple)
    tokens = np.full((len(ids), t), pad, np.int32)
    mask = np.zeros((len(ids), t), bool)
    for i, x in enumerate(ids):
        tokens[i, : len(x)] = x
        mask[i, : len(x)] = True
    return tokens, mask


def sample_round_batches(tokset_per_client: Sequence[TokenizedSet], pools=None, *, steps: int,
                         batch_size: int, seed: int, round_idx: int, streams=None) -> dict[str, np.ndarray]:
    """One round of local batches for every client.

    For client c, S*B indices are drawn from ``pools[c]`` (that client's allowed example
    indices, e.g. one local cluster; ``None`` = all its examples): the pool is walked through a
    permutation drawn from ``np.random.default_rng([seed, round_idx, streams[c]])`` (streams
    default ``arange(C)``; a method names each slot's stream by client and slot), so indices repeat
    only when the pool is smaller than S*B (then further fresh permutations follow). Stateless:
    a resumed run that asks for the same (seed, round_idx) gets the same batches.

    Args:
      tokset_per_client: C tokenized sets with the same T.
      pools: C int arrays of row indices into each client's set, or None.
      steps: S local steps.
      batch_size: B.

    Returns:
      dict with tokens [C, S, B, T] int32, mask / loss_mask [C, S, B, T] bool,
      and indices [C, S, B] int64 (rows of each client's set).
    """
    c_n = len(tokset_per_client)
    if c_n == 0:
        raise ValueError("sample_round_batches: no clients")
    if pools is None:
        pools = [None] * c_n
    if len(pools) != c_n:
        raise ValueError(f"got {len(pools)} pools for {c_n} clients")
    t_lens = {ts.tokens.shape[1] for ts in tokset_per_client}
    if len(t_lens) != 1:
        raise ValueError(f"clients' token sets have different T: {sorted(t_lens)}")
    need = steps * batch_size
    if need <= 0:
        raise ValueError(f"steps * batch_size must be > 0, got {steps} * {batch_size}")
    all_idx = np.zeros((c_n, need), np.int64)
    for c, (ts, pool) in enumerate(zip(tokset_per_client, pools)):
        pool = np.arange(len(ts)) if pool is None else np.asarray(pool, np.int64).reshape(-1)
        if pool.size == 0:
            raise ValueError(f"client {c}: empty pool, nothing to sample for round {round_idx}")
        if pool.min() < 0 or pool.max() >= len(ts):
            raise ValueError(f"client {c}: pool indices outside [0, {len(ts)})")
        rng = np.random.default_rng([int(seed), int(round_idx), c if streams is None else int(streams[c])])
        passes = -(-need // pool.size)
        order = np.concatenate([rng.permutation(pool.size) for _ in range(passes)])[:need]
        all_idx[c] = pool[order]
    take = lambda name: np.stack(  # noqa: E731
        [getattr(ts, name)[all_idx[c]] for c, ts in enumerate(tokset_per_client)]
    ).reshape(c_n, steps, batch_size, -1)
    return {
        "tokens": take("tokens"),
        "mask": take("mask"),
        "loss_mask": take("loss_mask"),
        "indices": all_idx.reshape(c_n, steps, batch_size),
    }


def _round_up(n: int, multiple: int) -> int:
    return -(-int(n) // multiple) * multiple


def head_token_budget(sets: Sequence[TokenizedSet], batch_size: int, multiple: int = 64) -> int:
    """Loss positions that cover any batch of `batch_size` distinct rows of `sets`.

    A row with response tokens at t predicts them from positions t - 1, so it needs
    `loss_mask[1:].sum()` LM-head positions; a batch needs at most the sum of the `batch_size`
    largest. Rounded up to `multiple` and capped at `batch_size * (T - 1)` (all positions).
    """
    counts = np.concatenate([ts.loss_mask[:, 1:].sum(axis=1) for ts in sets])
    t = sets[0].tokens.shape[1]
    top = np.sort(counts)[::-1][:batch_size].sum()
    return min(_round_up(max(top, 1), multiple), batch_size * (t - 1))


def head_tokens_for_batches(budget: int, loss_mask: np.ndarray, multiple: int = 64) -> int:
    """LM-head positions for one round's batches `loss_mask: [..., B, T]`: the static `budget`,
    unless some batch needs more (a pool smaller than B repeats rows); then that need rounded up.
    Never more than the batch's `B * (T - 1)` positions (T after `trim_padding`). Depends only
    on the round's batches, so a resumed run makes the same choice."""
    need = int(loss_mask[..., 1:].sum(axis=(-1, -2)).max())
    b, t = loss_mask.shape[-2:]
    return min(budget if need <= budget else _round_up(need, multiple), b * (t - 1))


def trim_padding(batches: dict, multiple: int = 32) -> dict:
    """Drop the tail columns that are padding in every row of every batch (right padding).

    `batches`: tokens / mask / loss_mask `[..., T]` from `sample_round_batches`. The width kept
    is the longest row rounded up to `multiple` (so a run compiles for a few widths only), at
    most T. Padding keys are masked and carry no loss, so training on the trimmed batches gives
    the same result with less work wherever rows are shorter than `model.max_seq_len`.
    """
    t = batches["mask"].shape[-1]
    longest = int(batches["mask"].sum(axis=-1).max())
    keep = min(t, _round_up(max(longest, 1), multiple))
    if keep == t:
        return batches
    out = dict(batches)
    for name in ("tokens", "mask", "loss_mask"):
        out[name] = batches[name][..., :keep]
    return out


def prompt_inputs(train_prompts: Sequence[tuple], test_prompts: Sequence[tuple]) -> dict:
    """Per-client (tokens [N_c, T], mask [N_c, T]) prompts stacked into the route inputs' fields
    (`algorithms.base.ClientInputs`): train_prompt / train_prompt_mask [C, N, T], test_* [C, M, T];
    rows past a client's samples are empty (mask False)."""
    def stack(prompts):
        n, t = max(p[0].shape[0] for p in prompts), prompts[0][0].shape[1]
        tok, msk = np.zeros((len(prompts), n, t), np.int32), np.zeros((len(prompts), n, t), bool)
        for c, (x, m) in enumerate(prompts):
            tok[c, : len(x)], msk[c, : len(x)] = x, m
        return tok, msk

    (tr, trm), (te, tem) = stack(train_prompts), stack(test_prompts)
    return {"train_prompt": tr, "train_prompt_mask": trm, "test_prompt": te, "test_prompt_mask": tem}
