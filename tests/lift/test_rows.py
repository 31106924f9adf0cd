"""LiFT's rows: compact SR1 against the dense SR1 recursion, H_wλ against autograd, HVP rows against the dense
Hessian of a tiny model; the golden-section search on known 1-D functions."""

from __future__ import annotations

import math

import pytest
import torch

from finetune_ext.lift.rows import CompactSR1, FlatParams, h_wlambda, hvp_rows, successive_differences
from finetune_ext.lift.search import golden_section
from finetune_ext.testing import tolerance

F64 = tolerance(torch.float64)


def _dense_sr1(S: torch.Tensor, Y: torch.Tensor, skip_tol: float) -> torch.Tensor:
    B = torch.eye(S.shape[1], dtype=torch.float64)
    for s, y in zip(S, Y, strict=True):
        r = y - B @ s
        if (r @ s).abs() >= skip_tol * s.norm() * r.norm() and r.norm() > 0:
            B += torch.outer(r, r) / (r @ s)
    return B


@pytest.mark.parametrize("chunk", [7, 4096])  # Gram matrices over several column blocks, or one
def test_compact_sr1_rows_equal_the_dense_recursion(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    n, K = 40, 12
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    H = A @ A.T / n + torch.eye(n, dtype=torch.float64)
    S = torch.randn(K, n, generator=g, dtype=torch.float64)
    Y = S @ H
    z = torch.randn(n, generator=g, dtype=torch.float64)
    z -= (z @ S[5]) / (S[5] @ S[5]) * S[5]
    Y[5] = _dense_sr1(S[:5], Y[:5], 1e-8) @ S[5] + z  # r = y - B s is orthogonal to s: the rule skips it
    sr1 = CompactSR1(S, Y, chunk=chunk)
    dense = _dense_sr1(S, Y, 1e-8)
    assert 5 not in sr1.kept and len(sr1.kept) == K - 1
    idx, cols = torch.tensor([0, 7, 39]), torch.tensor([3, 7, 20, 39])
    torch.testing.assert_close(sr1.rows(idx, cols), dense[idx][:, cols], **tolerance("dense_curvature"))
    torch.testing.assert_close(sr1.rows(idx), dense[idx], **tolerance("dense_curvature"))


def test_sr1_from_float32_records_computes_in_float64() -> None:
    """LiFT's records are float32: their differences and everything after equal the float64 computation on the
    same values (differences of float32 values in [1, 2) are exact)."""
    g = torch.Generator().manual_seed(1)
    w = [1.0 + torch.rand(50, generator=g) for _ in range(6)]
    grads = [1.0 + torch.rand(50, generator=g) for _ in w]
    S, Y = successive_differences(w), successive_differences(grads)
    S64, Y64 = (torch.diff(torch.stack(x).double(), dim=0) for x in (w, grads))
    assert S.dtype == torch.float32 and torch.equal(S.double(), S64) and torch.equal(Y.double(), Y64)
    idx, cols = torch.tensor([1, 30]), torch.tensor([0, 1, 49])
    got = CompactSR1(S, Y, chunk=16).rows(idx, cols)
    torch.testing.assert_close(got, CompactSR1(S64, Y64).rows(idx, cols), **tolerance("dense_curvature"))
    assert got.dtype == torch.float64


def _tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    return net, x, y


def test_h_wlambda_equals_autograd() -> None:
    net, x, y = _tiny()
    groups = [list(net[0].parameters()), list(net[2].parameters())]
    flat = FlatParams(groups)
    lam = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    params = flat.params

    def grad_f(lam: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.cross_entropy(net(x), y)
        penalty = sum(lam[b] * (p**2).sum() / flat.sizes[b] for b, g in enumerate(groups) for p in g if p.dim() >= 2)
        grads = torch.autograd.grad(loss + penalty, params, create_graph=True)
        return torch.cat([gr.reshape(-1) for gr in grads])

    expected = torch.autograd.functional.jacobian(grad_f, lam)  # [n, m]
    idx = torch.arange(flat.numel)
    torch.testing.assert_close(h_wlambda(flat, flat.values(), idx), expected, **F64)
    assert flat.sizes.tolist() == [12.0, 8.0] and (flat.block == -1).sum() == 4 + 2  # biases unregularized


def test_hvp_rows_equal_the_dense_hessian() -> None:
    net, x, y = _tiny()
    flat = FlatParams([list(net.parameters())])
    names = [n for n, _ in net.named_parameters()]

    def loss_fn(ps):
        out = torch.func.functional_call(net, dict(zip(names, ps, strict=True)), (x,))
        return torch.nn.functional.cross_entropy(out, y)

    def flat_loss(w):
        ps, offset = [], 0
        for p in flat.params:
            ps.append(w[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return loss_fn(ps)

    dense = torch.autograd.functional.hessian(flat_loss, flat.values())
    idx = torch.tensor([0, 5, 13, 21])
    got = hvp_rows(loss_fn, tuple(p.detach() for p in flat.params), flat, idx, chunk_size=3)
    torch.testing.assert_close(got, dense[idx], **tolerance("dense_curvature"))


@pytest.mark.parametrize("minimum", [0.03, 0.37, 5.0])
def test_golden_section_finds_a_known_minimum(minimum) -> None:
    res = golden_section(lambda t: (t - minimum) ** 2 + 1.0, first=0.1, tol=1e-4, max_evals=40)
    assert res.t == pytest.approx(minimum, abs=1e-4 * 0.1 * 10) and res.start == pytest.approx(1 + minimum**2)
    assert res.evaluations <= 40


def test_golden_section_keeps_zero_when_nothing_descends_and_respects_the_budget() -> None:
    assert golden_section(lambda t: t, first=0.1).t == 0.0
    calls = []
    res = golden_section(lambda t: calls.append(t) or math.cos(t), first=0.1, tol=1e-9, max_evals=12)
    assert len(calls) == res.evaluations <= 12 and res.value < 1.0
