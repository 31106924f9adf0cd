"""Cases for ``softmax_ce_hessian_vp``: m = 8 vectors over a GPT-2 vocabulary (C = 50257), rows = size // C;
providers ``reference`` (pure PyTorch: softmax materialised), ``compile``, ``ext``. Useful bytes: logits and V
read once, the output written once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from finetune_ext import ops, reference
from finetune_ext.bench.harness import Case, select_providers

VOCAB, VECTORS = 50257, 8


def cases(device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None) -> Iterator[Case]:
    """Fused Hessian-vector kernel against the pure-PyTorch and compiled versions."""
    compiled = torch.compile(reference.softmax_ce_hessian_vp)
    fns = select_providers(
        {
            "reference": reference.softmax_ce_hessian_vp,
            "compile": compiled,
            "ext": lambda z, v: ops.softmax_ce_hessian_vp(z, v, backend="ext"),
        },
        providers,
    )
    for size in sizes:
        rows = max(1, size // VOCAB)
        logits = torch.randn(rows, VOCAB, device=device, dtype=dtype)
        V = torch.randn(VECTORS, rows, VOCAB, device=device, dtype=dtype)
        moved = logits.nbytes + 2 * V.nbytes
        for name, fn in fns.items():
            run = lambda fn=fn, z=logits, v=V: fn(z, v)  # noqa: E731
            yield Case("softmax_ce_hessian_vp", "fwd", name, tuple(V.shape), dtype, device, moved, run)
