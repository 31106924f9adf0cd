"""``gaussian_perturb``: a frozen weight plus row-scaled Gaussian noise, ``W + std[:, None] * z``, as a new tensor.

The noise of LoRA-GGPO and Flat-LoRA. ``z`` is drawn from counter-based Philox keyed by ``(seed, offset)`` via
Box-Muller with float32 polynomials of our own, so the CPU and CUDA kernels and ``reference.gaussian_perturb``
give the same bits and the same key regenerates the same noise anywhere (backward, another micro-batch,
another rank). ``lora_linear(noise_std=...)`` uses it to multiply by ``W + eps`` without ever writing ``W``.
The op is not differentiable: the weight it perturbs is frozen and the noise is a constant.
"""

from __future__ import annotations

import torch

from finetune_ext import reference
from finetune_ext.ops._library import Backend, check_backend, philox_key, use_kernel

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def gaussian_perturb(
    weight: torch.Tensor,
    std: torch.Tensor,
    *,
    seed: int | None = None,
    offset: int = 0,
    generator: torch.Generator | None = None,
    backend: Backend = "auto",
) -> torch.Tensor:
    """``weight + std[:, None] * z`` with ``z ~ N(0, 1)`` i.i.d. from the Philox key ``(seed, offset)``.

    Args:
        weight: ``[out, in]``, any floating dtype and strides. ``z`` runs in memory order: row-major, or
            column-major for a transposed view (GPT-2's ``Conv1D`` weight ``.t()``), read and written in order.
        std: ``[out]`` row standard deviations (cast to float32), on ``weight``'s device.
        seed, offset, generator: the Philox key, as for ``fisher_dropout``.
        backend: ``"ext"``, ``"reference"`` or ``"auto"`` (the kernel when one is registered).

    Returns:
        A new ``[out, in]`` tensor in ``weight``'s dtype and layout (sums in float32, float64 for float64).
    """
    check_backend(backend)
    std = check_noise_args(weight, std)
    key = philox_key(seed, offset, generator)
    with torch.no_grad():
        if not use_kernel("gaussian_perturb", backend, weight.device):
            return reference.gaussian_perturb(weight, std, seed=int(key[0]), offset=int(key[1]))
        return torch.ops.finetune_ext.gaussian_perturb(weight, std, key)


def check_noise_args(weight: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Validate a weight and its row stds; ``std`` as float32."""
    if weight.dim() != 2 or weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight: expected a 2-d floating tensor [out, in], got {weight.dtype} {list(weight.shape)}")
    if not isinstance(std, torch.Tensor) or std.shape != weight.shape[:1] or std.device != weight.device:
        got = f"{list(std.shape)} on {std.device}" if isinstance(std, torch.Tensor) else type(std).__name__
        raise ValueError(f"std: expected shape [{weight.shape[0]}] on {weight.device} (weight [out, in]), got {got}")
    if not std.is_floating_point():
        raise ValueError(f"std: expected a floating dtype, got {std.dtype}")
    return std if std.dtype == torch.float32 else std.float()  # .to's no-op costs 1.5 us, per layer and step
