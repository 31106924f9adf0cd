"""The stepper ``--optimizer armijo``: ``BlockArmijo`` over the model's blocks (PLASLS), or one block (AdamSLS)."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from finetune_ext.optim.block_armijo import BlockArmijo
from finetune_ext.optim.blocks import blocks_from_model
from finetune_ext.train.options import option
from finetune_ext.train.parts import RunContext, StepContext, Stepper

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
    c: float = option(_DEFAULT["c"], "Armijo constant in (0, 1); 0.5 (SaLSa's default) beat 0.1 on GLUE small")
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

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
