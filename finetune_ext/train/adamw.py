"""The default stepper ``--optimizer adamw``: AdamW, linear warm-up and decay, gradient-norm clipping."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from finetune_ext.optim.blocks import check_layer_spec, train_only
from finetune_ext.train.options import option
from finetune_ext.train.parts import RunContext, StepContext, Stepper


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


@dataclass
class AdamWOptions:
    beta1: float = option(0.9, "Adam's first-moment decay")
    beta2: float = option(0.999, "Adam's second-moment decay")
    eps: float = option(1e-8, "Adam's epsilon")
    layers: str | None = option(None, "train only these transformer layers, 'last:K' or '10,11' (null: all)")

    def __post_init__(self) -> None:
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1), got {getattr(self, name)}")
        if not self.eps > 0:
            raise ValueError(f"eps: expected > 0, got {self.eps}")
        if self.layers is not None:
            check_layer_spec(self.layers, "layers")


class AdamW(Stepper):
    """AdamW with --lr, --weight-decay (matrices only), --warmup-steps then linear decay, --max-grad-norm."""

    name = "adamw"
    Options = AdamWOptions

    def setup(self, model: nn.Module, run: RunContext) -> None:
        o, self.settings = self.options, run.optim
        if o.layers is not None:
            train_only(model, o.layers, "optimizer-option (adamw): layers")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            decay_groups(model, run.optim.weight_decay), lr=run.optim.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_schedule(run.optim.warmup_steps, run.total_steps)
        )

    def step(self, ctx: StepContext) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = ctx.forward_backward()
        out = {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
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
