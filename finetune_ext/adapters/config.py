"""``LinChainConfig``: what to adapt and how."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

INITS = ("kaiming", "identity")


@dataclass
class LinChainConfig:
    """LinChain adapters ``W = W0 + (alpha / r) B M_k ... M_1 A`` (LoRA when ``chain_length == 0``).

    Args:
        r: rank.
        chain_length: number of r x r mixers between A and B (the official code uses 3; 0 is LoRA).
        alpha: the update is scaled by ``alpha / r``.
        mixer_bias: mixers are ``nn.Linear(r, r)`` with a bias, as in the official code.
        dropout: dropout on each adapter's input.
        target_modules: ``"all-linear"`` (every ``nn.Linear``/``Conv1D`` except the output head), a list of
            module-name suffixes (``["query", "value"]``), or a regular expression matched against full names.
        init: ``"kaiming"`` (official: A and mixers Kaiming-uniform, mixer biases ``U(-1/sqrt(r), 1/sqrt(r))``,
            B = 0) or ``"identity"`` (mixers = I, biases 0: the chain starts as plain LoRA).
        modules_to_save: name suffixes of modules trained in full and saved with the adapter (e.g. a new
            classification head).
    """

    r: int = 8
    chain_length: int = 3
    alpha: float = 16.0
    mixer_bias: bool = True
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"
    init: str = "kaiming"
    modules_to_save: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if isinstance(self.chain_length, bool) or not isinstance(self.chain_length, int) or self.chain_length < 0:
            raise ValueError(f"chain_length: expected an integer >= 0, got {self.chain_length!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        if self.init not in INITS:
            raise ValueError(f"init: expected one of {INITS}, got {self.init!r}")
        targets = self.target_modules
        if isinstance(targets, tuple):
            self.target_modules = targets = list(targets)
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"target_modules: expected 'all-linear', a regex or a non-empty list of names, got {targets!r}"
            )
        self.modules_to_save = list(self.modules_to_save)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinChainConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"adapter config: unknown fields {sorted(unknown)}")
        return cls(**data)
