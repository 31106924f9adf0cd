"""Philox4x32-10 in pure PyTorch: the oracle for ``csrc/common/philox.h``.

32-bit words are held in int64 tensors; 32x32-bit products are split into 16-bit halves so that no
intermediate leaves int64's range. Slow (about 200 tensor ops), exact, and identical on every device.
"""

from __future__ import annotations

import torch

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of the constant ``a`` and the words ``b``."""
    p_lo = b * (a & 0xFFFF)
    p_hi = b * (a >> 16)
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    high = (p_hi + (p_lo >> 16)) >> 16
    return high, low


def philox4x32_10(counter: tuple[torch.Tensor, ...], key: tuple[int, int]) -> torch.Tensor:
    """Philox4x32-10 of counters ``(c0, c1, c2, c3)`` (int64 tensors of 32-bit words) under ``key``.

    Returns an int64 tensor of shape ``(*c0.shape, 4)`` holding the four output words.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return torch.stack((c0, c1, c2, c3), dim=-1)


def philox_uniform(numel: int, seed: int, offset: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``numel`` float32 uniforms in [0, 1) in steps of 2^-16: element i is 16-bit half i % 8 of group i // 8
    (word (i % 8) // 2, its low half for even i, its high half for odd i).

    Group g uses counter ``(g, offset)`` and key ``seed`` (each split into 32-bit halves), as the kernels do.
    """
    groups = torch.arange((numel + 7) // 8, dtype=torch.int64, device=device)
    full = lambda v: torch.full_like(groups, v)  # noqa: E731
    counter = (groups & _MASK32, groups >> 32, full(offset & _MASK32), full((offset >> 32) & _MASK32))
    words = philox4x32_10(counter, (seed & _MASK32, (seed >> 32) & _MASK32)).reshape(-1)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=-1).reshape(-1)[:numel]
    return halves.to(torch.float32) * (1.0 / 65536.0)
