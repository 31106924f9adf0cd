"""Data: language-modelling blocks and labelled examples, from the hub or local files.

Language modelling: ``train/valid/test`` text (a folder of ``train.txt``, ``valid.txt``, ``test.txt`` or the
hub's WikiText-2) is tokenized line by line, concatenated and cut into ``block_size`` blocks; the validation
split selects models, the test split is reported. Labelled data (classification and regression, single sentences
and pairs, GLUE's layout: ``train/labelled.py``): ``dev`` is the reported test split and a seeded held-out slice of
train is the validation split. Token ids are cached on disk (``train/token_cache.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from finetune_ext.data import labelled
from finetune_ext.data.sources import HUB_LM, lm_texts, tokenize_lines
from finetune_ext.data.token_cache import cached
from finetune_ext.errors import UserError


@dataclass
class Splits:
    """Tensors per split: ``input_ids`` (and ``attention_mask``, ``labels``, maybe ``token_type_ids`` for labelled
    data). ``task``: ``lm``, ``classification`` or ``regression``; ``metrics``: what evaluation reports."""

    task: str
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    num_labels: int = 0  # 1 for regression
    main_metric: str = "loss"
    label_names: list[str] = dataclasses.field(default_factory=list)

    @property
    def metrics(self) -> tuple[str, ...]:
        if self.task == "lm":
            return ("loss", "acc", "ppl")
        return labelled.METRICS[self.task] if self.num_labels <= 2 else ("loss", "acc", "mcc")


def detect_source(data: str) -> str:
    """``text`` (language modelling) or ``labelled`` (classification or regression), from a hub name or a
    folder's files; a ``UserError`` for anything else."""
    if data in HUB_LM:
        return "text"
    if data in labelled.HUB:
        return "labelled"
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"data: no such file or folder {data!r} (hub names: {sorted(HUB_LM) + sorted(labelled.HUB)})")
    if labelled.is_labelled(data):
        return "labelled"
    if path.is_dir() and (path / "train.txt").exists():
        return "text"
    raise UserError(f"data: {data!r} has neither train.txt (language modelling) nor train.tsv (labelled examples)")


def load_splits(
    data: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    block_size: int,
    max_length: int,
    train_samples: int | float | None,
    val_size: int | float,
    seed: int,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    task: str = "auto",
    progress: bool = False,
) -> Splits:
    """Tokenized splits. ``train_samples``: an integer count (>= 1) or a fraction in (0, 1] of the training
    set, seeded. Labelled data: ``text_columns``/``label_column`` override the header's,
    ``task`` (``auto``, ``classification``, ``regression``) the task.
    ``progress``: a progress bar while language-modelling text is tokenized (not when the cache has it)."""
    if detect_source(data) == "text":
        texts = lm_texts(data)
        splits = {name: _blocks(tokenizer, lines, block_size, name, progress) for name, lines in texts.items()}
        train = _subset(splits["train"], train_samples, seed)
        return Splits("lm", train, splits["valid"], splits["test"])
    examples = labelled.read(data, text_columns, label_column)
    train_rows, val_rows = hold_out(examples["train"], val_size, seed)
    train_rows = _subset_rows(train_rows, train_samples, seed)
    splits = {"train": train_rows, "val": val_rows, "test": examples["test"]}
    t = labelled.encode(splits, examples["train"], tokenizer, max_length, task, data)
    return Splits(t.task, t.train, t.val, t.test, t.num_labels, t.main_metric, t.labels)


def _blocks(tokenizer: PreTrainedTokenizerBase, lines: list[str], block_size: int, split: str, progress: bool) -> dict:
    lines = [line for line in lines if line.strip()]
    desc = f"tokenize {split}" if progress else None
    ids = cached(tokenizer, lines, "lm", lambda: {"ids": torch.tensor(tokenize_lines(tokenizer, lines, desc))})["ids"]
    n = len(ids) // block_size
    if n == 0:
        raise UserError(f"data: the {split} split has {len(ids)} tokens, fewer than one block of {block_size}")
    return {"input_ids": ids[: n * block_size].view(n, block_size)}


def check_amount(amount: int | float | None, what: str) -> None:
    """``amount`` is ``None``, an integer count >= 1 or a fraction in (0, 1]; a ``UserError`` names ``what``."""
    if amount is None:
        return
    fraction = isinstance(amount, float) and 0 < amount <= 1
    count = (isinstance(amount, int) or (isinstance(amount, float) and amount.is_integer())) and amount >= 1
    if isinstance(amount, bool) or not (fraction or count):
        raise UserError(f"{what}: expected an integer count >= 1 or a fraction in (0, 1], got {amount}")


def count_examples(n: int, amount: int | float | None, what: str) -> int:
    """Examples meant by ``amount``: an integer count >= 1, or a fraction in (0, 1] (``1`` is one, ``1.0`` all)."""
    if amount is None:
        return n
    check_amount(amount, what)
    fraction = isinstance(amount, float) and 0 < amount <= 1
    k = round(amount * n) if fraction else int(amount)
    if k > n:
        raise UserError(f"{what}: asked for {k} examples, the training set has {n}")
    return max(k, 1)


def _subset(split: dict[str, torch.Tensor], amount: int | float | None, seed: int) -> dict[str, torch.Tensor]:
    n = len(split["input_ids"])
    k = count_examples(n, amount, "train_samples")
    if k == n:
        return split
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    return {key: value[idx] for key, value in split.items()}


def _subset_rows(rows: list, amount: int | float | None, seed: int) -> list:
    k = count_examples(len(rows), amount, "train_samples")
    idx = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:k]
    return [rows[i] for i in idx.tolist()]


def hold_out(rows: list, val_size: int | float, seed: int) -> tuple[list, list]:
    """Split off a seeded validation slice (a count or a fraction, as ``count_examples``) before any subsetting."""
    k = count_examples(len(rows), val_size, "val_size")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed + 1)).tolist()
    return [rows[i] for i in perm[k:]], [rows[i] for i in perm[:k]]


class Stream:
    """Training examples in a seeded order, epoch after epoch: step k takes examples [k*B, (k+1)*B).

    The order depends only on (seed, epoch), so the data position is the step number and resuming at
    step k reads exactly what an uninterrupted run reads.
    """

    def __init__(self, n: int, batch: int, seed: int) -> None:
        self.n, self.batch, self.seed = n, batch, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch, (step + 1) * self.batch)
        epochs, offsets = pos // self.n, pos % self.n
        return torch.stack([self._perm(int(e))[int(o)] for e, o in zip(epochs, offsets, strict=True)])


def make_batch(split: dict[str, torch.Tensor], idx: torch.Tensor, task: str, device: torch.device) -> dict:
    """The examples ``idx`` of ``split`` on ``device``, with ``labels`` (the inputs themselves for LM).

    Labelled examples are stored padded to ``max_length``; with right padding a batch ends at its longest example
    (SST-2's sentences fill about a fifth of 128), so no step computes on padding alone. Left padding is kept:
    cutting it would move the tokens' positions in models that count them from the left (GPT-2)."""
    columns = slice(None)
    if task != "lm" and "attention_mask" in split:
        used = split["attention_mask"][idx].any(0).int()
        columns = slice(0, int(used.cumsum(0).argmax()) + 1)  # through the last used position (one if none is)
    width = split["input_ids"].shape[-1]
    batch = {
        k: (v[idx, columns] if v.dim() == 2 and v.shape[1] == width else v[idx]).to(device, non_blocking=True)
        for k, v in split.items()
    }
    if task == "lm":
        batch["labels"] = batch["input_ids"]
    return batch


def micro_batches(
    split: dict[str, torch.Tensor],
    idx: torch.Tensor,
    task: str,
    device: torch.device,
    accum: int,
    rank: int,
    world: int,
) -> list[dict]:
    """This process's share of a step's examples ``idx``: ``accum`` micro-batches, each split across ranks."""
    micro = len(idx) // accum
    per_rank = micro // world
    return [make_batch(split, idx[m * micro + rank * per_rank :][:per_rank], task, device) for m in range(accum)]
