"""Our fused LoRA kernel for PEFT models in one line: ``patch(model)`` / ``unpatch(model)``.

    model = get_peft_model(base, LoraConfig(r=8, target_modules=["query", "value"], lora_dropout=0.05))
    patched = patch(model)        # PEFT LoRA Linear / Conv1D layers now run ops.lora_linear
    trainer.train()
    unpatch(model)                # the layers are PEFT's again

A patched layer computes ``base(x) + s · B(A(dropout(x)))`` with ``finetune_ext.ops.lora_linear``: one
operator for the base product, the adapter path and the adapter dropout (its mask from a Philox key drawn from
torch's default generator, so ``torch.manual_seed`` still makes runs repeatable, though the masks differ from
``nn.Dropout``'s). The layer's parameters, ``state_dict``, ``save_pretrained`` and merging are PEFT's own: patching
swaps the class of each layer for a subclass that overrides ``forward`` only. A forward the op does not cover (a
merged or disabled adapter, several active adapters, ``adapter_names=`` batches, DoRA, ``lora_bias``, mixed dtypes
outside autocast) runs PEFT's forward unchanged. Over a bitsandbytes 4-/8-bit base (QLoRA) the base runs its own
forward and the op the adapter path alone: the packed weight is never read as a matrix. Under autocast (Trainer's
``bf16=True``) the op computes in autocast's dtype, as PEFT's layers do.
"""

from __future__ import annotations

from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from finetune_ext import ops
from finetune_ext.adapters.layer import quantized_base


class _Fused:
    """The forward shared by the patched classes: ``ops.lora_linear`` wherever the op covers the call. A dense base
    runs inside the op; a bitsandbytes 4-/8-bit base runs its own forward and the op the adapter path alone."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.get_base_layer()
        dtype = _compute_dtype(x)
        dropout = self.lora_dropout[name]
        stochastic = {"scale": self.scaling[name], "training": self.training,
                      "dropout_p": dropout.p if isinstance(dropout, nn.Dropout) else 0.0}  # fmt: skip
        A, B = (self.lora_A[name].weight.to(dtype), self.lora_B[name].weight.to(dtype))
        if quantized_base(base):
            y = ops.lora_linear(x.to(dtype), None, None, A, B, **stochastic)
            return base(x).to(y.dtype) + y
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        x, weight, bias = (None if t is None else t.to(dtype) for t in (x, weight, base.bias))
        return ops.lora_linear(x, weight, bias, A, B, **stochastic)

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one active adapter the op can run, or None where PEFT's forward must."""
        if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or self.use_dora.get(name, False) or self.lora_bias.get(name, False):
            return None
        base = self.get_base_layer()
        tensors = [self.lora_A[name].weight, self.lora_B[name].weight]
        if not quantized_base(base):
            if not isinstance(base, (nn.Linear, Conv1D)) or type(base.weight) is not nn.Parameter:
                return None
            tensors += [base.weight] + ([base.bias] if base.bias is not None else [])
        same_dtype = torch.is_autocast_enabled(x.device.type) or all(t.dtype == x.dtype for t in tensors)
        return name if same_dtype and all(t.device == x.device for t in tensors) else None


class FusedLoraLinear(_Fused, LoraLinear):
    """PEFT's LoRA ``Linear`` whose forward is ``ops.lora_linear`` wherever the op covers it."""


def _bnb_classes() -> list[tuple[type, type]]:
    """``(PEFT's LoRA layer over a bitsandbytes base, its fused subclass)`` where PEFT has them (with bitsandbytes)."""
    try:
        from peft.tuners.lora import bnb
    except ImportError:
        return []
    pairs = [getattr(bnb, n) for n in ("Linear4bit", "Linear8bitLt") if hasattr(bnb, n)]
    return [(cls, _FUSED.setdefault(cls, type(f"Fused{cls.__name__}", (_Fused, cls), {}))) for cls in pairs]


_FUSED: dict[type, type] = {}


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Autocast's dtype where it is on (what PEFT's layers would compute in), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def patch(model: nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` layer of ``model`` (exactly that class, not a subclass such as our LinChain),
    and PEFT's LoRA layers over bitsandbytes 4-/8-bit bases, through ``ops.lora_linear``; returns how many layers
    were patched (0 is not an error: the model may have none or be patched already)."""
    pairs = [(LoraLinear, FusedLoraLinear), *_bnb_classes()]
    return sum(_swap_class(model, old, new) for old, new in pairs)


def unpatch(model: nn.Module) -> int:
    """Undo ``patch``: the layers are PEFT's classes again; returns how many were restored."""
    pairs = [(LoraLinear, FusedLoraLinear), *_bnb_classes()]
    return sum(_swap_class(model, new, old) for old, new in pairs)


def _swap_class(model: nn.Module, old: type, new: type) -> int:
    swapped = [m for m in model.modules() if type(m) is old]
    for module in swapped:
        module.__class__ = new
    return len(swapped)
