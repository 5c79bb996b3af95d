"""Synthetic tasks: determinism, variety, balance, prompt format, generic corpus."""

import collections

import datasets
import pytest

from fedrouter_jax.data.prompt import RESPONSE_SEPARATOR, format_example, format_prompt
from fedrouter_jax.data.synthetic import (
    INSTRUCTIONS,
    TASKS,
    generate_examples,
    generate_task,
    generic_corpus,
)


def test_task_order_is_the_authors():
    assert TASKS == ("qqp", "gigaword", "samsum", "webnlg")


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task):
    a = generate_examples(task, 50, seed=3)
    assert a == generate_examples(task, 50, seed=3)
    assert a != generate_examples(task, 50, seed=4)
    assert generate_examples(task, 20, seed=3) == a[:20]  # prefix-stable
    for e in a:
        assert set(e) == {"task", "instruction", "input", "output"}
        assert e["task"] == task and e["input"].strip() and e["output"].strip()
        assert e["instruction"] in INSTRUCTIONS[task]


@pytest.mark.parametrize("task", TASKS)
def test_near_all_distinct_at_20k(task):
    ex = generate_examples(task, 20_000, seed=0, unique=False)
    assert len({e["input"] for e in ex}) >= 0.97 * len(ex)
    assert len({e["input"] for e in generate_examples(task, 2_000, seed=1)}) == 2_000


def test_instruction_templates_per_task():
    assert all(len(INSTRUCTIONS[t]) >= 3 for t in TASKS)
    used = {e["instruction"] for e in generate_examples("samsum", 200, 0)}
    assert len(used) >= 3


def test_qqp_balanced_and_yes_pairs_share_content():
    ex = generate_examples("qqp", 1000, seed=5)
    c = collections.Counter(e["output"] for e in ex)
    assert c == {"Yes": 500, "No": 500}
    for e in ex[:200]:
        q1, q2 = e["input"].split("\n")
        assert q1.startswith("Question 1: ") and q2.startswith("Question 2: ")
        assert q1[12:] != q2[12:]
        if e["output"] == "Yes":  # same content words (names, cities, ...) up to phrasing
            caps1 = {w.strip("?,.") for w in q1[12:].split() if w[0].isupper()}
            caps2 = {w.strip("?,.") for w in q2[12:].split() if w[0].isupper()}
            caps1 -= {"How", "What", "Where", "Which", "When", "Why", "Should", "I", "In",
                      "Is", "Living", "At"}
            caps2 -= {"How", "What", "Where", "Which", "When", "Why", "Should", "I", "In",
                      "Is", "Living", "At"}
            assert caps1 == caps2, e["input"]


def test_outputs_are_functions_of_inputs():
    # the same input never maps to two outputs, so the mapping is learnable
    for task in TASKS:
        seen = {}
        for e in generate_examples(task, 3000, seed=2, unique=False):
            assert seen.setdefault(e["input"], e["output"]) == e["output"]


def test_webnlg_outputs_realise_every_object():
    for e in generate_examples("webnlg", 300, seed=0):
        triples = [t.split(" | ") for t in e["input"].split(" ; ")]
        assert 1 <= len(triples) <= 4
        for s, _, o in triples:
            assert s in e["output"] and o in e["output"]


def test_tasks_inputs_look_different():
    ex = {t: generate_examples(t, 100, 0) for t in TASKS}
    assert all(e["input"].startswith("Question 1:") for e in ex["qqp"])
    assert all(" | " in e["input"] for e in ex["webnlg"])
    assert all(e["input"].count("\n") >= 3 for e in ex["samsum"])
    assert all("\n" not in e["input"] and "|" not in e["input"] for e in ex["gigaword"])


def test_generate_task_dataset():
    ds = generate_task("gigaword", 10, seed=0)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["task", "instruction", "input", "output"]
    assert ds.to_list() == generate_examples("gigaword", 10, seed=0)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'squad'.*qqp"):
        generate_examples("squad", 3, 0)


def test_generic_corpus_has_no_task_mappings():
    docs = generic_corpus(500, seed=0)
    assert docs == generic_corpus(500, seed=0) and docs != generic_corpus(500, seed=1)
    joined = "\n".join(docs)
    for marker in ("### Response", "### Instruction", " | ", "Question 1:"):
        assert marker not in joined
    outputs = {e["output"] for t in ("gigaword", "samsum") for e in generate_examples(t, 200, 0)}
    assert not any(o in joined for o in outputs)


def test_prompt_format():
    p = format_prompt("Summarize this conversation.", "A: hi\nB: hello")
    assert p.startswith("Below is an instruction that describes a task, paired with an input")
    assert p.endswith("### Input:\nA: hi\nB: hello\n\n### Response:")
    # authors' data-only prompt (empty instruction): their no-input template, stray space kept
    q = format_prompt("", "What is it?-What's that?")
    assert q == ("Below is an instruction that describes a task. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\nWhat is it?-What's "
                 "that? \n\n### Response:")
    assert RESPONSE_SEPARATOR == " "
    assert format_example("", "x", "Yes").endswith("### Response: Yes")
