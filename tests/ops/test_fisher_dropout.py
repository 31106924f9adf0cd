"""finetune_ext::fisher_dropout against its reference: the op contract of DESIGN.md."""

from __future__ import annotations

import math

import pytest
import torch

from finetune_ext import ops, reference
from finetune_ext.testing import tolerance
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(7,), (3, 37), (2, 5, 129), (1, 1, 1023)]


def _keep(width: int, per_feature: bool, device: str) -> torch.Tensor:
    if per_feature:
        return (0.2 + 0.8 * torch.rand(width, device=device)).clamp(max=1.0)
    return torch.tensor(0.7, device=device)


def _ext(x, keep, residual=None, seed=1234, offset=0):
    return ops.fisher_dropout(x, keep, residual=residual, seed=seed, offset=offset, backend="ext")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_feature", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
def test_forward_backward_match_reference(device, dtype, shape, per_feature, with_residual) -> None:
    keep = _keep(shape[-1], per_feature, device)
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn(shape, device=device, dtype=dtype, requires_grad=True) if with_residual else None
    seed, offset = int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))
    y = _ext(x, keep, res, seed, offset)
    y_ref = reference.fisher_dropout(x, keep, res, seed=seed, offset=offset)
    torch.testing.assert_close(y, y_ref, **tolerance(dtype))
    mask = reference.dropout_mask(shape, keep, seed, offset)
    assert torch.equal(_ext(torch.ones(shape, device=device, dtype=dtype), keep, None, seed, offset) != 0, mask)

    grad = torch.randn_like(y)
    inputs = (x,) if res is None else (x, res)
    grads = torch.autograd.grad(y, inputs, grad)
    grads_ref = torch.autograd.grad(y_ref, inputs, grad)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, **tolerance(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device) -> None:
    base = torch.randn(40, 66, device=device)
    views = [base.t(), base[:, ::2], base[1:, 3:], base.view(-1)[1:].view(-1, 7, 1)]
    for x in views:
        keep = _keep(x.shape[-1], True, device)
        y = _ext(x, keep, seed=99)
        assert y.is_contiguous()
        assert torch.equal(y, _ext(x.contiguous(), keep, seed=99))
        torch.testing.assert_close(y, reference.fisher_dropout(x, keep, seed=99), **tolerance(x.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_one_and_eval_are_identities(device, dtype) -> None:
    x = torch.randn(9, 33, device=device, dtype=dtype)
    x[0, 0] = -0.0
    assert torch.equal(_ext(x, 1.0), x)
    assert torch.equal(_ext(x, torch.ones(33, device=device)), x)
    assert ops.fisher_dropout(x, 0.3, training=False) is x
    r = torch.randn_like(x)
    assert torch.equal(ops.fisher_dropout(x, 0.3, residual=r, training=False), r + x)


@pytest.mark.parametrize("device", DEVICES)
def test_drop_rate_and_mean_per_feature(device) -> None:
    rows, keep = 20000, torch.tensor([0.05, 0.3, 0.5, 0.77, 0.9, 0.999, 1.0], device=device)
    y = _ext(torch.ones(rows, keep.numel(), device=device), keep, seed=2024)
    k = keep.double().cpu()
    kept = (y != 0).double().mean(0).cpu()
    sigma = (k * (1 - k) / rows).sqrt()
    assert ((kept - k).abs() <= 4 * sigma + 1e-12).all(), (kept, k)
    mean = y.double().mean(0).cpu()
    sigma_mean = ((1 - k) / k / rows).sqrt()
    assert ((mean - 1).abs() <= 4 * sigma_mean + 1e-12).all(), mean


def test_seeding_reproduces_and_varies() -> None:
    x = torch.randn(64, 64)
    torch.manual_seed(5)
    a, b = ops.fisher_dropout(x, 0.5), ops.fisher_dropout(x, 0.5)
    torch.manual_seed(5)
    assert torch.equal(a, ops.fisher_dropout(x, 0.5))
    assert not torch.equal(a, b)
    assert not torch.equal(_ext(x, 0.5, offset=0), _ext(x, 0.5, offset=1))


@pytest.mark.parametrize("device", DEVICES)
def test_float_keep_made_under_inference_mode_serves_a_later_backward(device) -> None:
    """A float keep becomes one float32 tensor per value and device, made at its first use; a first use under
    inference mode must not leave an inference tensor that a later training call could not save."""
    x = torch.randn(16, 8, device=device)
    with torch.inference_mode():
        first = ops.fisher_dropout(x, 0.625, seed=3)
    xg = x.clone().requires_grad_(True)
    y = ops.fisher_dropout(xg, 0.625, seed=3)
    (grad,) = torch.autograd.grad(y, xg, torch.ones_like(y))
    assert torch.equal(y.detach(), first)
    torch.testing.assert_close(grad, (first != 0).float() / 0.625, **tolerance(torch.float32))


def test_backward_saves_no_tensor_of_input_size() -> None:
    x = torch.randn(32, 128, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _ext(x, torch.rand(128) * 0.5 + 0.5)
    y.sum().backward()
    assert sizes and max(sizes) < x.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_opcheck(device, with_residual) -> None:
    x = torch.randn(6, 19, device=device, requires_grad=True)
    keep = _keep(19, True, device)
    res = torch.randn(6, 19, device=device, requires_grad=True) if with_residual else None
    seed = torch.tensor([11, 3])
    torch.library.opcheck(torch.ops.finetune_ext.fisher_dropout.default, (x, keep, res, seed))


@pytest.mark.parametrize("fn", ["op", "reference"])
def test_gradcheck_float64(fn) -> None:
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    keep = torch.rand(9) * 0.6 + 0.3
    if fn == "op":
        f = lambda a, b: _ext(a, keep, b, seed=77)  # noqa: E731
    else:
        f = lambda a, b: reference.fisher_dropout(a, keep, b, seed=77)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, r))
    assert torch.autograd.gradgradcheck(f, (x, r))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device) -> None:
    keep = _keep(24, True, device)

    def f(x, r):
        return ops.fisher_dropout(torch.relu(x), keep, residual=r, seed=5, backend="ext") * 2

    x = torch.randn(8, 24, device=device, requires_grad=True)
    r = torch.randn(8, 24, device=device)
    y = torch.compile(f, fullgraph=True)(x, r)
    torch.testing.assert_close(y, f(x, r))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(f(x, r).sum(), x)[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_feature", [False, True])
def test_cpu_and_cuda_masks_bit_identical(dtype, per_feature) -> None:
    for shape in [(1,), (5, 3), (1000, 769), (3, 1 << 20)]:
        keep = _keep(shape[-1], per_feature, "cpu")
        x = torch.randn(shape, dtype=dtype)
        y_cpu = _ext(x, keep, seed=31337, offset=9)
        y_gpu = _ext(x.cuda(), keep.cuda(), seed=31337, offset=9)
        assert torch.equal(y_cpu, y_gpu.cpu())
        x_unaligned = x.cuda().view(-1)[1:]  # misaligned base pointer: the scalar path
        keep_u = _keep(x_unaligned.shape[-1], per_feature, "cuda")
        torch.testing.assert_close(
            _ext(x_unaligned, keep_u, seed=3), reference.fisher_dropout(x_unaligned, keep_u, seed=3), **tolerance(dtype)
        )


@pytest.mark.cuda
def test_cuda_large_tensor_matches_reference() -> None:
    n = (1 << 24) + 5
    x = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    keep = torch.tensor(0.9, device="cuda")
    y = _ext(x, keep, seed=1, offset=2**33)
    torch.testing.assert_close(y, reference.fisher_dropout(x, keep, seed=1, offset=2**33), **tolerance(x.dtype))


# ---- bad input: clear errors that name the argument --------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan])
def test_bad_scalar_keep(bad) -> None:
    with pytest.raises(ValueError, match=r"keep: expected a value in \(0, 1\]"):
        ops.fisher_dropout(torch.randn(3, 4), bad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["ext", "reference"])
@pytest.mark.parametrize("bad", [0.0, 1.01, math.nan])
def test_bad_tensor_keep_values(device, backend, bad) -> None:
    """The same error on every device and backend (the CUDA kernel is never reached with a bad rate)."""
    keep = torch.full((4,), 0.5, device=device)
    keep[2] = bad
    with pytest.raises(ValueError, match=r"keep: expected every value in \(0, 1\].*at index 2"):
        ops.fisher_dropout(torch.randn(3, 4, device=device), keep, backend=backend)


def test_bad_arguments() -> None:
    x = torch.randn(3, 4)
    cases = [
        (dict(keep=torch.full((5,), 0.5)), r"keep: expected shape \[\] or \[1\] .* \[4\] .* got \[5\]"),
        (dict(keep=torch.full((2, 2), 0.5)), r"keep: expected shape"),
        (dict(keep=torch.ones(4, dtype=torch.int64)), r"keep: expected a floating dtype, got torch.int64"),
        (dict(keep=torch.full((4,), 0.5, device="meta")), r"keep: expected device cpu"),
        (dict(keep="0.5"), r"keep: expected a float or a torch.Tensor"),
        (dict(keep=0.5, residual=torch.randn(3, 5)), r"residual: expected shape \[3, 4\]"),
        (dict(keep=0.5, residual=torch.randn(3, 4, dtype=torch.float64)), r"residual: expected dtype torch.float32"),
        (dict(keep=0.5, seed=-1), r"seed: expected an integer in \[0, 2\*\*63\)"),
        (dict(keep=0.5, offset=-3), r"offset: expected an integer"),
        (dict(keep=0.5, backend="triton"), r"backend: expected 'auto', 'ext' or 'reference', got 'triton'"),
    ]
    for kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            ops.fisher_dropout(x, **kwargs)
    with pytest.raises(ValueError, match=r"x: expected dtype float16, bfloat16, float32 or float64, got torch.int32"):
        ops.fisher_dropout(torch.ones(3, 4, dtype=torch.int32), 0.5)


def test_direct_op_call_checks_in_cpp() -> None:
    op = torch.ops.finetune_ext.fisher_dropout
    x, seed = torch.randn(3, 4), torch.tensor([1, 0])
    with pytest.raises(RuntimeError, match="expected keep to have dtype float32, got Double"):
        op(x, torch.full((4,), 0.5, dtype=torch.float64), None, seed)
    with pytest.raises(RuntimeError, match=r"expected keep of shape \[\] or \[1\] .*\[4\]"):
        op(x, torch.full((3,), 0.5), None, seed)
    with pytest.raises(RuntimeError, match=r"expected every keep probability in \(0, 1\], got 0 at index 1"):
        op(x, torch.tensor([0.5, 0.0, 0.5, 0.5]), None, seed)
    with pytest.raises(RuntimeError, match="expected seed to be a CPU int64 tensor of 2 elements"):
        op(x, torch.full((4,), 0.5), None, torch.tensor([1]))


@pytest.mark.cuda
@pytest.mark.parametrize("op", ["fisher_dropout", "gaussian_perturb"])
def test_cuda_graph_capture_is_refused(op) -> None:
    """A captured graph would replay the capture's Philox key (the same mask every replay): refused clearly."""
    x = torch.randn(64, 32, device="cuda")
    run = {
        "fisher_dropout": lambda: ops.fisher_dropout(x, 0.5, seed=1, backend="ext"),
        "gaussian_perturb": lambda: ops.gaussian_perturb(
            x, torch.full((64,), 0.1, device="cuda"), seed=1, backend="ext"
        ),
    }[op]
    run()  # fine outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match=f"{op}: cannot run inside CUDA graph capture"), torch.cuda.graph(graph):
        run()
