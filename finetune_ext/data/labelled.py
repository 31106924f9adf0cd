"""Labelled sentences and sentence pairs in GLUE's layout: classification and regression data for the trainer.

A folder holds ``train.tsv`` and ``dev.tsv``; GLUE's test labels are hidden, so ``dev`` is the reported test split.
Text and label columns are found from the header (``LAYOUTS``: SST-2, RTE, MRPC, STS-B, QNLI, QQP, WNLI, MNLI) or
given (``text_columns``, ``label_column``); CoLA's files have no header (source, label, original label, sentence).
The task follows from the training labels: integers are classes 0..K-1, other words are class names (sorted, so
RTE's ``entailment`` is 0 as on the hub), real numbers make a regression (one output, MSE); ``task``
overrides it. Hub names (``glue/rte``, ...) load through ``datasets``. Every format error names file, line and
column. ``main_metric`` is the task's GLUE metric: Matthews correlation for CoLA, F1 for MRPC and QQP, Pearson for
STS-B, accuracy otherwise.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from finetune_ext.data.sources import load_hub, read_text
from finetune_ext.data.token_cache import cached
from finetune_ext.errors import UserError

# (text columns, label column) as GLUE's files name them, tried in order against a header.
LAYOUTS = [
    (("#1 String", "#2 String"), "Quality"),  # MRPC
    (("sentence1", "sentence2"), "score"),  # STS-B
    (("sentence1", "sentence2"), "gold_label"),  # MNLI
    (("sentence1", "sentence2"), "label"),  # RTE, WNLI
    (("question1", "question2"), "is_duplicate"),  # QQP
    (("question", "sentence"), "label"),  # QNLI
    (("sentence",), "label"),  # SST-2
]
COLA_COLUMNS = ((3,), 1)  # CoLA has no header: source, label, original label, sentence
# Hub names -> (dataset, config, text columns, label column); their "validation" split is the reported test split.
HUB = {
    "sst2": ("glue", "sst2", ("sentence",), "label"),
    **{f"glue/{c}": ("glue", c, cols, "label") for c, cols in [
        ("sst2", ("sentence",)), ("cola", ("sentence",)), ("rte", ("sentence1", "sentence2")),
        ("mrpc", ("sentence1", "sentence2")), ("stsb", ("sentence1", "sentence2")),
        ("qnli", ("question", "sentence")), ("qqp", ("question1", "question2")), ("wnli", ("sentence1", "sentence2")),
    ]},
}  # fmt: skip
MAIN_METRIC = {"cola": "mcc", "mrpc": "f1", "qqp": "f1", "stsb": "pearson", "sts-b": "pearson"}
TASKS = ("auto", "classification", "regression")
METRICS = {"classification": ("loss", "acc", "mcc", "f1"), "regression": ("loss", "pearson", "spearman")}


@dataclass
class Example:
    texts: tuple[str, ...]
    label: str  # as written; converted once the task is known
    where: str  # "<file>:<line> column <label column>" for error messages


@dataclass
class Table:
    """Encoded splits of a labelled task: tensors per split, the task, the label names, the main metric."""

    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    task: str
    labels: list[str]  # class names by id (empty for regression)
    main_metric: str

    @property
    def num_labels(self) -> int:
        return 1 if self.task == "regression" else len(self.labels)


def is_labelled(data: str) -> bool:
    return data in HUB or (Path(data).expanduser() / "train.tsv").is_file()


def read(data: str, text_columns: list[str] | None, label_column: str | None) -> dict[str, list[Example]]:
    """The ``train`` and ``test`` examples of a folder or hub name."""
    if data in HUB:
        return _hub_examples(data)
    path = Path(data).expanduser()
    return {"train": _read_tsv(path / "train.tsv", text_columns, label_column),
            "test": _read_tsv(path / "dev.tsv", text_columns, label_column)}  # fmt: skip


def task_name(data: str) -> str:
    return HUB[data][1] if data in HUB else Path(data).expanduser().resolve().name.lower()


def _hub_examples(name: str) -> dict[str, list[Example]]:

    dataset, config, columns, label = HUB[name]
    ds = load_hub(name, (dataset, config))

    def examples(split: str) -> list[Example]:
        rows = zip(*(ds[split][c] for c in columns), ds[split][label], strict=True)
        return [Example(tuple(r[:-1]), str(r[-1]), f"{name} {split} row {i}") for i, r in enumerate(rows)]

    return {"train": examples("train"), "test": examples("validation")}


def _read_tsv(file: Path, text_columns: list[str] | None, label_column: str | None) -> list[Example]:

    if not file.exists():
        raise UserError(f"data: missing {file} (a labelled-data folder needs train.tsv and dev.tsv)")
    text = read_text(file).removeprefix("\ufeff")  # MRPC's files start with a byte-order mark
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        rows = list(reader)
    except csv.Error as err:
        raise UserError(f"data: {file}:{reader.line_num}: {err}") from None
    if not rows:
        raise UserError(f"data: {file} is empty")
    (texts, label), first = _columns(file, rows[0], text_columns, label_column)
    width, column = len(rows[0]), repr(rows[0][label]) if first else str(label + 1)
    examples = []
    for line, row in enumerate(rows[first:], start=first + 1):
        if len(row) != width:
            raise UserError(f"data: {file}:{line} has {len(row)} fields, expected {width} (tab-separated, unquoted)")
        examples.append(Example(tuple(row[i] for i in texts), row[label], f"{file}:{line} column {column}"))
    if not examples:
        raise UserError(f"data: {file} has no rows")
    return examples


def _columns(
    file: Path, header: list[str], text_columns: list[str] | None, label_column: str | None
) -> tuple[tuple[tuple[int, ...], int], int]:
    """Indices of the text and label columns, and the index of the first data row."""
    if text_columns or label_column:
        if not (text_columns and label_column):
            raise UserError("text_columns, label_column: give both (or neither, to detect them from the header)")
        for name in (*text_columns, label_column):
            if name not in header:
                raise UserError(f"data: {file}:1 has no column {name!r}; its header is {header}")
        return (tuple(header.index(c) for c in text_columns), header.index(label_column)), 1
    for texts, label in LAYOUTS:
        if all(c in header for c in (*texts, label)):
            return (tuple(header.index(c) for c in texts), header.index(label)), 1
    if len(header) == 4 and header[1] in ("0", "1"):
        return COLA_COLUMNS, 0
    raise UserError(
        f"data: {file}:1: cannot tell the text and label columns from the header {header}; "
        "pass --text-columns and --label-column"
    )


def encode(
    splits: dict[str, list[Example]],
    every: list[Example],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    task: str,
    data: str,
) -> Table:
    """Tokenize ``splits`` (train, val, test; pairs as pairs) and convert their labels by the task and class
    names that ``every`` training example gives (``task="auto"``: detected)."""
    if task == "auto":
        task = _detect_task(every)
    names = _class_names(every) if task == "classification" else []
    convert = (lambda e: _class_id(e, names)) if task == "classification" else _real
    metric = MAIN_METRIC.get(task_name(data), "acc" if task == "classification" else "pearson")
    if metric == "f1" and len(names) != 2:
        metric = "acc"

    def split(rows: list[Example]) -> dict[str, torch.Tensor]:
        columns = list(zip(*(e.texts for e in rows), strict=True))
        texts = (text for e in rows for text in e.texts)
        sides = f"padding_side={tokenizer.padding_side} truncation_side={tokenizer.truncation_side}"
        enc = cached(tokenizer, texts, f"columns={len(columns)} max_length={max_length} {sides}",
                     lambda: dict(tokenizer(*columns, padding="max_length", truncation=True, max_length=max_length,
                                            return_tensors="pt")))  # fmt: skip
        dtype = torch.float32 if task == "regression" else torch.long
        out = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        return out | {"labels": torch.tensor([convert(e) for e in rows], dtype=dtype)}

    return Table(split(splits["train"]), split(splits["val"]), split(splits["test"]), task, names, metric)


def _detect_task(every: list[Example]) -> str:
    """``regression`` when the labels are real numbers, ``classification`` when they are integers or words; a
    column of real numbers with a word among them is an error naming that cell, not hundreds of classes."""
    words = [e for e in every if not _parses(e.label, float)]
    fractional = any(not _parses(e.label, int) for e in every if _parses(e.label, float))
    if fractional and words:
        raise UserError(
            f"data: {words[0].where} has label {words[0].label!r} among real-valued labels; fix it, or pass "
            "--task classification to treat every label as a class name"
        )
    return "regression" if fractional else "classification"


def _parses(text: str, convert: type) -> bool:
    """Whether ``convert(text)`` (``int`` or ``float``) accepts the label."""
    try:
        convert(text)
    except ValueError:
        return False
    return True


def _real(example: Example) -> float:
    try:
        return float(example.label)
    except ValueError:
        raise UserError(f"data: {example.where} has label {example.label!r}, expected a number (regression)") from None


def _class_names(train: list[Example]) -> list[str]:
    found = {e.label for e in train}
    if all(_parses(label, int) for label in found):
        ids = sorted(int(label) for label in found)
        if ids != list(range(len(ids))):
            raise UserError(f"data: integer labels must be 0..K-1, got {ids[:10]}")
        return [str(i) for i in ids]
    return sorted(found)


def _class_id(example: Example, names: list[str]) -> int:
    label = str(int(example.label)) if _parses(example.label, int) else example.label
    if label not in names:
        known = ", ".join(names)
        raise UserError(f"data: {example.where} has label {example.label}, which the training set lacks ({known})")
    return names.index(label)
