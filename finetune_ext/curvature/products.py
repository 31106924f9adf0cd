"""Batched Hessian-vector and Gauss-Newton-vector products w.r.t. a set of parameters.

Vectors come as a tuple with one tensor per parameter, each with a leading dimension of m vectors:
``V[i].shape == (m, *params[i].shape)``. Functions take the parameter values and return the loss
(``loss_fn``) or the logits (``output_fn``), as ``torch.func`` needs; ``for_model`` builds both for a
Hugging Face model and a batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch.func import grad, jvp, vjp, vmap

from finetune_ext.ops.softmax_ce_hessian_vp import softmax_ce_hessian_vp

Tensors = tuple[torch.Tensor, ...]
LossFn = Callable[[Tensors], torch.Tensor]


def _check(params: Sequence[torch.Tensor], V: Sequence[torch.Tensor]) -> tuple[Tensors, Tensors, int]:
    params, V = tuple(params), tuple(V)
    if not params:
        raise ValueError("params: expected at least one parameter tensor, got an empty list")
    if len(V) != len(params):
        raise ValueError(f"V: expected one tensor per parameter ({len(params)}), got {len(V)}")
    m = V[0].shape[0] if V[0].dim() else 0
    for i, (p, v) in enumerate(zip(params, V, strict=True)):
        if v.shape != (m, *p.shape):
            raise ValueError(f"V[{i}]: expected shape {[m, *p.shape]} (m vectors of params[{i}]), got {list(v.shape)}")
        if v.dtype != p.dtype or v.device != p.device:
            raise ValueError(
                f"V[{i}]: expected {p.dtype} on {p.device} (like params[{i}]), got {v.dtype} on {v.device}"
            )
    if m == 0:
        raise ValueError("V: expected at least one vector (a leading dimension m >= 1)")
    return tuple(p.detach() for p in params), V, m


def _scalar(loss_fn: LossFn) -> LossFn:
    def f(ps: Tensors) -> torch.Tensor:
        out = loss_fn(ps)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"loss_fn: expected a scalar loss, got {shape}")
        return out.reshape(())

    return f


def _chunks(
    m: int,
    chunk_size: int | None,
    memory_budget_mb: float | None,
    run: Callable[[slice], object],
    device,
    start: int | None = None,
) -> list[slice]:
    """Slices of the m vectors. With a memory budget, one vector is run first (on the CUDA allocator) and
    the chunk is what the budget leaves, after what the call has allocated since ``start`` (allocator bytes at
    its start: ggn_vp's forward pass), over that vector's peak: conservative, since the chunk shares the forward
    pass."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    if memory_budget_mb is not None:
        if chunk_size is not None:
            raise ValueError("chunk_size, memory_budget_mb: pass one of them, not both")
        if torch.device(device).type != "cuda":
            raise ValueError(f"memory_budget_mb: measured with the CUDA allocator; on {device} pass chunk_size instead")
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(slice(0, 1))
        per_vector = max(torch.cuda.max_memory_allocated(device) - base, 1)
        held = base - start if start is not None else 0
        chunk_size = max(1, min(m, int((memory_budget_mb * 2**20 - held) // per_vector)))
    step = chunk_size or m
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def _allocated(device: torch.device) -> int:
    """Bytes the CUDA allocator holds on ``device``; 0 elsewhere (budgets are CUDA-only)."""
    return torch.cuda.memory_allocated(device) if torch.device(device).type == "cuda" else 0


def _cat(parts: list[Tensors]) -> Tensors:
    # Products are constants: detach them from parameters outside the selected subset.
    return tuple(torch.cat(ts).detach() for ts in zip(*parts, strict=True))


# Both products run under no_grad: torch.func transforms ignore it, and it stops autograd from recording a graph
# for the model's own parameters outside the subset (a third of the time of a product).
@torch.no_grad()
def hvp(
    loss_fn: LossFn,
    params: Sequence[torch.Tensor],
    V: Sequence[torch.Tensor],
    *,
    mode: Literal["exact", "double_backward"] = "exact",
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
) -> Tensors:
    """Exact Hessian-vector products ``H v`` of ``loss_fn`` at ``params`` for the m vectors in ``V``.

    ``exact`` is forward-over-reverse (``jvp`` of ``grad``) vectorised over the vectors with ``vmap``: one
    batched pass instead of m. ``double_backward`` builds the gradient graph once and back-propagates each
    vector through it: slower, but works for code ``vmap`` cannot batch. ``chunk_size`` bounds how many
    vectors are processed at once (peak memory grows with it).
    """
    primals, V, m = _check(params, V)
    f = _scalar(loss_fn)
    if mode == "exact":
        g = grad(f)

        def single(v: Tensors) -> Tensors:
            return jvp(g, (primals,), (v,))[1]

        batched = vmap(single, randomness="same")
        run = lambda s: batched(tuple(v[s] for v in V))  # noqa: E731
        return _cat([run(s) for s in _chunks(m, chunk_size, memory_budget_mb, run, primals[0].device)])
    if mode != "double_backward":
        raise ValueError(f"mode: expected 'exact' or 'double_backward', got {mode!r}")
    with torch.enable_grad():
        ps = tuple(p.clone().requires_grad_(True) for p in primals)
        grads = torch.autograd.grad(f(ps), ps, create_graph=True)
        out = [torch.autograd.grad(grads, ps, tuple(v[k] for v in V), retain_graph=True) for k in range(m)]
    return _cat([tuple(h[None] for h in hv) for hv in out])


@torch.no_grad()
def ggn_vp(
    output_fn: Callable[[Tensors], torch.Tensor],
    params: Sequence[torch.Tensor],
    V: Sequence[torch.Tensor],
    *,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    memory_budget_mb: float | None = None,
) -> Tensors:
    """Generalised Gauss-Newton products ``Jᵀ H_L J v`` for a mean softmax cross-entropy on ``output_fn``'s logits.

    ``J`` is the Jacobian of the logits ``[..., C]`` w.r.t. ``params`` and ``H_L`` the loss Hessian in logit
    space (``finetune_ext.ops.softmax_ce_hessian_vp``, fused), divided by the number of rows that count
    (labels other than ``ignore_index``). The labels do not enter ``H_L`` otherwise. Positive semi-definite.
    """
    primals, V, m = _check(params, V)
    start = _allocated(primals[0].device)
    logits, pullback = vjp(output_fn, primals)
    if labels is not None and labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels: expected shape {list(logits.shape[:-1])} (the logits' rows), got {list(labels.shape)}"
        )
    rows = torch.tensor(logits[..., 0].numel()) if labels is None else (labels != ignore_index).sum()
    scale = 1.0 / rows.clamp(min=1).to(device=logits.device, dtype=torch.float64)  # on the device: no host sync
    push = vmap(lambda v: jvp(output_fn, (primals,), (v,))[1], randomness="same")
    pull = vmap(lambda u: pullback(u)[0])

    def run(s: slice) -> Tensors:
        jv = push(tuple(v[s] for v in V))
        hjv = softmax_ce_hessian_vp(logits.detach(), jv, labels, ignore_index=ignore_index, scale=scale)
        return pull(hjv.to(logits.dtype))

    # start: the forward's residuals and logits count against the budget
    return _cat([run(s) for s in _chunks(m, chunk_size, memory_budget_mb, run, primals[0].device, start)])
