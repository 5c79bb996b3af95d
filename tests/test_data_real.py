"""Real-data loaders on small fixture files in each real schema, and validation errors."""

import json
import warnings

import datasets
import pytest

from fedrouter_jax.data.prompt import format_prompt
from fedrouter_jax.data.real import (
    DataError,
    convert_rows,
    load_real_task,
    load_real_tasks,
    validate_examples,
)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "data"
    _jsonl(d / "qqp" / "train.jsonl", [
        {"question1": "How do I cook rice?", "question2": "What is the way to cook rice?",
         "label": 1, "idx": 0},
        {"question1": "Where is Oslo?", "question2": "Why is the sky blue?", "label": 0,
         "idx": 1},
    ])
    _jsonl(d / "qqp" / "test.jsonl", [
        {"question1": "a?", "question2": "b?", "label": 0, "idx": 0},
    ])
    _jsonl(d / "webnlg" / "data.jsonl", [
        {"gem_id": "x", "input": ["Oslo | country | Norway", "Oslo | leader | Anna"],
         "target": "Oslo is in Norway and led by Anna.", "references": []},
    ])
    (d / "samsum").mkdir(parents=True)
    (d / "samsum" / "train.csv").write_text(
        'id,dialogue,summary\n1,"Ann: hi\nBob: hello","Ann greets Bob."\n'
        '2,"Bob: lunch?\nAnn: sure","They will have lunch."\n')
    datasets.Dataset.from_dict({
        "document": ["stocks rose sharply on monday in tokyo"], "summary": ["tokyo stocks rise"],
    }).to_parquet(str(d / "gigaword.parquet"))
    return d


def test_each_schema_loads_in_authors_style(data_dir, tmp_path):
    kw = dict(cache_dir=tmp_path / "cache")
    qqp, k = load_real_task("qqp", data_dir, **kw)
    assert k == 0 and len(qqp) == 2  # only the train split file
    assert qqp[0] == {"task": "qqp", "instruction": "",
                      "input": "How do I cook rice?-What is the way to cook rice?",
                      "output": "Yes"}
    assert qqp[1]["output"] == "No"
    assert len(load_real_task("qqp", data_dir, split="test", **kw)[0]) == 1
    web, _ = load_real_task("webnlg", data_dir, **kw)
    assert web[0]["input"] == "['Oslo | country | Norway', 'Oslo | leader | Anna']"
    assert web[0]["output"] == "Oslo is in Norway and led by Anna."
    sam, _ = load_real_task("samsum", data_dir, **kw)
    assert [e["output"] for e in sam] == ["Ann greets Bob.", "They will have lunch."]
    assert sam[0]["input"] == "Ann: hi\nBob: hello"
    gig, _ = load_real_task("gigaword", data_dir, **kw)
    assert gig == [{"task": "gigaword", "instruction": "",
                    "input": "stocks rose sharply on monday in tokyo",
                    "output": "tokyo stocks rise"}]
    # the authors' prompt, byte for byte
    assert format_prompt(gig[0]["instruction"], gig[0]["input"]).endswith(
        "### Instruction:\nstocks rose sharply on monday in tokyo \n\n### Response:")
    allt = load_real_tasks(data_dir, **kw)
    assert {t: len(v) for t, v in allt.items()} == {
        "qqp": 2, "gigaword": 1, "samsum": 2, "webnlg": 1}


def test_instruct_style(data_dir, tmp_path):
    qqp, _ = load_real_task("qqp", data_dir, style="instruct", cache_dir=tmp_path / "c")
    assert qqp[0]["instruction"] == "Are these two questions semantically equivalent?"
    assert qqp[0]["input"] == ("Question 1: How do I cook rice? "
                               "Question 2: What is the way to cook rice?")


def test_flan_schemas_and_saved_dataset(tmp_path):
    d = tmp_path / "data"
    _jsonl(d / "samsum" / "train.jsonl", [{"inputs": "Summarize: A: hi", "targets": "A says hi"}])
    _jsonl(d / "qqp" / "train.jsonl", [
        {"instruction": "Same?", "input": "q1 / q2", "output": "No"},
        {"instruction": "Is x y?", "input": "", "output": "Yes"},
    ])
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"document": ["a long sentence"], "summary": ["short"]})}).save_to_disk(
        str(d / "gigaword"))
    sam, _ = load_real_task("samsum", d, cache_dir=tmp_path / "c")
    assert sam == [{"task": "samsum", "instruction": "", "input": "Summarize: A: hi",
                    "output": "A says hi"}]
    qqp, _ = load_real_task("qqp", d, cache_dir=tmp_path / "c")
    assert qqp[0] == {"task": "qqp", "instruction": "Same?", "input": "q1 / q2", "output": "No"}
    assert qqp[1] == {"task": "qqp", "instruction": "", "input": "Is x y?", "output": "Yes"}
    gig, _ = load_real_task("gigaword", d)
    assert gig[0]["output"] == "short"


def test_missing_data_says_what_to_put_where(tmp_path):
    with pytest.raises(DataError, match=r"Put qqp as jsonl.*question1, question2, label.*"
                                        r"under .*/qqp/.*allow_hub=True"):
        load_real_task("qqp", tmp_path)
    with pytest.raises(DataError, match="unknown task 'boolq'"):
        load_real_task("boolq", tmp_path)


def test_missing_column_names_file_row_field(tmp_path):
    f = _jsonl(tmp_path / "d" / "qqp" / "train.jsonl",
               [{"question1": "a?", "question2": "b?"}])
    with pytest.raises(DataError) as e:
        load_real_task("qqp", tmp_path / "d", cache_dir=tmp_path / "c", skip_invalid=True)
    msg = str(e.value)
    assert str(f) in msg and "row 0" in msg and "'label'" in msg


def test_bad_rows_name_file_row_field_and_skip_count(tmp_path):
    f = _jsonl(tmp_path / "d" / "gigaword" / "train.jsonl", [
        {"document": "fine text", "summary": "ok"},
        {"document": "no headline", "summary": ""},
        {"document": "x", "summary": "y"},
        {"document": "also fine", "summary": "good"},
    ])
    kw = dict(cache_dir=tmp_path / "c")
    with pytest.raises(DataError) as e:
        load_real_task("gigaword", tmp_path / "d", **kw)
    assert str(e.value) == f"{f}: row 1: field 'summary': empty text"
    with pytest.warns(UserWarning, match="skipped 1 of 4 invalid rows"):
        ex, skipped = load_real_task("gigaword", tmp_path / "d", skip_invalid=True, **kw)
    assert skipped == 1 and [x["output"] for x in ex] == ["ok", "y", "good"]


def test_qqp_bad_label_and_non_text(tmp_path):
    rows = [{"question1": "a?", "question2": "b?", "label": -1}]
    with pytest.raises(DataError, match=r"src: row 0: field 'label'.*unlabelled"):
        convert_rows(rows, "qqp", source="src")
    rows = [{"question1": "a?", "question2": "b?", "label": 1},
            {"question1": 7, "question2": "b?", "label": 1}]
    with pytest.raises(DataError, match=r"src: row 1: field 'question1': non-text"):
        convert_rows(rows, "qqp", source="src")


def test_validate_examples():
    good = {"task": "qqp", "instruction": "", "input": "a-b", "output": "No"}
    out, k = validate_examples([good], source="mine")
    assert out == [good] and k == 0
    with pytest.raises(DataError, match=r"mine: row 1: field 'task': unknown task 'squad'"):
        validate_examples([good, dict(good, task="squad")], source="mine")
    with pytest.raises(DataError, match=r"mine: row 0: field 'output': non-text.*int"):
        validate_examples([dict(good, output=3)], source="mine")
    with pytest.raises(DataError, match=r"mine: row 0: field 'input'"):
        validate_examples([{"task": "qqp", "instruction": "", "output": "x"}], source="mine")
    ds = datasets.Dataset.from_dict({"task": ["qqp"], "input": ["x"], "output": ["y"]})
    with pytest.raises(DataError, match=r"mine: row 0: missing column.*instruction"):
        validate_examples(ds, source="mine")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out, k = validate_examples([good, dict(good, input=" "), good], source="mine",
                                   skip_invalid=True)
    assert k == 1 and len(out) == 2 and "skipped 1 of 3" in str(w[0].message)
