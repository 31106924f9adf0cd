"""The multi-tensor Armijo ops ``armijo_moments_`` and ``armijo_update_``: kernels against the reference loops
and ``torch._foreach``, opcheck, ``torch.compile``, bad input."""

from __future__ import annotations

import pytest
import torch

from finetune_ext import ops, reference
from finetune_ext.testing import assert_within_2x_reference, tolerance
from tests.conftest import DEVICES

SHAPES = [(70_001,), (3, 5), (64, 129), (1,), (2, 3, 4)]  # 70,001 spans two chunks


def _lists(device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def make(fn):
        return [fn(s).to(device=device, dtype=dtype) for s in SHAPES]

    grads = make(lambda s: torch.randn(s, generator=g))
    m = make(lambda s: 0.1 * torch.randn(s, generator=g))
    v = make(lambda s: 0.01 * torch.rand(s, generator=g) + 1e-6)
    w = make(lambda s: torch.randn(s, generator=g))
    return w, grads, m, v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adam", [True, False])
def test_moments_match_reference(device, dtype, adam) -> None:
    _, grads, m, v = _lists(device, dtype)
    block_of = [0, 2, 2, 1, 0]
    kw = dict(betas=(0.9, 0.999), bias_correction2=1 - 0.999**3, eps=1e-8, adam=adam)
    m_ref, v_ref = [t.clone() for t in m], [t.clone() for t in v]
    m64, v64 = ([t.to(torch.float64, copy=True) for t in ts] for ts in (m, v))
    sums = ops.armijo_moments_(grads, m, v, block_of, 3, backend="ext", **kw)
    sums_ref = ops.armijo_moments_(grads, m_ref, v_ref, block_of, 3, backend="reference", **kw)
    exact = reference.armijo_moments_([g.double() for g in grads], m64, v64, block_of, 3, 0.9, 0.999,
                                      kw["bias_correction2"], 1e-8, adam)  # fmt: skip
    assert sums.dtype == torch.float64 and sums.shape == (3, 2) and sums.device.type == device
    if dtype == torch.float64:  # the reference is the exact sum here: the table's float64 tolerance
        torch.testing.assert_close(sums, exact, **tolerance(torch.float64))
    else:  # float32 sums of the kernel against the reference's, both against float64
        assert_within_2x_reference(sums.float(), sums_ref.float(), exact)
    for a, b, e in zip(m + v, m_ref + v_ref, m64 + v64, strict=True):
        if dtype == torch.bfloat16:  # the reference rounds twice (mul_, then add_), the kernel once
            assert_within_2x_reference(a, b, e)
        else:
            torch.testing.assert_close(a, b, **tolerance(dtype))
    if not adam:
        torch.testing.assert_close(sums[:, 0], sums[:, 1], **tolerance(torch.float64))  # P = 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adam", [True, False])
def test_update_matches_reference_and_foreach(device, dtype, adam) -> None:
    w, grads, m, v = _lists(device, dtype)
    alpha_g = [0.1, -0.2, 0.0, 0.3, -1.0]
    alpha_m = [-0.01, 0.0, -0.02, 0.5, 0.1]
    kw = dict(bias_correction1=1 - 0.9**3, bias_correction2=1 - 0.999**3, eps=1e-8, adam=adam)
    w_ref, w_each = [t.clone() for t in w], [t.clone() for t in w]
    ops.armijo_update_(w, grads, m, v, alpha_g, alpha_m, backend="ext", **kw)
    ops.armijo_update_(w_ref, grads, m, v, alpha_g, alpha_m, backend="reference", **kw)
    reference.armijo_update_foreach_(w_each, grads, m, v, alpha_g, alpha_m, *kw.values())
    if dtype == torch.bfloat16:  # the references round every intermediate to bfloat16, the kernel only w
        w64 = [t.double() for t in _lists(device, dtype)[0]]  # the starting point again
        lists64 = [[t.double() for t in ts] for ts in (grads, m, v)]
        reference.armijo_update_(w64, *lists64, alpha_g, alpha_m, *kw.values())
        for a, b, c, e in zip(w, w_ref, w_each, w64, strict=True):
            assert_within_2x_reference(a, b, e)
            assert_within_2x_reference(a, c, e)
        return
    for a, b, c in zip(w, w_ref, w_each, strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))
        torch.testing.assert_close(c, b, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_opcheck(device) -> None:
    w, grads, m, v = _lists(device, torch.float32)
    args = (grads, m, v, [0] * 5, 1, 0.9, 0.999, 0.5, 1e-8, True)
    torch.library.opcheck(torch.ops.finetune_ext.armijo_moments_, args, test_utils=("test_schema", "test_faketensor"))
    update = (w, grads, m, v, [0.1] * 5, [-0.01] * 5, 0.9, 0.5, 1e-8, True)
    torch.library.opcheck(torch.ops.finetune_ext.armijo_update_, update, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
def test_bad_input(device) -> None:
    """Checked in the kernels (one-line errors naming the argument) and in the Python wrapper."""
    w, grads, m, v = _lists(device, torch.float32)
    with pytest.raises(RuntimeError, match=r"armijo_moments_: block_of\[1\] = 3 is outside \[0, 2\)"):
        torch.ops.finetune_ext.armijo_moments_(grads, m, v, [0, 3, 0, 0, 0], 2, 0.9, 0.999, 0.5, 1e-8, True)
    with pytest.raises(RuntimeError, match=r"armijo_update_: expected exp_avg\[1\] of shape \[3, 5\], got \[64, 129\]"):
        torch.ops.finetune_ext.armijo_update_(w, grads, [m[0], m[2], m[1], m[3], m[4]], v, [0.0] * 5, [0.0] * 5,
                                              1.0, 1.0, 1e-8, True)  # fmt: skip
    with pytest.raises(ValueError, match="block_of: expected 5 entries"):
        ops.armijo_moments_(grads, m, v, [0], 1)


def test_compiled_step_matches_eager() -> None:
    """Both ops inside one ``torch.compile(fullgraph=True)`` function give the eager results."""

    def step(w, grads, m, v):
        sums = torch.ops.finetune_ext.armijo_moments_(grads, m, v, [0, 1, 1, 0, 1], 2, 0.9, 0.999, 0.5, 1e-8, True)
        torch.ops.finetune_ext.armijo_update_(w, grads, m, v, [0.1] * 5, [-0.01] * 5, 0.9, 0.5, 1e-8, True)
        return sums

    eager, compiled = _lists("cpu", torch.float32), _lists("cpu", torch.float32)
    expected = step(*eager)
    got = torch.compile(step, fullgraph=True)(*compiled)
    torch.testing.assert_close(got, expected, **tolerance(torch.float64))
    for a, b in zip([t for ts in compiled for t in ts], [t for ts in eager for t in ts], strict=True):
        torch.testing.assert_close(a, b, **tolerance(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_moments_accumulate_in_double_on_every_device(device) -> None:
    """fp32 gradients whose squares a float accumulator drops: 2^6 (square 2^12) first in a chunk, then 2^-6
    (square 2^-12, half an ulp of 2^12 in float). In double every sum here is exact, so the accept/reject
    decisions built on them are the same on every device."""
    first = torch.full((70_001,), 2.0**-6)  # two chunks
    first[0] = 2.0**6
    grads = [t.to(device) for t in (first, torch.full((65_536,), 2.0**-6), torch.full((3,), 2.0**6))]
    sums = ops.armijo_moments_(grads, [], [], [0, 1, 0], 2, betas=(0.9, 0.999), bias_correction2=1.0, eps=1e-8,
                               adam=False, backend="ext")  # fmt: skip
    exact = [4 * 2.0**12 + 70_000 * 2.0**-12, 65_536 * 2.0**-12]
    assert sums[:, 1].tolist() == exact and sums[:, 0].tolist() == exact  # SGD: gᵀPg = gᵀg


@pytest.mark.cuda
def test_moments_equal_on_cpu_and_cuda() -> None:
    _, grads, m, v = _lists("cpu", torch.float32)
    kw = dict(betas=(0.9, 0.999), bias_correction2=1 - 0.999**3, eps=1e-8, adam=True, backend="ext")
    cuda = [[t.cuda() for t in ts] for ts in (grads, m, v)]
    on_cpu = ops.armijo_moments_(grads, m, v, [0, 1, 1, 0, 1], 2, **kw)
    on_cuda = ops.armijo_moments_(*cuda, [0, 1, 1, 0, 1], 2, **kw).cpu()
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-12, atol=0)
