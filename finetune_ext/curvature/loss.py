"""Mean softmax cross-entropy whose second derivative is the fused kernel, for ``torch.func`` transforms.

Forward-over-reverse through ``F.cross_entropy`` differentiates log-softmax's backward elementwise: a handful of
passes over ``[m, rows, vocab]`` tangents per product, which dominate an HVP for a 50,257-word head. Here the
gradient in logit space, ``g = (softmax(z) - onehot(y)) / n``, is its own ``autograd.Function`` whose ``jvp``
(and ``backward``: the Hessian is symmetric) is ``softmax_ce_hessian_vp``: one fused pass per vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune_ext.ops.softmax_ce_hessian_vp import softmax_ce_hessian_vp


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy`` (mean over the rows whose label is not ``ignore_index``) of ``logits [..., C]``,
    with the fused Hessian under ``torch.func.jvp``/``vmap`` and double backward."""
    return _CrossEntropy.apply(logits, labels, ignore_index)


def _scale(labels: torch.Tensor, ignore_index: int, weight: torch.Tensor) -> torch.Tensor:
    """``weight / n``: the incoming gradient of the mean over the n rows that count."""
    return weight / (labels != ignore_index).sum().clamp(min=1).to(weight.dtype)


def _unit_grad(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``softmax(z) - onehot(y)`` per row, zero on ignored rows."""
    valid = (labels != ignore_index).unsqueeze(-1)
    p = torch.softmax(logits, dim=-1)
    onehot = torch.zeros_like(p).scatter_(-1, labels.clamp(min=0).unsqueeze(-1), 1.0)
    return (p - onehot) * valid


class _CrossEntropy(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(logits, labels, ignore_index):
        c = logits.shape[-1]
        return F.cross_entropy(logits.reshape(-1, c), labels.reshape(-1), ignore_index=ignore_index)

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index = inputs
        ctx.save_for_backward(logits, labels)
        ctx.save_for_forward(logits, labels)
        ctx.ignore_index = ignore_index

    @staticmethod
    def backward(ctx, grad_out):
        logits, labels = ctx.saved_tensors
        return _CrossEntropyGrad.apply(logits, labels, ctx.ignore_index, grad_out), None, None

    @staticmethod
    def jvp(ctx, logits_t, labels_t, ignore_index_t):
        logits, labels = ctx.saved_tensors
        g = _CrossEntropyGrad.forward(logits, labels, ctx.ignore_index, logits.new_ones(()))
        return torch.dot(g.reshape(-1), logits_t.reshape(-1))


class _CrossEntropyGrad(torch.autograd.Function):
    """``w (softmax(z) - onehot(y)) / n`` for the incoming gradient ``w`` of the loss; its derivative in ``z`` is
    the fused Hessian product (and, being symmetric, its backward too)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits, labels, ignore_index, weight):
        return _unit_grad(logits, labels, ignore_index) * _scale(labels, ignore_index, weight.to(logits.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        logits, labels, ignore_index, weight = inputs
        ctx.save_for_backward(logits, labels, weight)
        ctx.save_for_forward(logits, labels, weight)
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        logits, labels, weight = ctx.saved_tensors
        grad_logits = grad_weight = None
        if ctx.needs_input_grad[0]:
            scale = _scale(labels, ctx.ignore_index, weight.to(logits.dtype))
            grad_logits = _hessian_vp(logits, grad, labels, ctx.ignore_index, scale)
        if ctx.needs_input_grad[3]:
            unit = _unit_grad(logits, labels, ctx.ignore_index)
            grad_weight = _scale(labels, ctx.ignore_index, torch.dot(unit.reshape(-1), grad.reshape(-1)))
        return grad_logits, None, None, grad_weight

    @staticmethod
    def jvp(ctx, logits_t, labels_t, ignore_index_t, weight_t):
        # Tangents are not materialised: None for an input without one (the gradient seed has none in an HVP).
        logits, labels, weight = ctx.saved_tensors
        out = None
        if logits_t is not None:
            out = _hessian_vp(logits, logits_t, labels, ctx.ignore_index, _scale(labels, ctx.ignore_index, weight))
        if weight_t is not None:
            term = _unit_grad(logits, labels, ctx.ignore_index) * _scale(labels, ctx.ignore_index, weight_t)
            out = term if out is None else out + term
        return out


def _hessian_vp(logits: torch.Tensor, u: torch.Tensor, labels: torch.Tensor, ignore_index: int, scale) -> torch.Tensor:
    return softmax_ce_hessian_vp(logits, u.unsqueeze(0), labels, ignore_index=ignore_index, scale=scale)[0]
