"""finetune_ext::gaussian_perturb against its reference, and lora_linear's noise path."""

from __future__ import annotations

import math

import pytest
import torch

from finetune_ext import ops, reference
from finetune_ext.reference.philox import philox4x32_10
from finetune_ext.testing import assert_within_2x_reference
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1, 1), (3, 37), (17, 129), (64, 40)]


def _key() -> tuple[int, int]:
    return int(torch.randint(0, 2**62, ())), int(torch.randint(0, 2**40, ()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bits_match_reference(device, dtype, shape) -> None:
    W = torch.randn(shape, device=device, dtype=dtype)
    std = torch.rand(shape[0], device=device)
    seed, offset = _key()
    before = W.clone()
    out = ops.gaussian_perturb(W, std, seed=seed, offset=offset, backend="ext")
    assert torch.equal(W, before), "the base weight was written"
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, reference.gaussian_perturb(W.cpu(), std.cpu(), seed=seed, offset=offset).to(device))


@pytest.mark.parametrize("device", DEVICES)
def test_strided_weights_keep_their_layout_and_match_the_reference(device) -> None:
    """A transposed view (GPT-2's Conv1D) draws in memory order and keeps its layout; other strides go row-major."""
    base = torch.randn(40, 66, device=device)
    views = (
        (base.t(), True),
        (base[:, ::2], False),
        (base[1:, 3:], False),
        (base[:, ::2].t(), False),
        (base[:1].t(), False),
    )
    for W, column_major in views:
        std = torch.rand(W.shape[0], device=device)
        out = ops.gaussian_perturb(W, std, seed=5, backend="ext")
        assert out.t().is_contiguous() if column_major else out.is_contiguous()
        assert torch.equal(out.cpu(), reference.gaussian_perturb(W.cpu(), std.cpu(), seed=5))
    std, zeros = torch.rand(66, device=device), torch.zeros_like(base)
    out = ops.gaussian_perturb(zeros.t(), std, seed=5, backend="ext")
    noise = ops.gaussian_perturb(zeros, torch.ones(40, device=device), seed=5, backend="ext")  # same memory order
    assert torch.equal(out, std[:, None] * noise.t())  # row i of the [66, 40] view takes std_i on every element


def test_normals_are_box_muller_of_the_philox_words() -> None:
    """Against float64 Box-Muller of the same uniforms: our polynomials are within a few float32 ulps."""
    n, seed, offset = 1 << 16, 77, 3
    z = reference.philox_normal(n, seed, offset)
    g = torch.arange(n // 4, dtype=torch.int64)
    words = philox4x32_10((g, torch.zeros_like(g), torch.full_like(g, offset), torch.zeros_like(g)), (seed, 0))
    words = words.reshape(-1, 2, 2).double()
    u = (torch.floor(words[..., 0] / 256) + 1) / 2**24
    t = torch.floor(words[..., 1] / 256) / 2**24
    r = torch.sqrt(-2 * torch.log(u))
    exact = torch.stack((r * torch.cos(2 * math.pi * t), r * torch.sin(2 * math.pi * t)), -1).reshape(-1)
    err = (z.double() - exact).abs() / torch.clamp(r.repeat_interleave(2), min=1.0)
    assert err.max() < 8 * 2**-24
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02


@pytest.mark.parametrize("device", DEVICES)
def test_same_key_same_noise_new_key_new_noise(device) -> None:
    W, std = torch.zeros(8, 32, device=device), torch.ones(8, device=device)
    a = ops.gaussian_perturb(W, std, seed=1, offset=0)
    assert torch.equal(a, ops.gaussian_perturb(W, std, seed=1, offset=0))
    assert not torch.equal(a, ops.gaussian_perturb(W, std, seed=2, offset=0))
    assert not torch.equal(a, ops.gaussian_perturb(W, std, seed=1, offset=1))
    assert torch.equal(ops.gaussian_perturb(W, 2 * std, seed=1) - W, 2 * (a - W))


def test_opcheck_and_compile() -> None:
    W, std, key = torch.randn(9, 13), torch.rand(9), torch.tensor([3, 4], dtype=torch.int64)
    torch.library.opcheck(torch.ops.finetune_ext.gaussian_perturb, (W, std, key))
    compiled = torch.compile(lambda w, s: ops.gaussian_perturb(w, s, seed=3, offset=4), fullgraph=True)
    assert torch.equal(compiled(W, std), ops.gaussian_perturb(W, std, seed=3, offset=4))


@pytest.mark.parametrize(
    "weight, std, match",
    [
        (torch.zeros(4), torch.zeros(4), "weight: expected a 2-d floating tensor"),
        (torch.zeros(4, 3, dtype=torch.int64), torch.zeros(4), "weight: expected a 2-d floating tensor"),
        (torch.zeros(4, 3), torch.zeros(3), r"std: expected shape \[4\]"),
        (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), "std: expected a floating dtype"),
    ],
)
def test_bad_input(weight, std, match) -> None:
    with pytest.raises(ValueError, match=match):
        ops.gaussian_perturb(weight, std, seed=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lora_linear_noise_is_the_layer_at_w_plus_eps(device, dtype) -> None:
    """Forward and gradients at W + eps: the fused op equals a plain lora_linear at the materialised W + eps
    bit for bit, and the reference path obeys the 2x-reference rule against float64."""
    out_f, in_f, r = 24, 19, 4
    W = torch.randn(out_f, in_f, device=device, dtype=dtype)
    bias = torch.randn(out_f, device=device, dtype=dtype)
    std = 0.1 * torch.rand(out_f, device=device)
    x = torch.randn(3, 5, in_f, device=device, dtype=dtype, requires_grad=True)
    A = torch.randn(r, in_f, device=device, dtype=dtype, requires_grad=True)
    B = torch.randn(out_f, r, device=device, dtype=dtype, requires_grad=True)
    before = W.clone()
    Wp = ops.gaussian_perturb(W, std, seed=41, offset=2)

    def run(backend, weight, noise, cast=None):
        inputs = [t.detach().to(cast or dtype).requires_grad_(True) for t in (x, A, B)]
        w, b = weight.to(cast or dtype), bias.to(cast or dtype)
        extra = dict(noise_std=std, noise_seed=41, noise_offset=2) if noise else {}
        y = ops.lora_linear(inputs[0], w, b, *inputs[1:], scale=0.5, dropout_p=0.2, seed=9, backend=backend, **extra)
        return (y, *torch.autograd.grad(y, inputs, torch.ones_like(y)))

    fused, plain = run("ext", W, True), run("ext", Wp, False)
    ref, exact = run("reference", W, True), run("reference", Wp, False, torch.float64)
    assert torch.equal(W, before)
    for f, p, r_, e in zip(fused, plain, ref, exact, strict=True):
        assert torch.equal(f, p)
        assert_within_2x_reference(f, r_, e)
