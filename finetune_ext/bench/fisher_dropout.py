"""Cases for ``fisher_dropout``: per-feature keep over the last dimension, forward and backward.

Providers: ``reference`` (the textbook version a user writes: rand, compare, multiply, divide), ``compile``
(``torch.compile`` of it), ``ext`` (the fused kernel, keep checked once up front as ``FisherDropout`` does),
``F.dropout`` (one rate, for scale: it is not the same op) and ``copy`` (``x.clone()``, forward only: the
bandwidth issue 16 asks the kernel to reach 80 % of). Useful bytes: x (or the gradient) and keep
read once, the output written once; a stored mask is not counted.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from finetune_ext import ops, reference
from finetune_ext.bench.harness import Case, select_providers

WIDTH = 1024


def _providers(keep: torch.Tensor) -> dict:
    # The backward cases re-run one graph (retain_graph=True), which compiled graphs only allow without
    # donated buffers. Benchmark processes only.
    torch._functorch.config.donated_buffer = False
    compiled = torch.compile(reference.fisher_dropout_eager)
    return {
        "reference": lambda x: reference.fisher_dropout_eager(x, keep),
        "compile": lambda x: compiled(x, keep),
        "ext": lambda x: ops.fisher_dropout(x, keep, backend="ext", check_keep=False),
        "F.dropout": lambda x: F.dropout(x, 0.1, training=True),
        "copy": torch.clone,
    }


def cases(device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None) -> Iterator[Case]:
    """Forward and backward cases for each size (elements) and provider (``None``: all)."""
    keep = (0.8 + 0.2 * torch.rand(WIDTH, device=device)).clamp(max=1.0)
    fns = select_providers(_providers(keep), providers)
    for numel in sizes:
        shape = (max(1, numel // WIDTH), WIDTH)
        x = torch.randn(shape, device=device, dtype=dtype)
        x_grad = x.detach().clone().requires_grad_(True)
        grad = torch.randn_like(x)
        moved = 2 * x.nbytes + keep.nbytes
        for name, fn in fns.items():
            fwd_bytes = 2 * x.nbytes if name == "copy" else moved
            yield Case("fisher_dropout", "fwd", name, shape, dtype, device, fwd_bytes, lambda fn=fn, x=x: fn(x))
            if name == "copy":  # no backward case: a copy's gradient is the incoming gradient itself
                continue
            y = fn(x_grad)
            yield Case(
                "fisher_dropout",
                "bwd",
                name,
                shape,
                dtype,
                device,
                moved,
                lambda y=y, x=x_grad, g=grad: torch.autograd.grad(y, x, g, retain_graph=True),
            )
