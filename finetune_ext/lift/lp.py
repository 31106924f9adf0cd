"""LiFT's linear program, solved by HiGHS: the steepest validation descent inside a tube of training optimality.

    minimise  cᵀd   subject to   -delta <= rows · d <= delta,   -box <= d <= box

``c`` is the validation gradient on the chosen coordinates (zero on the λ columns), ``rows`` the sampled rows
of ``[H_ww | H_wλ]``. Before solving, ``c`` is scaled to unit max-norm and each row (with its ``delta``) to
unit max-norm, so HiGHS sees numbers near 1 whatever the loss scale (the predecessor multiplied by 1e6 and
1e5 instead); ``objective`` is reported unscaled. ``formulation="direct"`` hands HiGHS the whole LP; its
``LPSolver`` keeps the last basis, so a re-solve of the same shape starts from the previous optimum.

``formulation="sifted"`` (the default) exploits that an optimal vertex has at most k coordinates strictly inside
the box. Every coordinate starts fixed at the bound its estimated reduced cost prefers (``-box·sign(c)`` when
the rows have full rank; ``_reduced_cost_estimate`` when not), except a working set of the k smallest. HiGHS
solves the restricted LP with elastic rows (a slack of cost ``big`` on each side of every row, so it is
feasible whatever was fixed); each round the fixed coordinates whose reduced cost (from HiGHS's row duals) has
the wrong sign for their bound are ranked by its size and the worst join the working set (k in the first
round, twice as many each round after), the model growing in place from its last basis. When no reduced cost
is wrong and no slack is left, the point and the row duals satisfy the full LP's optimality conditions: the
optimum is certified, not estimated. (A slack left with nothing to add means ``big`` was below the dual's
scale: it grows 100x.)
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import highspy
import numpy as np
import torch

USABLE = ("Optimal", "Time limit reached")  # statuses whose point LiFT may use (the latter only if feasible)


@dataclass
class LPResult:
    """``d`` (None when the LP gave no usable point), ``objective`` = cᵀd unscaled, HiGHS ``status``, ``seconds``."""

    d: np.ndarray | None
    objective: float
    status: str
    seconds: float

    @property
    def usable(self) -> bool:
        return self.d is not None


class LPSolver:
    """A persistent HiGHS model for ``min cᵀd, |rows·d| <= delta, |d| <= box`` (see the module docstring).

    ``solver``: HiGHS's ``solver`` option (``"choose"``, ``"simplex"``, ``"ipm"``, ``"pdlp"``); ``presolve`` and
    ``crossover`` are HiGHS's switches. ``threads`` caps HiGHS's threads (0: its default). ``formulation``:
    ``"sifted"`` or ``"direct"`` (module docstring).
    """

    def __init__(
        self,
        solver: str = "choose",
        presolve: bool = True,
        crossover: bool = True,
        threads: int = 0,
        formulation: str = "sifted",
    ) -> None:
        if formulation not in ("direct", "sifted"):
            raise ValueError(f"formulation: expected 'direct' or 'sifted', got {formulation!r}")
        self.formulation = formulation
        self.highs = quiet_highs()
        self.highs.setOptionValue("solver", solver)
        self.highs.setOptionValue("presolve", "on" if presolve else "off")
        self.highs.setOptionValue("run_crossover", "on" if crossover else "off")
        if threads:
            self.highs.setOptionValue("threads", threads)
        self._shape: tuple[int, int] | None = None
        self._basis = None

    def solve(
        self, c: np.ndarray, rows: np.ndarray, delta: float, box: float = 1.0, time_limit: float | None = None
    ) -> LPResult:
        c, rows = _check(c, rows, delta, box)
        start = time.perf_counter()
        c_scale = float(np.abs(c).max()) or 1.0
        row_scale = np.abs(rows).max(axis=1)
        row_scale[row_scale == 0] = 1.0
        scaled = rows / row_scale[:, None]
        if self.formulation == "sifted":
            status, d = self._sifted(c / c_scale, scaled, delta / row_scale, box, time_limit, start)
        else:
            status, d = self._direct(c / c_scale, scaled, delta / row_scale, box, time_limit)
        objective = float(c @ d) if d is not None else float("nan")
        return LPResult(d, objective, status, time.perf_counter() - start)

    def _direct(self, c, A, delta, box, time_limit):
        """The whole LP in one HiGHS solve, from the last basis when the shape repeats: (status, d or None)."""
        k, n = A.shape
        self.highs.clearModel()
        self.highs.addRows(k, -delta, delta, 0, np.zeros(k, dtype=np.int32), [], [])
        _add_columns(self.highs, A, c, box)
        self.highs.setOptionValue("time_limit", float(time_limit) if time_limit else float("inf"))
        if self._shape == (k, n) and self._basis is not None:
            self.highs.setBasis(self._basis)
        self.highs.run()
        status = self.highs.modelStatusToString(self.highs.getModelStatus())
        if not _feasible(self.highs):
            return status, None
        self._shape, self._basis = (k, n), self.highs.getBasis()
        return status, np.asarray(self.highs.getSolution().col_value, dtype=np.float64)

    def _sifted(self, c, A, delta, box, time_limit, start, big: float = 1e4):
        """The column-generation solve of the module docstring: (status, d or None)."""
        k, n = A.shape
        r = _reduced_cost_estimate(c, A)
        working = np.sort(np.argsort(np.abs(r), kind="stable")[: min(n, k)])
        fixed = np.ones(n, dtype=bool)
        fixed[working] = False
        bound = np.where(r > 0, -box, box)
        offset = A @ np.where(fixed, bound, 0.0)
        h = self._elastic(A[:, working], c[working], delta, offset, box, big)
        grow = k
        while True:
            left = np.inf if time_limit is None else max(time_limit - (time.perf_counter() - start), 1e-3)
            h.setOptionValue("time_limit", float(left))
            h.run()
            status = h.modelStatusToString(h.getModelStatus())
            solution = h.getSolution()
            x = np.asarray(solution.col_value)
            d = bound.copy()
            d[working] = x[2 * k :]
            feasible = _feasible(h) and x[: 2 * k].max(initial=0.0) <= 1e-9
            if status != "Optimal":
                return status, d if feasible else None  # a feasible point at the time limit: usable, not certified
            reduced = c - A.T @ np.asarray(solution.row_dual)
            wrong = np.nonzero(fixed & (((d > 0) & (reduced > 1e-9)) | ((d < 0) & (reduced < -1e-9))))[0]
            if len(wrong) == 0 and feasible:
                return "Optimal", d
            if len(wrong) == 0:
                big *= 100.0
                h.changeColsCost(2 * k, np.arange(2 * k, dtype=np.int32), np.full(2 * k, big))
                continue
            new = np.sort(wrong[np.argsort(-np.abs(reduced[wrong]), kind="stable")[:grow]])
            grow *= 2
            offset = _join(h, A[:, new], c[new], bound[new], offset, delta, box)
            fixed[new] = False
            working = np.concatenate([working, new])

    def _elastic(self, A, c, delta, offset, box, big) -> highspy.Highs:
        """A fresh model ``min cᵀx + big·Σ(s⁺ + s⁻), -delta <= A x + offset + s⁺ - s⁻ <= delta`` (slacks first)."""
        k = A.shape[0]
        h = self.highs
        h.clearModel()
        h.addRows(k, -delta - offset, delta - offset, 0, np.zeros(k, dtype=np.int32), [], [])
        rows = np.arange(k, dtype=np.int32)
        for sign in (1.0, -1.0):
            h.addCols(k, np.full(k, big), np.zeros(k), np.full(k, highspy.kHighsInf), k, rows, rows, np.full(k, sign))
        _add_columns(h, A, c, box)
        return h

    def state_dict(self) -> dict:
        """The warm-start basis (plain integers), so that a resumed run solves exactly as an uninterrupted one."""
        if self._basis is None:
            return {}
        status = [[int(x) for x in self._basis.col_status], [int(x) for x in self._basis.row_status]]
        return {"shape": self._shape, "status": status}

    def load_state_dict(self, state: dict) -> None:
        self._shape, self._basis = None, None
        if state:
            basis = highspy.HighsBasis()
            basis.col_status = [highspy.HighsBasisStatus(x) for x in state["status"][0]]
            basis.row_status = [highspy.HighsBasisStatus(x) for x in state["status"][1]]
            basis.valid = True
            self._shape, self._basis = tuple(state["shape"]), basis


def lp_direction(
    c: np.ndarray | torch.Tensor,
    rows: np.ndarray | torch.Tensor,
    delta: float,
    box: float = 1.0,
    time_limit: float | None = None,
) -> LPResult:
    """``argmin cᵀd`` subject to ``|rows·d| <= delta`` and ``|d| <= box`` (HiGHS, a fresh model).

    ``c`` is ``[n]``, ``rows`` ``[k, n]``: float64 NumPy arrays or CPU tensors. The result's ``status`` is HiGHS's
    model status; ``d`` is ``None`` unless the solve ended optimal, or at the time limit with a feasible point.
    """
    return LPSolver().solve(c, rows, delta, box, time_limit)


def _reduced_cost_estimate(c: np.ndarray, A: np.ndarray, iters: int = 32) -> np.ndarray:
    """``c + Aᵀπ`` for an estimate of the optimal row duals π, whose signs say at which bound each column sits.

    When the rows have full rank the estimate is ``c`` itself (π = 0). When they are rank-deficient (LiFT's SR1
    rows after a short warm-up: rank = the pairs kept), ``Aᵀπ = Qᵀμ`` for ``Q`` the rows' basis (from the k x k
    Gram matrix) and a small μ: iteratively reweighted least squares on ``min_μ ‖c + Qᵀμ‖₁`` (the dual without
    its ``delta`` term) costs ``rank² · n`` per step.
    """
    w, V = np.linalg.eigh(A @ A.T)
    keep = w > 1e-12 * w.max(initial=0.0)
    if keep.sum() > A.shape[0] // 2 or not keep.any():
        return c
    Q = V[:, keep].T @ A
    mu = np.zeros(len(Q))
    floor = 1e-9 * float(np.abs(c).max(initial=1.0))
    for _ in range(iters):
        weight = 1.0 / np.maximum(np.abs(c + Q.T @ mu), floor)
        mu = np.linalg.solve((Q * weight) @ Q.T, -(Q * weight) @ c)
    return c + Q.T @ mu


def _feasible(h: highspy.Highs) -> bool:
    """Whether ``h`` ended with a usable status and a primal-feasible point."""
    usable = h.modelStatusToString(h.getModelStatus()) in USABLE
    return usable and h.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible


def _join(h: highspy.Highs, A, c, bound, offset, delta, box) -> np.ndarray:
    """Move fixed columns into the model at the bound they were fixed at, from the last basis: the new offset."""
    basis = h.getBasis()
    _add_columns(h, A, c, box)
    at = [highspy.HighsBasisStatus.kUpper if v > 0 else highspy.HighsBasisStatus.kLower for v in bound]
    basis.col_status = list(basis.col_status) + at
    offset = offset - A @ bound
    h.changeRowsBounds(len(offset), np.arange(len(offset), dtype=np.int32), -delta - offset, delta - offset)
    h.setBasis(basis)
    return offset


def _add_columns(h: highspy.Highs, A: np.ndarray, c: np.ndarray, box: float) -> None:
    """Append the dense columns of ``A`` with costs ``c`` and bounds ``±box`` to the model ``h``."""
    k, m = A.shape
    starts = np.arange(0, k * m, k, dtype=np.int32)
    index = np.tile(np.arange(k, dtype=np.int32), m)
    h.addCols(m, c, np.full(m, -box), np.full(m, box), k * m, starts, index, np.ascontiguousarray(A.T).ravel())


def quiet_highs() -> highspy.Highs:
    """A HiGHS instance that prints nothing: its banner comes from the constructor, before options can be set."""
    with _stdout_silenced():
        highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    return highs


@contextlib.contextmanager
def _stdout_silenced():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _check(c, rows, delta: float, box: float) -> tuple[np.ndarray, np.ndarray]:
    c, rows = (x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in (c, rows))
    if c.ndim != 1:
        raise ValueError(f"c: expected a vector [n], got shape {list(c.shape)}")
    if c.shape[0] < 1:
        raise ValueError("c: expected at least one column (n >= 1), got an empty vector")
    if rows.ndim != 2 or rows.shape[1] != c.shape[0] or rows.shape[0] < 1:
        raise ValueError(
            f"rows: expected shape [k, {c.shape[0]}] with k >= 1 (c has {c.shape[0]} entries), got {list(rows.shape)}"
        )
    if not (np.isfinite(c).all() and np.isfinite(rows).all()):
        raise ValueError("c, rows: expected finite values, got NaN or inf")
    if not (delta > 0 and math.isfinite(delta)):
        raise ValueError(f"delta: expected a finite number > 0, got {delta}")
    if not (box > 0 and math.isfinite(box)):
        raise ValueError(f"box: expected a finite number > 0, got {box}")
    return c.astype(np.float64, copy=False), rows.astype(np.float64, copy=False)
