"""Row and layer norms of a low-rank-adapted weight and of its gradient proxy, without forming ``B A``.

For ``W' = W + s B A`` (LinChain: ``A`` is the chain's ``M A``), row ``i``:

    ||W'_i||^2 = ||W_i||^2 + 2 s <B_i, (W A^T)_i> + s^2 B_i (A A^T) B_i^T

from the cached ``||W_i||^2``, the ``[out, r]`` product ``W A^T`` (computed as ``A W^T``) and the ``r x r`` Gram
of ``A``. The gradient proxy of LoRA-GGPO and MGPO, ``G = s (grad_B A + B grad_A)``, is the product ``P Q`` of
``P = s [grad_B, B]`` ``[out, 2r]`` and ``Q = [A; grad_A]`` ``[2r, in]``, so ``||G_i||^2 = P_i (Q Q^T) P_i^T``
from the ``2r x 2r`` Gram of ``Q``. Everything but ``W A^T`` costs ``O((in + out) r^2)``; ``W A^T`` is one
``[out, in] x [in, r]`` product, the cost of a forward pass over ``r`` tokens. Results are float64.
"""

from __future__ import annotations

import torch


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``: ``torch.bmm`` for stacked layers (matmul's broadcasting adds about ten dispatcher events)."""
    return torch.bmm(a, b) if a.dim() == 3 and b.dim() == 3 else a @ b


def row_sq_norms(W: torch.Tensor) -> torch.Tensor:
    """``||W_i||^2`` of every row, float64 (cache it: the base weight is frozen)."""
    return W.double().square().sum(-1)


def weight_product(W_t: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``A W^T`` ``[r, out]`` in ``W``'s dtype from ``W_t = W^T`` ``[in, out]``: the one product of a row-norm
    update that touches ``W``. Not ``W A^T``: for a transposed view ``W`` (GPT-2's Conv1D) MKL takes 5-15x longer
    on that product on CPU. One ``mm`` a layer (on a GPU the statistics' step cost is the host's)."""
    return torch.mm(A if A.dtype == W_t.dtype else A.to(W_t.dtype), W_t)


def merged_row_norms(
    w_sq: torch.Tensor, AW: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float
) -> torch.Tensor:
    """``||(W + scale B A)_i||`` for every row ``i``, from ``w_sq = row_sq_norms(W)`` and ``AW = weight_product(W^T,
    A)``. Every argument may carry a leading layer dimension (layers of one shape, stacked)."""
    A64, B64 = A.double(), B.double()
    # ||W'_i||^2 = ||W_i||^2 + 2 s <B_i, half_i>
    half = _product(B64, _product(A64, A64.mT)).mul_(0.5 * scale).add_(AW.mT)
    return torch.add(w_sq, (B64 * half).sum(-1), alpha=2.0 * scale).clamp_min_(0.0).sqrt_()


def product_row_norms(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``||(P Q)_i||`` for every row ``i`` from the Gram of ``Q``, without forming ``P Q`` (stacked layers too)."""
    P64, Q64 = P.double(), Q.double()
    return (_product(P64, _product(Q64, Q64.mT)) * P64).sum(-1).clamp_min_(0.0).sqrt_()


def product_norm(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """``||P Q||_F`` from the Gram of ``Q``, without forming ``P Q``."""
    return product_row_norms(P, Q).square().sum(-1).sqrt()


def gradient_factors(
    A: torch.Tensor,
    B: torch.Tensor,
    grad_A: torch.Tensor,
    grad_B: torch.Tensor,
    scale: float,
    M: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, Q)`` with ``P Q = scale (grad_B A + B M grad_A)``: ``P = scale [grad_B, B]``, ``Q = [A; M grad_A]``.
    ``A`` is the effective down-projection (LinChain: ``M A_0``) and ``M`` the chain matrix, ``None`` for LoRA."""
    grad_A = _product(M, grad_A) if M is not None else grad_A
    return scale * torch.cat([grad_B, B], dim=-1), torch.cat([A, grad_A], dim=-2)
