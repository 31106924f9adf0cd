"""``fisher_dropout``: dropout with per-site or per-feature keep probabilities, mask-free backward.

``y = residual + x * m / keep`` with ``m ~ Bernoulli(keep)`` drawn from counter-based Philox keyed by
``(seed, offset)``. The backward regenerates the mask from the same key instead of storing it, so
nothing of the size of ``x`` is saved. The CPU and CUDA kernels and ``reference.fisher_dropout`` give
bit-identical masks for the same key and shape.
"""

from __future__ import annotations

import math

import torch

from finetune_ext import reference
from finetune_ext.ops._library import Backend, check_backend, keep_tensor, philox_key, use_kernel

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fisher_dropout(
    x: torch.Tensor,
    keep: float | torch.Tensor,
    *,
    residual: torch.Tensor | None = None,
    training: bool = True,
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
    check_keep: bool = True,
) -> torch.Tensor:
    """Fisher-masked dropout, optionally fused with a residual add.

    Args:
        x: input of any shape, float16/bfloat16/float32/float64; non-contiguous views are fine.
        keep: keep probability in (0, 1]: a float or 0-d/1-element tensor (one dropout site), or a
            tensor of ``x.shape[-1]`` values (per feature), on ``x``'s device. Not differentiated.
        residual: optional tensor like ``x``; returns ``residual + dropout(x)`` in one pass.
        training: ``False`` returns ``x`` (plus ``residual``) unchanged, as ``nn.Dropout.eval()`` does.
        seed: Philox key. ``None`` draws one from ``generator`` (default: the CPU default generator),
            so ``torch.manual_seed`` reproduces a run and CPU and CUDA runs draw the same masks.
        offset: Philox counter offset, to draw independent masks under one seed.
        backend: ``"ext"`` the compiled kernel, ``"reference"`` pure PyTorch, ``"auto"`` the kernel when
            one is registered for ``x``'s device.
        check_keep: check the values of a tensor ``keep`` (one host sync on GPU). Modules that validate
            their rates once turn it off.

    Returns:
        A contiguous tensor with ``x``'s shape and dtype.
    """
    check_backend(backend)
    keep_t = _check_args(x, keep, residual, check_keep)
    if not training:
        return x if residual is None else residual + x
    seed_t = philox_key(seed, offset, generator)
    if not use_kernel("fisher_dropout", backend, x.device):
        return reference.fisher_dropout(x, keep_t, residual, seed=int(seed_t[0]), offset=int(seed_t[1]))
    return torch.ops.finetune_ext.fisher_dropout(x, keep_t, residual, seed_t)


def _check_args(
    x: torch.Tensor, keep: float | torch.Tensor, residual: torch.Tensor | None, check_keep: bool
) -> torch.Tensor:
    """Validate the arguments and return ``keep`` as a float32 tensor on ``x``'s device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected dtype float16, bfloat16, float32 or float64, got {x.dtype}")
    width = x.shape[-1] if x.dim() else 1
    if isinstance(keep, torch.Tensor):
        if not keep.is_floating_point():
            raise ValueError(f"keep: expected a floating dtype, got {keep.dtype}")
        if keep.device != x.device:
            raise ValueError(f"keep: expected device {x.device} (the device of x), got {keep.device}")
        if keep.dim() > 1 or keep.numel() not in (1, width):
            raise ValueError(
                f"keep: expected shape [] or [1] (one site) or [{width}] (x.shape[-1], per feature), "
                f"got {list(keep.shape)}"
            )
        if check_keep and not torch.compiler.is_compiling():
            bad = ~((keep > 0) & (keep <= 1))  # NaN fails both comparisons
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0]) if keep.dim() else 0
                raise ValueError(f"keep: expected every value in (0, 1], got {keep.reshape(-1)[i].item()} at index {i}")
        keep_t = keep.to(torch.float32)
    elif isinstance(keep, (int, float)):
        if math.isnan(keep) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep: expected a value in (0, 1], got {keep}")
        keep_t = keep_tensor(float(keep), x.device)
    else:
        raise TypeError(f"keep: expected a float or a torch.Tensor, got {type(keep).__name__}")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual: expected shape {list(x.shape)} (the shape of x), got {list(residual.shape)}")
        if residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(
                f"residual: expected dtype {x.dtype} on {x.device} (like x), got {residual.dtype} on {residual.device}"
            )
    return keep_t


def _setup_context(ctx, inputs, output) -> None:
    _, keep, residual, seed = inputs
    ctx.save_for_backward(keep, seed)
    ctx.has_residual = residual is not None


def _backward(ctx, grad: torch.Tensor):
    # d/dx (x * m / keep) = m / keep: the forward kernel applied to the gradient, mask regenerated.
    keep, seed = ctx.saved_tensors
    grad_x = torch.ops.finetune_ext.fisher_dropout(grad, keep, None, seed) if ctx.needs_input_grad[0] else None
    grad_residual = grad if ctx.has_residual and ctx.needs_input_grad[2] else None
    return grad_x, None, grad_residual, None


torch.library.register_autograd("finetune_ext::fisher_dropout", _backward, setup_context=_setup_context)
