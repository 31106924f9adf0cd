"""Training methods. A method owns the optimisation step, so that plain optimizers, line searches (several
loss evaluations per step), perturbation methods (perturb, step, restore) and LP-driven outer loops all fit.

The trainer hands each step a ``StepContext``: ``forward_backward()`` accumulates gradients over the step's
micro-batches (DDP-synchronised once, on the last one) and returns the mean loss across ranks;
``loss()`` evaluates the same batch without gradients, for line searches.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Make a method available as ``--method <cls.name>``."""
    METHODS[cls.name] = cls
    return cls


@dataclass
class StepContext:
    """One optimizer step's batch and the means to evaluate it."""

    model: nn.Module  # DDP-wrapped under torchrun
    micro_batches: list[dict[str, torch.Tensor]]
    autocast: Callable[[], Any]

    def _mean_across_ranks(self, value: torch.Tensor) -> float:
        if dist.is_available() and dist.is_initialized():
            value = value.clone()
            dist.all_reduce(value)
            value /= dist.get_world_size()
        return float(value)

    def forward_backward(self) -> float:
        """Accumulate gradients of the mean loss over the micro-batches; the mean loss across ranks."""
        total = torch.zeros((), device=self.micro_batches[0]["input_ids"].device)
        n = len(self.micro_batches)
        for i, batch in enumerate(self.micro_batches):
            sync = i == n - 1 or not hasattr(self.model, "no_sync")
            with nullcontext() if sync else self.model.no_sync(), self.autocast():
                loss = self.model(**batch).loss / n
            loss.backward()
            total += loss.detach().float()
        return self._mean_across_ranks(total)

    @torch.no_grad()
    def loss(self) -> float:
        """The mean loss of this step's batch at the current weights, without gradients."""
        total = torch.zeros((), device=self.micro_batches[0]["input_ids"].device)
        for batch in self.micro_batches:
            with self.autocast():
                total += self.model(**batch).loss.float() / len(self.micro_batches)
        return self._mean_across_ranks(total)


@dataclass
class RunInfo:
    """What a method may need from the run beyond the model: the data and its tokenizer."""

    task: str  # "lm" or "cls"
    tokenizer: Any
    train: dict[str, torch.Tensor]
    seed: int
    output_dir: str
    progress: bool = True


@dataclass
class MethodConfig:
    """Optimizer settings shared by the methods (the CLI's --lr, --weight-decay, ...)."""

    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


class Method(ABC):
    """A training method: set up on a model, then one ``step`` per optimizer step."""

    name: ClassVar[str]

    @abstractmethod
    def setup(self, model: nn.Module, config: MethodConfig, total_steps: int, run: RunInfo | None = None) -> None:
        """Prepare optimizer state (and change the model, if the method does) before the first step."""

    @abstractmethod
    def step(self, ctx: StepContext) -> dict[str, float]:
        """Do one optimizer step; return at least ``{"loss": ...}`` for logging."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up from 0 to 1 over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only; biases, norms and other vectors are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


@register_method
class AdamW(Method):
    """The baseline: AdamW, linear warm-up and decay, gradient-norm clipping."""

    name = "adamw"

    def setup(self, model: nn.Module, config: MethodConfig, total_steps: int, run: RunInfo | None = None) -> None:
        self.config = config
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            decay_groups(model, config.weight_decay), lr=config.lr, betas=config.betas, eps=config.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(config.warmup_steps, total_steps)
        )

    def step(self, ctx: StepContext) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = ctx.forward_backward()
        out = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            out["grad_norm"] = float(norm)
            if not math.isfinite(out["grad_norm"]):
                raise FloatingPointError(f"gradient norm is {out['grad_norm']}; lower --lr or check the data")
        self.optimizer.step()
        self.scheduler.step()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
