"""Pure-PyTorch Hessian of softmax cross-entropy w.r.t. the logits, applied to vectors.

For one row with probabilities ``p = softmax(z)`` the Hessian of ``-log p_y`` in ``z`` is
``diag(p) - p pᵀ`` (independent of the label y), so ``H v = p ⊙ v - p (pᵀ v)``.
"""

from __future__ import annotations

import torch


def softmax_ce_hessian_vp(
    logits: torch.Tensor,
    V: torch.Tensor,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale (diag(p) - p pᵀ) v`` for logits ``[N, C]`` and vectors ``V`` ``[m, N, C]``; ignored rows give 0."""
    acc = torch.float64 if torch.float64 in (logits.dtype, V.dtype) else torch.float32
    p = torch.softmax(logits.to(acc), dim=-1)
    v = V.to(acc)
    out = p * v - p * (p * v).sum(-1, keepdim=True)
    if labels is not None:
        out = out * (labels != ignore_index).to(acc).unsqueeze(-1)
    if scale is not None:
        out = out * scale.to(acc)
    return out.to(V.dtype)
