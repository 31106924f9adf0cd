"""Evaluation, the ``metrics.jsonl`` log and the ``curves.png`` plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finetune_ext.train.data import make_batch
from finetune_ext.train.distributed import Dist


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
    """``metrics.jsonl`` on rank 0; on resume, entries after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict] = []
        if enabled and resume_step is not None and path.exists():
            lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            self.records = [r for r in lines if r["step"] <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in self.records))
        elif enabled:
            path.write_text("")

    def log(self, record: dict) -> None:
        if self.enabled:
            self.records.append(record)
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


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
