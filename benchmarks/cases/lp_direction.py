"""Cases for ``lp_direction``: LiFT's LP, ``min cᵀd`` s.t. ``|A d| <= delta``, ``|d| <= 1``, on a LiFT-shaped
problem: ``A`` = k rows of a compact SR1 matrix from 50 random pairs on ``n`` columns plus 2 λ columns
(``2 w / N``, tiny), ``c`` a heavy-tailed gradient (~1e-4). Providers: ``reference`` (HiGHS defaults on the
raw ranged-row model: the baseline of the speed target), ``ipm``, ``ipm-nocrossover``, ``simplex`` (HiGHS
options on the same raw model), ``scipy`` (``scipy.optimize.linprog(method="highs")`` with each ranged row as
two inequalities, as the predecessor states its rows), ``ours`` (``LPSolver(formulation="direct")``: the scaled
model, HiGHS defaults) and ``ours-sifted`` (``LPSolver()``, the sifted formulation that ``lp_direction`` and
LiFT use). ``sizes`` is unused: the shape is ``SHAPE``; the full 256 x 20,000 case is
``benchmarks/lp_direction.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from scipy.optimize import linprog

from finetune_ext.bench.harness import Case, select_providers
from finetune_ext.lift.lp import LPSolver, quiet_highs
from finetune_ext.lift.rows import CompactSR1

SHAPE = (64, 5000)
DELTA = 1e-4


def lift_lp(k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(c, A) of a LiFT-shaped LP: SR1 rows on ``n`` columns plus two λ columns."""
    g = torch.Generator().manual_seed(seed)
    S = torch.randn(50, n, generator=g, dtype=torch.float64) * 1e-3
    curvature = torch.rand(n, generator=g, dtype=torch.float64) * 10
    sr1 = CompactSR1(S, S * curvature)
    idx = torch.randperm(n, generator=g)[:k]
    w = torch.randn(n, generator=g, dtype=torch.float64) * 0.02
    lam_cols = torch.zeros(k, 2, dtype=torch.float64)
    lam_cols[: k // 2, 0], lam_cols[k // 2 :, 1] = 2 * w[idx[: k // 2]] / n, 2 * w[idx[k // 2 :]] / n
    A = torch.cat([sr1.rows(idx), lam_cols], dim=1)
    # Student-t with 2 degrees of freedom, z / sqrt(Exp(1)), drawn from ``g`` so that every run sees one LP.
    z, e = torch.randn(n, generator=g, dtype=torch.float64), -torch.rand(n, generator=g, dtype=torch.float64).log()
    c = z / e.sqrt() * 1e-4
    return torch.cat([c.double(), torch.zeros(2, dtype=torch.float64)]).numpy(), A.numpy()


def raw_highs(options: dict[str, object]):
    """HiGHS with ``options`` on the unscaled ranged-row model, a fresh model per call (no warm start)."""

    def solve(c: np.ndarray, A: np.ndarray) -> str:
        h = quiet_highs()
        for key, value in options.items():
            h.setOptionValue(key, value)
        k, n = A.shape
        h.addVars(n, np.full(n, -1.0), np.full(n, 1.0))
        h.changeColsCost(n, np.arange(n, dtype=np.int32), c)
        starts = np.arange(0, k * n, n, dtype=np.int32)
        h.addRows(k, np.full(k, -DELTA), np.full(k, DELTA), k * n, starts, np.tile(np.arange(n, dtype=np.int32), k),
                  A.ravel())  # fmt: skip
        h.run()
        return h.modelStatusToString(h.getModelStatus())

    return solve


def scipy_linprog(c: np.ndarray, A: np.ndarray) -> str:
    """scipy's HiGHS interface on ``-delta <= A d <= delta`` written as ``[A; -A] d <= delta``."""
    res = linprog(c, A_ub=np.vstack([A, -A]), b_ub=np.full(2 * A.shape[0], DELTA), bounds=(-1, 1), method="highs")
    return "Optimal" if res.status == 0 else res.message


VARIANTS = {
    "reference": {},
    "ipm": {"solver": "ipm"},
    "ipm-nocrossover": {"solver": "ipm", "run_crossover": "off"},
    "simplex": {"solver": "simplex"},
}


def cases(
    device: torch.device,
    dtype: torch.dtype,
    sizes: list[int],
    providers: list[str] | None,
    shape: tuple[int, int] = SHAPE,
    lp: tuple[np.ndarray, np.ndarray] | None = None,
) -> Iterator[Case]:
    """Each HiGHS variant and ours on the same LP (CPU; the LP has no GPU path): ``lp`` = (c, A), or the
    synthetic one of ``shape``."""
    c, A = lp if lp is not None else lift_lp(*shape)
    k, n = A.shape[0], A.shape[1] - 2
    fns = {name: raw_highs(opts) for name, opts in VARIANTS.items()}
    fns["scipy"] = scipy_linprog
    fns["ours"] = lambda c, A: LPSolver(formulation="direct").solve(c, A, DELTA).status
    fns["ours-sifted"] = lambda c, A: LPSolver().solve(c, A, DELTA).status
    for name, fn in select_providers(fns, providers).items():
        yield Case("lp_direction", "solve", name, (k, n + 2), torch.float64, torch.device("cpu"), c.nbytes + A.nbytes,
                   lambda fn=fn: fn(c, A))  # fmt: skip
