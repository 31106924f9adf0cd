"""Evaluation, the ``metrics.jsonl`` log and the ``curves.png`` plot."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finetune_ext.data.splits import make_batch
from finetune_ext.errors import RunWarning, UserError
from finetune_ext.parts import Dist


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: dict[str, torch.Tensor],
    task: str,
    *,
    num_labels: int = 0,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    ddp: Dist,
    autocast: Callable[[], Any],
) -> dict[str, float]:
    """The metrics of ``task`` (``lm``, ``classification``, ``regression``) on ``split``.

    ``lm``: mean NLL over every predicted token, accuracy, perplexity. ``classification``: mean NLL, accuracy,
    Matthews correlation and, with two classes, F1 of class 1. ``regression``: mean squared error as the loss,
    Pearson and Spearman correlation. Each process evaluates every ``world``-th batch; the predictions are
    gathered, so every process returns the same numbers.
    """
    was_training = model.training
    model.eval()
    n = len(split["input_ids"])
    starts = list(range(0, n, batch_size))[:max_batches]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, count, correct
    predictions, targets = [], []  # labelled data only: its correlations need every prediction
    mine = starts[ddp.rank :: ddp.world]
    if ddp.sharded:  # every forward gathers weights with the other processes: run as many as rank 0, unscored
        _idle_forwards(model, make_batch(split, torch.arange(0, min(batch_size, n)), task, device),
                       len(starts[:: ddp.world]) - len(mine), autocast)  # fmt: skip
    for start in mine:
        batch = make_batch(split, torch.arange(start, min(start + batch_size, n)), task,
                           device)  # fmt: skip
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if task == "lm":
            logits, labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        if task == "regression":
            sums[0] += F.mse_loss(logits.view(-1), labels, reduction="sum").double()
            pred = logits.view(-1)
        else:
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            pred = logits.argmax(-1)
            sums[2] += (pred == labels).sum().double()
        sums[1] += labels.numel()
        if task != "lm":
            predictions.append(pred)
            targets.append(labels)
    if ddp.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    out = {"loss": float(sums[0] / sums[1])}
    if task != "regression":
        out["acc"] = float(sums[2] / sums[1])
    if task == "lm":
        return out | {"ppl": math.exp(min(out["loss"], 700.0))}
    pred, target = _gathered(predictions, targets, ddp)
    if task == "regression":
        return out | _correlations(pred.double().numpy(), target.double().numpy())
    return out | _class_metrics(pred.numpy(), target.numpy(), binary=num_labels == 2)


@torch.no_grad()
def _idle_forwards(model: nn.Module, batch: dict[str, torch.Tensor], count: int, autocast: Callable[[], Any]) -> None:
    batch = {k: v for k, v in batch.items() if k != "labels"}
    for _ in range(count):
        with autocast():
            model(**batch)


def _gathered(predictions: list[torch.Tensor], targets: list[torch.Tensor], ddp: Dist):
    """Every process's predictions and targets, on the CPU of every process (one copy from the device)."""
    mine = (torch.cat(predictions).cpu(), torch.cat(targets).cpu()) if predictions else None
    if ddp.world == 1:
        return mine
    parts: list = [None] * ddp.world
    dist.all_gather_object(parts, mine)
    parts = [p for p in parts if p is not None]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _class_metrics(pred, target, binary: bool) -> dict[str, float]:
    """Matthews correlation (any number of classes), the share of the most often predicted class (1.0: the
    model predicts one class everywhere) and, for two classes, F1 of class 1 (GLUE's)."""
    import numpy as np
    from sklearn.metrics import f1_score, matthews_corrcoef

    top = float(np.bincount(pred).max() / len(pred)) if len(pred) else 0.0
    out = {"mcc": float(matthews_corrcoef(target, pred)), "top_class_frac": top}
    if binary:
        out["f1"] = float(f1_score(target, pred, zero_division=0.0))
    return out


def _correlations(pred, target) -> dict[str, float]:
    """Pearson and Spearman correlation of predictions and scores (0 where either side is constant)."""
    from scipy.stats import pearsonr, spearmanr

    if pred.std() == 0 or target.std() == 0:
        return {"pearson": 0.0, "spearman": 0.0}
    return {"pearson": float(pearsonr(pred, target)[0]), "spearman": float(spearmanr(pred, target)[0])}


class MetricsLog:
    """``metrics.jsonl`` on rank 0; on resume, entries after the checkpoint's step are dropped, and so is a
    line torn by a kill during its write (with a warning)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []
        if not enabled:
            return
        if resume_step is not None and path.exists():
            self.records = [r for r in _read_records(path) if r["step"] <= resume_step]
        # Rewritten beside and renamed over: a kill during the rewrite must not lose the kept records.
        tmp = path.with_name(path.name + ".tmp")
        self._write("".join(json.dumps(r) + "\n" for r in self.records), "w", tmp)
        os.replace(tmp, path)

    def log(self, record: dict) -> None:
        if self.enabled:
            self.records.append(record)
            self._write(json.dumps(record) + "\n", "a")

    def _write(self, text: str, mode: str, path: Path | None = None) -> None:
        path = path or self.path
        try:
            with path.open(mode) as f:
                f.write(text)
        except OSError as err:
            raise UserError(f"metrics: cannot write {path} ({err.strerror or err})") from None


def _read_records(path: Path) -> list[dict]:
    records, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            torn += 1
    if torn:
        warnings.warn(f"metrics: dropped {torn} unreadable line(s) of {path} (a run killed while writing?)",
                      RunWarning, stacklevel=3)  # fmt: skip
    return records


QUALITY = ("acc", "f1", "mcc", "pearson", "spearman")  # validation metrics drawn beside the loss


def plot_curves(records: list[dict], path: Path) -> None:
    """Train and validation loss against the step and, beside it, the validation metrics, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val = [r for r in records if r["split"] == "val"]
    shown = [m for m in QUALITY if any(m in r for r in val)]
    fig, axes = plt.subplots(1, 2 if shown else 1, figsize=(11 if shown else 6.4, 4.0), squeeze=False)
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        if pts:
            axes[0, 0].plot(*zip(*pts, strict=True), style, label=split, ms=3)
    axes[0, 0].set(xlabel="step", ylabel="loss")
    axes[0, 0].legend()
    for metric in shown:
        pts = [(r["step"], r[metric]) for r in val if metric in r]
        axes[0, 1].plot(*zip(*pts, strict=True), "o-", label=metric, ms=3)
    if shown:
        axes[0, 1].set(xlabel="step", ylabel="validation metric")
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_lift(records: list[dict], path: Path) -> None:
    """LiFT's rounds from the metrics log, as PNG: each block's λ and the validation loss after the LP step.
    Nothing is drawn for a run without LiFT rounds."""
    rounds = [r for r in records if "lift_round" in r]
    if not rounds:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    blocks = sorted(
        {k for r in rounds for k in r if k.startswith("lift_lambda_")}, key=lambda k: int(k.rsplit("_", 1)[1])
    )
    for key in blocks:
        ax1.plot([r["lift_round"] for r in rounds], [r[key] for r in rounds], "o-", ms=3, label=f"block {key[12:]}")
    ax1.set(xlabel="round", ylabel="λ")
    ax1.legend()
    moved = [(r["lift_round"], r["lift_val_after"]) for r in rounds if "lift_val_after" in r]
    if moved:
        ax2.plot(*zip(*moved, strict=True), "o-", ms=3)
    ax2.set(xlabel="round", ylabel="validation loss after the LP step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
