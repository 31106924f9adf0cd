"""Explicit Philox keys for random layers: derived from ``(run seed, step, micro-batch, rank)`` and a site.

Inside ``keyed(seed, step, micro, rank)`` every random layer of ours keys its Philox stream by
``site_seed(site)``, a hash of the evaluation key and the layer's site id (``site_id(module name)``), and the
torch generators are seeded from the same key for the model's own randomness (``nn.Dropout``, attention-
probability dropout). Evaluating a batch twice under the same key therefore draws the same masks, without
saving or restoring generator states; outside ``keyed`` the layers draw keys from the default generator.
Activation checkpointing recomputes a forward during the backward, outside ``keyed`` (and on GPUs in autograd's
own thread): ``checkpoint_context`` is the ``context_fn`` of ``torch.utils.checkpoint`` that gives the recompute
the key of the forward it repeats, so it draws the same masks and noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar

import torch

_MASK = (1 << 64) - 1
_START = 0x9E3779B97F4A7C15  # the hash state before the first word
_current: ContextVar[int | None] = ContextVar("finetune_ext_key", default=None)


def _fold(h: int, words: Iterable[int]) -> int:
    for w in words:
        h = (h ^ (w & _MASK)) & _MASK
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
        h ^= h >> 31
    return h


def mix(*words: int) -> int:
    """A 63-bit hash of integers (SplitMix64 finaliser, folded word by word)."""
    return _fold(_START, words) >> 1


def mix_each(prefix: tuple[int, ...], lasts: list[int]) -> list[int]:
    """``[mix(*prefix, last) for last in lasts]`` with the prefix folded once (a step's keys for every layer)."""
    h = _fold(_START, prefix)
    return [_fold(h, (last,)) >> 1 for last in lasts]


def site_id(name: str) -> int:
    """A stable id for a random layer from its dotted module name."""
    return zlib.crc32(name.encode())


@contextmanager
def keyed(*stream: int) -> Iterator[int]:
    """Key every random layer (and seed the torch generators) from ``stream`` for the enclosed code."""
    key = mix(*stream)
    token = _current.set(key)
    torch.manual_seed(key)
    try:
        yield key
    finally:
        _current.reset(token)


def site_seed(site: int) -> int | None:
    """The Philox seed of layer ``site`` under the current key; ``None`` outside ``keyed``."""
    key = _current.get()
    return None if key is None else mix(key, site)


def checkpoint_context() -> tuple[AbstractContextManager, AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: (nothing around the
    forward, the forward's key around its recompute)."""
    return nullcontext(), _with_key(_current.get())


@contextmanager
def _with_key(key: int | None) -> Iterator[None]:
    token = _current.set(key)
    try:
        yield
    finally:
        _current.reset(token)
