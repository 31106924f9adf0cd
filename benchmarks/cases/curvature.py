"""Cases for the curvature layer, ``hvp_block``: 16 products w.r.t. one GPT-2 block (GPT-2 small at batch
8 x 512 on GPU, blocks 0 and 11; a 2-layer, 128-wide GPT-2 at 2 x 64 on CPU, blocks 0 and 1), fp32.
``gradient`` is one plain gradient (the unit of the targets), ``reference`` a double-backward loop over the
vectors, ``exact`` batched forward-over-reverse, ``ggn`` the batched Gauss-Newton product with the fused kernel;
with curvlinops installed, ``curvlinops-hessian`` and ``curvlinops-ggn`` are its ``HessianLinearOperator`` and
``GGNLinearOperator`` multiplying the same 16 vectors. ``flop_bound`` gives the matmul-FLOP lower bound of a
product in gradients. ``sizes`` is unused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext import curvature
from finetune_ext.bench.harness import Case, select_providers

HVP_VECTORS = 16


def setup(device: torch.device) -> tuple[GPT2LMHeadModel, dict[str, torch.Tensor], list[str]]:
    """The model (seeded), the batch and the blocks of the benchmark on ``device``."""
    if device.type == "cuda":
        config, shape, blocks = GPT2Config(), (8, 512), ["transformer.h.0.", "transformer.h.11."]
    else:
        config = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=64)
        shape, blocks = (2, 64), ["transformer.h.0.", "transformer.h.1."]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(device)
    return model, {"input_ids": torch.randint(0, config.vocab_size, shape, device=device)}, blocks


def hvp_cases(
    device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None
) -> Iterator[Case]:
    """16 HVP/GGN products for each block against one gradient, a double-backward loop and curvlinops."""
    model, batch, blocks = setup(device)
    shape = tuple(batch["input_ids"].shape)
    for block in blocks:
        with curvature.for_model(model, batch, [block]) as fns:
            mode = f"{HVP_VECTORS}vec-{block.removeprefix('transformer.').rstrip('.')}"
            for name, fn in select_providers(_providers(model, fns), providers).items():
                yield Case("hvp_block", mode, name, shape, torch.float32, device, 0, fn)


def _providers(model: GPT2LMHeadModel, fns: curvature.ModelFunctions) -> dict[str, Callable[[], object]]:
    device = fns.params[0].device
    V = tuple(torch.randn(HVP_VECTORS, *p.shape, device=device) for p in fns.params)
    params = tuple(p.clone().requires_grad_(True) for p in fns.params)
    # On a GPU, the batched products take chunks of vectors within half the free memory: all 16 vectors of GPT-2
    # small at 8 x 512 at once ran out of an H200's 140 GB.
    budget = {"memory_budget_mb": torch.cuda.mem_get_info(device)[0] / 2 / 2**20} if device.type == "cuda" else {}
    found = {
        "gradient": lambda: torch.autograd.grad(fns.loss_fn(params), params),
        "reference": lambda: curvature.hvp(fns.loss_fn, fns.params, V, mode="double_backward"),
        "exact": lambda: curvature.hvp(fns.loss_fn, fns.params, V, **budget),
        "ggn": lambda: curvature.ggn_vp(fns.output_fn, fns.params, V, labels=fns.labels, **budget),
    }
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator
    except ImportError:
        return found
    X = [v.movedim(0, -1) for v in V]  # curvlinops multiplies [*shape, K] matrices
    for name, operator in (("curvlinops-hessian", HessianLinearOperator), ("curvlinops-ggn", GGNLinearOperator)):
        op = _curvlinops(operator, model, fns)
        found[name] = lambda op=op: op @ X
    return found


class _PredictedLogits(nn.Module):
    """The model as curvlinops takes it: a module from the batch to the logits of the predicted tokens."""

    def __init__(self, model: GPT2LMHeadModel, rows: torch.Tensor) -> None:
        super().__init__()
        self.model, self.rows = model, rows

    def forward(self, X: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**X).logits[self.rows]


def _curvlinops(operator: type, model: GPT2LMHeadModel, fns: curvature.ModelFunctions):
    """curvlinops' operator for the same model, batch, block and mean cross-entropy over the predicted tokens."""
    rows = fns.labels != -100  # the last position predicts nothing
    params = [model.get_parameter(n) for n in fns.names]
    return operator(_PredictedLogits(model, rows), nn.CrossEntropyLoss(), params, [(fns.batch, fns.labels[rows])],
                    check_deterministic=False, batch_size_fn=lambda X: X["input_ids"].shape[0])  # fmt: skip


def flop_bound(model: GPT2LMHeadModel, batch: dict[str, torch.Tensor], block: str, m: int = HVP_VECTORS) -> float:
    """Matmul FLOPs of m products w.r.t. ``block`` over those of one gradient: one forward and backward, plus per
    vector a tangent forward pass (a ``jvp`` of the logits) and a backward pass from the logits to the block."""
    with curvature.for_model(model, batch, [block]) as fns:
        params = tuple(p.clone().requires_grad_(True) for p in fns.params)
        v = tuple(torch.randn_like(p) for p in fns.params)
        forward = _flops(lambda: fns.loss_fn(fns.params))
        gradient = _flops(lambda: torch.autograd.grad(fns.loss_fn(params), params))
        tangent = _flops(lambda: torch.func.jvp(fns.output_fn, (fns.params,), (v,))) - forward
    return (gradient + m * (tangent + gradient - forward)) / gradient


def _flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()
