"""``softmax_ce_hessian_vp``: the Hessian of softmax cross-entropy w.r.t. the logits, times m vectors.

Per row ``H v = p * v - p (pᵀ v)`` with ``p = softmax(logits)``: the middle factor of a Gauss-Newton
vector product for language models (``Jᵀ H J v``). The kernels compute the softmax on the fly from the
logits, so the probabilities (``N x C``, 800 MB at 4096 x 50257 in fp32) are never materialised.
"""

from __future__ import annotations

import torch

from finetune_ext import reference
from finetune_ext.ops._library import Backend, check_backend, use_kernel

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def softmax_ce_hessian_vp(
    logits: torch.Tensor,
    V: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    scale: torch.Tensor | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``(diag(p) - p pᵀ) v`` for every row of ``logits`` and every vector in ``V``.

    Args:
        logits: ``[..., C]`` (any leading shape), float16/bfloat16/float32/float64.
        V: ``[m, ..., C]``: m vectors in logit space, the leading shape of ``logits`` after m.
        labels: optional ``[...]`` int64; rows whose label is ``ignore_index`` give zeros (the loss ignores them).
        scale: optional 0-dim tensor on ``logits``' device multiplying the result inside the kernel (e.g. 1 / rows
            of a mean loss; a tensor, so no host sync), saving a pass over ``[m, ..., C]``.
        backend: ``"ext"``, ``"reference"`` or ``"auto"`` (the kernel when one is registered).

    Returns:
        ``[m, ..., C]`` in ``V``'s dtype, accumulated in float32 (float64 for float64 inputs). Not scaled by
        the number of rows unless ``scale`` says so.
    """
    check_backend(backend)
    for name, t in (("logits", logits), ("V", V)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got {_describe(t)}")
    if logits.dim() < 1 or V.dim() != logits.dim() + 1 or V.shape[1:] != logits.shape:
        raise ValueError(f"V: expected shape [m, {', '.join(map(str, logits.shape))}], got {list(V.shape)}")
    if V.device != logits.device:
        raise ValueError(f"V: expected device {logits.device} (the device of logits), got {V.device}")
    if (logits.dtype == torch.float64) != (V.dtype == torch.float64):
        raise ValueError(f"V: float64 logits need float64 V and vice versa, got {logits.dtype} and {V.dtype}")
    c = logits.shape[-1]
    if c == 0:
        raise ValueError("logits: expected at least one class (last dimension >= 1), got 0")
    if V.numel() == 0:  # no vectors or no rows: the empty product
        return torch.zeros_like(V)
    z = logits.reshape(-1, c)
    v = V.reshape(V.shape[0], -1, c)
    lab = None
    if labels is not None:
        if labels.shape != logits.shape[:-1] or labels.dtype != torch.int64 or labels.device != logits.device:
            raise ValueError(
                f"labels: expected int64 of shape {list(logits.shape[:-1])} on {logits.device}, "
                f"got {labels.dtype} of shape {list(labels.shape)} on {labels.device}"
            )
        lab = labels.reshape(-1)
    if scale is not None and (not isinstance(scale, torch.Tensor) or scale.dim() != 0 or scale.device != logits.device):
        got = f"{list(scale.shape)} on {scale.device}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"scale: expected a 0-dim tensor on {logits.device}, got {got}")
    if not use_kernel("softmax_ce_hessian_vp", backend, logits.device):
        return reference.softmax_ce_hessian_vp(z, v, lab, ignore_index, scale).view(V.shape)
    return torch.ops.finetune_ext.softmax_ce_hessian_vp(z, v, lab, ignore_index, scale).view(V.shape)


def _describe(t: object) -> str:
    return f"{t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__


def _setup_context(ctx, inputs, output) -> None:
    logits, _, labels, ignore_index, scale = inputs
    ctx.save_for_backward(logits, labels, scale)
    ctx.ignore_index = ignore_index


def _backward(ctx, grad: torch.Tensor):
    # H is symmetric, so the gradient w.r.t. V is H applied to the incoming gradient. The logits are
    # treated as constants (curvature at a fixed point), as in every use of this op.
    logits, labels, scale = ctx.saved_tensors
    grad_v = torch.ops.finetune_ext.softmax_ce_hessian_vp(logits, grad, labels, ctx.ignore_index, scale)
    return None, grad_v if ctx.needs_input_grad[1] else None, None, None, None


torch.library.register_autograd("finetune_ext::softmax_ce_hessian_vp", _backward, setup_context=_setup_context)
