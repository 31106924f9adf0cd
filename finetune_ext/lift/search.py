"""Step length along LiFT's direction: bracketing, then golden-section search, within an evaluation budget."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

INV_PHI = (math.sqrt(5) - 1) / 2  # 0.618...


@dataclass
class SearchResult:
    t: float  # the best step found (0 when no step lowers the function)
    value: float  # F(t)
    start: float  # F(0)
    evaluations: int


def golden_section(
    fn: Callable[[float], float], first: float = 0.1, tol: float = 1e-4, max_evals: int = 25
) -> SearchResult:
    """Minimise ``fn`` over ``t >= 0`` as the predecessor does: evaluate ``0`` and ``first``, double ``t`` while
    ``fn`` decreases (a bracket ``[a, c]`` around the best point), then shrink the bracket by the golden ratio
    until it is shorter than ``tol`` (relative to ``first``) or ``max_evals`` evaluations are spent. If ``fn``
    already rises at ``first``, the bracket is ``[0, first]``. Returns the best point evaluated.
    """
    if not first > 0 or not tol > 0 or max_evals < 3:
        raise ValueError(f"first, tol: expected > 0 and max_evals >= 3, got {first}, {tol}, {max_evals}")
    seen: dict[float, float] = {}

    def f(t: float) -> float:
        if t not in seen:
            value = fn(t)
            seen[t] = value if math.isfinite(value) else math.inf
        return seen[t]

    a, b = 0.0, first
    f(a)
    if f(b) < f(a):  # expand while decreasing: [a, b, c] with f(b) below both ends
        c = 2 * b
        while f(c) < f(b) and len(seen) < max_evals:
            a, b, c = b, c, 2 * c
    else:
        c = b
    lo, hi = a, c
    x1, x2 = hi - INV_PHI * (hi - lo), lo + INV_PHI * (hi - lo)
    while hi - lo > tol * first and len(seen) + 2 <= max_evals:
        if f(x1) < f(x2):
            hi, x2 = x2, x1
            x1 = hi - INV_PHI * (hi - lo)
        else:
            lo, x1 = x1, x2
            x2 = lo + INV_PHI * (hi - lo)
    t = min(seen, key=lambda k: (seen[k], k))
    return SearchResult(t, seen[t], seen[0.0], len(seen))
