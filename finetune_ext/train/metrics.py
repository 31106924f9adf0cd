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

from finetune_ext.train.data import make_batch
from finetune_ext.train.distributed import Dist
from finetune_ext.train.errors import RunWarning, UserError


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: dict[str, torch.Tensor],
    task: str,
    *,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    ddp: Dist,
    autocast: Callable[[], Any],
) -> dict[str, float]:
    """Mean NLL over every predicted token (LM) or example (classification), accuracy, perplexity (LM).

    Each process evaluates every ``world``-th batch; the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    n = len(split["input_ids"])
    starts = list(range(0, n, batch_size))[:max_batches]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, count, correct
    for start in starts[ddp.rank :: ddp.world]:
        batch = make_batch(split, torch.arange(start, min(start + batch_size, n)), task, device)
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        if task == "lm":
            logits, labels = logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)
        sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
        sums[1] += labels.numel()
        sums[2] += (logits.argmax(-1) == labels).sum().double()
    if ddp.world > 1:
        dist.all_reduce(sums)
    model.train(was_training)
    loss = float(sums[0] / sums[1])
    out = {"loss": loss, "acc": float(sums[2] / sums[1])}
    if task == "lm":
        out["ppl"] = math.exp(min(loss, 700.0))
    return out


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


def plot_curves(records: list[dict], path: Path) -> None:
    """Train and validation loss against the step, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = [(r["step"], r["loss"]) for r in records if r["split"] == split]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=split, ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
