"""Curvature of Hugging Face models: loss and logit functions of a parameter subset for one batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from finetune_ext.curvature.loss import cross_entropy
from finetune_ext.curvature.matmul import tangent_aware_matmuls
from finetune_ext.curvature.products import Tensors


@dataclass
class ModelFunctions:
    """What ``hvp`` and ``ggn_vp`` need for one model and batch."""

    names: tuple[str, ...]
    params: Tensors
    labels: torch.Tensor
    model: nn.Module
    batch: dict[str, torch.Tensor]

    def output_fn(self, ps: Tensors) -> torch.Tensor:
        """Logits with the selected parameters set to ``ps``; for causal LMs every position's, the last one's
        label being -100 (no slice: a sliced ``[m, ...]`` tangent would be copied at every product)."""
        with tangent_aware_matmuls():
            out = functional_call(self.model, dict(zip(self.names, ps, strict=True)), args=(), kwargs=self.batch)
        return out.logits

    def loss_fn(self, ps: Tensors) -> torch.Tensor:
        """Mean cross-entropy over the rows whose label is not -100 (its Hessian is the fused kernel)."""
        return cross_entropy(self.output_fn(ps), self.labels)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Switch a Hugging Face model to eager attention (it has a double backward; SDPA's fused kernels do not)."""
    config = getattr(model, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    if previous in (None, "eager"):
        yield
        return
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def for_model(
    model: nn.Module, batch: dict[str, torch.Tensor], params: Sequence[str] | None = None
) -> Iterator[ModelFunctions]:
    """Loss/logit functions of ``model`` on ``batch`` w.r.t. the parameters whose names start with a prefix in
    ``params`` (all trainable ones if ``None``). Inside the block the model is in eval mode (no dropout) and
    uses eager attention; both are restored on exit.

    Causal LMs (a batch without ``labels``) predict ``input_ids[:, 1:]`` (``labels`` has -100 at the last
    position); classifiers need ``labels``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        prefixes = tuple(params)
        named = [(n, p) for n, p in named if n.startswith(prefixes)]
        if not named:
            raise ValueError(f"params: no trainable parameter name starts with any of {list(prefixes)}")
    if not named:
        raise ValueError("params: the model has no trainable parameters")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    causal = "labels" not in batch or batch["labels"].shape == batch["input_ids"].shape
    labels = batch.get("labels", batch["input_ids"])
    if causal:  # position t predicts token t + 1
        labels = F.pad(labels[:, 1:], (0, 1), value=-100)
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            yield ModelFunctions(tuple(n for n, _ in named), tuple(p.detach() for _, p in named), labels, model, inputs)
    finally:
        model.train(was_training)
