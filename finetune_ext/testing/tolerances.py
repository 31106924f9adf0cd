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


def assert_within_2x_reference(actual: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor) -> None:
    """Reductions: the error of ``actual`` against the float64 ``exact`` is at most twice that of the
    pure-PyTorch ``reference`` in the same dtype, plus the dtype's ``atol`` (for references that are exact)."""
    err = (actual.double() - exact.double()).abs().max().item()
    ref_err = (reference.double() - exact.double()).abs().max().item()
    bound = 2 * ref_err + TOLERANCES[actual.dtype][0]
    assert err <= bound, f"max error {err:.3g} exceeds 2 x reference error {ref_err:.3g} + atol"


# Comparisons that are not an op against its reference, by name: (atol, rtol).
NAMED: dict[str, tuple[float, float]] = {
    "dense_curvature": (1e-8, 1e-5),  # float64 products against a dense Hessian/GGN (curvlinops' compare_matmat)
    "lanczos": (1e-8, 1e-6),  # float64 Lanczos eigenvalues against eigvalsh
    "quadratic_minimiser": (1e-4, 0.0),  # BlockArmijo's iterate after 400 steps against the exact minimiser
    "merge": (1e-4, 1e-4),  # merged adapters against the unmerged forward (fp32); atol relative to the output
}


def tolerance(dtype_or_name: torch.dtype | str, scale: float = 1.0) -> dict[str, float]:
    """``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close``: a dtype's entry or a named one, with
    ``atol`` multiplied by ``scale`` (the magnitude of the compared values, for relative comparisons)."""
    table = NAMED if isinstance(dtype_or_name, str) else TOLERANCES
    atol, rtol = table[dtype_or_name]
    return {"atol": atol * scale, "rtol": rtol}
