"""Adapter transforms ``--adapter lora|linchain``: freeze the model and wrap its linear layers in adapters."""

from __future__ import annotations

import dataclasses

from torch import nn

from finetune_ext.adapters.config import LinChainConfig, LoRAConfig
from finetune_ext.adapters.model import HEAD_NAMES, apply_linchain
from finetune_ext.parts import RunContext, Transform


class LinChain(Transform):
    """LinChain adapters W0 + (alpha/r)·B·M_k⋯M_1·A; a classifier's new head trains in full, as in PEFT."""

    name = "linchain"
    shardable = True
    Options = LinChainConfig

    def adapter_config(self) -> LinChainConfig:
        return self.options

    def model_config(self, model: nn.Module, task: str) -> LinChainConfig:
        """The adapter config for ``model``: by default a classifier's head is saved (trained in full)."""
        config = self.adapter_config()
        if not config.modules_to_save and task != "lm":
            heads = [n for n, _ in model.named_children() if n in HEAD_NAMES and n not in ("lm_head", "cls")]
            config = dataclasses.replace(config, modules_to_save=heads)
        return config

    def apply(self, model: nn.Module, run: RunContext) -> None:
        apply_linchain(model, self.model_config(model, run.task))


class LoRA(LinChain):
    """LoRA adapters W0 + (alpha/r)·B·A (LinChain without mixers; PEFT's LoRA exactly)."""

    name = "lora"
    Options = LoRAConfig

    def adapter_config(self) -> LinChainConfig:
        return LinChainConfig(**dataclasses.asdict(self.options), chain_length=0)
