"""curvature.loss.cross_entropy: F.cross_entropy's value and derivatives (first and second, forward and reverse,
under vmap) in float64, with its second derivative from the fused kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

from finetune_ext.curvature.loss import cross_entropy
from finetune_ext.testing import tolerance

DENSE = tolerance("dense_curvature")


def _case():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (2, 5), generator=g)
    y[0, 4] = y[1, 0] = -100
    U = torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64)
    return z, y, U


def _reference(y):
    return lambda z: F.cross_entropy(z.reshape(-1, 7), y.reshape(-1))


@pytest.mark.parametrize("outer", ["plain", "squared"])
def test_value_gradient_and_hessian_products_equal_f_cross_entropy(outer) -> None:
    """``squared``: loss = ce², whose gradient seed depends on the input (the weight tangent is used)."""
    z, y, U = _case()
    wrap = (lambda f: f) if outer == "plain" else (lambda f: lambda z: f(z) ** 2)
    ours, ref = wrap(lambda z: cross_entropy(z, y)), wrap(_reference(y))
    torch.testing.assert_close(ours(z), ref(z), **DENSE)
    torch.testing.assert_close(grad(ours)(z), grad(ref)(z), **DENSE)

    def hvps(f):
        return vmap(lambda u: jvp(grad(f), (z,), (u,))[1])(U)

    torch.testing.assert_close(hvps(ours), hvps(ref), **DENSE)
    torch.testing.assert_close(jvp(ours, (z,), (U[0],))[1], jvp(ref, (z,), (U[0],))[1], **DENSE)
    zz = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(ours(zz), zz, create_graph=True)
    (hv,) = torch.autograd.grad(g, zz, U[1])
    torch.testing.assert_close(hv, hvps(ref)[1], **DENSE)


def test_all_rows_ignored_gives_zero_curvature() -> None:
    z, y, U = _case()
    y = torch.full_like(y, -100)
    h = vmap(lambda u: jvp(grad(lambda z: cross_entropy(z, y)), (z,), (u,))[1])(U)
    assert torch.equal(h, torch.zeros_like(h))
