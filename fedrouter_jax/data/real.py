"""Loaders for the real FLAN-subset datasets, and the validation every example set goes through.

Each task is read with ``datasets.load_dataset`` from local files, one file at a time so that
errors can name the file: ``<data_dir>/<task>/`` holding ``*.jsonl``/``*.json``/``*.csv``/
``*.parquet`` files (``<split>*`` files if any file name starts with a split name, else all),
a ``Dataset.save_to_disk``/``DatasetDict.save_to_disk`` directory, or a single file
``<data_dir>/<task>.<ext>``. The Hugging Face hub/cache is used only with ``allow_hub=True``
(nothing here flips the process-wide offline switches); without data a :class:`DataError` says
what to put where.

Accepted schemas (the hub datasets the authors load in ``utils/process_dataset.py``):

=========  =============================  ==========================================
task       hub id (config)                columns
=========  =============================  ==========================================
qqp        glue (qqp)                     question1, question2, label (1 = duplicate)
webnlg     GEM/web_nlg (en)               input (list of "S | R | O"), target
samsum     Samsung/samsum                 dialogue, summary
gigaword   Harvard/gigaword               document, summary
any task   FLAN-formatted                 inputs, targets  | instruction, [input], output
                                          | instruction, response (authors' processed form)
=========  =============================  ==========================================

Conversion to ``{task, instruction, input, output}`` follows the authors' ``*_format``
functions. Their prompts contain the raw data only (the task instructions are commented out), so
``style="authors"`` (default) gives ``instruction=""`` and ``input`` = exactly their text:
``q1 + "-" + q2`` with output "Yes"/"No"; ``str(list_of_triples)``; the dialogue; the document.
``prompt.format_prompt("", input)`` then reproduces their prompt. ``style="instruct"`` uses
their commented-out instruction strings as ``instruction`` and the data as ``input`` (qqp:
"Question 1: ... Question 2: ..."). Either way ``input`` is what FedRouter embeds.

Validation (:func:`validate_examples`, also applied to every converted row): missing columns,
non-text values, empty inputs/outputs and unknown task names raise :class:`DataError` naming the
source file, the row (0-based record index within that file) and the field. With
``skip_invalid=True`` bad *rows* are skipped, counted, reported with ``warnings.warn`` and the
count is returned; a missing column is a schema error and always raises.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from fedrouter_jax.data.synthetic import TASKS

EXAMPLE_FIELDS = ("task", "instruction", "input", "output")
HF_SOURCES = {
    "qqp": ("glue", "qqp"),
    "webnlg": ("GEM/web_nlg", "en"),
    "samsum": ("Samsung/samsum", None),
    "gigaword": ("Harvard/gigaword", None),
}
TASK_COLUMNS = {
    "qqp": ("question1", "question2", "label"),
    "webnlg": ("input", "target"),
    "samsum": ("dialogue", "summary"),
    "gigaword": ("document", "summary"),
}
# The authors' commented-out instruction strings (process_dataset.py), used by style="instruct".
INSTRUCT_STRINGS = {
    "qqp": "Are these two questions semantically equivalent?",
    "webnlg": "Organize this data into a readable text:",
    "samsum": "Summarize this conversation:",
    "gigaword": "Summarize this text:",
}
STYLES = ("authors", "instruct")
_EXTS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_SPLIT_NAMES = ("train", "validation", "valid", "dev", "test")


class DataError(ValueError):
    """Bad or missing data; the message names the file (or source), the row and the field."""


class _RowError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field, self.problem = field, problem


def _text(row: Mapping, field: str, *, allow_empty: bool = False) -> str:
    v = row.get(field)
    if v is None:
        raise _RowError(field, "missing value (None)")
    if not isinstance(v, str):
        raise _RowError(field, f"non-text value of type {type(v).__name__}: {v!r:.60}")
    if not allow_empty and not v.strip():
        raise _RowError(field, "empty text")
    return v


def _check_task_name(task: Any) -> str:
    if not isinstance(task, str):
        raise _RowError("task", f"non-text value of type {type(task).__name__}")
    if task not in TASKS:
        raise _RowError("task", f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def _columns(rows) -> list[str] | None:
    names = getattr(rows, "column_names", None)
    return list(names) if names is not None else None


class _Collector:
    """Raises on the first bad row, or (skip_invalid) counts and remembers a few problems."""

    def __init__(self, source: str, skip_invalid: bool):
        self.source, self.skip, self.n_skipped, self.first = source, skip_invalid, 0, []

    def bad(self, i: int, err: _RowError) -> None:
        msg = f"{self.source}: row {i}: field {err.field!r}: {err.problem}"
        if not self.skip:
            raise DataError(msg)
        self.n_skipped += 1
        if len(self.first) < 3:
            self.first.append(msg)

    def report(self, n_rows: int) -> None:
        if self.n_skipped:
            warnings.warn(
                f"{self.source}: skipped {self.n_skipped} of {n_rows} invalid rows; first: "
                + " | ".join(self.first),
                stacklevel=3,
            )


def validate_examples(ds: Iterable[Mapping], *, source: str, tasks: Iterable[str] = TASKS,
                      skip_invalid: bool = False) -> tuple[list[dict], int]:
    """Check examples ``{task, instruction, input, output}`` (list of dicts or a Dataset).

    ``instruction`` may be empty (authors' data-only prompts); ``input`` and ``output`` must be
    non-empty text; ``task`` must be in ``tasks``.

    Returns:
      (examples as plain dicts with exactly the four fields, number of skipped rows).
    Raises:
      DataError naming ``source``, the row and the field.
    """
    tasks = tuple(tasks)
    cols = _columns(ds)
    if cols is not None:
        missing = [f for f in EXAMPLE_FIELDS if f not in cols]
        if missing:
            raise DataError(f"{source}: row 0: missing column(s) {missing}; have {cols}")
    col = _Collector(source, skip_invalid)
    out: list[dict] = []
    n = 0
    for i, row in enumerate(ds):
        n += 1
        try:
            if not isinstance(row, Mapping):
                raise _RowError("<row>", f"expected a mapping, got {type(row).__name__}")
            missing = [f for f in EXAMPLE_FIELDS if f not in row]
            if missing:
                raise _RowError(missing[0], "missing field")
            task = _check_task_name(row["task"])
            if task not in tasks:
                raise _RowError("task", f"task {task!r} not allowed here ({', '.join(tasks)})")
            out.append({
                "task": task,
                "instruction": _text(row, "instruction", allow_empty=True),
                "input": _text(row, "input"),
                "output": _text(row, "output"),
            })
        except _RowError as e:
            col.bad(i, e)
    col.report(n)
    return out, col.n_skipped


# ------------------------------------------------------------------------------- conversion
def _schema(task: str, cols: list[str]) -> str:
    """Which schema the columns follow: the task's own, 'flan', 'alpaca' or 'processed'."""
    if all(c in cols for c in TASK_COLUMNS[task]):
        return "task"
    if "inputs" in cols and "targets" in cols:
        return "flan"
    if "instruction" in cols and "output" in cols:
        return "alpaca"
    if "instruction" in cols and "response" in cols:
        return "processed"
    return ""


def _convert_row(task: str, schema: str, style: str, row: Mapping) -> dict:
    if schema != "task":
        if "task" in row and row["task"] is not None:
            task = _check_task_name(row["task"])
        if schema == "flan":
            instruction, inp, out = "", _text(row, "inputs"), _text(row, "targets")
        elif schema == "processed":
            instruction, inp, out = "", _text(row, "instruction"), _text(row, "response")
        else:  # alpaca: an empty input means the instruction *is* the data
            instruction = _text(row, "instruction")
            inp = _text(row, "input", allow_empty=True) if "input" in row else ""
            out = _text(row, "output")
            if not inp.strip():
                instruction, inp = "", instruction
        return {"task": task, "instruction": instruction, "input": inp, "output": out}
    if task == "qqp":
        q1, q2 = _text(row, "question1"), _text(row, "question2")
        label = row.get("label")
        if isinstance(label, bool) or label not in (0, 1):
            raise _RowError("label", f"expected 0 or 1, got {label!r}"
                            + (" (unlabelled GLUE test split?)" if label == -1 else ""))
        out = "Yes" if label == 1 else "No"
        inp = q1 + "-" + q2 if style == "authors" else f"Question 1: {q1} Question 2: {q2}"
    elif task == "webnlg":
        triples = row.get("input")
        if isinstance(triples, str):
            triples = [triples]
        if not isinstance(triples, (list, tuple)) or not triples:
            raise _RowError("input", f"expected a non-empty list of 'S | R | O' strings, got "
                                     f"{type(triples).__name__}")
        for t in triples:
            if not isinstance(t, str) or not t.strip():
                raise _RowError("input", f"non-text or empty triple {t!r:.60}")
        inp = str(list(triples))  # the authors' str(example['input'])
        out = _text(row, "target")
    elif task == "samsum":
        inp, out = _text(row, "dialogue"), _text(row, "summary")
    else:  # gigaword
        inp, out = _text(row, "document"), _text(row, "summary")
    return {"task": task, "instruction": "" if style == "authors" else INSTRUCT_STRINGS[task],
            "input": inp, "output": out}


def convert_rows(rows, task: str, *, source: str, style: str = "authors",
                 skip_invalid: bool = False) -> tuple[list[dict], int]:
    """Convert rows in one of the accepted schemas (module doc) to validated examples.

    Args:
      rows: a ``datasets.Dataset`` or a list of dicts.
      task: the task the rows belong to (a FLAN-schema row's own ``task`` column wins).
      source: name used in error messages (the file path).

    Returns:
      (examples, number of skipped rows).
    """
    _require_task(task)
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; valid styles: {', '.join(STYLES)}")
    cols = _columns(rows)
    if cols is None:
        rows = list(rows)
        cols = sorted({k for r in rows if isinstance(r, Mapping) for k in r})
    schema = _schema(task, cols)
    if not schema:
        missing = [c for c in TASK_COLUMNS[task] if c not in cols]
        raise DataError(
            f"{source}: row 0: missing column(s) {missing} for {task} "
            f"(expected {', '.join(TASK_COLUMNS[task])}; or FLAN columns inputs, targets | "
            f"instruction, input, output); have {cols}"
        )
    col = _Collector(source, skip_invalid)
    out, n = [], 0
    for i, row in enumerate(rows):
        n += 1
        try:
            ex = _convert_row(task, schema, style, row)
            _text(ex, "input")
            _text(ex, "output")
            out.append(ex)
        except _RowError as e:
            col.bad(i, e)
    col.report(n)
    return out, col.n_skipped


# ---------------------------------------------------------------------------------- loading
def _require_task(task: str) -> None:
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")


def _missing_msg(task: str, data_dir, split: str) -> str:
    name, config = HF_SOURCES[task]
    where = f"{data_dir}/{task}/" if data_dir is not None else "<data_dir>/" + task + "/"
    return (
        f"{task}: no local data. Put {task} as jsonl/json/csv/parquet files with columns "
        f"{', '.join(TASK_COLUMNS[task])} (or FLAN columns inputs, targets) under {where} "
        f"(named {split}*.jsonl etc., or any names if there are no split files), or a "
        f"datasets save_to_disk directory there; or, on a machine with internet or an HF cache "
        f"holding it, run load_real_task({task!r}, allow_hub=True) "
        f"(hub: {name}" + (f", config {config}" if config else "") + ") and save it with "
        f"ds.to_json('{where}{split}.jsonl')."
    )


def _data_files(task_dir: Path, split: str) -> list[Path]:
    files = sorted(p for p in task_dir.iterdir() if p.is_file() and p.suffix in _EXTS)
    split_files = [p for p in files if p.name.startswith(_SPLIT_NAMES)]
    if split_files:
        return [p for p in split_files if p.name.startswith(split)]
    return files


def _cause_chain(e: BaseException) -> list[BaseException]:
    """e and its causes, outermost first: `datasets` wraps parse errors in a generic "An error
    occurred while generating the dataset" that names neither the file nor the problem."""
    chain, seen = [e], {id(e)}
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        chain.append(nxt)
    return [c for c in chain if not isinstance(c, StopIteration)] or chain


def _why(e: BaseException) -> str:
    """The innermost informative cause in one line."""
    import json

    chain = _cause_chain(e)
    for c in chain:
        if isinstance(c, UnicodeDecodeError):
            return f"not UTF-8 text (byte {c.start}: {c.reason})"
        if isinstance(c, json.JSONDecodeError):
            return f"invalid or truncated JSON (line {c.lineno} column {c.colno}: {c.msg})"
    root = chain[-1]
    text = " ".join(str(root).split()) or type(root).__name__
    return f"{type(root).__name__}: {text[:300]}"


def _load_disk(path: Path, split: str):
    import datasets

    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - truncated state.json / .arrow files raise raw errors
        raise DataError(f"{path}: cannot be read as a datasets save_to_disk directory ({_why(e)}); "
                        "save it again (Dataset.save_to_disk)") from None
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f"{path}: no split {split!r} (have {list(obj)})")
        obj = obj[split]
    return obj


def _load_file(path: Path, cache_dir):
    import datasets

    try:
        return datasets.load_dataset(_EXTS[path.suffix], data_files=str(path), split="train",
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:  # a parse error: name the file and the real cause
        raise DataError(f"{path}: cannot be read as {_EXTS[path.suffix]}: {_why(e)}") from None


def load_real_task(task: str, data_dir: str | Path | None = None, *, split: str = "train",
                   style: str = "authors", skip_invalid: bool = False, allow_hub: bool = False,
                   cache_dir: str | Path | None = None) -> tuple[list[dict], int]:
    """Load one real task as validated examples ``{task, instruction, input, output}``.

    Args:
      task: one of ``TASKS``.
      data_dir: directory holding ``<task>/`` or ``<task>.<ext>`` (module doc).
      split: which split's files to read when split-named files exist.
      style: "authors" (data-only prompts, default) or "instruct" (module doc).
      skip_invalid: skip and count bad rows instead of raising.
      allow_hub: fall back to ``datasets.load_dataset(<hub id>)`` (internet or HF cache).
      cache_dir: ``datasets`` cache for the file loaders (default: the HF default).

    Returns:
      (examples, number of skipped rows).
    Raises:
      DataError with what to put where if nothing is found; naming file/row/field if bad.
    """
    _require_task(task)
    sources: list[tuple[str, Any]] = []
    if data_dir is not None:
        base = Path(data_dir)
        task_dir = base / task
        singles = [base / f"{task}{ext}" for ext in _EXTS if (base / f"{task}{ext}").is_file()]
        if task_dir.is_dir():
            if any((task_dir / f).exists() for f in ("dataset_dict.json", "state.json")):
                sources.append((str(task_dir), _load_disk(task_dir, split)))
            else:
                files = _data_files(task_dir, split)
                if not files:
                    raise DataError(_missing_msg(task, data_dir, split)
                                    + f" ({task_dir} has no {split} data files)")
                sources += [(str(f), f) for f in files]
        elif singles:
            sources += [(str(f), f) for f in singles]
    if not sources:
        if not allow_hub:
            raise DataError(_missing_msg(task, data_dir, split))
        import datasets

        name, config = HF_SOURCES[task]
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:
            raise DataError(_missing_msg(task, data_dir, split)
                            + f" Hub load failed: {type(e).__name__}: {e}") from e
        sources.append((f"{name}[{split}]", ds))
    examples, skipped = [], 0
    for name, src in sources:
        rows = _load_file(src, cache_dir) if isinstance(src, Path) else src
        try:
            ex, k = convert_rows(rows, task, source=name, style=style, skip_invalid=skip_invalid)
        except (UnicodeDecodeError, OSError) as e:  # decoded lazily, row by row
            raise DataError(f"{name}: cannot be read: {_why(e)}") from None
        examples += ex
        skipped += k
    return examples, skipped


def load_real_tasks(data_dir: str | Path | None, tasks: Iterable[str] = TASKS,
                    **kwargs) -> dict[str, list[dict]]:
    """``{task: examples}`` for :func:`fedrouter_jax.data.scenarios.build_scenario`'s
    ``source``; keyword arguments go to :func:`load_real_task` (skips are warned there)."""
    return {t: load_real_task(t, data_dir, **kwargs)[0] for t in tasks}
