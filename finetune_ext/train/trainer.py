"""The training loop: one readable recipe from config to summary.

``train(TrainConfig(...))`` builds the tokenizer, data and model, runs the chosen method for ``steps``
optimizer steps with evaluation every ``eval_every`` steps and checkpoints every ``save_every`` steps, and
writes ``metrics.jsonl``, ``curves.png`` and ``summary.json`` into ``output_dir``. Under ``torchrun`` it
runs data-parallel (gloo on CPU, NCCL on GPUs) with the same global batch, hence the same result, as one
process. The model reported on the test split is the one with the best validation ``select_metric``
(loss for language modelling, accuracy for classification); the final model's test metrics are reported
too. ``batch_size`` is the global number of sequences per optimizer step; it is split into
``grad_accum`` micro-batches and each micro-batch across the processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from finetune_ext import guided  # noqa: F401  (registers the guided-dropout methods)
from finetune_ext.adapters import method as _adapter_methods  # noqa: F401  (registers linchain, lora)
from finetune_ext.optim import method as _optim_methods  # noqa: F401  (registers armijo)
from finetune_ext.train import checkpoint
from finetune_ext.train.data import Splits, detect_task, load_splits
from finetune_ext.train.errors import UserError
from finetune_ext.train.methods import METHODS, MethodConfig, RunInfo, StepContext
from finetune_ext.train.models import check_model_spec, load_model, load_tokenizer, max_positions, param_count

# Fields that must match when resuming: changing them would not continue the same run.
RESUME_KEYS = ("model", "data", "tokenizer", "method", "method_options", "seed", "steps", "batch_size", "train_samples",
               "block_size")  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI's options map one to one onto these fields."""

    model: str
    data: str
    output_dir: str = "runs/run"
    tokenizer: str | None = None
    method: str = "adamw"
    seed: int = 0
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    block_size: int = 128
    max_length: int = 128
    train_samples: float | None = None
    val_size: float = 0.1
    eval_every: int = 50
    eval_batch_size: int = 32
    max_eval_batches: int | None = None
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    bf16: bool = False
    device: str = "auto"
    select_metric: str | None = None
    progress: bool = True
    method_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _init_distributed(device_arg: str) -> tuple[_Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if device_arg not in ("auto", "cpu", "cuda"):
        raise UserError(f"device: expected auto, cpu or cuda, got {device_arg!r}")
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but no CUDA device is available")
    if world == 1:
        return _Dist(), torch.device("cuda" if use_cuda else "cpu")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return _Dist(rank, world, local), torch.device(f"cuda:{local}" if use_cuda else "cpu")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_config(cfg: TrainConfig, world: int) -> None:
    if cfg.method not in METHODS:
        raise UserError(f"method: unknown {cfg.method!r}; available: {sorted(METHODS)}")
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "eval_batch_size", "block_size"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: expected an integer >= 1, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise UserError(f"lr: expected > 0, got {cfg.lr}")
    if cfg.batch_size % (cfg.grad_accum * world):
        raise UserError(
            f"batch_size: {cfg.batch_size} must be divisible by grad_accum x processes = {cfg.grad_accum} x {world}"
        )


class _Stream:
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


def _batch(split: dict[str, torch.Tensor], idx: torch.Tensor, task: str, device: torch.device) -> dict:
    batch = {k: v[idx].to(device, non_blocking=True) for k, v in split.items()}
    if task == "lm":
        batch["labels"] = batch["input_ids"]
    return batch


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: dict[str, torch.Tensor],
    task: str,
    cfg: TrainConfig,
    device: torch.device,
    ddp: _Dist,
    autocast,
) -> dict[str, float]:
    """Mean NLL over every predicted token (LM) or example (classification), accuracy, perplexity (LM).

    Each process evaluates every ``world``-th batch; the sums are all-reduced.
    """
    was_training = model.training
    model.eval()
    n = len(split["input_ids"])
    starts = list(range(0, n, cfg.eval_batch_size))
    if cfg.max_eval_batches is not None:
        starts = starts[: cfg.max_eval_batches]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nll, count, correct
    for start in starts[ddp.rank :: ddp.world]:
        idx = torch.arange(start, min(start + cfg.eval_batch_size, n))
        batch = _batch(split, idx, task, device)
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


class _MetricsLog:
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


class _Interrupt:
    """Defers SIGINT/SIGTERM to the end of the current step, so a checkpoint can be written there.

    A second signal interrupts at once. Under DDP the flag is all-reduced every step so that all
    processes stop after the same step.
    """

    def __init__(self, ddp: _Dist, device: torch.device) -> None:
        self.ddp, self.device, self.requested, self.previous = ddp, device, False, {}

    def __enter__(self) -> _Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = True

    def stop_now(self) -> bool:
        if self.ddp.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *_: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the summary that is also written to summary.json."""
    ddp, device = _init_distributed(cfg.device)
    _check_config(cfg, ddp.world)
    out = Path(cfg.output_dir)
    found = checkpoint.latest(out) if out.exists() else None
    if cfg.resume and found is None:
        raise UserError(f"resume: no checkpoint in {out}")
    if not cfg.resume and found is not None and not cfg.overwrite:
        raise UserError(f"output_dir: {out} already holds checkpoints; pass --resume to continue or --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    _seed_all(cfg.seed)

    check_model_spec(cfg.model)
    try:
        method = METHODS[cfg.method](**cfg.method_options)
    except TypeError as err:  # an option the method does not take
        raise UserError(f"method-option: {cfg.method} {str(err).split('()')[-1].strip()}") from None
    task = detect_task(cfg.data)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.removeprefix("config:"))
    splits: Splits = load_splits(
        cfg.data,
        tokenizer,
        block_size=cfg.block_size,
        max_length=cfg.max_length,
        train_samples=cfg.train_samples,
        val_size=cfg.val_size,
        seed=cfg.seed,
    )
    model = load_model(cfg.model, task, tokenizer, num_labels=max(splits.num_labels, 2))
    context = max_positions(model)
    length = cfg.block_size if task == "lm" else cfg.max_length
    if context is not None and length > context:
        raise UserError(
            f"{'block_size' if task == 'lm' else 'max_length'}: {length} exceeds the model's context {context}"
        )
    model.to(device)
    model.train()
    method.setup(
        model,
        MethodConfig(cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_grad_norm),
        cfg.steps,
        RunInfo(task, tokenizer, splits.train, cfg.seed, cfg.output_dir, cfg.progress and ddp.main),
    )
    # Wrapped after setup: a method may replace modules (guided dropout swaps its dropout layers).
    trained = nn.parallel.DistributedDataParallel(model) if ddp.world > 1 else model
    metric = cfg.select_metric or ("loss" if task == "lm" else "acc")
    if metric not in ("loss", "acc"):
        raise UserError(f"select_metric: expected loss or acc, got {metric!r}")
    sign = 1.0 if metric == "loss" else -1.0  # lower is better after the sign
    step, best, last_val = 0, {"metric": metric, "value": sign * math.inf, "step": 0}, None
    best_state: dict[str, torch.Tensor] | None = None
    if cfg.resume:
        state = checkpoint.load(found, model, ddp.rank)
        changed = {
            k: (state["config"].get(k), getattr(cfg, k))
            for k in RESUME_KEYS
            if state["config"].get(k) != getattr(cfg, k)
        }
        if changed:
            raise UserError(f"resume: options differ from the checkpoint's run (saved, given): {changed}")
        method.load_state_dict(state["method"])
        step, best, best_state = state["step"], state["best"], state.get("best_state")
    log = _MetricsLog(out / "metrics.jsonl", ddp.main, step if cfg.resume else None)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext()

    def save(at: int) -> None:
        checkpoint.write_rng(out, at, ddp.rank)
        ddp.barrier()
        if ddp.main:
            state = {
                "step": at,
                "best": best,
                "best_state": best_state,
                "method": method.state_dict(),
                "config": dataclasses.asdict(cfg),
            }
            checkpoint.commit(out, at, model, state, cfg.keep_checkpoints)
        ddp.barrier()

    stream = _Stream(len(splits.train["input_ids"]), cfg.batch_size, cfg.seed)
    micro = cfg.batch_size // cfg.grad_accum
    per_rank = micro // ddp.world
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=not (cfg.progress and ddp.main), unit="step")
    start_time = time.perf_counter()
    with _Interrupt(ddp, device) as interrupt:
        while step < cfg.steps:
            idx = stream.indices(step)
            batches = [
                _batch(splits.train, idx[m * micro + ddp.rank * per_rank :][:per_rank], task, device)
                for m in range(cfg.grad_accum)
            ]
            t0 = time.perf_counter()
            metrics = method.step(StepContext(trained, batches, autocast))  # returns host floats: synchronised
            metrics["step_ms"] = (time.perf_counter() - t0) * 1e3
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"training loss is {metrics['loss']} at step {step + 1}; lower --lr")
            step += 1
            log.log({"step": step, "split": "train", **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_val = evaluate(model, splits.val, task, cfg, device, ddp, autocast)
                log.log({"step": step, "split": "val", **last_val})
                if sign * last_val[metric] < sign * best["value"]:
                    best = {"metric": metric, "value": last_val[metric], "step": step}
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            stop = interrupt.stop_now()
            if stop or step % cfg.save_every == 0 or step == cfg.steps:
                save(step)
            if stop:
                bar.close()
                raise KeyboardInterrupt(f"interrupted after step {step}; checkpoint saved in {out}")
    bar.close()

    trainable, total = param_count(model)
    summary: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "task": task,
        "steps": step,
        "processes": ddp.world,
        "device": str(device),
        "params_trainable": trainable,
        "params_total": total,
        "train_seconds_this_session": time.perf_counter() - start_time,
        "final_val": last_val or evaluate(model, splits.val, task, cfg, device, ddp, autocast),
        "test_final": evaluate(model, splits.test, task, cfg, device, ddp, autocast),
        "best_val": best,
    }
    if best_state is not None:
        final_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        model.load_state_dict(best_state)
        summary["test"] = evaluate(model, splits.test, task, cfg, device, ddp, autocast)
        model.load_state_dict(final_state)
    else:
        summary["test"] = summary["test_final"]
    if ddp.main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(log.records, out / "curves.png")
    return summary
