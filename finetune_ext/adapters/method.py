"""Training-loop methods ``linchain`` and ``lora``: adapters on the model, AdamW on the adapter parameters."""

from __future__ import annotations

from typing import Any

from torch import nn

from finetune_ext.adapters.config import LinChainConfig
from finetune_ext.adapters.model import HEAD_NAMES, apply_linchain
from finetune_ext.train.methods import AdamW, MethodConfig, RunInfo, register_method


@register_method
class LinChainMethod(AdamW):
    """LinChain adapters (``r``, ``chain_length``, ``alpha``, ...; see ``LinChainConfig``); a classifier's new
    head is trained in full (``modules_to_save``), as PEFT does for sequence classification."""

    name = "linchain"
    default_chain = 3

    def __init__(self, **options: Any) -> None:
        options.setdefault("chain_length", self.default_chain)
        self.options = options
        self.config = LinChainConfig(**options)  # validates now, before any data or model is loaded

    def setup(self, model: nn.Module, config: MethodConfig, total_steps: int, run: RunInfo | None = None) -> None:
        adapter = self.config
        if not adapter.modules_to_save and (run is None or run.task == "cls"):
            heads = [n for n, _ in model.named_children() if n in HEAD_NAMES and n not in ("lm_head", "cls")]
            adapter = LinChainConfig(**{**self.options, "modules_to_save": heads})
        apply_linchain(model, adapter)
        super().setup(model, config, total_steps, run)


@register_method
class LoRAMethod(LinChainMethod):
    """LoRA: LinChain without mixers."""

    name = "lora"
    default_chain = 0

    def __init__(self, **options: Any) -> None:
        if options.get("chain_length", 0) != 0:
            raise ValueError("chain_length: the lora method has no chain; use --method linchain")
        super().__init__(**options)
