"""Training-loop method ``armijo``: ``BlockArmijo`` over the model's blocks (PLASLS), or one block (AdamSLS)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from finetune_ext.optim.block_armijo import BlockArmijo
from finetune_ext.optim.blocks import blocks_from_model
from finetune_ext.train.methods import Method, MethodConfig, RunInfo, StepContext, register_method


@register_method
class ArmijoMethod(Method):
    """Per-block Armijo line search; the step size comes from the search, so ``--lr`` is not used.

    Options: ``blocks`` (``"auto"``: embeddings, each ``layers_per_block`` layers, head; ``"single"``: one block,
    i.e. AdamSLS), ``layers_per_block``, and every ``BlockArmijo`` argument (``c``, ``beta_b``, ``gamma``,
    ``strategy``, ``direction``, ``init_step_size``, ``max_backtracks``, ``n_batches_per_epoch``, ...).
    """

    name = "armijo"

    def __init__(self, blocks: str = "auto", layers_per_block: int = 1, **options: Any) -> None:
        if blocks not in ("auto", "single"):
            raise ValueError(f"blocks: expected 'auto' or 'single', got {blocks!r}")
        self.blocks, self.layers_per_block, self.options = blocks, layers_per_block, options
        BlockArmijo([[torch.zeros(1, requires_grad=True)]], **options)  # validate the options now

    def setup(self, model: nn.Module, config: MethodConfig, total_steps: int, run: RunInfo | None = None) -> None:
        if self.blocks == "single":
            groups = [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad]}]
        else:
            groups = blocks_from_model(model, self.layers_per_block)
        self.optimizer = BlockArmijo(groups, betas=config.betas, eps=config.eps, **self.options)

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
