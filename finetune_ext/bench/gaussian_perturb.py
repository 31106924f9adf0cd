"""Cases for ``gaussian_perturb``: ``W + std[:, None] * z`` for a weight of ``size`` elements (768 rows).

Providers: ``reference`` (the bit-exact pure-PyTorch Philox and Box-Muller), ``eager`` (what one writes by hand:
``W + std[:, None] * torch.randn_like(W)``), ``ext`` (the kernel). GB/s counts W read and the result written.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from finetune_ext import ops, reference
from finetune_ext.bench.harness import Case, select_providers

ROWS = 768


def cases(device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None) -> Iterator[Case]:
    for size in sizes:
        cols = max(1, size // ROWS)
        W = torch.randn(ROWS, cols, device=device, dtype=dtype)
        std = torch.rand(ROWS, device=device)
        available = {
            "reference": lambda W=W, std=std: reference.gaussian_perturb(W, std, seed=1),
            "eager": lambda W=W, std=std: W + std[:, None].to(W.dtype) * torch.randn_like(W),
            "ext": lambda W=W, std=std: ops.gaussian_perturb(W, std, seed=1, backend="ext"),
        }
        moved = 2 * W.numel() * W.element_size()
        for name, fn in select_providers(available, providers).items():
            yield Case("gaussian_perturb", "fwd", name, tuple(W.shape), dtype, device, moved, fn)
