"""``LoRAConfig`` and ``LinChainConfig``: what to adapt and how (also the options of the adapter parts)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from finetune_ext.parts import option


@dataclass
class LoRAConfig:
    """LoRA adapters ``W = W0 + (alpha / r) B A``: the options LoRA and LinChain share."""

    r: int = option(8, "rank")
    alpha: float = option(16.0, "the update is scaled by alpha / r")
    dropout: float = option(0.05, "dropout on each adapter's input")
    target_modules: str | list[str] = option(
        "all-linear",
        "'all-linear' (every nn.Linear/Conv1D except the output head), a list of module-name suffixes "
        "(query,value) or a regular expression matched against full names",
    )
    modules_to_save: list[str] = option(
        [], "name suffixes of modules trained in full and saved with the adapter (default: a classifier's new head)"
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r: expected a positive integer, got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"alpha: expected a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, tuple):
            self.target_modules = targets = list(targets)
        if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
        ):
            raise ValueError(
                f"target_modules: expected 'all-linear', a regex or a non-empty list of names, got {targets!r}"
            )
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"target_modules: {targets!r} is not a regular expression ({err})") from None
        self.modules_to_save = list(self.modules_to_save)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LinChainConfig(LoRAConfig):
    """LinChain adapters ``W = W0 + (alpha / r) B M_k ... M_1 A`` (LoRA when ``chain_length == 0``).

    ``init="kaiming"`` is the official initialisation (A and mixers Kaiming-uniform, mixer biases
    ``U(-1/sqrt(r), 1/sqrt(r))``, B = 0); ``"identity"`` starts the mixers at I with zero biases (plain LoRA).
    """

    chain_length: int = option(3, "number of r x r mixers between A and B (the official code uses 3; 0 is LoRA)")
    mixer_bias: bool = option(True, "mixers are nn.Linear(r, r) with a bias, as in the official code")
    init: Literal["kaiming", "identity"] = option("kaiming", "mixer initialisation: official Kaiming, or identity")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.chain_length, bool) or not isinstance(self.chain_length, int) or self.chain_length < 0:
            raise ValueError(f"chain_length: expected an integer >= 0, got {self.chain_length!r}")
        if self.init not in ("kaiming", "identity"):
            raise ValueError(f"init: expected one of ('kaiming', 'identity'), got {self.init!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LinChainConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"adapter config: unknown fields {sorted(unknown)}")
        return cls(**data)
