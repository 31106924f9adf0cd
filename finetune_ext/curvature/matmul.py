"""Matrix products whose forward-mode derivative skips operands without a tangent.

PyTorch's forward AD differentiates ``a @ b`` as ``a_t @ b + a @ b_t`` with a materialised zero ``b_t`` when only
``a`` carries a tangent: for a language model's head that is a whole extra ``[rows, 768] x [768, 50257]`` product
and an addition over the batched tangents, in every product and again in the backward of the tangents. Inside
``tangent_aware_matmuls()`` the linear layers of a model (``F.linear``, ``torch.addmm`` as in GPT-2's ``Conv1D``)
with at least ``MIN_WEIGHT_NUMEL`` weights go through ``_MatMul``, whose ``jvp`` computes only the terms that
exist and whose backward is made of ``_MatMul`` too, so forward-over-reverse (exact HVPs) gains the same.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for matrices or batches of them (``torch.matmul`` broadcasting), with the tangent-aware forward
    derivative."""
    return _MatMul.apply(a, b)


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed over the leading dimensions it was broadcast along, back to ``shape``."""
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


class _MatMul(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return torch.matmul(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.save_for_backward(a, b)
        ctx.save_for_forward(a, b)
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, a_t, b_t):
        a, b = ctx.saved_tensors
        out = torch.matmul(a_t, b) if a_t is not None else None
        if b_t is not None:
            out = torch.matmul(a, b_t) if out is None else out + torch.matmul(a, b_t)
        return out

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        a, b = ctx.saved_tensors
        grad_a = _sum_to(matmul(grad, b.mT), a.shape) if ctx.needs_input_grad[0] else None
        grad_b = _sum_to(matmul(a.mT, grad), b.shape) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = matmul(x, weight.t())
    return out if bias is None else out + bias


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta=1, alpha=1) -> torch.Tensor:
    out = matmul(a, b)
    return (out if alpha == 1 else alpha * out) + (bias if beta == 1 else beta * bias)


# Below this many weight elements the saved matmul costs less than the autograd.Function's own overhead under
# torch.func (measured on tiny float64 test models: 3x slower products when every layer is routed).
MIN_WEIGHT_NUMEL = 1 << 16


class _TangentAwareMatmuls(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args[0].dim() >= 2 and args[1].numel() >= MIN_WEIGHT_NUMEL:
            return _linear(*args, **kwargs)
        if func is torch.addmm and not kwargs.keys() - {"beta", "alpha"} and args[2].numel() >= MIN_WEIGHT_NUMEL:
            return _addmm(*args, **kwargs)
        return func(*args, **kwargs)


@contextmanager
def tangent_aware_matmuls() -> Iterator[None]:
    """Route the linear layers and matmuls called inside through ``_MatMul`` (see the module docstring)."""
    with _TangentAwareMatmuls():
        yield
