"""Cases for ``lora_linear``: one adapted linear layer, forward + backward, at rank 16 with a 3-mixer chain.

Providers: ``reference`` (the official LinChain forward, mixer by mixer per token, as plain autograd ops),
``lora`` (plain PyTorch LoRA at the same rank, PEFT's formulation: base + scale * B(A(dropout(x)))),
``ext`` (``LinChainLinear`` on its own: ``linchain_linear``, the chain composed inside the fused layer op),
``ext-lora`` (the fused op without a chain), ``merged`` (the base layer alone: what a merged model runs) and,
when ``peft`` is installed, ``peft`` (PEFT's ``lora.Linear`` at the same rank, what users would otherwise pick).
Adapter dropout 0.05 everywhere. Sizes are element counts of x: tokens = size // d, for d = 768 (and 4096
on GPU). The target: ``ext`` within 1.05x of ``lora`` on an H100 in bf16. GB/s is not meaningful here (0).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from finetune_ext import reference
from finetune_ext.adapters import LinChainConfig, LinChainLinear
from finetune_ext.bench.harness import Case, select_providers

RANK, CHAIN, DROPOUT = 16, 3, 0.05


def _adapter(base: nn.Linear, k: int) -> LinChainLinear:
    layer = LinChainLinear(base, LinChainConfig(r=RANK, chain_length=k, alpha=2 * RANK, dropout=DROPOUT))
    layer.to(base.weight.dtype)  # every provider in the case's dtype (the factors would be fp32 over a bf16 base)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    return layer


def _peft(base: nn.Linear) -> tuple | None:
    """PEFT's LoRA layer around ``base`` (B random, as for ours) and its trainable tensors; None without peft."""
    try:
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear
    except ImportError:
        return None
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=DROPOUT)
    layer = PeftLinear(base, "default", config, r=RANK, lora_alpha=2 * RANK, lora_dropout=DROPOUT)
    layer.to(device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.02)
    return layer, [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def _providers(base: nn.Linear) -> dict[str, tuple]:
    """name -> (forward, trainable parameters whose gradients the backward computes, besides x's)."""
    chain, lora = _adapter(base, CHAIN), _adapter(base, 0)
    mixers = [(chain.mixer_weight[i], chain.mixer_bias[i]) for i in range(CHAIN)]
    scale = chain.scale

    def official(x):
        return reference.linchain_chain(x, base.weight, base.bias, chain.lora_A, chain.lora_B, mixers, scale, DROPOUT)

    def plain_lora(x):
        return base(x) + scale * F.linear(F.linear(F.dropout(x, DROPOUT), lora.lora_A), lora.lora_B)

    chain_params, lora_params = list(chain.parameters(recurse=False)), list(lora.parameters(recurse=False))
    found = {
        "reference": (official, chain_params),
        "lora": (plain_lora, lora_params),
        "ext": (chain, chain_params),
        "ext-lora": (lora, lora_params),
        "merged": (base, []),
    }
    peft_layer = _peft(base)
    return found if peft_layer is None else {**found, "peft": peft_layer}


def cases(device: torch.device, dtype: torch.dtype, sizes: list[int], providers: list[str] | None) -> Iterator[Case]:
    """Forward + backward of one adapted layer for each width, size (elements of x) and provider."""
    widths = [768, 4096] if device.type == "cuda" else [768]
    for d in widths:
        torch.manual_seed(0)
        base = nn.Linear(d, d, device=device, dtype=dtype).requires_grad_(False)
        fns = select_providers(_providers(base), providers)
        for size in sizes:
            x = torch.randn(max(1, size // d), d, device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            for name, (fn, params) in fns.items():

                def run(fn=fn, x=x, leaves=(x, *params), grad=grad):
                    return torch.autograd.grad(fn(x), leaves, grad)

                yield Case("lora_linear", "fwdbwd", name, tuple(x.shape), dtype, device, 0, run)
