"""Curvature of Hugging Face models: loss and logit functions of a parameter subset for one batch."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from finetune_ext.curvature.products import Tensors


@dataclass
class ModelFunctions:
    """What ``hvp`` and ``ggn_vp`` need for one model and batch."""

    names: tuple[str, ...]
    params: Tensors
    labels: torch.Tensor
    model: nn.Module
    batch: dict[str, torch.Tensor]
    causal: bool

    def output_fn(self, ps: Tensors) -> torch.Tensor:
        """Logits of the predicted positions (shifted for causal LMs) with the selected parameters set to ``ps``."""
        out = functional_call(self.model, dict(zip(self.names, ps, strict=True)), args=(), kwargs=self.batch)
        logits = out.logits
        return logits[:, :-1] if self.causal else logits

    def loss_fn(self, ps: Tensors) -> torch.Tensor:
        """Mean cross-entropy over the rows whose label is not -100."""
        logits = self.output_fn(ps)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.labels.reshape(-1), ignore_index=-100)


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

    Causal LMs (a batch without ``labels``) predict ``input_ids[:, 1:]``; classifiers need ``labels``.
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
    labels = labels[:, 1:] if causal else labels
    was_training = model.training
    model.eval()
    try:
        with eager_attention(model):
            yield ModelFunctions(
                tuple(n for n, _ in named), tuple(p.detach() for _, p in named), labels, model, inputs, causal
            )
    finally:
        model.train(was_training)
