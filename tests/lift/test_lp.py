"""``lp_direction`` against an independent solve (scipy's linprog on the same LP as inequality rows), on
random, degenerate and time-limited LPs; warm re-solves; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from finetune_ext.lift import LPSolver, lp_direction
from finetune_ext.testing import tolerance

F64 = tolerance(torch.float64)


def _reference(c: np.ndarray, rows: np.ndarray, delta: float, box: float) -> float:
    ineq = np.vstack([rows, -rows])
    res = linprog(c, A_ub=ineq, b_ub=np.full(len(ineq), delta), bounds=[(-box, box)] * len(c), method="highs-ds")
    assert res.status == 0
    return float(res.fun)


def _feasible(d: np.ndarray, rows: np.ndarray, delta: float, box: float) -> bool:
    slack = 1e-7 * max(1.0, delta)
    return bool(np.abs(rows @ d).max() <= delta + slack and np.abs(d).max() <= box + 1e-9)


@pytest.mark.parametrize(("k", "n", "delta", "box"), [(3, 10, 1e-2, 1.0), (17, 301, 1e-4, 1.0), (40, 900, 0.5, 2.0)])
def test_matches_an_independent_solve(k, n, delta, box) -> None:
    rng = np.random.default_rng(k)
    c, rows = rng.standard_normal(n) * 1e-3, rng.standard_normal((k, n)) * 50  # loss-like scales
    res = lp_direction(c, rows, delta, box)
    assert res.status == "Optimal" and res.usable and _feasible(res.d, rows, delta, box)
    expected = _reference(c, rows, delta, box)
    assert res.objective == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert res.objective == pytest.approx(float(c @ res.d), rel=1e-12) and res.seconds > 0


@pytest.mark.parametrize(("k", "n"), [(8, 300), (32, 2000)])
def test_sifted_formulation_certifies_the_same_optimum(k, n) -> None:
    from benchmarks.cases.lp_direction import lift_lp

    rng = np.random.default_rng(k)
    low_rank = rng.standard_normal((k, 4)) @ rng.standard_normal((4, n))  # LiFT's SR1 rows after a short warm-up
    for c, rows in [lift_lp(k, n, seed=k), (rng.standard_normal(n), rng.standard_normal((k, n))),
                    (rng.standard_normal(n), low_rank)]:  # fmt: skip
        res = LPSolver(formulation="sifted").solve(c, rows, 1e-4)
        assert res.status == "Optimal" and _feasible(res.d, rows, 1e-4, 1.0)
        assert res.objective == pytest.approx(_reference(c, rows, 1e-4, 1.0), rel=1e-6)


def test_sifted_slack_price_grows_until_the_rows_hold() -> None:
    rng = np.random.default_rng(5)
    c, rows = rng.standard_normal(80), rng.standard_normal((6, 80))
    solver = LPSolver()
    # A slack price far below the dual's scale: the elastic LP first buys slack instead of meeting the rows.
    status, d = solver._sifted(c, rows, np.full(6, 1e-3), 1.0, None, 0.0, big=1e-6)
    assert status == "Optimal" and _feasible(d, rows, 1e-3, 1.0)
    assert float(c @ d) == pytest.approx(_reference(c, rows, 1e-3, 1.0), rel=1e-6)


def test_degenerate_lps() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((4, 30))
    rows = np.vstack([rows, rows, np.zeros((2, 30))])  # repeated and empty rows
    c = rng.standard_normal(30)
    res = lp_direction(c, rows, 1e-3)
    assert res.status == "Optimal" and res.objective == pytest.approx(_reference(c, rows, 1e-3, 1.0), rel=1e-6)
    flat = lp_direction(np.zeros(30), rows, 1e-3)  # every feasible point is optimal
    assert flat.status == "Optimal" and flat.objective == 0.0
    free = lp_direction(c, np.zeros((3, 30)), 1e-3)  # no coupling: the vertex is -sign(c) on the box
    np.testing.assert_allclose(free.d, -np.sign(c), **F64)


def test_tensors_and_warm_resolve() -> None:
    g = torch.Generator().manual_seed(0)
    c, rows = torch.randn(200, generator=g, dtype=torch.float64), torch.randn(12, 200, generator=g, dtype=torch.float64)
    solver = LPSolver()
    first = solver.solve(c, rows, 1e-2)
    again = solver.solve(c * 1.01, rows, 1e-2)  # same shape: starts from the previous basis
    assert first.status == again.status == "Optimal"
    assert again.objective == pytest.approx(_reference((c * 1.01).numpy(), rows.numpy(), 1e-2, 1.0), rel=1e-6)


def test_time_limit_is_reported_never_raised() -> None:
    rng = np.random.default_rng(2)
    c, rows = rng.standard_normal(4000), rng.standard_normal((64, 4000))
    res = LPSolver(solver="ipm").solve(c, rows, 1e-4, time_limit=1e-4)
    assert res.status == "Time limit reached"
    assert res.d is None or _feasible(res.d, rows, 1e-4, 1.0)  # a point is only handed out when feasible


def test_bad_input() -> None:
    with pytest.raises(
        ValueError, match=r"rows: expected shape \[k, 3\] with k >= 1 \(c has 3 entries\), got \[2, 4\]"
    ):
        lp_direction(np.ones(3), np.ones((2, 4)), 1e-3)
    with pytest.raises(ValueError, match="delta: expected a finite number > 0, got 0"):
        lp_direction(np.ones(3), np.ones((2, 3)), 0)
    with pytest.raises(ValueError, match="formulation: expected 'direct' or 'sifted', got 'dual'"):
        LPSolver(formulation="dual")
    with pytest.raises(ValueError, match="c, rows: expected finite values"):
        lp_direction(np.array([1.0, np.nan]), np.ones((1, 2)), 1e-3)
