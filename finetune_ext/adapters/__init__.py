"""LinChain adapters (LoRA with a chain of r x r mixers) for Hugging Face models; LoRA is ``chain_length=0``."""

from finetune_ext.adapters.config import LinChainConfig
from finetune_ext.adapters.layer import LinChainLinear
from finetune_ext.adapters.model import (
    adapter_state_dict,
    adapters,
    apply_linchain,
    load_adapter,
    merge,
    merge_and_unload,
    save_adapter,
    unmerge,
)
from finetune_ext.adapters.peft_format import load_peft, save_peft

__all__ = [
    "LinChainConfig",
    "LinChainLinear",
    "adapter_state_dict",
    "adapters",
    "apply_linchain",
    "load_adapter",
    "load_peft",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "save_peft",
    "unmerge",
]
