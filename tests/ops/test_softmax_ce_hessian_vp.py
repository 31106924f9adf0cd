"""finetune_ext::softmax_ce_hessian_vp against its reference and against the autograd Hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune_ext import ops, reference
from finetune_ext.testing import assert_within_2x_reference, tolerance
from tests.conftest import DEVICES

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _inputs(device, dtype, m=3, lead=(5,), c=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(*lead, c, generator=g)).to(device=device, dtype=dtype)
    V = torch.randn(m, *lead, c, generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, c, lead, generator=g).to(device)
    labels.view(-1)[::3] = -100
    return logits, V, labels


def test_reference_is_the_autograd_hessian_of_cross_entropy() -> None:
    logits, V, labels = _inputs("cpu", torch.float64, m=2, lead=(4,), c=9)
    keep = labels != -100
    for k in range(2):
        for n in range(4):
            h = torch.autograd.functional.hessian(lambda z, n=n: F.cross_entropy(z[None], labels[n : n + 1]), logits[n])
            expected = h @ V[k, n] if keep[n] else torch.zeros(9, dtype=torch.float64)
            got = reference.softmax_ce_hessian_vp(logits, V, labels)[k, n]
            torch.testing.assert_close(got, expected, **tolerance(torch.float64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("m", "lead", "c"), [(1, (1,), 5), (3, (5,), 37), (9, (2, 3), 1001), (2, (4,), 50257), (2, (160,), 4099)]
)
def test_matches_reference(device, dtype, m, lead, c) -> None:
    """On a GPU with fewer multiprocessors than rows the last case runs one block per row; with fewer rows than
    multiprocessors (the 1001 and 50257 cases) each row is split into slices across blocks."""
    logits, V, labels = _inputs(device, dtype, m, lead, c)
    for lab in (None, labels):
        out = ops.softmax_ce_hessian_vp(logits, V, lab, backend="ext")
        assert out.dtype == dtype and out.shape == V.shape
        exact = reference.softmax_ce_hessian_vp(logits.double(), V.double(), lab)
        assert_within_2x_reference(out, reference.softmax_ce_hessian_vp(logits, V, lab), exact)
    ignored = (labels == -100).unsqueeze(0).unsqueeze(-1).expand_as(V)
    assert (ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext")[ignored] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_threads_split_rows_between_vectors(dtype) -> None:
    """The CPU kernel splits (row, vector) pairs across threads, so a row's vectors can fall to different threads
    (here 4 rows x 5 vectors over 3 threads: shares of 7, 7 and 6 pairs). Every pair's result is the same bits
    whatever the split, and matches the reference, ignored rows included."""
    logits, V, labels = _inputs("cpu", dtype, m=5, lead=(4,), c=3001)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext")
        torch.set_num_threads(3)
        split = ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one)
    exact = reference.softmax_ce_hessian_vp(logits.double(), V.double(), labels)
    assert_within_2x_reference(split, reference.softmax_ce_hessian_vp(logits, V, labels), exact)


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("logit_dtype", "dtype"),
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
     (torch.float32, torch.float32)],
)  # fmt: skip
def test_gpt2_vocabulary_one_block_per_row(logit_dtype, dtype) -> None:
    """One block per row with the probabilities in shared memory, at GPT-2's vocabulary: 16-bit vectors are kept in
    registers between their two passes (the resident kernel), 32-bit ones read twice."""
    rows = torch.cuda.get_device_properties(0).multi_processor_count
    logits, V, labels = _inputs("cuda", dtype, m=3, lead=(rows,), c=50257)
    logits = logits.to(logit_dtype)
    logits[1, :30000] = float("-inf")
    logits[2, 1::7] = -1e30
    for lab in (None, labels):
        out = ops.softmax_ce_hessian_vp(logits, V, lab, backend="ext")
        exact = reference.softmax_ce_hessian_vp(logits.double(), V.double(), lab)
        assert_within_2x_reference(out, reference.softmax_ce_hessian_vp(logits, V, lab), exact)
    ignored = (labels == -100).unsqueeze(0).unsqueeze(-1).expand_as(V)
    assert ignored.any() and (ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext")[ignored] == 0).all()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rows_wider_than_shared_memory_on_every_multiprocessor(dtype) -> None:
    """The kernel that recomputes probabilities from the logits: one block per row (as many rows as the GPU has
    multiprocessors) and rows wider than the shared memory a block may opt into."""
    props = torch.cuda.get_device_properties(0)
    rows, c = props.multi_processor_count, getattr(props, "shared_memory_per_block_optin", 227 * 1024) // 4 + 1000
    logits, V, labels = _inputs("cuda", dtype, m=2, lead=(rows,), c=c)
    logits[0, : c // 2] = float("-inf")
    out = ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext")
    exact = reference.softmax_ce_hessian_vp(logits.double(), V.double(), labels)
    assert_within_2x_reference(out, reference.softmax_ce_hessian_vp(logits, V, labels), exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_scale_multiplies_inside_the_kernel(device, dtype) -> None:
    logits, V, labels = _inputs(device, dtype, m=3, lead=(5,), c=301)
    scale = torch.tensor(0.37, device=device, dtype=torch.float64)
    out = ops.softmax_ce_hessian_vp(logits, V, labels, scale=scale, backend="ext")
    exact = reference.softmax_ce_hessian_vp(logits.double(), V.double(), labels) * 0.37
    assert_within_2x_reference(out, reference.softmax_ce_hessian_vp(logits, V, labels, scale=scale), exact)


@pytest.mark.parametrize("device", DEVICES)
def test_vmap_over_vectors_is_one_batched_call(device, monkeypatch) -> None:
    """Under vmap (Hessian products of torch.func) the batched vectors join the m vectors of one call; batched
    logits fall back to one call per batch entry. Both equal the unbatched results."""
    logits, V, labels = _inputs(device, torch.float32, m=2, lead=(4,), c=23)
    W = torch.randn(5, *V.shape, device=device)
    scale = torch.tensor(0.5, device=device)
    got = torch.vmap(lambda v: ops.softmax_ce_hessian_vp(logits, v, labels, scale=scale, backend="ext"))(W)
    expected = ops.softmax_ce_hessian_vp(logits, W.flatten(0, 1), labels, scale=scale, backend="ext")
    torch.testing.assert_close(got, expected.view(W.shape), **tolerance(torch.float32))
    Z = torch.randn(5, *logits.shape, device=device)
    got = torch.vmap(lambda z, v: ops.softmax_ce_hessian_vp(z, v, labels, backend="ext"))(Z, W)
    expected = torch.stack([reference.softmax_ce_hessian_vp(z, w, labels) for z, w in zip(Z, W, strict=True)])
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_and_views(device) -> None:
    logits, V, labels = _inputs(device, torch.bfloat16, m=4, lead=(6,), c=129)
    V32 = V.float()
    torch.testing.assert_close(
        ops.softmax_ce_hessian_vp(logits, V32, labels, backend="ext"),
        reference.softmax_ce_hessian_vp(logits, V32, labels),
        **tolerance(torch.float32),
    )
    wide = torch.randn(4, 129, 6, device=device).transpose(1, 2)  # non-contiguous V
    torch.testing.assert_close(
        ops.softmax_ce_hessian_vp(logits.float(), wide, backend="ext"),
        reference.softmax_ce_hessian_vp(logits.float(), wide.contiguous()),
        **tolerance(torch.float32),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_gradient(device) -> None:
    logits, V, labels = _inputs(device, torch.float32, m=2, lead=(4,), c=11)
    V.requires_grad_(True)
    torch.library.opcheck(torch.ops.finetune_ext.softmax_ce_hessian_vp.default, (logits, V, labels, -100))
    torch.library.opcheck(torch.ops.finetune_ext.softmax_ce_hessian_vp.default, (logits, V, None, -100))
    scale = torch.tensor(0.25, device=device)
    torch.library.opcheck(torch.ops.finetune_ext.softmax_ce_hessian_vp.default, (logits, V, labels, -100, scale))
    grad = torch.randn_like(V)
    (g_ext,) = torch.autograd.grad(ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext"), V, grad)
    (g_ref,) = torch.autograd.grad(reference.softmax_ce_hessian_vp(logits, V, labels), V, grad)
    torch.testing.assert_close(g_ext, g_ref, **tolerance(torch.float32))


def test_gradcheck_float64() -> None:
    logits, V, labels = _inputs("cpu", torch.float64, m=2, lead=(3,), c=6)
    logits.requires_grad_(True)
    V.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z, v: reference.softmax_ce_hessian_vp(z, v, labels), (logits, V))
    assert torch.autograd.gradcheck(lambda v: ops.softmax_ce_hessian_vp(logits.detach(), v, labels), (V,))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device) -> None:
    logits, V, labels = _inputs(device, torch.float32, m=2, lead=(4,), c=13)

    def f(z, v):
        return ops.softmax_ce_hessian_vp(z * 2, v, labels, backend="ext").sum(0)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(logits, V), f(logits, V))


def test_bad_input() -> None:
    logits, V, labels = _inputs("cpu", torch.float32)
    cases = [
        (dict(V=V[:, :4]), r"V: expected shape \[m, 5, 37\], got \[3, 4, 37\]"),
        (dict(V=V.long()), r"V: expected a float16/bfloat16/float32/float64 tensor, got torch.int64 tensor"),
        (dict(V=V.double()), "V: float64 logits need float64 V and vice versa"),
        (dict(V=V.to("meta")), "V: expected device cpu"),
        (dict(labels=labels.int()), r"labels: expected int64 of shape \[5\]"),
        (dict(labels=labels[:3]), r"labels: expected int64 of shape \[5\]"),
        (dict(backend="cuda"), "backend: expected 'auto', 'ext' or 'reference'"),
        (dict(scale=torch.ones(1)), r"scale: expected a 0-dim tensor on cpu, got \[1\] on cpu"),
        (dict(scale=0.5), "scale: expected a 0-dim tensor on cpu, got float"),
    ]
    for kwargs, message in cases:
        args = {"logits": logits, "V": V, "labels": None, "scale": None} | kwargs
        backend = args.pop("backend", "auto")
        with pytest.raises(ValueError, match=message):
            ops.softmax_ce_hessian_vp(args["logits"], args["V"], args["labels"], scale=args["scale"], backend=backend)
    with pytest.raises(RuntimeError, match=r"expected V of shape \[m, 5, 37\]"):
        torch.ops.finetune_ext.softmax_ce_hessian_vp(logits, V[:, :2], None, -100)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_and_very_negative_logits(device, dtype) -> None:
    """-inf logits (a masked vocabulary) anywhere in a row, including first in every thread's stride, and logits
    far below the row's maximum: finite outputs equal to the reference's, zero where the probability is zero."""
    c = 2000
    logits, V, labels = _inputs(device, dtype, m=3, lead=(6,), c=c)
    logits[0, : c // 2] = float("-inf")  # the first half of the vocabulary masked: every CUDA thread starts on -inf
    logits[1, ::2] = float("-inf")
    logits[2, 1::7] = -1e30 if dtype == torch.float32 else -1e38
    logits[3, -1] = float("-inf")
    logits[4] = -3e4  # very negative everywhere, equal: a uniform distribution
    labels[:5] = 1
    labels[0] = c - 1  # a label on an unmasked entry
    out = ops.softmax_ce_hessian_vp(logits, V, labels, backend="ext")
    assert torch.isfinite(out).all()
    exact = reference.softmax_ce_hessian_vp(logits.double(), V.double(), labels)
    assert torch.isfinite(exact).all()
    assert_within_2x_reference(out, reference.softmax_ce_hessian_vp(logits, V, labels), exact)
    masked = torch.isinf(logits).unsqueeze(0).expand_as(V)
    assert (out[masked] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_probabilities_across_the_whole_exponent_range(device) -> None:
    """Logits from 0 down to 100 below the row's maximum (the CPU kernel's own exp flushes below -87, where
    float32 exp is subnormal) match the reference; a NaN logit makes its row NaN, as in the reference."""
    c = 4001
    g = torch.Generator().manual_seed(0)
    spread = -torch.linspace(0, 100, c)
    logits = torch.stack([spread[torch.randperm(c, generator=g)] + 5 * k for k in range(4)]).to(device)
    logits[3, 7] = float("nan")
    V = torch.randn(2, 4, c, generator=g).to(device)
    out = ops.softmax_ce_hessian_vp(logits, V, backend="ext")
    exact = reference.softmax_ce_hessian_vp(logits[:3].double(), V[:, :3].double())
    assert_within_2x_reference(out[:, :3], reference.softmax_ce_hessian_vp(logits[:3], V[:, :3]), exact)
    assert out[:, 3].isnan().all() and reference.softmax_ce_hessian_vp(logits, V)[:, 3].isnan().all()
