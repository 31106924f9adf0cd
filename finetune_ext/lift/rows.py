"""LiFT's constraint rows: the trainable weights as one flat vector, ``H_wλ`` columns, and rows of ``H_ww``
from a compact SR1 matrix (no n x n matrix is formed) or from exact Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from finetune_ext import curvature


class FlatParams:
    """The trainable parameters as one vector: ``block[i]`` is the λ block of coordinate ``i`` (-1: not
    regularized), ``sizes[b]`` the regularized element count N_b of block ``b``.

    ``groups`` is one list of parameters per λ block; within a block matrices (``dim >= 2``) are regularized,
    biases and norms are not.
    """

    def __init__(self, groups: Sequence[Sequence[torch.nn.Parameter]]) -> None:
        self.params = [p for g in groups for p in g]
        labels = []
        for b, group in enumerate(groups):
            for p in group:
                labels.append(torch.full((p.numel(),), b if p.dim() >= 2 else -1, dtype=torch.long))
        self.block = torch.cat(labels)
        self.sizes = torch.bincount(self.block[self.block >= 0], minlength=len(groups)).double()
        self.numel = self.block.numel()

    def values(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double().cpu() for p in self.params])

    def grads(self) -> torch.Tensor:
        return torch.cat([
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).double().cpu()
            for p in self.params
        ])  # fmt: skip

    @torch.no_grad()
    def set_(self, values: torch.Tensor) -> None:
        """``w = values`` for a flat ``values`` (CPU float64), in each parameter's dtype and device."""
        offset = 0
        for p in self.params:
            p.copy_(values[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def unflatten(self, flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A flat ``[m, n]`` batch of vectors as one ``[m, *p.shape]`` tensor per parameter."""
        out, offset = [], 0
        for p in self.params:
            out.append(flat[:, offset : offset + p.numel()].reshape(-1, *p.shape).to(p.dtype).to(p.device))
            offset += p.numel()
        return tuple(out)


def h_wlambda(flat: FlatParams, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``H_wλ = ∂(∇_w f)/∂λ``: ``2 w_i / N_b`` in column ``b`` of coordinate ``i``'s block."""
    out = torch.zeros(len(idx), len(flat.sizes), dtype=torch.float64)
    blocks = flat.block[idx]
    reg = blocks >= 0
    out[reg.nonzero().squeeze(1), blocks[reg]] = 2 * w[idx[reg]] / flat.sizes[blocks[reg]]
    return out


def log_lambda_columns(
    flat: FlatParams, w: torch.Tensor, idx: torch.Tensor, lam: torch.Tensor, scale_to: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LP's λ columns on rows ``idx``, for ``log λ`` and balanced against the weight columns.

    ``∂(∇_w f)/∂ log λ_b = λ_b H_wλ[:, b]`` is scaled so that its largest entry equals ``scale_to`` (the largest
    entry of the weight columns): one unit of a λ variable then moves the constraints as far as one unit of a
    weight. Without this, ``2 w / N_b`` (about 1e-7 for a transformer block) beside rows of order 1 let the LP
    set ``d_λ`` freely, and λ never moved. Returns ``(columns [len(idx), B], unit [B])``: one unit of the LP's
    variable ``b`` changes ``log λ_b`` by ``unit[b]`` (0 for a block with no regularized row in ``idx``)."""
    raw = h_wlambda(flat, w, idx) * lam[None, :]
    peak = raw.abs().amax(0)
    unit = torch.where(peak > 0, scale_to / peak.clamp_min(1e-300), torch.zeros_like(peak))
    return raw * unit[None, :], unit


def step_log_lambda(lam: torch.Tensor, du: torch.Tensor, unit: torch.Tensor, cap: float) -> torch.Tensor:
    """``λ · exp(clamp(unit · du, ±cap))``: the λ update of a step ``du`` in the LP's λ variables, at most ``cap``
    in ``log λ`` per round (λ stays > 0)."""
    return lam * torch.exp((unit * du).clamp(-cap, cap))


def successive_differences(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[x₁ - x₀, x₂ - x₁, ...]`` as one ``[len(xs) - 1, n]`` tensor, written in place (no stacked copy of xs)."""
    out = torch.empty(len(xs) - 1, xs[0].numel(), dtype=xs[0].dtype, device=xs[0].device)
    for i in range(len(xs) - 1):
        torch.sub(xs[i + 1], xs[i], out=out[i])
    return out


class CompactSR1:
    """``B = I + Ψ M⁻¹ Ψᵀ`` (Byrd, Nocedal and Schnabel 1994, B₀ = I) from pairs ``S, Y`` (``[K, n]``, one pair
    per row), with ``Ψ = Y - S`` and ``M = D + L + Lᵀ - SᵀS`` (D, L: the diagonal and strict lower triangle of
    SᵀY). Pairs are taken in order and skipped, as in the standard SR1 rule, when
    ``|sᵀ(y - B s)| < skip_tol · ‖s‖ · ‖y - B s‖`` for the matrix built from the pairs kept so far.

    Arithmetic in float64 on ``S, Y`` as given (LiFT's are float32): the Gram matrices a block of ``chunk``
    columns at a time, and Ψ only on the columns ``rows`` asks for, so no ``[K, n]`` float64 copy is made
    (GPT-2 small's block, K = 50, n = 7.1M: 15.3 s to build with those copies, dominated by their allocation).
    """

    def __init__(self, S: torch.Tensor, Y: torch.Tensor, skip_tol: float = 1e-8, chunk: int = 4096) -> None:
        if S.shape != Y.shape or S.dim() != 2:
            raise ValueError(f"S, Y: expected two [K, n] tensors of one shape, got {list(S.shape)}, {list(Y.shape)}")
        K = len(S)
        # Every quantity of the skip test is a K x K Gram entry: one pass over the n columns.
        SS, YS, YY = self._grams(S, Y, chunk)
        PP = YY - YS - YS.T + SS  # ΨΨᵀ
        PS = YS - SS  # Ψ Sᵀ: (Ψᵀ s_j)_a = PS[a, j]
        self.kept: list[int] = []
        for j in range(K):
            a = self.kept
            u = torch.linalg.solve(self._m(SS, YS, a), PS[a, j]) if a else torch.zeros(0, dtype=torch.float64)
            rs = YS[j, j] - SS[j, j] - PS[a, j] @ u  # rᵀs with r = y_j - B s_j = ψ_j - Ψ_a u
            rr = PP[j, j] - 2 * u @ PP[a, j] + u @ PP[a][:, a] @ u
            if rr > 0 and rs.abs() >= skip_tol * SS[j, j].sqrt() * rr.sqrt():
                self.kept.append(j)
        self.S, self.Y = S, Y  # the caller's: only the kept rows and the columns asked for are read again
        self.m_inv = torch.linalg.inv(self._m(SS, YS, self.kept)) if self.kept else torch.zeros(0, 0).double()

    @staticmethod
    def _grams(S: torch.Tensor, Y: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``S Sᵀ, Y Sᵀ, Y Yᵀ`` in float64, summed over blocks of ``chunk`` columns."""
        K = len(S)
        SS, YS, YY = (torch.zeros(K, K, dtype=torch.float64, device=S.device) for _ in range(3))
        for start in range(0, S.shape[1], chunk):
            s, y = S[:, start : start + chunk].double(), Y[:, start : start + chunk].double()
            SS.addmm_(s, s.T)
            YS.addmm_(y, s.T)
            YY.addmm_(y, y.T)
        return SS, YS, YY

    @staticmethod
    def _m(SS: torch.Tensor, YS: torch.Tensor, a: list[int]) -> torch.Tensor:
        """``M = D + L + Lᵀ - SᵀS`` of the pairs ``a`` (D, L from ``SᵀY``; ``YS[i, j] = y_i·s_j``)."""
        SY = YS[a][:, a].T  # SY[i, j] = s_i·y_j
        return torch.diag(torch.diagonal(SY)) + torch.tril(SY, -1) + torch.tril(SY, -1).T - SS[a][:, a]

    def psi(self, cols: torch.Tensor) -> torch.Tensor:
        """Columns ``cols`` of Ψ (the kept pairs), ``[K', len(cols)]`` float64."""
        return (self.Y[:, cols].double() - self.S[:, cols].double())[self.kept]

    def rows(self, idx: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
        """``B[idx][:, cols]`` (all columns when ``cols`` is None), ``[len(idx), len(cols)]``."""
        cols = torch.arange(self.S.shape[1]) if cols is None else cols
        out = (self.psi(idx).T @ self.m_inv) @ self.psi(cols)
        out += (idx[:, None] == cols[None, :]).double()
        return out


def hvp_rows(
    loss_fn: Callable, params: Sequence[torch.Tensor], flat: FlatParams, idx: torch.Tensor, chunk_size: int = 32
) -> torch.Tensor:
    """Exact rows ``idx`` of the Hessian of ``loss_fn`` w.r.t. ``params`` (``[len(idx), n]``, float64 on CPU),
    by batched Hessian-vector products with the unit vectors (the Hessian is symmetric: ``H e_i`` is row i)."""
    rows = []
    for start in range(0, len(idx), chunk_size):
        part = idx[start : start + chunk_size]
        E = torch.zeros(len(part), flat.numel, dtype=params[0].dtype, device=params[0].device)
        E[torch.arange(len(part)), part] = 1.0
        HV = curvature.hvp(loss_fn, params, flat.unflatten(E))
        rows.append(torch.cat([h.reshape(len(part), -1).double().cpu() for h in HV], dim=1))
    return torch.cat(rows)
