"""The one tolerance table of the project. Never widen an entry to make a test pass.

Elementwise ops compare against their reference with these ``(atol, rtol)`` pairs (bitsandbytes' values).
Reductions use the flash-attention rule instead: the op's error against a float64 reference is at most
twice the error of the pure-PyTorch version in the same dtype (``assert_within_2x_reference``).
"""

from __future__ import annotations

import torch

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-4, 1e-3),
    torch.bfloat16: (1e-3, 1e-2),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close`` at ``dtype``."""
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}
