"""Pure-PyTorch ``gaussian_perturb``: the oracle of ``csrc/gaussian_perturb.h`` and the naive baseline.

``philox_normal`` reproduces the kernels' normals bit for bit: the same Philox words, the same Box-Muller
polynomials, each multiply and add a separately rounded float32 tensor op (no FMA). ``gaussian_perturb`` is
``W + std[:, None] * z`` with them, in the kernels' arithmetic.
"""

from __future__ import annotations

import torch

from finetune_ext.reference.philox import _MASK32, philox4x32_10

_LOG_SERIES = ("0x1.745d18p-4", "0x1.c71c72p-4", "0x1.24924ap-3", "0x1.99999ap-3", "0x1.555556p-2")
_SIN_SERIES = ("0x1.71de3ap-19", "-0x1.a01a02p-13", "0x1.111112p-7", "-0x1.555556p-3")
_COS_SERIES = ("-0x1.27e4fcp-22", "0x1.a01a02p-16", "-0x1.6c16c2p-10", "0x1.555556p-5", "-0x1p-1")
_SQRT2, _LN2, _HALF_PI = "0x1.6a09e6p+0", "0x1.62e43p-1", "0x1.921fb6p+0"


def _f(hex_literal: str) -> torch.Tensor:
    return torch.tensor(float.fromhex(hex_literal), dtype=torch.float32)


def _horner(coefficients: tuple[str, ...], x2: torch.Tensor, last: float) -> torch.Tensor:
    p = _f(coefficients[0]).to(x2.device).expand_as(x2)
    for c in (*coefficients[1:], None):
        p = p * x2 + (_f(c).to(x2.device) if c is not None else torch.tensor(last, dtype=torch.float32))
    return p


def _radius(u: torch.Tensor) -> torch.Tensor:
    """``sqrt(-2 ln u)`` for u in (0, 1], as ``box_muller_radius``."""
    bits = u.view(torch.int32)
    e = ((bits >> 23) - 127).to(torch.float32)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    high = m > _f(_SQRT2)
    m = torch.where(high, m * 0.5, m)
    e = torch.where(high, e + 1.0, e)
    s = (m - 1.0) / (m + 1.0)
    ln_u = e * _f(_LN2) + (2.0 * s) * _horner(_LOG_SERIES, s * s, 1.0)
    # torch's float32 sqrt is not always correctly rounded; the float64 root rounded to float32 is.
    return torch.sqrt((-2.0 * ln_u).double()).float()


def _turn_cos_sin(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of ``2 pi t`` for t in [0, 1), as ``turn_cos_sin``."""
    q4 = t * 4.0
    q = q4.to(torch.int32)
    f = q4 - q.to(torch.float32)
    fold = f > 0.5
    x = torch.where(fold, 1.0 - f, f) * _f(_HALF_PI)
    x2 = x * x
    sin_x = _horner(_SIN_SERIES, x2, 1.0) * x
    cos_x = _horner(_COS_SERIES, x2, 1.0)  # the last coefficient adds 1 after -1/2: cos = 1 + x2 * (...)
    sp, cp = torch.where(fold, cos_x, sin_x), torch.where(fold, sin_x, cos_x)
    c = torch.where(q == 0, cp, torch.where(q == 1, -sp, torch.where(q == 2, -cp, sp)))
    s = torch.where(q == 0, sp, torch.where(q == 1, cp, torch.where(q == 2, -sp, -cp)))
    return c, s


def philox_normal(numel: int, seed: int, offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``numel`` float32 standard normals; element i from group i // 4 as the kernels draw them."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    full = lambda v: torch.full_like(groups, v)  # noqa: E731
    counter = (groups & _MASK32, groups >> 32, full(offset & _MASK32), full((offset >> 32) & _MASK32))
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32)).reshape(-1, 2, 2)
    inv = 1.0 / 16777216.0
    u = ((words[..., 0] >> 8) + 1).to(torch.float32) * inv
    t = (words[..., 1] >> 8).to(torch.float32) * inv
    c, s = _turn_cos_sin(t)
    r = _radius(u)
    return torch.stack((r * c, r * s), dim=-1).reshape(-1)[:numel]


def gaussian_perturb(weight: torch.Tensor, std: torch.Tensor, *, seed: int, offset: int = 0) -> torch.Tensor:
    """``weight + std[:, None] * z`` with the kernels' normals ``z``, a new tensor. ``z`` runs in the weight's memory
    order: row-major, or column-major for a transposed view of a contiguous tensor (GPT-2's ``Conv1D``)."""
    column_major = not weight.is_contiguous() and weight.t().is_contiguous()
    z = philox_normal(weight.numel(), seed, offset, weight.device)
    z = z.reshape(weight.shape[::-1]).t() if column_major else z.reshape(weight.shape)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return (weight.to(acc) + std.to(device=weight.device, dtype=acc)[:, None] * z.to(acc)).to(weight.dtype)
