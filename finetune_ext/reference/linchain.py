"""Pure-PyTorch LinChain: the oracles of the ``linchain_compose``, ``lora_linear`` and ``linchain_linear`` ops and
the benchmarks' baselines.

``linchain_compose`` multiplies the mixers one by one; ``lora_linear`` writes the adapted layer with plain
autograd ops and the reference dropout (same Philox mask as the kernels); ``linchain_linear`` is the two
chained. ``linchain_chain`` is the official
code's per-token form (``A``, then each mixer with its bias, then ``B``), the "matmul by matmul" baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from finetune_ext.reference.fisher_dropout import fisher_dropout
from finetune_ext.reference.gaussian_perturb import gaussian_perturb


def linchain_compose(W: torch.Tensor, b: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, beff)``: ``M = W[:, k-1] @ ... @ W[:, 0]`` and ``beff = sum_i W[:, k-1] ... W[:, i+1] @ b[:, i]``."""
    M = W[:, 0]
    beff = b[:, 0] if b is not None else W.new_zeros(W.shape[0], W.shape[2])
    for i in range(1, W.shape[1]):
        M = W[:, i] @ M
        beff = (W[:, i] @ beff.unsqueeze(-1)).squeeze(-1)
        if b is not None:
            beff = beff + b[:, i]
    return M, beff


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    c: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor | None = None,
    *,
    seed: int = 0,
    offset: int = 0,
    noise_std: torch.Tensor | None = None,
    noise_key: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``x W^T + bias + scale * (dropout(x) A^T + c) B^T`` with the kernels' dropout mask (no ``x W^T`` term
    without ``weight``); with ``noise_std``, ``W`` is the kernels' ``W + eps`` of ``noise_key`` (a new tensor:
    ``weight`` is not written)."""
    xd = fisher_dropout(x, keep, seed=seed, offset=offset) if keep is not None else x
    u = F.linear(xd, A, c)
    if weight is None:
        return scale * F.linear(u, B) + (bias if bias is not None else 0.0)
    if noise_std is not None:
        weight = gaussian_perturb(weight, noise_std, seed=noise_key[0], offset=noise_key[1])
    return F.linear(x, weight, bias) + scale * F.linear(u, B)


def linchain_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    mixer_weight: torch.Tensor,
    mixer_bias: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor | None = None,
    *,
    seed: int = 0,
    offset: int = 0,
    noise_std: torch.Tensor | None = None,
    noise_key: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``lora_linear`` with ``A' = M A`` and ``c = beff`` of one chain, ``mixer_weight [k, r, r]`` and
    ``mixer_bias [k, r]`` or ``None`` (then no ``c``)."""
    M, beff = linchain_compose(mixer_weight[None], mixer_bias[None] if mixer_bias is not None else None)
    c = beff[0] if mixer_bias is not None else None
    return lora_linear(
        x, weight, bias, M[0] @ A, B, c, scale, keep, seed=seed, offset=offset, noise_std=noise_std,
        noise_key=noise_key,
    )  # fmt: skip


def linchain_chain(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    mixers: list[tuple[torch.Tensor, torch.Tensor | None]],
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The official code's forward: ``u = A dropout(x)``, ``u = M_i u + b_i`` for each mixer, ``+ scale B u``."""
    u = F.linear(F.dropout(x, dropout_p) if dropout_p else x, A)
    for w, b in mixers:
        u = F.linear(u, w, b)
    return F.linear(x, weight, bias) + scale * F.linear(u, B)
