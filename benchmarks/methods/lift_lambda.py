"""Does LiFT's λ move? Its round on a ridge regression whose validation-optimal λ is known, from 100x too small
and 100x too large, with the balanced log-λ columns of ``finetune_ext.lift`` and with the former raw columns.

    python benchmarks/methods/lift_lambda.py [--features 400 --rounds 8]

Ridge: ``f = ‖X w - y‖²/n + λ ‖w‖²/p`` (n = 1.25 p training rows, 5 p validation rows, features of scale 10, noise
of scale 20), ``w*(λ)`` in closed form; λ* minimises the validation loss ``F(w*(λ))`` on a log grid. Each round
solves the lower level exactly (what LiFT's warm-up approximates), takes the LP over every coordinate plus λ
(rows = every coordinate, delta 1e-4, box 1), normalises the direction, searches t on F, and updates λ: balanced
(``log λ`` += clamp(t · unit · u, ±ln 10)) or raw (``λ = max(0, λ + t d_λ)``, columns ``2 w / N``). Prints a
table; the committed one is benchmarks/results/lift_lambda.md.
"""

from __future__ import annotations

import argparse
import math

import torch

from finetune_ext.lift.lp import LPSolver
from finetune_ext.lift.rows import FlatParams, h_wlambda, log_lambda_columns, step_log_lambda
from finetune_ext.lift.search import golden_section


def ridge(p: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    X, Xv = (10 * torch.randn(m, p, generator=g, dtype=torch.float64) for m in (p * 5 // 4, 5 * p))
    y, yv = (A @ w_true + 20 * torch.randn(len(A), generator=g, dtype=torch.float64) for A in (X, Xv))
    n, eye = len(X), torch.eye(p, dtype=torch.float64)
    hessian = lambda lam: 2 * X.T @ X / n + 2 * lam / p * eye  # noqa: E731
    w_star = lambda lam: torch.linalg.solve(hessian(lam), 2 * X.T @ y / n)  # noqa: E731
    F = lambda w: float(((Xv @ w - yv) ** 2).mean())  # noqa: E731
    grad_F = lambda w: 2 * Xv.T @ (Xv @ w - yv) / len(Xv)  # noqa: E731
    best = min(torch.logspace(-2, 6, 401, dtype=torch.float64).tolist(), key=lambda lam: F(w_star(lam)))
    return hessian, w_star, F, grad_F, best


def run(problem, lam0: float, rounds: int, balanced: bool) -> list[float]:
    hessian, w_star, F, grad_F, _ = problem
    p = hessian(1.0).shape[0]
    flat = FlatParams([[torch.nn.Parameter(torch.zeros(1, p, dtype=torch.float64))]])
    lam, rows, trace = torch.tensor([lam0], dtype=torch.float64), torch.arange(p), [lam0]
    for _ in range(rounds):
        w0, H = w_star(float(lam[0])), hessian(float(lam[0]))
        if balanced:
            columns, unit = log_lambda_columns(flat, w0, rows, lam, float(H.abs().max()))
        else:
            columns = h_wlambda(flat, w0, rows)
        c = torch.cat([grad_F(w0), torch.zeros(1, dtype=torch.float64)])
        d = torch.as_tensor(LPSolver().solve(c, torch.cat([H, columns], 1), 1e-4, 1.0).d)
        d = d / d.norm()
        t = golden_section(lambda t, w0=w0, d=d: F(w0 + t * d[:p]), first=0.1, tol=1e-4, max_evals=25).t
        lam = step_log_lambda(lam, t * d[p:], unit, math.log(10)) if balanced else (lam + t * d[p:]).clamp_min(0)
        trace.append(float(lam[0]))
    return trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if args.features < 2 or args.rounds < 1:
        parser.error(f"--features >= 2 and --rounds >= 1 expected, got {args.features}, {args.rounds}")
    problem = ridge(args.features)
    best = problem[-1]
    print(f"lambda* = {best:.4g} (p = {args.features})\n")
    print("| start | columns | λ after each round | final / λ* |")
    print("|---|---|---|---|")
    for factor in (0.01, 100.0):
        for balanced in (True, False):
            trace = run(problem, factor * best, args.rounds, balanced)
            name = "balanced log λ" if balanced else "raw (former)"
            print(f"| {factor:g} λ* | {name} | {', '.join(f'{v:.4g}' for v in trace[1:])} | {trace[-1] / best:.3f} |")


if __name__ == "__main__":
    main()
