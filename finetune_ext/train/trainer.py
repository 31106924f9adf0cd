"""The training loop: one readable recipe from config to summary.

``train(TrainConfig(...))`` builds the tokenizer, data and model, applies the run's transforms (dropout, then
adapters), sets up its stepper, runs ``steps`` optimizer steps with evaluation every ``eval_every`` steps and
checkpoints every ``save_every`` steps, and writes ``metrics.jsonl``, ``curves.png`` and ``summary.json`` into
``output_dir``. Under ``torchrun`` it runs data-parallel (gloo on CPU, NCCL on GPUs) with the same global batch,
hence the same result, as one process. The model reported on the test split is the one with the best validation
``select_metric`` (loss for language modelling, the task's GLUE metric for labelled data); the final model's test
metrics are reported too. ``batch_size`` is the global number of sequences per optimizer step; it is split into
``grad_accum`` micro-batches and each micro-batch across the processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from finetune_ext.data.splits import Splits, Stream, check_amount, detect_source, load_splits, micro_batches
from finetune_ext.errors import RunWarning, UserError
from finetune_ext.parts import Dist, OptimSettings, RunContext, StepContext, Stepper, Transform, unshardable
from finetune_ext.parts.options import check_finite, option
from finetune_ext.train import checkpoint, registry, rundir
from finetune_ext.train.distributed import Interrupt, process_group
from finetune_ext.train.metrics import MetricsLog, evaluate, plot_curves, plot_lift
from finetune_ext.train.models import (
    cast_frozen,
    check_model_spec,
    enable_gradient_checkpointing,
    load_model,
    load_tokenizer,
    max_positions,
    param_count,
    quantize_4bit,
    shard,
)

# Fields a resumed run may change: they steer bookkeeping, not the computation. A change is applied and
# reported; any other field (and the parts with their options) must match the checkpoint's run.
CHANGEABLE_ON_RESUME = (
    "output_dir", "resume", "overwrite", "eval_every", "save_every", "keep_checkpoints", "eval_batch_size",
    "max_eval_batches", "progress", "device",
)  # fmt: skip
# Spellings of the parts (a preset or its parts one by one): compared through the parts they resolve to.
PART_FIELDS = ("method", *registry.PARTS, "method_options", *(f"{kind}_options" for kind in registry.PARTS))


def _choices(kind: str):
    return lambda: list(registry.PARTS[kind])


def _presets() -> list[str]:
    return list(registry.PRESETS)


@dataclass
class TrainConfig:
    """Everything a run needs; the CLI's ``train`` options are generated from these fields."""

    model: str = option(
        help="hub id, local folder, config:<tiny name> (gpt2-tiny, gpt2-small, bert-tiny, llama-tiny, mistral-tiny, "
        "qwen2-tiny), or config:<config.json>"
    )
    data: str = option(
        help="wikitext-2 | wikitext-103 | sst2 (hub), or a folder with train/valid/test.txt or train.tsv + dev.tsv"
    )
    output_dir: str = option("runs/run", "where metrics, plots, summary and checkpoints go")
    tokenizer: str | None = option(None, "hub id or folder (default: the model's)")
    method: str | None = option(None, "a preset of parts, the one-word methods of earlier releases", _presets)
    dropout: str | None = option(None, "dropout transform (default: standard)", _choices("dropout"))
    adapter: str | None = option(None, "adapter transform (default: none)", _choices("adapter"))
    perturbation: str | None = option(
        None, "weight perturbation of adapted layers (default: none)", _choices("perturbation")
    )
    optimizer: str | None = option(None, "stepper that owns the optimizer step (default: adamw)", _choices("optimizer"))
    seed: int = option(0, "seed for initialisation, data order, subsets and dropout")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "sequences per optimizer step, over all processes")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-5, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay (matrices only)")
    warmup_steps: int = option(0, "linear warm-up steps, then linear decay to 0")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0: off)")
    block_size: int = option(128, "tokens per language-modelling block")
    max_length: int = option(128, "tokens per labelled example, both sentences of a pair (padded/truncated)")
    text_columns: list[str] | None = option(
        None, "labelled data: the text column(s) of train.tsv/dev.tsv, two for pairs (default: from the header)"
    )
    label_column: str | None = option(None, "labelled data: the label column (default: from the header)")
    task: Literal["auto", "classification", "regression"] = option(
        "auto", "labelled data: classes or real-valued scores (auto: real-valued labels make a regression)"
    )
    train_samples: int | float | None = option(
        None, "low-data runs: an integer count >= 1 or a fraction in (0, 1] of the training set (1 = one, 1.0 = all)"
    )
    val_size: int | float = option(
        0.1, "classification: held-out slice of train for model selection (integer count or fraction in (0, 1])"
    )
    eval_every: int = option(50, "evaluate on the validation split every N steps")
    eval_batch_size: int = option(32, "batch size for evaluation")
    max_eval_batches: int | None = option(None, "cap evaluation at N batches (quick runs)")
    save_every: int = option(50, "checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, "how many checkpoints to keep")
    resume: bool = option(False, "continue the run in --output-dir from its latest checkpoint")
    overwrite: bool = option(False, "start over in an --output-dir that holds checkpoints")
    bf16: bool = option(False, "bf16 autocast for forward passes")
    dtype: Literal["fp32", "bf16", "fp16", "nf4"] = option(
        "fp32",
        "the frozen base weights' dtype (bf16: half their memory, with bf16 autocast; fp16: the same in fp16, with "
        "fp16 autocast and dynamic loss scaling in the stepper; nf4: the transformer layers' linear weights in "
        "4-bit NF4 through bitsandbytes, the rest bf16: QLoRA, with an adapter); what trains and the optimizer "
        "state stay fp32",
    )
    gradient_checkpointing: bool = option(
        False, "recompute each layer's activations in the backward (less memory; random layers draw the same masks)"
    )
    fsdp: bool = option(
        False,
        "under torchrun: shard the model with FSDP2 (each layer a unit) instead of replicating it with DDP; parts "
        "that shard: adapters, dropouts, adamw",
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "default: cuda if available")
    select_metric: Literal["loss", "acc", "f1", "mcc", "pearson", "spearman"] | None = option(
        None, "validation metric that selects the reported model (default: loss for LM, the task's GLUE metric)"
    )
    progress: bool = option(True, "the progress bar (--no-progress hides it)")
    method_options: dict[str, Any] = option({}, "options of the --method preset's parts, routed by name")
    dropout_options: dict[str, Any] = option({}, "options of the dropout transform")
    adapter_options: dict[str, Any] = option({}, "options of the adapter transform")
    perturbation_options: dict[str, Any] = option({}, "options of the perturbation transform")
    optimizer_options: dict[str, Any] = option({}, "options of the stepper")


@dataclass
class Parts:
    """The run's parts by kind (no entry for a kind's no-op choice) and what was chosen, options resolved."""

    by_kind: dict[str, Transform | Stepper]
    chosen: dict[str, dict[str, Any]]  # kind -> {"name": ..., "options": {...}}

    @property
    def transforms(self) -> list[Transform]:
        """In application order."""
        return [self.by_kind[k] for k in registry.TRANSFORM_KINDS if k in self.by_kind]

    @property
    def stepper(self) -> Stepper:
        return self.by_kind[registry.STEPPER_KIND]


def build_parts(cfg: TrainConfig) -> Parts:
    """One part per kind from ``--<kind>`` / ``--<kind>-option`` and the ``--method`` preset, validated."""
    names, routed = registry.expand_preset(cfg.method or "adamw", cfg.method_options)
    parts = Parts({}, {})
    for kind in registry.PARTS:
        given = getattr(cfg, kind)
        preset = registry.PRESETS.get(cfg.method or "", {}).get(kind)
        if given is not None and preset is not None and given != preset:
            raise UserError(f"{kind}: --method {cfg.method} uses {kind} {preset!r}; got {given!r}")
        name = given or names[kind]
        part = registry.build(kind, name, {**routed[kind], **getattr(cfg, f"{kind}_options")})
        parts.chosen[kind] = {"name": name, "options": part.options_dict() if part else {}}
        if part is not None:
            parts.by_kind[kind] = part
    for kind, part in parts.by_kind.items():
        for needed in [k for k in part.requires if k not in parts.by_kind]:
            choices = " or ".join(n for n, path in registry.PARTS[needed].items() if path)
            raise UserError(f"{kind}: {part.name} does not run with --{needed} none; add --{needed} {choices}")
    for transform in parts.transforms:
        transform.check_stepper(parts.stepper)
    return parts


def check_config(cfg: TrainConfig, world: int = 1) -> Parts:
    """Every option of ``cfg`` checked (the model and data paths exist) and its parts built, before the output
    folder is touched or any data read; a ``UserError`` names the first bad one."""
    _check_numbers(cfg, world)
    check_model_spec(cfg.model)
    if cfg.tokenizer is not None:
        check_model_spec(cfg.tokenizer, "tokenizer")
    detect_source(cfg.data)
    parts = build_parts(cfg)
    if cfg.dtype == "fp16" and not parts.stepper.scales_loss:
        raise UserError(f"dtype: fp16 needs a stepper that scales the loss (adamw); {parts.stepper.name} compares "
                        "unscaled losses and gradients (its line search or LP); use bf16")  # fmt: skip
    if cfg.dtype == "nf4" and "adapter" not in parts.by_kind:
        raise UserError("dtype: nf4 quantizes the base's linear layers, which then cannot train; add --adapter lora "
                        "or linchain (QLoRA)")  # fmt: skip
    if cfg.fsdp and (found := unshardable(parts.by_kind)):
        kind, part = found
        raise UserError(f"fsdp: {kind} {part.name} does not run on FSDP shards ({part.unshardable_because}); "
                        "drop --fsdp to run it with DDP")  # fmt: skip
    rundir.check(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
    return parts


def _check_numbers(cfg: TrainConfig, world: int) -> None:
    for name in ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "eval_batch_size", "block_size",
                 "max_length"):  # fmt: skip
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: expected an integer >= 1, got {getattr(cfg, name)}")
    check_finite({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    if cfg.lr <= 0:
        raise UserError(f"lr: expected > 0, got {cfg.lr}")
    for name in ("weight_decay", "warmup_steps", "max_grad_norm"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name}: expected >= 0, got {getattr(cfg, name)}")
    if cfg.keep_checkpoints < 1:
        raise UserError(f"keep_checkpoints: expected an integer >= 1, got {cfg.keep_checkpoints}")
    if cfg.max_eval_batches is not None and cfg.max_eval_batches < 1:
        raise UserError(f"max_eval_batches: expected an integer >= 1 or none, got {cfg.max_eval_batches}")
    check_amount(cfg.train_samples, "train_samples")
    check_amount(cfg.val_size, "val_size")
    if cfg.batch_size % (cfg.grad_accum * world):
        raise UserError(
            f"batch_size: {cfg.batch_size} must be divisible by grad_accum x processes = {cfg.grad_accum} x {world}"
        )
    if cfg.resume and cfg.overwrite:
        raise UserError("resume, overwrite: pass one of them (--resume continues the run, --overwrite starts over)")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class _Run:
    """The state the loop reads and writes."""

    cfg: TrainConfig
    ddp: Dist
    device: torch.device
    out: Path
    task: str
    splits: Splits
    model: nn.Module
    trained: nn.Module  # the model, DDP-wrapped under torchrun
    parts: Parts
    stream: Stream
    metric: str
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    resumes: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # step and changed options, each
    step: int = 0
    best: dict[str, Any] = dataclasses.field(default_factory=dict)
    best_state: dict[str, torch.Tensor] | None = None
    base_digest: str | None = None  # of the frozen parameters; set: checkpoints hold only the trained state
    last_val: dict[str, float] | None = None
    log: MetricsLog | None = None

    def autocast(self):
        if self.cfg.dtype == "fp16":
            return torch.autocast(self.device.type, dtype=torch.float16)
        if self.cfg.bf16 or self.cfg.dtype in ("bf16", "nf4"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def evaluate(self, model: nn.Module, split: dict[str, torch.Tensor]) -> dict[str, float]:
        return evaluate(model, split, self.splits.task, num_labels=self.splits.num_labels,
                        batch_size=self.cfg.eval_batch_size,
                        max_batches=self.cfg.max_eval_batches, device=self.device, ddp=self.ddp,
                        autocast=self.autocast)  # fmt: skip

    def better(self, value: float) -> bool:
        return value < self.best["value"] if self.metric == "loss" else value > self.best["value"]


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a fine-tuning run; returns the summary that is also written to summary.json."""
    with process_group(cfg.device, cfg.fsdp) as (ddp, device):
        return _train(cfg, ddp, device)


def _train(cfg: TrainConfig, ddp: Dist, device: torch.device) -> dict[str, Any]:
    run = preflight(cfg, ddp, device)
    out = run.out
    rundir.prepare(out)
    with rundir.RunLock(out) if ddp.main else contextlib.nullcontext():
        found = _claim(cfg, out, ddp)
        if found is not None:
            _restore(run, found)
        run.log = MetricsLog(out / "metrics.jsonl", ddp.main, run.step if cfg.resume else None)
        bar = tqdm(total=cfg.steps, initial=run.step, desc="train", unit="step",
                   disable=not (cfg.progress and ddp.main))  # fmt: skip
        start = time.perf_counter()
        with Interrupt(ddp, device) as interrupt, bar:
            while run.step < cfg.steps:
                metrics = _train_step(run)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                    _validate(run)
                stop = interrupt.stop_now()
                if stop or run.step % cfg.save_every == 0 or run.step == cfg.steps:
                    _save(run)
                if stop:
                    raise KeyboardInterrupt(f"interrupted after step {run.step}; checkpoint saved in {run.out}")
        return _report(run, time.perf_counter() - start)


def _claim(cfg: TrainConfig, out: Path, ddp: Dist) -> Path | None:
    """Rank 0 tidies the locked folder (temporaries of a killed run; everything with --overwrite) and picks
    the newest intact checkpoint to resume from, removing damaged newer ones with a warning. Returns it."""
    if ddp.main:
        rundir.remove_temporaries(out)
        if cfg.overwrite:
            rundir.clear(out)
        existing = checkpoint.folders(out)
        if cfg.resume and not existing:
            raise UserError(f"resume: no checkpoint in {out}")
        if not cfg.resume and existing:
            raise UserError(f"output_dir: {out} already holds checkpoints; pass --resume to continue or --overwrite")
        if cfg.resume:
            found, damaged = checkpoint.newest_intact(out)
            if found is None:
                reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged.items())
                raise UserError(f"resume: no intact checkpoint in {out} ({reasons})")
            for folder, why in damaged.items():
                warnings.warn(f"resume: {folder.name} is damaged ({why}); removed it, resuming from {found.name}",
                              RunWarning, stacklevel=2)  # fmt: skip
                checkpoint.remove(folder)
            checkpoint.point_latest(out, found)
    ddp.barrier()
    return out / (out / checkpoint.LATEST).read_text().strip() if cfg.resume else None


def preflight(cfg: TrainConfig, ddp: Dist | None = None, device: torch.device | None = None) -> _Run:
    """Every check a run makes, before its output folder or lock exists: the options and parts
    (``check_config``), then the data, the model, the transforms applied and the stepper set up, each checking
    what it is given. Writes nothing into ``output_dir`` (``--dry-run`` stops here). Returns the run, ready to
    claim its folder."""
    if ddp is None or device is None:
        ddp, device = Dist(), torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")
    return _setup(cfg, check_config(cfg, ddp.world), ddp, device)


def _setup(cfg: TrainConfig, parts: Parts, ddp: Dist, device: torch.device) -> _Run:
    """Load data and model, apply the transforms, set up the stepper."""
    out = Path(cfg.output_dir)
    _seed_all(cfg.seed)

    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model.removeprefix("config:"))
    splits = load_splits(cfg.data, tokenizer, block_size=cfg.block_size, max_length=cfg.max_length,
                         train_samples=cfg.train_samples, val_size=cfg.val_size, seed=cfg.seed,
                         text_columns=cfg.text_columns, label_column=cfg.label_column,
                         task=cfg.task, progress=cfg.progress and ddp.main)  # fmt: skip
    task = splits.task
    metric = cfg.select_metric or splits.main_metric
    if metric not in splits.metrics:
        raise UserError(f"select_metric: {metric} is not reported for {splits.task} (choose from {splits.metrics})")
    labels = 1 if splits.task == "regression" else max(splits.num_labels, 2)
    model = load_model(cfg.model, task, tokenizer, num_labels=labels)
    _check_context(model, cfg, task)
    model.to(device).train()
    if cfg.dtype == "nf4":
        quantize_4bit(model)
    run = _Run(cfg, ddp, device, out, task, splits, model, model, parts,
               Stream(len(splits.train["input_ids"]), cfg.batch_size, cfg.seed), metric)  # fmt: skip
    run.best = {"metric": metric, "value": math.inf if metric == "loss" else -math.inf, "step": 0}

    context = RunContext(
        task,
        tokenizer,
        splits.train,
        splits.val,
        lambda m: run.evaluate(m, splits.val),
        cfg.seed,
        cfg.steps,
        OptimSettings(cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.max_grad_norm, cfg.dtype == "fp16"),
        cfg.output_dir,
        cfg.progress and ddp.main,
        ddp,
    )
    for transform in parts.transforms:
        transform.apply(model, context)
    parts.stepper.freeze(model, context)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    cast_frozen(model, cfg.dtype)
    run.base_digest = checkpoint.frozen_digest(model)
    # Wrapped after the transforms (they may replace modules: dropout layers, adapters), sharded before the
    # stepper builds its optimizer over the shards.
    if ddp.sharded:
        shard(model)
    elif ddp.world > 1:
        run.trained = nn.parallel.DistributedDataParallel(model)
    parts.stepper.setup(model, context)
    return run


def _check_context(model: nn.Module, cfg: TrainConfig, task: str) -> None:
    context = max_positions(model)
    length = cfg.block_size if task == "lm" else cfg.max_length
    if context is not None and length > context:
        raise UserError(
            f"{'block_size' if task == 'lm' else 'max_length'}: {length} exceeds the model's context {context}"
        )


def _train_step(run: _Run) -> dict[str, float]:
    """One optimizer step of the stepper, with the transforms' hooks around it; logs the step's metrics."""
    cfg, parts = run.cfg, run.parts
    idx = run.stream.indices(run.step)
    batches = micro_batches(run.splits.train, idx, run.task, run.device, cfg.grad_accum, run.ddp.rank, run.ddp.world)
    ctx = StepContext(run.trained, batches, run.autocast, run.step, cfg.seed, run.ddp.rank)
    t0 = time.perf_counter()
    for transform in parts.transforms:
        transform.before_step(run.step, parts.stepper)
    metrics = parts.stepper.step(ctx)  # host floats: synchronised
    for transform in parts.transforms:
        transform.after_step(run.step, parts.stepper)
    metrics["step_ms"] = (time.perf_counter() - t0) * 1e3
    if not math.isfinite(metrics["loss"]):
        raise FloatingPointError(f"training loss is {metrics['loss']} at step {run.step + 1}; lower --lr")
    run.step += 1
    run.log.log({"step": run.step, "split": "train", **metrics})
    return metrics


def _validate(run: _Run) -> None:
    """Evaluate on the validation split; keep a CPU copy of the best model's weights."""
    run.last_val = run.evaluate(run.model, run.splits.val)
    run.log.log({"step": run.step, "split": "val", **run.last_val})
    if run.better(run.last_val[run.metric]):
        run.best = {"metric": run.metric, "value": run.last_val[run.metric], "step": run.step}
        run.best_state = {k: v.to("cpu", copy=True) for k, v in checkpoint.trained_state(run.model).items()}


def _config_record(run: _Run) -> dict[str, Any]:
    return {**dataclasses.asdict(run.cfg), "parts": run.parts.chosen}


def _save(run: _Run) -> None:
    checkpoint.write_rng(run.out, run.step, run.ddp.rank)
    # On every process: under FSDP, gathering the trained weights and the stepper's moments is a collective.
    sharded_or_frozen = run.base_digest is not None or run.ddp.sharded
    weights = checkpoint.trained_state(run.model) if sharded_or_frozen else None
    part_states = {kind: part.state_dict() for kind, part in run.parts.by_kind.items()}
    run.ddp.barrier()
    if run.ddp.main:
        state = {
            "step": run.step,
            "run_id": run.run_id,
            "resumes": run.resumes,
            "best": run.best,
            "best_state": run.best_state,
            "base_digest": run.base_digest,
            "parts": part_states,
            "config": _config_record(run),
            "model": {"task": run.task, "num_labels": run.model.config.num_labels},
        }
        checkpoint.commit(run.out, run.step, run.model, state, run.cfg.keep_checkpoints, run.run_id, weights)
    run.ddp.barrier()


def _restore(run: _Run, folder: Path) -> None:
    """Load a checkpoint into the run. Its options are compared first: any outside ``CHANGEABLE_ON_RESUME``
    that differs (parts and their options included) is an error naming each one (``optimizer.beta1: 0.9 ->
    0.5``), before a weight is read; changed bookkeeping options are applied, reported and recorded."""
    state = checkpoint.read_state(folder)
    saved, given = _flat_config(state["config"]), _flat_config(_config_record(run))
    differ = [k for k in {**saved, **given} if saved.get(k, "(unset)") != given.get(k, "(unset)")]
    rejected = [k for k in differ if k not in CHANGEABLE_ON_RESUME]
    if rejected:
        text = ", ".join(f"{k}: {saved.get(k, '(unset)')!r} -> {given.get(k, '(unset)')!r}" for k in rejected)
        raise UserError(
            f"resume: changed since the checkpoint's run: {text}; "
            f"a resumed run may change only {', '.join(CHANGEABLE_ON_RESUME)}"
        )
    checkpoint.load(folder, run.model, run.ddp.rank, state.get("base_digest"), run.base_digest)
    changed = {k: (saved[k], given[k]) for k in differ if k not in ("resume", "overwrite")}
    if changed and run.ddp.main:
        text = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        warnings.warn(f"resume: applying changed option(s) {text}", RunWarning, stacklevel=2)
    for kind, part in run.parts.by_kind.items():
        part.load_state_dict(state["parts"][kind])
    run.step, run.best, run.best_state = state["step"], state["best"], state.get("best_state")
    run.run_id = state.get("run_id", run.run_id)  # checkpoints written before run ids: adopt them
    run.resumes = [*state.get("resumes", []), {"step": run.step, "changed": changed}]


def _flat_config(record: dict[str, Any]) -> dict[str, Any]:
    """A config record as ``{field: value}`` with the parts resolved to ``kind`` (its name) and ``kind.option``;
    the spellings of the parts (a preset or one kind at a time) are left out: the resolved parts compare."""
    flat = {k: v for k, v in record.items() if k not in (*PART_FIELDS, "parts")}
    for kind, chosen in record.get("parts", {}).items():
        flat[kind] = chosen["name"]
        flat |= {f"{kind}.{name}": value for name, value in chosen["options"].items()}
    return flat


def _report(run: _Run, seconds: float) -> dict[str, Any]:
    """Final and test metrics (of the best-validation model and of the final one) into summary.json."""
    trainable, total = param_count(run.model)
    summary: dict[str, Any] = {
        "config": _config_record(run),
        "task": run.task,
        "steps": run.step,
        "processes": run.ddp.world,
        "sharded": run.ddp.sharded,
        "device": str(run.device),
        "params_trainable": trainable,
        "params_total": total,
        "train_seconds_this_session": seconds,
        "resumes": run.resumes,
        "final_val": run.last_val or run.evaluate(run.model, run.splits.val),
        "test_final": run.evaluate(run.model, run.splits.test),
        "best_val": run.best,
    }
    summary["test"] = summary["test_final"]
    if run.best_state is not None:
        final_state = {k: v.to("cpu", copy=True) for k, v in checkpoint.trained_state(run.model).items()}
        checkpoint.load_trained_state(run.model, run.best_state)
        summary["test"] = run.evaluate(run.model, run.splits.test)
        checkpoint.load_trained_state(run.model, final_state)
    if run.ddp.main:
        (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
        plot_curves(run.log.records, run.out / "curves.png")
        plot_lift(run.log.records, run.out / "lift.png")
    return summary
