"""The one prompt format used for training, generation and evaluation.

What the FedRouter authors do (``utils/template.py`` and ``evaluation/prepare_eval_data.py`` of
GabrielTalasso/FedRouter, the OpenFedLLM code base): the Alpaca *no-input* template

    Below is an instruction that describes a task. Write a response that appropriately completes
    the request.\\n\\n### Instruction:\\n{instruction} \\n\\n### Response: {response}{eos}

where, for the FLAN multitask subset, ``instruction`` is the *raw task data alone* (their task
instruction strings such as "Summarize this conversation: " are commented out). Note the stray
space after ``{instruction}`` and the single space between ``### Response:`` and the response.

What we do, in :func:`format_prompt`:

* ``instruction`` and ``input`` both non-empty: the Alpaca *with-input* template (our examples
  carry a task instruction and the task data separately, so this is the natural Alpaca form).
* ``instruction`` empty (the authors' style, produced by ``real.py`` with ``style="authors"``):
  exactly the authors' no-input template with ``input`` in the instruction slot, stray space
  included, so real-data prompts reproduce the paper's prompts byte for byte.
* ``input`` empty: the no-input template with ``instruction`` in the instruction slot.

The prompt always ends with ``### Response:`` (no trailing whitespace). The response follows
after exactly one space, :data:`RESPONSE_SEPARATOR`, as in the authors' template; batching
encodes ``RESPONSE_SEPARATOR + output`` as the response so that a byte-level BPE attaches the
space to the response's first word, the same way at training and at generation time.
"""

from __future__ import annotations

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
# The authors' template (stray space after the instruction kept on purpose, see module doc).
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction} \n\n### Response:"
)
RESPONSE_SEPARATOR = " "


def format_prompt(instruction: str, input: str) -> str:  # noqa: A002 - the Alpaca field name
    """Alpaca prompt for one example, ending with ``### Response:``.

    Args:
      instruction: the task instruction; may be empty (authors' style: data-only prompts).
      input: the task data (questions, triples, dialogue, news sentence); may be empty.

    Returns:
      The prompt text. The training target is ``RESPONSE_SEPARATOR + output`` followed by EOS.
    """
    if not isinstance(instruction, str) or not isinstance(input, str):
        raise TypeError(
            f"format_prompt expects str, got instruction={type(instruction).__name__}, "
            f"input={type(input).__name__}"
        )
    if instruction and input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction or input)


def format_example(instruction: str, input: str, output: str) -> str:  # noqa: A002
    """Full training text ``prompt + " " + output`` (without BOS/EOS), for inspection."""
    return format_prompt(instruction, input) + RESPONSE_SEPARATOR + output
