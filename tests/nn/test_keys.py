"""finetune_ext.nn.keys: the layers' Philox keys."""

from __future__ import annotations

import random

from finetune_ext.nn import keys


def test_mix_each_equals_mix_per_last_word() -> None:
    rng = random.Random(0)
    for length in (0, 1, 3):
        prefix = tuple(rng.getrandbits(64) for _ in range(length))
        lasts = [rng.getrandbits(32) for _ in range(5)]
        assert keys.mix_each(prefix, lasts) == [keys.mix(*prefix, last) for last in lasts]


def test_mix_is_63_bit_and_order_sensitive() -> None:
    a, b = keys.mix(1, 2), keys.mix(2, 1)
    assert a != b and 0 <= a < 2**63 and 0 <= b < 2**63
