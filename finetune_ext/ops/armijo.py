"""Multi-tensor kernels of the block Armijo line search (``finetune_ext.optim.BlockArmijo``).

``armijo_moments_`` updates Adam's moments of every tensor and returns, per parameter block, ``gᵀPg`` (the
preconditioned Armijo right-hand side) and ``‖g‖²``, in one launch. ``armijo_update_`` moves every tensor by
``(alpha_g g + alpha_m m̂) P`` in one launch: a trial step, the move from one trial to the next (no copy of
the parameters is kept) and the final momentum step. Not differentiable (optimizer internals).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from finetune_ext import reference
from finetune_ext.ops._library import Backend, check_backend, use_kernel


def armijo_moments_(
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    block_of: Sequence[int],
    num_blocks: int,
    *,
    betas: tuple[float, float] = (0.9, 0.999),
    bias_correction2: float = 1.0,
    eps: float = 1e-8,
    adam: bool = True,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Update ``exp_avg``/``exp_avg_sq`` in place (``adam``) and return float64 ``[num_blocks, 2]``:
    per block ``(Σ g² P, Σ g²)``, ``P = 1 / (sqrt(v / bias_correction2) + eps)`` (1 without ``adam``)."""
    check_backend(backend)
    grads = list(grads)
    if not grads:
        raise ValueError("grads: expected at least one tensor, got none")
    if len(block_of) != len(grads):
        raise ValueError(f"block_of: expected {len(grads)} entries (one per tensor), got {len(block_of)}")
    args = (grads, list(exp_avg), list(exp_avg_sq), list(block_of), num_blocks, *betas, bias_correction2, eps, adam)
    if not use_kernel("armijo_moments_", backend, grads[0].device):
        return reference.armijo_moments_(*args)
    return torch.ops.finetune_ext.armijo_moments_(*args)


def armijo_update_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avg: Sequence[torch.Tensor],
    exp_avg_sq: Sequence[torch.Tensor],
    alpha_g: Sequence[float],
    alpha_m: Sequence[float],
    *,
    bias_correction1: float = 1.0,
    bias_correction2: float = 1.0,
    eps: float = 1e-8,
    adam: bool = True,
    backend: Backend = "auto",
) -> None:
    """``w += (alpha_g[i] g + alpha_m[i] m / bias_correction1) P`` for every tensor ``i``, in place."""
    check_backend(backend)
    params = list(params)
    if not params:
        raise ValueError("params: expected at least one tensor, got none")
    if len(alpha_g) != len(params) or len(alpha_m) != len(params):
        raise ValueError(
            f"alpha_g, alpha_m: expected {len(params)} entries each (one per tensor), "
            f"got {len(alpha_g)} and {len(alpha_m)}"
        )
    args = (params, list(grads), list(exp_avg), list(exp_avg_sq), [float(a) for a in alpha_g],
            [float(a) for a in alpha_m], bias_correction1, bias_correction2, eps, adam)  # fmt: skip
    if not use_kernel("armijo_update_", backend, params[0].device):
        reference.armijo_update_(*args)
    else:
        torch.ops.finetune_ext.armijo_update_(*args)
