"""Adapters over bitsandbytes 4-bit layers (QLoRA): the base through bitsandbytes (on CPU, its torch backend), the
adapter through ``lora_linear`` without a weight; against PEFT's LoRA on the same quantized layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from finetune_ext import adapters
from finetune_ext.adapters import LinChainConfig
from finetune_ext.errors import UserError
from finetune_ext.testing import tolerance

bnb = pytest.importorskip("bitsandbytes")


def _quantized(d_in: int = 32, d_out: int = 24, seed: int = 0) -> nn.Sequential:
    """Two NF4 layers (bias on the first) with a ReLU between: the gradient reaches the first adapter through the
    second quantized base."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential()
    for name, (i, o, bias) in {"q": (d_in, d_out, True), "v": (d_out, d_in, False)}.items():
        layer = bnb.nn.Linear4bit(i, o, bias=bias, quant_type="nf4", compute_dtype=torch.float32)
        layer.weight = bnb.nn.Params4bit(torch.randn(o, i, generator=g) / i**0.5, requires_grad=False, quant_type="nf4")
        if bias:
            layer.bias = nn.Parameter(torch.randn(o, generator=g), requires_grad=False)
        model.add_module(name, layer.to("cpu"))
        if name == "q":
            model.add_module("act", nn.ReLU())
    return model


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)


def test_lora_over_4bit_equals_peft_qlora() -> None:
    peft = pytest.importorskip("peft")
    ours, theirs = _quantized(), _quantized()
    packed = {n: m.weight.clone() for n, m in ours.named_children() if hasattr(m, "weight")}
    found = adapters.apply_linchain(
        ours, LinChainConfig(r=4, chain_length=0, alpha=8.0, dropout=0.0, target_modules=["q", "v"])
    )
    theirs = peft.get_peft_model(
        theirs, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"])
    )
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert sorted(peft_layers) == sorted(found) == ["q", "v"]
    with torch.no_grad():
        for name, layer in found.items():
            layer.lora_B.normal_(generator=torch.Generator().manual_seed(2))
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    x_ours, x_theirs = _x(), _x()
    got, expected = ours(x_ours), theirs(x_theirs)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    got.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, **tolerance(torch.float32))
    for name, layer in found.items():
        for mine, peft_factor in ((layer.lora_A, "lora_A"), (layer.lora_B, "lora_B")):
            other = getattr(peft_layers[name], peft_factor)["default"].weight
            torch.testing.assert_close(mine.grad, other.grad, **tolerance(torch.float32), msg=f"{name}.{peft_factor}")
    for name, weight in packed.items():  # the packed weights were only read by bitsandbytes
        assert torch.equal(found[name].base_layer.weight, weight) and weight.dtype == torch.uint8


def test_linchain_over_4bit_is_the_base_plus_the_chained_update() -> None:
    model = _quantized()
    base = copy.deepcopy(model)
    found = adapters.apply_linchain(model, LinChainConfig(r=4, chain_length=2, dropout=0.0, target_modules=["q"]))
    layer = found["q"]
    assert layer.lora_A.dtype == torch.float32 and layer.quantized
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(3))
    x = _x()
    M = layer.mixer_weight[1] @ layer.mixer_weight[0]
    beff = layer.mixer_weight[1] @ layer.mixer_bias[0] + layer.mixer_bias[1]
    u = x @ (M @ layer.lora_A).t() + beff
    expected = base.v(torch.relu(base.q(x) + layer.scale * u @ layer.lora_B.t()))
    torch.testing.assert_close(model(x), expected, **tolerance(torch.float32))


def test_a_quantized_base_refuses_merge_and_weight_perturbations() -> None:
    from finetune_ext.parts import OptimSettings, RunContext
    from finetune_ext.perturb.parts import GGPO

    model = _quantized()
    found = adapters.apply_linchain(model, LinChainConfig(r=4, chain_length=0, target_modules=["q"]))
    with pytest.raises(ValueError, match="merge: the base weight is quantized"):
        found["q"].merge()
    run = RunContext("lm", None, {}, {}, lambda m: {}, 0, 10, OptimSettings(1e-3, 0.0, 0, 1.0), ".")
    with pytest.raises(UserError, match=r"perturbation: ggpo perturbs the base weight, and 'q' has a packed"):
        GGPO().apply(model, run)
