"""Our training parts inside Hugging Face ``Trainer``: ``PartsTrainer(..., parts={...}, part_options={...})``.

The parts are the ones ``finetune-ext train`` runs, built from the same registry and option dataclasses (so the
same names, defaults and one-line ``ValueError``s). At construction the transforms are applied to the model in
the CLI's order (dropout, adapter, perturbation) and the stepper is set up over what is then trainable. Each
optimizer step of ``Trainer`` is one step of our stepper: ``training_step`` collects the step's micro-batches
(``gradient_accumulation_steps`` of them) and, at the last one, runs the transforms' hooks around
``stepper.step`` with a ``StepContext`` keyed by ``(args.seed, global step, micro-batch, process)``, exactly as
our trainer does, so a line search (``armijo``) re-evaluates the batch with the same masks. Trainer's own
optimizer and scheduler are a no-op stand-in whose ``state_dict`` carries every part's state, so Trainer's
checkpoints and ``resume_from_checkpoint`` restore them. Trainer's gradient clipping is left to the stepper
(``max_grad_norm`` goes into its settings).

What it needs from the datasets: the transforms that read data (guided dropout's Fisher pass, LiFT's
validation batches) get ``train_dataset`` and ``eval_dataset`` collated into tensors by the trainer's data
collator; a stepper that needs the validation split (``lift``) needs ``eval_dataset``. Several processes: launch
the script with ``torchrun`` or ``accelerate launch`` (DDP; both tested with two gloo processes on CPU). FSDP2: a
model sharded as it loads (``from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N))``) takes the
parts that shard (``Part.shardable``; the others are one-line ``ValueError``s). Not supported: Accelerate's FSDP
plugin (``TrainingArguments(fsdp=...)``, a one-line ``ValueError``) and DeepSpeed.
``activation_checkpointing=True`` (``gradient_checkpointing`` before transformers 5) checkpoints every layer
with the recompute drawing the forward's masks and noise (``keys.checkpoint_context``).
Trainers built on ``Trainer`` take the parts by putting this class first:
``class PartsSFTTrainer(PartsTrainer, trl.SFTTrainer): pass`` (tested: SFT, chat template, completion-only loss).
A PEFT model whose LoRA layers come from ``adapters.peft_linchain`` stands in for the adapter part: the
perturbations act on its layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from finetune_ext.nn.perturbation import PerturbableLayer
from finetune_ext.parts import Dist, OptimSettings, RunContext, StepContext, Stepper, Transform, unshardable
from finetune_ext.parts.distributed import is_sharded
from finetune_ext.train import registry
from finetune_ext.train.models import enable_gradient_checkpointing


class _PartsState(torch.optim.Optimizer):
    """Trainer's optimizer, standing in for the stepper: ``step`` does nothing (the stepper stepped inside
    ``training_step``); ``state_dict`` / ``load_state_dict`` carry the parts' states through Trainer's checkpoints."""

    def __init__(self, parts: dict[str, Transform | Stepper], lr: float) -> None:
        super().__init__([torch.zeros(1, requires_grad=True)], {"lr": lr})
        self.parts = parts

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # the stepper clears its own gradients
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {kind: part.state_dict() for kind, part in self.parts.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for kind, part in self.parts.items():
            part.load_state_dict(state_dict["parts"][kind])


def build_parts(
    parts: Mapping[str, str] | None, part_options: Mapping[str, Mapping[str, Any]] | None, has_adapters: bool = False
):
    """``{kind: part}`` for the choices in ``parts`` (unnamed kinds take their default; no-op choices are left
    out), each built from ``part_options[kind]`` through the registry; the stepper is always present.
    ``has_adapters``: the model brings its own perturbable adapters (a PEFT model made with
    ``adapters.peft_linchain``), which stand in for the adapter part."""
    parts, part_options = dict(parts or {}), dict(part_options or {})
    unknown = sorted((set(parts) | set(part_options)) - set(registry.PARTS))
    if unknown:
        raise ValueError(f"parts: unknown kind(s) {unknown}; expected some of {list(registry.PARTS)}")
    built = {}
    for kind, default in registry.DEFAULTS.items():
        part = registry.build(kind, parts.get(kind, default), dict(part_options.get(kind, {})))
        if part is not None:
            built[kind] = part
    for kind, part in built.items():
        for needed in [k for k in part.requires if k not in built and not (k == "adapter" and has_adapters)]:
            raise ValueError(f"parts: {kind} {part.name!r} does not run without a {needed}")
    for kind in registry.TRANSFORM_KINDS:
        if kind in built:
            built[kind].check_stepper(built[registry.STEPPER_KIND])
    return built


def _check_fsdp_only(model: nn.Module) -> None:
    """A model sharded as it loaded: FSDP only (tensor, pipeline and expert parallelism split the weights that the
    fused ops read whole)."""
    config = getattr(model.config, "distributed_config", None)
    split = {f"{k}_size": getattr(config, f"{k}_size", None) or 1 for k in ("tp", "pp", "ep")}
    if any(size > 1 for size in split.values()):
        got = ", ".join(f"{k}={v}" for k, v in split.items() if v > 1)
        raise ValueError(f"distributed_config: PartsTrainer runs on FSDP shards only (fsdp_size), got {got}; tensor, "
                         "pipeline and expert parallelism split the weights our fused ops read whole")  # fmt: skip


class PartsTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose optimizer step is our stepper and whose model carries our transforms.

    Args:
        parts: ``{kind: name}``, e.g. ``{"adapter": "linchain", "dropout": "guided", "perturbation": "ggpo",
            "optimizer": "armijo"}`` (kinds: those of ``finetune-ext methods``; unnamed kinds take their
            defaults: standard dropout, no adapter, no perturbation, ``adamw``).
        part_options: ``{kind: {option: value}}`` (strings are parsed by the option's declared type).
        *args, **kwargs: ``transformers.Trainer``'s.

    Raises:
        ValueError: an unknown kind, part or option, an option out of range, or parts that cannot run together.
    """

    def __init__(
        self,
        *args: Any,
        parts: Mapping[str, str] | None = None,
        part_options: Mapping[str, Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        model = kwargs.get("model", args[0] if args else None)
        if getattr(kwargs.get("args", args[1] if len(args) > 1 else None), "fsdp", None):
            raise ValueError(
                "fsdp: PartsTrainer does not run under Accelerate's FSDP plugin (it shards the model after the "
                "stepper built its optimizer); load the model sharded with from_pretrained(..., "
                "distributed_config=DistributedConfig(fsdp_size=N)), or run finetune-ext train --fsdp"
            )
        has_adapters = isinstance(model, nn.Module) and any(isinstance(m, PerturbableLayer) for m in model.modules())
        built = build_parts(parts, part_options, has_adapters)
        sharded = isinstance(model, nn.Module) and is_sharded(model)
        if sharded:
            _check_fsdp_only(model)
        if sharded and (found := unshardable(built)):
            kind, part = found
            raise ValueError(
                f"{kind}: {part.name} does not run on FSDP shards ({part.unshardable_because}); load the model "
                "without distributed_config to run it with DDP"
            )
        if getattr(model, "is_quantized", False) and "adapter" in built:
            raise ValueError(
                "adapter: Trainer takes a quantized model only with PEFT adapters; attach PEFT LoRA "
                "(get_peft_model) and route it through our op with integrations.peft.patch, or run finetune-ext "
                "train --dtype nf4"
            )
        rng = torch.get_rng_state()  # the parts initialise from the state the model left, as in our trainer
        super().__init__(*args, **kwargs)
        torch.set_rng_state(rng)
        self.parts = built
        self.stepper: Stepper = built[registry.STEPPER_KIND]
        if self.stepper.needs_validation and self.eval_dataset is None:
            raise ValueError(
                f"eval_dataset: optimizer {self.stepper.name!r} evaluates a validation split; pass eval_dataset "
                "(a held-out slice of the training data, never the test set)"
            )
        self.transforms: list[Transform] = [built[k] for k in registry.TRANSFORM_KINDS if k in built]
        run = self._run_context(sharded)
        for transform in self.transforms:
            transform.apply(self.model, run)
        self.stepper.freeze(self.model, run)
        self.stepper.setup(self.model, run)
        if getattr(self.args, "activation_checkpointing", None) or getattr(self.args, "gradient_checkpointing", None):
            # After the transforms (guided dropout's Fisher pass runs under torch.func); with our recompute key,
            # which Trainer's own call would lack
            enable_gradient_checkpointing(self.model)
            for name in ("activation_checkpointing", "gradient_checkpointing"):
                if hasattr(self.args, name):
                    setattr(self.args, name, False)
        self._micro: list[dict[str, torch.Tensor]] = []
        self.last_step_metrics: dict[str, float] = {}

    # ---- what the parts are told ------------------------------------------------------------------------
    def _run_context(self, sharded: bool) -> RunContext:
        args = self.args
        total = args.max_steps if args.max_steps > 0 else self._epoch_steps()
        optim = OptimSettings(args.learning_rate, args.weight_decay, args.get_warmup_steps(total), args.max_grad_norm,
                              loss_scaling=bool(args.fp16))  # fmt: skip
        labels = getattr(self.model.config, "num_labels", 2)
        task = "lm" if self.model.can_generate() else "regression" if labels == 1 else "classification"
        return RunContext(
            task=task, tokenizer=self.processing_class, train=self._tensors(self.train_dataset),
            val=self._tensors(self.eval_dataset), evaluate_val=self._evaluate_val, seed=args.seed,
            total_steps=total, optim=optim, output_dir=args.output_dir, progress=not args.disable_tqdm,
            dist=Dist(args.process_index, args.world_size, args.local_process_index, sharded),
        )  # fmt: skip

    def _epoch_steps(self) -> int:
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        return math.ceil(len(self.train_dataset) / per_step) * math.ceil(self.args.num_train_epochs)

    def _tensors(self, dataset) -> dict[str, torch.Tensor]:
        """A dataset collated into one batch of tensors (what guided dropout and LiFT read); empty without one."""
        if dataset is None or len(dataset) == 0:
            return {}
        batch = self.data_collator([dataset[i] for i in range(len(dataset))])
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _evaluate_val(self, model: nn.Module) -> dict[str, float]:
        metrics = self.evaluate()
        return {k.removeprefix("eval_"): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    # ---- the optimizer step -----------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            self.optimizer = _PartsState(self.parts, self.args.learning_rate)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is None:  # the stepper keeps its own schedule; Trainer's is constant
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, lambda _: 1.0)
        return self.lr_scheduler

    def _clip_grad_norm(self, model: nn.Module) -> float:
        return self.last_step_metrics.get("grad_norm", 0.0)  # the stepper clipped before its update

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        model.train()
        self._micro.append(self._prepare_inputs(inputs))
        if len(self._micro) < self.current_gradient_accumulation_steps:
            return torch.zeros((), device=self.args.device)  # the step's loss is reported at its last micro-batch
        batches, self._micro = self._micro, []
        step = self.state.global_step
        ctx = StepContext(model, batches, self.autocast_smart_context_manager, step, self.args.seed,
                          self.args.process_index)  # fmt: skip
        for transform in self.transforms:
            transform.before_step(step, self.stepper)
        metrics = self.stepper.step(ctx)
        for transform in self.transforms:
            transform.after_step(step, self.stepper)
        self.last_step_metrics = metrics
        return torch.tensor(metrics["loss"], device=self.args.device)
