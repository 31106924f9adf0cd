"""LiFT's linear program, solved by HiGHS: the steepest validation descent inside a tube of training optimality.

    minimise  cᵀd   subject to   -delta <= rows · d <= delta,   -box <= d <= box

``c`` is the validation gradient on the chosen coordinates (zero on the λ columns), ``rows`` the sampled rows
of ``[H_ww | H_wλ]``. Before solving, ``c`` is scaled to unit max-norm and each row (with its ``delta``) to
unit max-norm, so HiGHS sees numbers near 1 whatever the loss scale (the predecessor multiplied by 1e6 and
1e5 instead); ``objective`` is reported unscaled. One ``LPSolver`` keeps its ``highspy.Highs`` model and the
last basis: a re-solve of the same shape starts from the previous optimal basis (LiFT's rounds).

``formulation="sifted"`` exploits that an optimal vertex has at most k coordinates strictly inside the box: a
few reweighted least-squares steps on the dual (``min_y δᵀ|y| + box·‖c + Aᵀy‖₁``, one k x k solve each) fix
every coordinate at ``-box·sign(c + Aᵀy)`` except a working set of the ``4k`` smallest ``|c + Aᵀy|``; HiGHS
solves the restricted LP; coordinates whose reduced cost (from HiGHS's row duals) has the wrong sign join the
working set, until none does, which certifies the full LP's optimum.
"""

from __future__ import annotations

import contextlib
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
    ``crossover`` are HiGHS's switches. ``threads`` caps HiGHS's threads (0: its default).
    """

    def __init__(
        self,
        solver: str = "choose",
        presolve: bool = True,
        crossover: bool = True,
        threads: int = 0,
        formulation: str = "direct",
    ) -> None:
        if formulation not in ("direct", "sifted"):
            raise ValueError(f"formulation: expected 'direct' or 'sifted', got {formulation!r}")
        self.formulation = formulation
        with _stdout_silenced():  # HiGHS prints its banner from the constructor, before options can be set
            self.highs = highspy.Highs()
        self.highs.setOptionValue("output_flag", False)
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
            status, d = self._run(c / c_scale, scaled, -delta / row_scale, delta / row_scale, box, time_limit)
        objective = float(c @ d) if d is not None else float("nan")
        return LPResult(d, objective, status, time.perf_counter() - start)

    def _run(self, c, A, lo, hi, box, time_limit, warm: bool = True):
        """One HiGHS solve of ``min cᵀd, lo <= A d <= hi, |d| <= box``: (status, d or None)."""
        k, n = A.shape
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = n, k
        lp.col_cost_ = c
        lp.col_lower_, lp.col_upper_ = np.full(n, -box), np.full(n, box)
        lp.row_lower_, lp.row_upper_ = lo, hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = n, k
        lp.a_matrix_.start_ = np.arange(0, k * n + 1, k, dtype=np.int32)
        lp.a_matrix_.index_ = np.tile(np.arange(k, dtype=np.int32), n)
        lp.a_matrix_.value_ = np.ascontiguousarray(A.T).ravel()
        self.highs.clearModel()
        self.highs.passModel(lp)
        self.highs.setOptionValue("time_limit", float(time_limit) if time_limit else float("inf"))
        if warm and self._shape == (k, n) and self._basis is not None:
            self.highs.setBasis(self._basis)
        self.highs.run()
        status = self.highs.modelStatusToString(self.highs.getModelStatus())
        feasible = self.highs.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible
        if status not in USABLE or not feasible:
            return status, None
        if warm:
            self._shape, self._basis = (k, n), self.highs.getBasis()
        return status, np.asarray(self.highs.getSolution().col_value, dtype=np.float64)

    def _sifted(self, c, A, delta, box, time_limit, start, size: int = 4):
        """The column-generation solve of the module docstring: (status, d or None)."""
        k, n = A.shape
        r = c + A.T @ _dual_estimate(c, A, delta, box)
        working = np.sort(np.argsort(np.abs(r))[: min(n, size * k)])
        while True:
            fixed = np.ones(n, dtype=bool)
            fixed[working] = False
            d = np.where(fixed, -box * np.sign(r), 0.0)
            offset = A[:, fixed] @ d[fixed]
            left = None if time_limit is None else max(time_limit - (time.perf_counter() - start), 1e-3)
            status, d_w = self._run(c[working], A[:, working], -delta - offset, delta - offset, box, left, warm=False)
            if status == "Time limit reached":
                return status, None  # a restricted point certifies nothing
            if d_w is None or status != "Optimal":
                if len(working) == n:
                    return status, None
                working = np.sort(np.argsort(np.abs(r))[: min(n, 2 * len(working))])
                continue
            d[working] = d_w
            r = c - A.T @ np.asarray(self.highs.getSolution().row_dual)  # reduced costs
            tol = 1e-9 * max(1.0, float(np.abs(c).max()))
            wrong = fixed & (((d > 0) & (r > tol)) | ((d < 0) & (r < -tol)))
            if not wrong.any():
                return "Optimal", d
            working = np.union1d(working, np.nonzero(wrong)[0])

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


def _dual_estimate(c: np.ndarray, A: np.ndarray, delta: np.ndarray, box: float, iters: int = 16) -> np.ndarray:
    """Iteratively reweighted least squares on the dual ``min_y Σ delta_i |y_i| + box Σ_j |c_j + a_jᵀ y|``."""
    y = np.zeros(A.shape[0])
    floor = 1e-9 * max(1.0, float(np.abs(c).max()))
    for _ in range(iters):
        w = box / np.maximum(np.abs(c + A.T @ y), floor)
        v = delta / np.maximum(np.abs(y), floor)
        y = np.linalg.solve((A * w) @ A.T + np.diag(v), -(A * w) @ c)
    return y


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
    if rows.ndim != 2 or rows.shape[1] != c.shape[0]:
        raise ValueError(f"rows: expected shape [k, {c.shape[0]}] (c has {c.shape[0]} entries), got {list(rows.shape)}")
    if not (np.isfinite(c).all() and np.isfinite(rows).all()):
        raise ValueError("c, rows: expected finite values, got NaN or inf")
    if not delta > 0:
        raise ValueError(f"delta: expected > 0, got {delta}")
    if not box > 0:
        raise ValueError(f"box: expected > 0, got {box}")
    return c.astype(np.float64, copy=False), rows.astype(np.float64, copy=False)
