"""GLUE tasks: layouts of the real files, pairs tokenized as pairs, regression, each task's metric, hub names."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from finetune_ext.data import labelled
from finetune_ext.data import splits as data
from finetune_ext.data.splits import load_splits
from finetune_ext.errors import UserError
from finetune_ext.train import TrainConfig, train
from finetune_ext.train.metrics import _class_metrics, _correlations
from tests.conftest import shared_data

# task -> (rows of train, rows of dev, has a header)
SLICES = {"RTE": (120, 40, True), "MRPC": (120, 40, True), "CoLA": (120, 40, False), "STS-B": (120, 40, True)}


@pytest.fixture(scope="module")
def glue_slices(tmp_path_factory) -> dict[str, Path]:
    """The first rows of each GLUE folder, bytes as they are (MRPC's byte-order mark, CoLA without a header)."""
    out = {}
    for task, (n_train, n_dev, header) in SLICES.items():
        folder = tmp_path_factory.mktemp("glue") / task  # the folder's name tells the task (its metric)
        folder.mkdir()
        for split, n in (("train", n_train), ("dev", n_dev)):
            lines = shared_data(task, f"{split}.tsv").read_bytes().splitlines(keepends=True)
            (folder / f"{split}.tsv").write_bytes(b"".join(lines[: n + header]))
        out[task] = folder
    return out


@pytest.fixture(scope="module")
def gpt2_tok():
    from finetune_ext.train.models import load_tokenizer

    return load_tokenizer(str(shared_data("gpt2-tokenizer")))


def _splits(folder: Path, tokenizer, **kw):
    return load_splits(str(folder), tokenizer, block_size=8, max_length=48, train_samples=None, val_size=20, seed=0,
                       **kw)  # fmt: skip


@pytest.mark.parametrize(
    ("task", "pairs", "kind", "labels", "metric"),
    [
        ("RTE", 2, "classification", ["entailment", "not_entailment"], "acc"),
        ("MRPC", 2, "classification", ["0", "1"], "f1"),
        ("CoLA", 1, "classification", ["0", "1"], "mcc"),
        ("STS-B", 2, "regression", [], "pearson"),
    ],
)
def test_real_glue_files_are_read_by_their_layout(glue_slices, gpt2_tok, task, pairs, kind, labels, metric) -> None:
    examples = labelled.read(str(glue_slices[task]), None, None)
    n_train, n_dev, _ = SLICES[task]
    assert len(examples["train"]) == n_train and len(examples["test"]) == n_dev
    assert all(len(e.texts) == pairs and all(e.texts) for e in examples["train"])
    splits = _splits(glue_slices[task], gpt2_tok)
    assert (splits.task, splits.label_names, splits.main_metric) == (kind, labels, metric)
    assert len(splits.val["labels"]) == 20 and len(splits.train["labels"]) == n_train - 20
    first_dev = examples["test"][0]
    if kind == "regression":
        assert splits.num_labels == 1 and splits.test["labels"].dtype == torch.float32
        assert splits.test["labels"][0].item() == pytest.approx(float(first_dev.label))
    else:
        assert splits.test["labels"][0].item() == labels.index(first_dev.label)


def test_cola_and_mrpc_first_rows(glue_slices) -> None:
    cola = labelled.read(str(glue_slices["CoLA"]), None, None)["train"][0]
    assert cola.texts == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert cola.label == "1" and cola.where.endswith("train.tsv:1 column 2")
    mrpc = labelled.read(str(glue_slices["MRPC"]), None, None)["train"][0]  # after the byte-order mark
    assert mrpc.label == "1" and mrpc.texts[0].startswith("Amrozi accused his brother")
    assert mrpc.where.endswith("train.tsv:2 column 'Quality'")


def test_pairs_are_tokenized_as_pairs(glue_slices, bert_tokenizer) -> None:
    tok = AutoTokenizer.from_pretrained(bert_tokenizer)
    splits = _splits(glue_slices["RTE"], tok)
    example = labelled.read(str(glue_slices["RTE"]), None, None)["test"][0]
    expected = tok(*example.texts, padding="max_length", truncation=True, max_length=48)
    assert splits.test["input_ids"][0].tolist() == expected["input_ids"]
    assert splits.test["token_type_ids"][0].tolist() == expected["token_type_ids"]
    assert 1 in expected["token_type_ids"]  # the second sentence is a segment of its own


def test_columns_and_kind_can_be_given(tmp_path, gpt2_tok) -> None:
    rows = "id\tleft\tright\tscore\n" + "".join(f"{i}\tleft {i}\tright {i}\t{i % 3}\n" for i in range(30))
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text(rows)
    with pytest.raises(UserError, match=r"train.tsv:1: cannot tell the text and label columns .*--text-columns"):
        _splits(tmp_path, gpt2_tok)
    given = dict(text_columns=["left", "right"], label_column="score")
    assert _splits(tmp_path, gpt2_tok, **given).task == "classification"  # integer labels: classes 0..2
    reg = _splits(tmp_path, gpt2_tok, **given, task="regression")
    assert reg.task == "regression" and reg.main_metric == "pearson" and reg.train["labels"].dtype == torch.float32
    with pytest.raises(UserError, match=r"train.tsv:1 has no column 'middle'; its header is"):
        _splits(tmp_path, gpt2_tok, text_columns=["middle"], label_column="score")
    with pytest.raises(UserError, match="text_columns, label_column: give both"):
        _splits(tmp_path, gpt2_tok, label_column="score")
    (tmp_path / "dev.tsv").write_text("id\tleft\tright\tscore\n0\ta\tb\tfive\n")
    with pytest.raises(UserError, match=r"dev.tsv:2 column 'score' has label 'five', expected a number"):
        _splits(tmp_path, gpt2_tok, **given, task="regression")


def test_metrics_match_their_formulas() -> None:
    target = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 1])
    pred = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    tp, tn = np.sum((pred == 1) & (target == 1)), np.sum((pred == 0) & (target == 0))
    fp, fn = np.sum((pred == 1) & (target == 0)), np.sum((pred == 0) & (target == 1))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    got = _class_metrics(pred, target, binary=True)
    assert got["mcc"] == pytest.approx(mcc) and got["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert "f1" not in _class_metrics(pred, target, binary=False)
    scores, guesses = np.array([0.0, 1.2, 2.5, 3.1, 4.8, 5.0]), np.array([0.3, 0.9, 3.0, 2.9, 4.0, 4.4])
    ranks = lambda a: np.argsort(np.argsort(a))  # noqa: E731  (no ties here)
    corr = _correlations(guesses, scores)
    assert corr["pearson"] == pytest.approx(np.corrcoef(guesses, scores)[0, 1])
    assert corr["spearman"] == pytest.approx(np.corrcoef(ranks(guesses), ranks(scores))[0, 1])
    assert _correlations(np.ones(6), scores) == {"pearson": 0.0, "spearman": 0.0}  # a constant prediction


@pytest.mark.parametrize(("task", "metric", "reported"), [("STS-B", "pearson", {"pearson", "spearman"}),
                                                          ("MRPC", "f1", {"acc", "mcc", "f1"})])  # fmt: skip
def test_trains_and_selects_by_the_task_metric(tmp_path, glue_slices, gpt2_tokenizer, task, metric, reported):
    out = tmp_path / "run"
    cfg = TrainConfig(model="config:bert-tiny", tokenizer=gpt2_tokenizer, data=str(glue_slices[task]),
                      output_dir=str(out), steps=6, batch_size=8, lr=1e-3, max_length=48, val_size=20, eval_every=3,
                      eval_batch_size=20, progress=False)  # fmt: skip
    summary = train(cfg)
    val = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    assert [r["step"] for r in val] == [3, 6] and all(reported <= r.keys() for r in val)
    best = max(val, key=lambda r: (r[metric], -r["step"]))
    assert summary["best_val"] == {"metric": metric, "value": best[metric], "step": best["step"]}
    assert reported <= summary["test"].keys() and math.isfinite(summary["test"]["loss"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError, match=r"select_metric: acc is not reported for regression"):
        train(TrainConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "other"), "select_metric": "acc",
                             "data": str(glue_slices["STS-B"])}))  # fmt: skip


def test_hub_names_read_glue_through_datasets(monkeypatch, gpt2_tok) -> None:
    rows = {"sentence1": ["a cat sits", "a dog runs", "birds fly"], "sentence2": ["a cat", "dogs", "a bird"]}
    fake = {split: {**rows, "label": [4.2, 1.0, 2.5]} for split in ("train", "validation")}
    monkeypatch.setattr(labelled, "load_hub", lambda name, spec: fake if spec == ("glue", "stsb") else None)
    splits = load_splits("glue/stsb", gpt2_tok, block_size=8, max_length=16, train_samples=None, val_size=1, seed=0)
    assert (splits.task, splits.main_metric, len(splits.train["labels"])) == ("regression", "pearson", 2)
    assert sorted(splits.test["labels"].tolist()) == pytest.approx([1.0, 2.5, 4.2])
    assert data.detect_source("glue/rte") == "labelled" and "glue/cola" in labelled.HUB
