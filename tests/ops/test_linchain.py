"""finetune_ext::linchain_compose and finetune_ext::lora_linear against their references and autograd."""

from __future__ import annotations

import pytest
import torch

from finetune_ext import ops, reference
from finetune_ext.testing import assert_within_2x_reference, tolerance
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _chains(device, dtype, n=3, k=3, r=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(n, k, r, r, generator=g) / r**0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, k, r, generator=g).to(device=device, dtype=dtype)
    return W, b


def _explicit_chain(W: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """M and beff by pushing the identity and zero through the chain, mixer by mixer (the official forward)."""
    n, k, r, _ = W.shape
    M = torch.eye(r, dtype=W.dtype, device=W.device).expand(n, r, r)
    u = torch.zeros(n, r, 1, dtype=W.dtype, device=W.device)
    for i in range(k):
        M = W[:, i] @ M
        u = W[:, i] @ u + (b[:, i, :, None] if b is not None else 0)
    return M, u[..., 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "k", "r"), [(1, 1, 1), (4, 3, 5), (2, 4, 16), (7, 2, 33)])
def test_compose_matches_reference(device, dtype, n, k, r) -> None:
    W, b = _chains(device, dtype, n, k, r)
    for bias in (b, None):
        M, beff = ops.linchain_compose(W, bias, backend="ext")
        assert M.shape == (n, r, r) and beff.shape == (n, r) and M.dtype == dtype
        exact = _explicit_chain(W.double(), bias.double() if bias is not None else None)
        ref = reference.linchain_compose(W, bias)
        assert_within_2x_reference(M, ref[0], exact[0])
        assert_within_2x_reference(beff, ref[1], exact[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_compose_gradients_are_exact(device, k) -> None:
    """float64: the kernel's gradient of every mixer equals autograd through the explicit chain."""
    W, b = _chains(device, torch.float64, n=3, k=k, r=6)
    gM, gb = (
        torch.randn(3, 6, 6, dtype=torch.float64, device=device),
        torch.randn(3, 6, dtype=torch.float64, device=device),
    )
    for bias in (b, None):
        Wr = W.clone().requires_grad_(True)
        br = bias.clone().requires_grad_(True) if bias is not None else None
        M, beff = ops.linchain_compose(Wr, br, backend="ext")
        got = torch.autograd.grad((M * gM).sum() + (beff * gb).sum(), [t for t in (Wr, br) if t is not None])
        Me, be = _explicit_chain(Wr, br)
        want = torch.autograd.grad((Me * gM).sum() + (be * gb).sum(), [t for t in (Wr, br) if t is not None])
        for g_, w_ in zip(got, want, strict=True):
            torch.testing.assert_close(g_, w_, **tolerance(torch.float64))
    Wr, br = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w, c: ops.linchain_compose(w, c, backend="ext"), (Wr, br))
    assert torch.autograd.gradcheck(lambda w: ops.linchain_compose(w, None, backend="ext")[0], (Wr,))


@pytest.mark.parametrize("device", DEVICES)
def test_compose_opcheck(device) -> None:
    W, b = _chains(device, torch.float32)
    torch.library.opcheck(torch.ops.finetune_ext.linchain_compose, (W.requires_grad_(True), b))
    torch.library.opcheck(torch.ops.finetune_ext.linchain_compose, (W, None))


def _layer(device, dtype, lead=(3, 7), d_in=24, d_out=20, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = {"device": device, "dtype": dtype}
    x = torch.randn(*lead, d_in, generator=g).to(**t)
    weight = (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(**t)
    bias = torch.randn(d_out, generator=g).to(**t)
    A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(**t)
    B = torch.randn(d_out, r, generator=g).to(**t)
    c = torch.randn(r, generator=g).to(**t)
    return x, weight, bias, A, B, c


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("base", ["weight", "none"])
def test_lora_linear_matches_reference(device, dtype, p, base) -> None:
    """GEMMs are reductions: the 2x-reference rule against float64, forward and every gradient; ``weight=None``
    is the adapter path alone (a base the caller runs itself)."""
    x, weight, bias, A, B, c = _layer(device, dtype)
    grad_out = torch.randn(3, 7, 20, device=device).to(dtype)

    def run(backend, cast=None):
        def fn(x_, A_, B_, c_):
            w, bi = (weight, bias) if cast is None else (weight.to(cast), bias.to(cast))
            w = w if base == "weight" else None
            return ops.lora_linear(x_, w, bi, A_, B_, c_, scale=2.0, dropout_p=p, seed=11, backend=backend)

        inputs = [x, A, B, c] if cast is None else [t.to(cast) for t in (x, A, B, c)]
        return _grads(fn, inputs, grad_out if cast is None else grad_out.to(cast))

    (y, grads), (y_ref, grads_ref), (y64, grads64) = run("ext"), run("reference"), run("reference", torch.float64)
    assert y.dtype == dtype and y.shape == (3, 7, 20)
    assert_within_2x_reference(y, y_ref, y64)
    for g_, gr, g64 in zip(grads, grads_ref, grads64, strict=True):
        assert_within_2x_reference(g_, gr, g64)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_gradcheck_and_opcheck(device) -> None:
    x, weight, bias, A, B, c = _layer(device, torch.float64, lead=(5,), d_in=6, d_out=4, r=3)
    leaves = [t.requires_grad_(True) for t in (x, A, B, c)]

    std = torch.rand(4, device=device)

    def fn(x_, A_, B_, c_, noise=None):
        return ops.lora_linear(x_, weight, bias, A_, B_, c_, scale=0.5, dropout_p=0.4, seed=3, noise_std=noise,
                               noise_seed=8, backend="ext")  # fmt: skip

    def adapter_only(x_, A_, B_, c_):
        return ops.lora_linear(x_, None, bias, A_, B_, c_, scale=0.5, dropout_p=0.4, seed=3, backend="ext")

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradcheck(lambda *t: fn(*t, noise=std), leaves)
    assert torch.autograd.gradcheck(adapter_only, leaves)
    keep, seed = torch.full((), 0.6, dtype=torch.float32, device=device), torch.tensor([3, 0])
    no_noise, noise_key = (None, torch.zeros(2, dtype=torch.int64)), torch.tensor([8, 0])
    op = torch.ops.finetune_ext.lora_linear
    torch.library.opcheck(op, (x, weight, bias, A, B, c, 0.5, keep, seed, *no_noise))
    torch.library.opcheck(op, (x, weight, None, A, B, None, 0.5, None, seed, *no_noise))
    torch.library.opcheck(op, (x, weight, bias, A, B, c, 0.5, keep, seed, std, noise_key))
    torch.library.opcheck(op, (x, None, bias, A, B, c, 0.5, keep, seed, *no_noise))


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_dropout_and_memory(device) -> None:
    x, weight, bias, A, B, c = _layer(device, torch.float32, lead=(64,), d_in=32, r=4)
    x.requires_grad_(True)
    # Eval (training=False) and p = 0 are the undropped layer; the mask follows the seed.
    plain = ops.lora_linear(x, weight, bias, A, B, c, scale=2.0, backend="ext")
    assert torch.equal(ops.lora_linear(x, weight, bias, A, B, c, scale=2.0, dropout_p=0.5, training=False), plain)
    y1 = ops.lora_linear(x, weight, bias, A, B, c, scale=2.0, dropout_p=0.5, seed=1, backend="ext")
    y2 = ops.lora_linear(x, weight, bias, A, B, c, scale=2.0, dropout_p=0.5, seed=2, backend="ext")
    assert not torch.equal(y1, y2) and not torch.equal(y1, plain)
    # Nothing of x's size is saved besides x itself: the mask is redrawn in the backward.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        ops.lora_linear(x, weight, bias, A.requires_grad_(True), B, c, scale=2.0, dropout_p=0.5, backend="ext")
    big = [t for t in saved if t.numel() >= x.numel() and t.data_ptr() not in (x.data_ptr(), weight.data_ptr())]
    assert big == []


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_transposed_weight_and_frozen_base(device) -> None:
    x, weight, bias, A, B, c = _layer(device, torch.float32)
    conv_weight = weight.t().contiguous()  # GPT-2 Conv1D layout [in, out]
    torch.testing.assert_close(
        ops.lora_linear(x, conv_weight.t(), bias, A, B, c, scale=2.0, backend="ext"),
        reference.lora_linear(x, weight, bias, A, B, c, 2.0),
        **tolerance(torch.float32),
    )
    weight.requires_grad_(True)  # a trainable base: auto takes the reference path, ext refuses
    y = ops.lora_linear(x, weight, bias, A, B, c, scale=2.0)
    assert torch.autograd.grad(y.sum(), weight)[0].shape == weight.shape
    with pytest.raises(RuntimeError, match="keeps weight and bias frozen"):
        ops.lora_linear(x, weight, bias, A, B, c, scale=2.0, backend="ext")


def _mixers(device, dtype, k=3, r=4, seed=1):
    W, b = _chains(device, dtype, n=1, k=k, r=r, seed=seed)
    return W[0], b[0]


def _layer_on_kernel_chain(x, weight, bias, A, B, Wm, bm=None, **kw):
    """The layer as ``reference.lora_linear`` on the chain from ``linchain_compose``'s kernel (its own test
    checks the chain against the reference). A low-precision chain's rounding shifts ``M A`` and ``beff`` for
    every token alike, so against the all-reference layer the gradients' errors are single correlated draws
    (1-2 of 60 random bf16/fp16 cases failed the 2x rule; none did here)."""
    M, beff = ops.linchain_compose(Wm[None], bm[None] if bm is not None else None, backend="ext")
    c = beff[0] if bm is not None else None
    return reference.lora_linear(x, weight, bias, M[0] @ A, B, c, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_linchain_linear_matches_reference(device, dtype, p) -> None:
    """The layer with its chain in one op: forward and the gradients of x, A, B and both mixer tensors by the
    2x-reference rule against float64; without mixer biases too."""
    x, weight, bias, A, B, _ = _layer(device, dtype)
    Wm, bm = _mixers(device, dtype)
    grad_out = torch.randn(3, 7, 20, device=device).to(dtype)
    std = torch.rand(20, device=device)
    keep = torch.full((), 1.0 - p) if p else None

    def run(fn, leaves, cast=None):
        w, bi = (weight, bias) if cast is None else (weight.to(cast), bias.to(cast))
        inputs = list(leaves) if cast is None else [t.to(cast) for t in leaves]
        return _grads(lambda x_, *t: fn(x_, w, bi, *t), inputs, grad_out if cast is None else grad_out.to(cast))

    def ext(x_, w, bi, A_, B_, *mixers):
        return ops.linchain_linear(x_, w, bi, A_, B_, *mixers, scale=2.0, dropout_p=p, seed=11, noise_std=std,
                                   noise_seed=5, backend="ext")  # fmt: skip

    def ref(x_, w, bi, A_, B_, *mixers):
        return _layer_on_kernel_chain(x_, w, bi, A_, B_, *mixers, scale=2.0, keep=keep, seed=11, noise_std=std,
                                      noise_key=(5, 0))  # fmt: skip

    for leaves in ((x, A, B, Wm, bm), (x, A, B, Wm)):
        (y, grads), (y_ref, grads_ref), (y64, grads64) = (
            run(ext, leaves),
            run(ref, leaves),
            run(ref, leaves, torch.float64),
        )
        assert y.dtype == dtype and y.shape == (3, 7, 20)
        assert_within_2x_reference(y, y_ref, y64)
        for g_, gr, g64 in zip(grads, grads_ref, grads64, strict=True):
            assert_within_2x_reference(g_, gr, g64)


@pytest.mark.parametrize("device", DEVICES)
def test_linchain_linear_gradcheck_opcheck_and_inference(device) -> None:
    x, weight, bias, A, B, _ = _layer(device, torch.float64, lead=(5,), d_in=6, d_out=4, r=3)
    Wm, bm = _mixers(device, torch.float64, k=2, r=3)
    leaves = [t.requires_grad_(True) for t in (x, A, B, Wm, bm)]
    std = torch.rand(4, device=device, dtype=torch.float64)

    def fn(*t, noise=None):
        return ops.linchain_linear(*t[:1], weight, bias, *t[1:], scale=0.5, dropout_p=0.4, seed=3, noise_std=noise,
                                   noise_seed=8, backend="ext")  # fmt: skip

    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradcheck(lambda *t: fn(*t, noise=std), leaves)
    assert torch.autograd.gradcheck(fn, leaves[:4])  # no mixer biases
    grad_out = torch.randn(5, 4, dtype=torch.float64, device=device)
    ours = torch.autograd.grad(fn(*leaves, noise=std), leaves, grad_out)
    y_ref = reference.linchain_linear(
        leaves[0], weight, bias, *leaves[1:], 0.5, torch.full((), 0.6), seed=3, noise_std=std.float(), noise_key=(8, 0)
    )
    want = torch.autograd.grad(y_ref, leaves, grad_out)
    for g_, w_ in zip(ours, want, strict=True):
        torch.testing.assert_close(g_, w_, **tolerance(torch.float64))
    keep, seed = torch.full((), 0.6, dtype=torch.float32, device=device), torch.tensor([3, 0])
    no_noise, noise_key = (None, torch.zeros(2, dtype=torch.int64)), torch.tensor([8, 0])
    op = torch.ops.finetune_ext.linchain_linear
    torch.library.opcheck(op, (x, weight, bias, A, B, Wm, bm, 0.5, keep, seed, *no_noise))
    torch.library.opcheck(op, (x, weight, None, A, B, Wm, None, 0.5, None, seed, *no_noise))
    torch.library.opcheck(op, (x, weight, bias, A, B, Wm, bm, 0.5, keep, seed, std.float(), noise_key))
    expected = ops.linchain_linear(x, weight, bias, A, B, Wm, bm, scale=0.5, backend="reference")
    with torch.inference_mode():  # inference tensors skip the autograd kernel: the op's plain forward
        y = ops.linchain_linear(*(t.detach().clone() for t in (x, weight, bias, A, B, Wm, bm)), scale=0.5)
    torch.testing.assert_close(y, expected.detach(), **tolerance(torch.float64))


def test_bad_input() -> None:
    x, weight, bias, A, B, c = _layer("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"A: expected shape \[r, 24\], got \[4, 23\]"):
        ops.lora_linear(x, weight, bias, A[:, :23], B, c)
    with pytest.raises(ValueError, match=r"B: expected shape \[20, 4\], got \[20, 3\]"):
        ops.lora_linear(x, weight, bias, A, B[:, :3], c)
    with pytest.raises(ValueError, match=r"c: expected dtype torch.float32 on cpu \(like x\), got torch.float64"):
        ops.lora_linear(x, weight, bias, A, B, c.double())
    with pytest.raises(ValueError, match=r"dropout_p: expected a value in \[0, 1\), got 1.0"):
        ops.lora_linear(x, weight, bias, A, B, c, dropout_p=1.0)
    with pytest.raises(ValueError, match=r"W: expected shape \[N, k, r, r\] with k >= 1, got \[2, 3, 4\]"):
        ops.linchain_compose(torch.zeros(2, 3, 4))
    W, b = _chains("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"b: expected shape \[3, 3, 5\]"):
        ops.linchain_compose(W, b[:, :2])
    with pytest.raises(RuntimeError, match="linchain_compose: expected W of shape"):
        torch.ops.finetune_ext.linchain_compose(torch.zeros(2, 0, 3, 3), None)
    Wm, bm = _mixers("cpu", torch.float32)
    with pytest.raises(ValueError, match=r"mixer_weight: expected shape \[k, 4, 4\] with k >= 1, got \[3, 4, 5\]"):
        ops.linchain_linear(x, weight, bias, A, B, torch.zeros(3, 4, 5), bm)
    with pytest.raises(ValueError, match=r"mixer_bias: expected shape \[3, 4\], got \[2, 4\]"):
        ops.linchain_linear(x, weight, bias, A, B, Wm, bm[:2])
    with pytest.raises(ValueError, match=r"mixer_bias: expected dtype torch.float32 on cpu \(like x\)"):
        ops.linchain_linear(x, weight, bias, A, B, Wm, bm.double())
    with pytest.raises(RuntimeError, match=r"linchain_linear: expected mixer_weight \[k, 4, 4\]"):
        key = torch.zeros(2, dtype=torch.int64)
        torch.ops.finetune_ext.linchain_linear(x, weight, bias, A, B, Wm[:, :3], None, 1.0, None, key, None, key)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device) -> None:
    """An adapted layer end to end (compose, A' = M A, fused layer; or linchain_linear) compiles without graph
    breaks."""
    x, weight, bias, A, B, _ = _layer(device, torch.float32)
    W, b = _chains(device, torch.float32, n=1, k=3, r=4)
    leaves = [t.requires_grad_(True) for t in (x, A, W, b)]

    def composed(x_, A_, W_, b_):
        M, beff = ops.linchain_compose(W_, b_, backend="ext")
        return ops.lora_linear(x_, weight, bias, M[0] @ A_, B, beff[0], scale=2.0, dropout_p=0.1, seed=9)

    def fused(x_, A_, W_, b_):
        return ops.linchain_linear(x_, weight, bias, A_, B, W_[0], b_[0], scale=2.0, dropout_p=0.1, seed=9)

    for f in (composed, fused):
        y = torch.compile(f, fullgraph=True)(*leaves)
        torch.testing.assert_close(y, f(*leaves), **tolerance(torch.float32))
        got = torch.autograd.grad(y.sum(), leaves)
        for g_, e in zip(got, torch.autograd.grad(f(*leaves).sum(), leaves), strict=True):
            torch.testing.assert_close(g_, e, **tolerance(torch.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_and_cuda_agree(dtype) -> None:
    """The chain compose and its backward give identical bits on both devices (same sums in the same order, no
    FMA contraction); the fused layer draws the same dropout mask (fisher_dropout's Philox)."""
    W, b = _chains("cpu", dtype, n=9, k=3, r=16)
    Wc, bc_ = W.cuda().requires_grad_(), b.cuda().requires_grad_()
    W.requires_grad_(), b.requires_grad_()
    M, beff = ops.linchain_compose(W, b, backend="ext")
    Mc, bc = ops.linchain_compose(Wc, bc_, backend="ext")
    assert torch.equal(Mc.cpu(), M) and torch.equal(bc.cpu(), beff)
    gM, gb = torch.randn_like(M), torch.randn_like(beff)
    grads = torch.autograd.grad((M, beff), (W, b), (gM, gb))
    grads_c = torch.autograd.grad((Mc, bc), (Wc, bc_), (gM.cuda(), gb.cuda()))
    assert all(torch.equal(gc.cpu(), g) for gc, g in zip(grads_c, grads, strict=True))
    x, weight, bias, A, B, c = _layer("cpu", dtype, lead=(257,), d_in=64, d_out=48)
    y = ops.lora_linear(x, weight, bias, A, B, c, scale=2.0, dropout_p=0.2, seed=4, backend="ext")
    args = [t.cuda() for t in (x, weight, bias, A, B, c)]
    yc = ops.lora_linear(*args, scale=2.0, dropout_p=0.2, seed=4, backend="ext")
    assert_within_2x_reference(
        yc.cpu(),
        y,
        reference.lora_linear(*(t.double() for t in (x, weight, bias, A, B, c)), 2.0, torch.full((), 0.8), seed=4),
    )


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linchain_linear_cpu_and_cuda_agree(dtype) -> None:
    """The layer with its chain on CUDA: forward and every gradient by the 2x rule of the CPU op, against the CPU
    op in float64 (the same dropout mask on both devices)."""
    x, weight, bias, A, B, _ = _layer("cpu", dtype, lead=(257,), d_in=64, d_out=48, r=8)
    Wm, bm = _mixers("cpu", dtype, k=3, r=8)
    grad_out = torch.randn(257, 48).to(dtype)

    def run(device, cast=dtype):
        w, bi = (t.to(device=device, dtype=cast) for t in (weight, bias))

        def fn(x_, A_, B_, W_, b_):
            return ops.linchain_linear(x_, w, bi, A_, B_, W_, b_, scale=2.0, dropout_p=0.2, seed=4, backend="ext")

        leaves = [t.to(device=device, dtype=cast) for t in (x, A, B, Wm, bm)]
        y, grads = _grads(fn, leaves, grad_out.to(device=device, dtype=cast))
        return [t.cpu() for t in (y, *grads)]

    for on_cuda, on_cpu, exact in zip(run("cuda"), run("cpu"), run("cpu", torch.float64), strict=True):
        assert_within_2x_reference(on_cuda, on_cpu, exact)
