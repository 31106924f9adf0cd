"""The pure-PyTorch Philox against the Random123 known-answer vectors (kat_vectors, philox4x32 10)."""

from __future__ import annotations

import pytest
import torch

from finetune_ext.reference.philox import philox4x32_10, philox_uniform

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_known_answers(counter, key, expected) -> None:
    words = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(w) for w in words[0]] == list(expected)


def test_uniform_layout_and_range() -> None:
    seed, offset = (7 << 32) | 3, (5 << 32) | 11
    u = philox_uniform(20, seed, offset)
    # Element i is half i % 8 of group i // 8 (low half of a word first), counter (group, offset), key seed.
    groups = torch.arange(3)
    counter = (groups, torch.zeros(3, dtype=torch.int64), torch.full((3,), 11), torch.full((3,), 5))
    words = [int(w) for w in philox4x32_10(counter, (3, 7)).reshape(-1)]
    halves = [h for w in words for h in (w & 0xFFFF, w >> 16)][:20]
    assert u.tolist() == [h / 2**16 for h in halves]
    big = philox_uniform(1 << 16, seed=1, offset=0)
    assert big.dtype == torch.float32 and big.min() >= 0.0 and big.max() < 1.0
    assert abs(big.mean().item() - 0.5) < 4 * (1 / 12) ** 0.5 / 256  # 4 sigma of the mean of 65536 draws
    assert len(torch.unique(big)) > 40000  # all 16 bits are used: 65536 draws of 65536 values give ~41400
