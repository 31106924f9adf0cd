"""perturb.stats against the dense float64 formulas: row norms of W + s B A and of the gradient proxy."""

from __future__ import annotations

import torch

from finetune_ext.perturb import stats
from finetune_ext.testing import tolerance


def _factors(out_f: int, in_f: int, r: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in ((out_f, in_f), (r, in_f), (out_f, r))]


def test_merged_row_norms_match_the_dense_merge() -> None:
    for out_f, in_f, r, s in ((7, 5, 3, 2.0), (33, 129, 8, 0.5), (64, 16, 16, 1.0)):
        W, A, B = _factors(out_f, in_f, r, out_f)
        for layout in (W, W.t().contiguous().t()):  # row-major, and GPT-2's Conv1D (a transposed view)
            got = stats.merged_row_norms(stats.row_sq_norms(layout), stats.weight_product(layout.t(), A), A, B, s)
            exact = torch.linalg.vector_norm(W + s * B @ A, dim=1)
            torch.testing.assert_close(got, exact, **tolerance(torch.float64))


def test_gradient_proxy_row_norms_match_the_dense_product() -> None:
    _, A, B = _factors(40, 23, 4, 1)
    _, gA, gB = _factors(40, 23, 4, 2)
    P, Q = stats.gradient_factors(A, B, gA, gB, 0.25)
    dense = 0.25 * (gB @ A + B @ gA)
    torch.testing.assert_close(P @ Q, dense, **tolerance(torch.float64))
    torch.testing.assert_close(stats.product_row_norms(P, Q), torch.linalg.vector_norm(dense, dim=1),
                               **tolerance(torch.float64))  # fmt: skip
    torch.testing.assert_close(stats.product_norm(P, Q), torch.linalg.norm(dense), **tolerance(torch.float64))


def test_float32_inputs_give_float64_norms() -> None:
    W, A, B = (t.float() for t in _factors(12, 9, 2, 3))
    got = stats.merged_row_norms(stats.row_sq_norms(W), stats.weight_product(W.t(), A), A, B, 1.5)
    assert got.dtype == torch.float64
    exact = torch.linalg.vector_norm(W.double() + 1.5 * B.double() @ A.double(), dim=1)
    torch.testing.assert_close(got, exact, **tolerance(torch.float32))
