"""A small byte-level BPE tokenizer for the tiny models, wrapped as an HF fast tokenizer.

Byte-level (GPT-2 style) so that every string round-trips exactly: no normalizer, no prefix
space, ``clean_up_tokenization_spaces=False``. Special tokens ``<|bos|>``, ``<|eos|>``,
``<|pad|>`` get ids 0, 1, 2 (pad distinct from eos, unlike the authors' Llama setup where
pad = eos; a distinct pad keeps padding visibly separate from real tokens in every mask test).

No post-processor: ``tokenizer(text)`` returns the text's tokens only; ``batching.py`` adds BOS
and EOS explicitly, so the training layout is decided in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, *, min_frequency: int = 2):
    """Train a byte-level BPE on ``texts``.

    Args:
      texts: training strings (e.g. the generic corpus plus formatted task prompts).
      vocab_size: target vocabulary size V including the 256 byte symbols and 3 specials.
      min_frequency: minimum pair count for a merge.

    Returns:
      ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad set; ``len(tok) <= vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return _wrap(tok)


def _wrap(tok):
    from fedrouter_jax.hf_quiet import transformers

    PreTrainedTokenizerFast = transformers().PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, directory: str | Path) -> Path:
    """``tokenizer.save_pretrained(directory)`` (writes tokenizer.json + tokenizer_config.json)."""
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    return directory


def load_tokenizer(directory: str | Path):
    """Load a tokenizer saved by :func:`save_tokenizer` via ``AutoTokenizer``.

    Any HF tokenizer directory works if it defines bos, eos and pad tokens (batching needs all
    three; a stock Llama tokenizer has no pad: set one before use). Raises
    ``FileNotFoundError`` naming the directory if it holds no tokenizer."""
    from fedrouter_jax.hf_quiet import transformers

    AutoTokenizer = transformers().AutoTokenizer

    directory = Path(directory)
    if not (directory / "tokenizer.json").exists() and not (
        directory / "tokenizer_config.json"
    ).exists():
        raise FileNotFoundError(f"no tokenizer.json / tokenizer_config.json in {directory}")
    tok = AutoTokenizer.from_pretrained(str(directory))
    for name, want in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        if getattr(tok, name) is None:
            raise ValueError(f"tokenizer in {directory} has no {name} (expected {want!r})")
    return tok


def load_model_tokenizer_file(model_dir: str | Path):
    """The `tokenizers.Tokenizer` of a model directory's ``tokenizer.json`` (no sentencepiece
    fallback: a missing or broken file is an error naming it)."""
    import json

    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the model directory needs the fast tokenizer file "
                                "tokenizer.json (save the tokenizer with save_pretrained)")
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises untyped errors
        raise ValueError(f"{path}: not a tokenizer file ({str(e).splitlines()[0][:200]})") from None


def check_tokenizer_vocab(tokenizer, vocab_size: int, model_dir: str | Path) -> None:
    """Every token id must index the model's embedding: ids >= config.json's vocab_size would
    read past it (NaN / garbage losses that look like a too-high learning rate)."""
    n = tokenizer.get_vocab_size(with_added_tokens=True) if hasattr(tokenizer, "get_vocab_size") else len(tokenizer)
    if n > vocab_size:
        raise ValueError(f"{Path(model_dir) / 'tokenizer.json'}: the tokenizer has {n} tokens but "
                         f"{Path(model_dir) / 'config.json'} says vocab_size={vocab_size}; use the tokenizer "
                         "saved with this model")
