"""Pure-PyTorch Fisher-masked dropout.

``fisher_dropout`` is the oracle of the fused kernels: the same Philox bits, the same arithmetic, so
the compiled kernels match it exactly. ``fisher_dropout_eager`` is what a user would write by hand
(``torch.rand``, compare, multiply, divide): the baseline the benchmarks compare against.
"""

from __future__ import annotations

import torch

from finetune_ext.reference.philox import philox_uniform


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_mask(shape: torch.Size | tuple[int, ...], keep: torch.Tensor, seed: int, offset: int) -> torch.Tensor:
    """Boolean keep-mask of the kernels for ``shape`` (row-major element order)."""
    keep = keep.to(torch.float32)
    numel = 1
    for s in shape:
        numel *= s
    u = philox_uniform(numel, seed, offset, keep.device).reshape(shape)
    return u < (keep.reshape(()) if keep.numel() == 1 else keep)


def fisher_dropout(
    x: torch.Tensor,
    keep: torch.Tensor,
    residual: torch.Tensor | None = None,
    *,
    seed: int,
    offset: int = 0,
) -> torch.Tensor:
    """``residual + x * m / keep`` with the kernels' Philox mask ``m``; differentiable in x and residual."""
    keep = keep.to(device=x.device, dtype=torch.float32)
    mask = dropout_mask(x.shape, keep, seed, offset)
    acc = _acc_dtype(x.dtype)
    scale = (1.0 / keep).reshape(()) if keep.numel() == 1 else 1.0 / keep
    y = torch.where(mask, x.to(acc) * scale.to(acc), torch.zeros((), dtype=acc, device=x.device))
    if residual is not None:
        y = residual.to(acc) + y
    return y.to(x.dtype)


def fisher_dropout_eager(
    x: torch.Tensor,
    keep: torch.Tensor,
    residual: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Textbook per-feature dropout: draw uniforms, compare with keep, multiply, divide."""
    keep = keep.to(x.dtype)
    u = torch.rand_like(x) if generator is None else torch.rand(x.shape, dtype=x.dtype, generator=generator)
    mask = u.to(x.device) < keep
    y = x * mask / keep
    return y if residual is None else residual + y
