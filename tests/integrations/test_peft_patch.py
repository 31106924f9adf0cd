"""``integrations.peft.patch``: PEFT LoRA layers through ``ops.lora_linear`` give PEFT's logits and gradients, the
adapter dropout is the op's, and ``unpatch`` gives the model back."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from finetune_ext import ops
from finetune_ext.integrations.peft import FusedLoraLinear, patch, unpatch
from finetune_ext.ops import lora_linear
from finetune_ext.testing import tolerance


def _bert(dropout: float = 0.0):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=50, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], lora_dropout=dropout)
    return get_peft_model(BertForSequenceClassification(config), lora)


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_dropout=0.0)
    return get_peft_model(GPT2LMHeadModel(config), lora)


def _llama_nf4():
    """QLoRA: a tiny Llama whose layers' linear weights are NF4 (bitsandbytes, CPU backend), PEFT LoRA over them."""
    pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from finetune_ext.train.models import quantize_4bit

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(config)
    quantize_4bit(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return get_peft_model(model, lora)


MODELS = {"bert": lambda: _bert(), "gpt2": lambda: _gpt2(), "llama-nf4": lambda: _llama_nf4()}


def _randomise_adapters(model) -> None:
    with torch.no_grad():  # as after training: B != 0, so the adapter path shows in the logits
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.2)


def _logits_and_grads(model, ids: torch.Tensor):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return logits.detach(), grads


@pytest.mark.parametrize("family", list(MODELS))
def test_patched_logits_and_gradients_equal_peft(family: str, monkeypatch) -> None:
    """Dense bases inside the op; 4-bit bases through bitsandbytes with the op's adapter path alone."""
    calls = []
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(a[1] is None) or lora_linear(*a, **k))
    model = MODELS[family]()
    _randomise_adapters(model)
    model.train()
    ids = torch.randint(0, 50, (3, 7))
    expected = _logits_and_grads(model, ids)
    layers = sum(hasattr(m, "lora_A") and hasattr(m, "get_base_layer") for m in model.modules())
    assert patch(model) == layers > 0
    got = _logits_and_grads(model, ids)
    assert len(calls) == layers  # every layer took the op, none fell back to PEFT's forward
    assert all(calls) == (family == "llama-nf4")  # weight=None: the packed 4-bit weights stayed out of the op
    torch.testing.assert_close(got[0], expected[0], **tolerance(torch.float32))
    assert got[1].keys() == expected[1].keys()
    for name in expected[1]:
        torch.testing.assert_close(got[1][name], expected[1][name], **tolerance(torch.float32), msg=name)


def test_the_adapter_dropout_is_the_ops() -> None:
    model = _bert(dropout=0.3)
    _randomise_adapters(model)
    patch(model)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    layer.train()
    x = torch.randn(4, 5, 32)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    expected = ops.lora_linear(x, base.weight, base.bias, A, B, scale=layer.scaling["default"], dropout_p=0.3)
    torch.testing.assert_close(got, expected, **tolerance(torch.float32))
    no_dropout = ops.lora_linear(x, base.weight, base.bias, A, B, scale=layer.scaling["default"])
    assert not torch.allclose(got, no_dropout)
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout, **tolerance(torch.float32))


def test_unpatch_restores_peft_and_the_state_dict_is_unchanged() -> None:
    model = _gpt2()
    keys = list(model.state_dict())
    count = patch(model)
    assert patch(model) == 0 and list(model.state_dict()) == keys
    assert unpatch(model) == count
    assert not any(isinstance(m, FusedLoraLinear) for m in model.modules())


def test_forwards_the_op_does_not_cover_run_pefts() -> None:
    model = _bert()
    _randomise_adapters(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        patch(model)
        model.merge_adapter()  # merged: PEFT's forward (the base layer alone)
        torch.testing.assert_close(model(input_ids=ids).logits, expected, **tolerance(torch.float32))
        model.unmerge_adapter()
        with model.disable_adapter():
            unpatch(model)
            plain = model(input_ids=ids).logits
            patch(model)
            torch.testing.assert_close(model(input_ids=ids).logits, plain, **tolerance(torch.float32))


def test_under_autocast_the_op_computes_in_its_dtype(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(a[0].dtype) or lora_linear(*a, **k))
    model = _bert()
    _randomise_adapters(model)
    model.train()
    ids = torch.randint(0, 50, (3, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=ids).logits.float()
        patch(model)
        got = model(input_ids=ids).logits.float()
    assert calls and set(calls) == {torch.bfloat16}  # Trainer's bf16=True: the fused path, in bf16
    torch.testing.assert_close(got, expected, **tolerance(torch.bfloat16))
