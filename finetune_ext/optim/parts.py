"""The steppers of ``--optimizer``: ``adamw`` (the default) and ``armijo`` (``BlockArmijo`` over the model's
blocks, PLASLS, or one block, AdamSLS)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from finetune_ext.optim.block_armijo import BlockArmijo
from finetune_ext.optim.blocks import blocks_from_model, check_layer_spec, train_only
from finetune_ext.parts import RunContext, StepContext, Stepper, option
from finetune_ext.parts.distributed import full_tensor, shard_like


def warmup_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
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


class LossScale:
    """Dynamic loss scaling for fp16: the loss is multiplied by ``scale`` before backward and the gradients divided
    after; a step whose gradients overflow is skipped and the scale halved, and every ``growth_interval`` steps
    without one it doubles (torch's GradScaler rule, kept here so the stepper owns it and checkpoints it)."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale, self.growth_interval, self.good_steps = scale, growth_interval, 0

    @torch.no_grad()
    def unscale(self, params: list[torch.Tensor]) -> bool:
        """Divide the gradients by the scale; whether they are all finite."""
        grads = [p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scale)
        return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))

    def update(self, finite: bool) -> None:
        """Halve after an overflow; double after ``growth_interval`` finite steps in a row."""
        self.good_steps = self.good_steps + 1 if finite else 0
        if not finite:
            self.scale /= 2.0
        elif self.good_steps == self.growth_interval:
            self.scale, self.good_steps = self.scale * 2.0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]


class AdamW(Stepper):
    """AdamW with --lr, --weight-decay (matrices only), --warmup-steps then linear decay, --max-grad-norm."""

    name = "adamw"
    Options = AdamWOptions
    shardable = True
    scales_loss = True

    def freeze(self, model: nn.Module, run: RunContext) -> None:
        if self.options.layers is not None:
            train_only(model, self.options.layers, "optimizer-option (adamw): layers")

    def setup(self, model: nn.Module, run: RunContext) -> None:
        o, self.settings = self.options, run.optim
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            decay_groups(model, run.optim.weight_decay), lr=run.optim.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_linear_decay(run.optim.warmup_steps, run.total_steps)
        )
        self.loss_scale = LossScale() if run.optim.loss_scaling else None

    keeps_momentum = True

    def step(self, ctx: StepContext) -> dict[str, float]:
        return self.update(self.backward(ctx))

    def backward(self, ctx: StepContext) -> dict[str, float]:
        """The step's gradients (the mean over its micro-batches); its loss and learning rate."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = ctx.forward_backward(self.loss_scale.scale if self.loss_scale else 1.0)
        return {"loss": loss, "lr": self.scheduler.get_last_lr()[0]}

    def update(self, out: dict[str, float]) -> dict[str, float]:
        """Clip the gradients, check them, take the AdamW step and advance the schedule; ``out`` plus the norm.
        With loss scaling, a step whose gradients overflow is skipped (``skipped`` = 1) and the schedule advances."""
        if self.loss_scale is not None:
            out["loss_scale"] = self.loss_scale.scale
            finite = self.loss_scale.unscale(self.params)
            self.loss_scale.update(finite)
            if not finite:
                self.scheduler.step()
                return out | {"skipped": 1.0}
        if self.settings.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_grad_norm)
            out["grad_norm"] = float(norm)
            if not math.isfinite(out["grad_norm"]):
                raise FloatingPointError(f"gradient norm is {out['grad_norm']}; lower --lr or check the data")
        self.optimizer.step()
        self.scheduler.step()
        return out

    def momentum(self, param: torch.Tensor) -> torch.Tensor | None:
        return self.optimizer.state.get(param, {}).get("exp_avg")

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's, schedule's and loss scale's state; moments of FSDP shards gathered whole (on every
        process)."""
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: full_tensor(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
        scale = self.loss_scale.state_dict() if self.loss_scale else None
        return {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "loss_scale": scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.loss_scale is not None:
            self.loss_scale.load_state_dict(state["loss_scale"])
        for p in self.params:
            moments = self.optimizer.state.get(p, {})
            for k, v in moments.items():
                moments[k] = v if k == "step" else shard_like(v, p)


# The optimizer's own defaults, so that the CLI's and the Python API's cannot drift apart.
_DEFAULT = {name: p.default for name, p in inspect.signature(BlockArmijo).parameters.items()}


@dataclass
class ArmijoOptions:
    blocks: Literal["auto", "single"] = option(
        "auto", "'auto': embeddings, each layers_per_block layers, head (PLASLS); 'single': one block (AdamSLS)"
    )
    layers_per_block: int = option(1, "transformer layers per block (blocks=auto)")
    direction: Literal["adam", "sgd"] = option(
        _DEFAULT["direction"], "Adam-preconditioned direction with momentum, or SGD"
    )
    c: float = option(_DEFAULT["c"], "Armijo constant in (0, 1); 0.5 (SaLSa's) won held-out selection on SST-2 small")
    beta_b: float = option(_DEFAULT["beta_b"], "backtracking factor in (0, 1)")
    gamma: float = option(_DEFAULT["gamma"], "SLS reset factor >= 1: step sizes grow by gamma^(1/n_batches_per_epoch)")
    reset: Literal["sls", "keep", "init"] = option(_DEFAULT["reset"], "step-size reset before each search")
    strategy: Literal["cycle", "all", "joint"] = option(_DEFAULT["strategy"], "which blocks each step searches")
    max_backtracks: int = option(_DEFAULT["max_backtracks"], "trials per search before the 1e-6 fallback step")
    init_step_size: float = option(_DEFAULT["init_step_size"], "every block's first step size")
    n_batches_per_epoch: int = option(_DEFAULT["n_batches_per_epoch"], "the SLS reset's exponent denominator")
    joint_steps: int = option(_DEFAULT["joint_steps"], "steps searched jointly at the start")
    beta1: float = option(_DEFAULT["betas"][0], "Adam's first-moment decay")
    beta2: float = option(_DEFAULT["betas"][1], "Adam's second-moment decay")
    eps: float = option(_DEFAULT["eps"], "Adam's epsilon")

    def __post_init__(self) -> None:
        if self.blocks not in ("auto", "single"):
            raise ValueError(f"blocks: expected 'auto' or 'single', got {self.blocks!r}")
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block: expected >= 1, got {self.layers_per_block}")
        BlockArmijo([[torch.zeros(1, requires_grad=True)]], **self.optimizer_kwargs())  # its own checks, now

    def optimizer_kwargs(self) -> dict[str, Any]:
        kw = dataclasses.asdict(self)
        for key in ("blocks", "layers_per_block", "beta1", "beta2"):
            del kw[key]
        return {**kw, "betas": (self.beta1, self.beta2)}


class Armijo(Stepper):
    """Per-block Armijo line search around Adam's direction (PLASLS/AdamSLS); --lr is not used."""

    name = "armijo"
    Options = ArmijoOptions
    unshardable_because = "its line search evaluates the loss at trial weights of whole blocks, a global decision"
    keeps_momentum = True

    def setup(self, model: nn.Module, run: RunContext) -> None:
        if self.options.blocks == "single":
            groups = [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad]}]
        else:
            groups = blocks_from_model(model, self.options.layers_per_block)
        self.optimizer = BlockArmijo(groups, **self.options.optimizer_kwargs())

    def step(self, ctx: StepContext) -> dict[str, float]:
        def closure() -> torch.Tensor:
            # With gradients: accumulate them over the micro-batches (backward inside); trials: loss only.
            return torch.tensor(ctx.forward_backward() if torch.is_grad_enabled() else ctx.loss())

        loss = self.optimizer.step(closure)
        last = self.optimizer.last
        return {"loss": loss, "backtracks": float(last["backtracks"]), "step_size": min(last["step_sizes"])}

    def momentum(self, param: torch.Tensor) -> torch.Tensor | None:
        state = self.optimizer.state.get(param, {})
        return state.get("exp_avg", state.get("momentum_buffer"))

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
