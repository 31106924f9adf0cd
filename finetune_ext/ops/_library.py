"""Every schema of the ``finetune_ext`` namespace and its fake (meta) kernel: the one place ops are declared.

Kernels register against these schemas from C++ (``TORCH_LIBRARY_IMPL(finetune_ext, CPU|CUDA, m)`` in
``csrc/``), so an op exists, with its fake kernel for ``torch.compile``, even when the compiled library is
missing. Autograd is registered next to each public function in ``finetune_ext/ops/<op>.py``.
"""

from __future__ import annotations

import torch

LIB = torch.library.Library("finetune_ext", "DEF")

# y = residual + x * m / keep, m ~ Bernoulli(keep) from Philox keyed by seed = (seed, offset), a CPU int64[2].
# keep: float32 of shape [] / [1] (one site) or [x.size(-1)] (per feature). Output is contiguous.
LIB.define("fisher_dropout(Tensor x, Tensor keep, Tensor? residual, Tensor seed) -> Tensor")


@torch.library.register_fake("finetune_ext::fisher_dropout")
def _fisher_dropout_fake(
    x: torch.Tensor, keep: torch.Tensor, residual: torch.Tensor | None, seed: torch.Tensor
) -> torch.Tensor:
    # The fake kernel lets torch.compile trace the op without running it (shapes, dtypes, strides only).
    torch._check(keep.dtype == torch.float32, lambda: f"keep must be float32, got {keep.dtype}")
    return x.new_empty(x.shape)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether a compiled kernel of ``finetune_ext::<op>`` is registered for ``device``'s type."""
    return _has_kernel(op, device.type)


@torch.compiler.assume_constant_result  # fixed once the library is loaded; lets torch.compile fold the branch
def _has_kernel(op: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"finetune_ext::{op}", key)
