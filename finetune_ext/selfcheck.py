"""``finetune-ext info --check``: every fused op once, compiled kernel against its pure-PyTorch reference.

What an installed wheel is checked with (``make wheel-check``): small fp32 inputs on the CPU and, when a GPU and
CUDA kernels are present, on the GPU; each op's result against the reference within the tolerance table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from finetune_ext import ops
from finetune_ext.testing import tolerance


def _fisher_dropout(backend: str, device: torch.device) -> list[torch.Tensor]:
    x = _randn(device, 64, 96)
    keep = torch.rand(96, generator=_gen(1)).to(device) * 0.5 + 0.5
    return [ops.fisher_dropout(x, keep, seed=7, backend=backend)]


def _softmax_ce_hessian_vp(backend: str, device: torch.device) -> list[torch.Tensor]:
    logits, V = _randn(device, 6, 300), _randn(device, 3, 6, 300, seed=2)
    labels = torch.tensor([0, 5, -100, 7, 299, 1], device=device)
    return [ops.softmax_ce_hessian_vp(logits, V, labels, backend=backend)]


def _linchain_compose(backend: str, device: torch.device) -> list[torch.Tensor]:
    return list(
        ops.linchain_compose(_randn(device, 3, 2, 4, 4) * 0.5, _randn(device, 3, 2, 4, seed=2), backend=backend)
    )


def _lora_linear(backend: str, device: torch.device) -> list[torch.Tensor]:
    x, W, bias = _randn(device, 10, 32), _randn(device, 24, 32, seed=2), _randn(device, 24, seed=3)
    A, B, c = _randn(device, 4, 32, seed=4), _randn(device, 24, 4, seed=5), _randn(device, 4, seed=6)
    return [ops.lora_linear(x, W, bias, A, B, c, scale=2.0, dropout_p=0.1, seed=3, backend=backend)]


def _linchain_linear(backend: str, device: torch.device) -> list[torch.Tensor]:
    x, W, bias = _randn(device, 10, 32), _randn(device, 24, 32, seed=2), _randn(device, 24, seed=3)
    A, B = _randn(device, 4, 32, seed=4), _randn(device, 24, 4, seed=5)
    mixers = _randn(device, 3, 4, 4, seed=6) * 0.5, _randn(device, 3, 4, seed=7)
    return [ops.linchain_linear(x, W, bias, A, B, *mixers, scale=2.0, dropout_p=0.1, seed=3, backend=backend)]


def _gaussian_perturb(backend: str, device: torch.device) -> list[torch.Tensor]:
    return [
        ops.gaussian_perturb(
            _randn(device, 24, 40), torch.rand(24, generator=_gen(2)).to(device), seed=5, backend=backend
        )
    ]


def _armijo(backend: str, device: torch.device) -> list[torch.Tensor]:
    params, grads = (
        [_randn(device, 50), _randn(device, 7, 9, seed=2)],
        [_randn(device, 50, seed=3), _randn(device, 7, 9, seed=4)],
    )
    exp_avg, exp_avg_sq = [g * 0.1 for g in grads], [g.square() * 0.01 for g in grads]
    sums = ops.armijo_moments_(grads, exp_avg, exp_avg_sq, [0, 1], 2, bias_correction2=0.5, backend=backend)
    ops.armijo_update_(params, grads, exp_avg, exp_avg_sq, [0.1, -0.2], [0.3, 0.05], backend=backend)
    return [sums.float(), *params, *exp_avg, *exp_avg_sq]


CHECKS: dict[str, Callable[[str, torch.device], list[torch.Tensor]]] = {
    "fisher_dropout": _fisher_dropout,
    "softmax_ce_hessian_vp": _softmax_ce_hessian_vp,
    "linchain_compose": _linchain_compose,
    "lora_linear": _lora_linear,
    "linchain_linear": _linchain_linear,
    "gaussian_perturb": _gaussian_perturb,
    "armijo_moments_/armijo_update_": _armijo,
}


def check_ops(device: torch.device) -> list[tuple[str, float, bool]]:
    """``(op, max abs error, within tolerance)`` for every op on ``device``."""
    results = []
    for name, run in CHECKS.items():
        got, expected = run("ext", device), run("reference", device)
        err = max((g.double() - e.double()).abs().max().item() for g, e in zip(got, expected, strict=True))
        ok = all(
            torch.allclose(g, e, **tolerance(e.dtype, scale=max(1.0, e.abs().max().item())))
            for g, e in zip(got, expected, strict=True)
        )
        results.append((name, err, ok))
    return results


def _randn(device: torch.device, *shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(device)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
