"""Pure-PyTorch versions of the Armijo line-search kernels: a loop over tensors (the oracle) and a
``torch._foreach_*`` version (the strongest stock baseline in the benchmarks)."""

from __future__ import annotations

import torch


def _precond(v: torch.Tensor, bc2: float, eps: float) -> torch.Tensor:
    return 1.0 / ((v / bc2).sqrt() + eps)


def armijo_moments_(
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    block_of: list[int],
    num_blocks: int,
    beta1: float,
    beta2: float,
    bias_correction2: float,
    eps: float,
    adam: bool,
) -> torch.Tensor:
    """Update Adam's moments in place; per block ``(sum g^2 P, sum g^2)`` as float64 ``[num_blocks, 2]``."""
    out = torch.zeros(num_blocks, 2, dtype=torch.float64, device=grads[0].device)
    for i, g in enumerate(grads):
        g2 = g.float() * g.float() if g.dtype in (torch.float16, torch.bfloat16) else g * g
        p = torch.ones((), dtype=g2.dtype, device=g.device)
        if adam:
            exp_avg[i].mul_(beta1).add_(g, alpha=1 - beta1)
            exp_avg_sq[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            p = _precond(exp_avg_sq[i].to(g2.dtype), bias_correction2, eps)
        out[block_of[i], 0] += (g2 * p).sum(dtype=torch.float64)
        out[block_of[i], 1] += g2.sum(dtype=torch.float64)
    return out


def armijo_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    alpha_g: list[float],
    alpha_m: list[float],
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    adam: bool,
) -> None:
    """``w += (alpha_g g + alpha_m m / bc1) P`` in place, tensor by tensor."""
    for i, w in enumerate(params):
        d = alpha_g[i] * grads[i]
        if adam:
            d = (d + alpha_m[i] * (exp_avg[i] / bias_correction1)) * _precond(exp_avg_sq[i], bias_correction2, eps)
        w.add_(d)


def armijo_update_foreach_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avg: list[torch.Tensor],
    exp_avg_sq: list[torch.Tensor],
    alpha_g: list[float],
    alpha_m: list[float],
    bias_correction1: float,
    bias_correction2: float,
    eps: float,
    adam: bool,
) -> None:
    """The same update with ``torch._foreach_*`` (several multi-tensor launches, temporaries)."""
    d = torch._foreach_mul(grads, alpha_g)
    if adam:
        torch._foreach_add_(d, torch._foreach_mul(exp_avg, [a / bias_correction1 for a in alpha_m]))
        denom = torch._foreach_sqrt(torch._foreach_div(exp_avg_sq, bias_correction2))
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(d, denom)
    torch._foreach_add_(params, d)
