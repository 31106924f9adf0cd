"""The two kinds of training parts. A run is one ``Stepper`` plus any ``Transform``s.

* A ``Transform`` changes the model before training (adapters, dropout schedules, perturbations) and may hook
  each step; its hooks receive the stepper, so a transform can read the optimizer's state.
* A ``Stepper`` owns the optimizer step. It sees the step's batch through a ``StepContext`` and may evaluate
  it as often as it needs (line searches) or evaluate the validation split (``RunContext.evaluate_val``); the
  test split is never handed to a part.

Each part declares ``Options``, a dataclass of ``finetune_ext.parts.options.option`` fields, and is listed in
``finetune_ext.train.registry``. Parts that draw random numbers take their Philox keys from
``finetune_ext.nn.keys``, which the ``StepContext`` sets from ``(run seed, step, micro-batch, rank)`` for
every evaluation of the batch, so re-evaluations draw the same masks and resume is exact.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from finetune_ext.nn import keys
from finetune_ext.parts.distributed import Dist, mean_across_ranks


@dataclass
class NoOptions:
    """A part without options."""


@dataclass
class OptimSettings:
    """The run's optimizer settings (``--lr``, ``--weight-decay``, ...), shared by every stepper."""

    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float
    loss_scaling: bool = False  # fp16: the stepper scales the loss before backward and skips steps that overflow


@dataclass
class RunContext:
    """What a part may know about the run besides the model. The test split is deliberately absent."""

    task: str  # "lm", "classification" or "regression"
    tokenizer: Any
    train: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]
    evaluate_val: Callable[[nn.Module], dict[str, float]]  # loss/acc/ppl of a model on the validation split
    seed: int
    total_steps: int
    optim: OptimSettings
    output_dir: str
    progress: bool = True
    dist: Dist = dataclasses.field(default_factory=Dist)  # rank, world size and the collectives parts use


@dataclass
class StepContext:
    """One optimizer step's batch and the means to evaluate it, with identical randomness every time."""

    model: nn.Module  # DDP-wrapped under torchrun
    micro_batches: list[dict[str, torch.Tensor]]
    autocast: Callable[[], Any]
    step: int  # 0-based index of this optimizer step
    seed: int
    rank: int = 0

    def _key(self, micro: int):
        return keys.keyed(self.seed, self.step, micro, self.rank)

    def forward_backward(self, loss_scale: float = 1.0) -> float:
        """Accumulate gradients of the mean loss over the micro-batches, times ``loss_scale`` (fp16's loss
        scaling: the stepper divides the gradients back); the unscaled mean loss across ranks."""
        total = torch.zeros((), device=self.micro_batches[0]["input_ids"].device)
        n = len(self.micro_batches)
        for i, batch in enumerate(self.micro_batches):
            sync = i == n - 1 or not hasattr(self.model, "no_sync")
            with nullcontext() if sync else self.model.no_sync(), self.autocast(), self._key(i):
                loss = self.model(**batch).loss / n
            (loss * loss_scale if loss_scale != 1.0 else loss).backward()
            total += loss.detach().float()
        return mean_across_ranks(total)

    @torch.no_grad()
    def loss(self) -> float:
        """The mean loss of this step's batch at the current weights, without gradients (same masks)."""
        total = torch.zeros((), device=self.micro_batches[0]["input_ids"].device)
        for i, batch in enumerate(self.micro_batches):
            with self.autocast(), self._key(i):
                total += self.model(**batch).loss.float() / len(self.micro_batches)
        return mean_across_ranks(total)


class Part(ABC):
    """A training part, built from its options; ``state_dict`` is saved in every checkpoint."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    requires: ClassVar[tuple[str, ...]] = ()  # kinds whose no-op choice this part cannot run with
    shardable: ClassVar[bool] = False  # whether it runs on FSDP shards (``RunContext.dist.sharded``)
    scales_loss: ClassVar[bool] = False  # stepper: whether it honours ``OptimSettings.loss_scaling`` (fp16)
    unshardable_because: ClassVar[str] = "not built for FSDP"  # said when --fsdp is refused

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027  (stateless parts keep nothing)
        pass

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


class Stepper(Part):
    """Owns the optimizer step."""

    keeps_momentum: ClassVar[bool] = False  # whether ``momentum`` answers (MGPO needs it)
    needs_validation: ClassVar[bool] = False  # whether ``setup`` / ``step`` read ``RunContext.val``

    def freeze(self, model: nn.Module, run: RunContext) -> None:
        """Stop the parameters this stepper does not train from requiring grad (after every transform applied,
        before the frozen base is cast or sharded and before ``setup``)."""

    @abstractmethod
    def setup(self, model: nn.Module, run: RunContext) -> None:
        """Build the optimizer over the model's trainable parameters (after ``freeze``; under FSDP, over the
        shards)."""

    @abstractmethod
    def step(self, ctx: StepContext) -> dict[str, float]:
        """Do one optimizer step; return at least ``{"loss": ...}`` (host floats) for logging."""

    def momentum(self, param: torch.Tensor) -> torch.Tensor | None:
        """The first moment the stepper keeps for ``param`` (Adam's ``exp_avg``), ``None`` before its first
        update. Raises ``NotImplementedError`` unless ``keeps_momentum``."""
        raise NotImplementedError(f"optimizer {self.name!r} keeps no momentum")


class Transform(Part):
    """Changes the model before training; may hook each optimizer step."""

    @abstractmethod
    def apply(self, model: nn.Module, run: RunContext) -> None:
        """Change ``model`` in place, before the stepper is set up."""

    def check_stepper(self, stepper: Stepper) -> None:
        """Raise ``UserError`` if this transform cannot run beside ``stepper`` (called before any work)."""

    def before_step(self, step: int, stepper: Stepper) -> None:
        """Called before each optimizer step (``step`` is 0-based)."""

    def after_step(self, step: int, stepper: Stepper) -> None:
        """Called after each optimizer step."""


def unshardable(parts: Mapping[str, Part]) -> tuple[str, Part] | None:
    """The first ``(kind, part)`` of ``parts`` that does not run on FSDP shards, ``None`` if all do."""
    return next(((kind, part) for kind, part in parts.items() if not part.shardable), None)
