"""LinChain adapters: the official forward, exact mixer gradients, merge, save/load, methods, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from finetune_ext import adapters, reference
from finetune_ext.adapters import LinChainConfig, LinChainLinear
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train


def _gpt2(dtype=torch.float32) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50)
    return GPT2LMHeadModel(config).to(dtype).eval()


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    return BertForSequenceClassification(config).eval()


def _randomise_B(model: nn.Module) -> None:
    with torch.no_grad():
        for a in adapters.adapters(model).values():
            a.lora_B.normal_(0, 0.2)


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def test_targets_trainable_parameters_and_no_patching() -> None:
    model = _gpt2()
    forward = Conv1D.forward
    found = adapters.apply_linchain(model, LinChainConfig(r=4, chain_length=3, target_modules=["c_attn", "c_fc"]))
    assert sorted(found) == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    assert Conv1D.forward is forward and type(model.transformer.h[0].attn.c_proj) is Conv1D
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "mixer_weight", "mixer_bias") for n in trainable)
    per = {"c_attn": 4 * (16 + 48), "c_fc": 4 * (16 + 64)}
    assert sum(trainable.values()) == 2 * (per["c_attn"] + per["c_fc"]) + 4 * 3 * (4 * 4 + 4)
    bert = _bert()
    names = adapters.apply_linchain(
        bert, LinChainConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"])
    )
    assert "classifier" not in names and "bert.pooler.dense" in names
    assert bert.classifier.weight.requires_grad and not bert.bert.embeddings.word_embeddings.weight.requires_grad
    regex = adapters.apply_linchain(_bert(), LinChainConfig(target_modules=r".*\.attention\.self\.(query|value)"))
    assert len(regex) == 4


def test_starts_at_the_base_model_and_inherits_eval_mode() -> None:
    model = _gpt2()
    ids = _ids()
    before = model(ids).logits
    adapters.apply_linchain(model, LinChainConfig(r=4, chain_length=3, dropout=0.5))
    assert all(not a.training for a in adapters.adapters(model).values())
    torch.testing.assert_close(model(ids).logits, before, **tolerance(torch.float32))  # B = 0 at init


@pytest.mark.parametrize("k", [0, 1, 3])
def test_forward_and_gradients_equal_the_official_chain(k) -> None:
    """float64: our layer (batched compose + fused op) against the official mixer-by-mixer forward."""
    model = _gpt2(torch.float64)
    found = adapters.apply_linchain(model, LinChainConfig(r=3, chain_length=k, dropout=0.0, alpha=6.0))
    _randomise_B(model)
    layer = found["transformer.h.1.attn.c_attn"]
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mixers = [(layer.mixer_weight[i], layer.mixer_bias[i]) for i in range(k)]
    w, b = layer.base_layer.weight.t(), layer.base_layer.bias
    expected = reference.linchain_chain(x, w, b, layer.lora_A, layer.lora_B, mixers, scale=2.0)
    got = layer(x)
    torch.testing.assert_close(got, expected, **tolerance(torch.float64))
    params = [p for p in layer.parameters() if p.requires_grad]
    g = torch.randn_like(got)
    for a, e in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(expected, params, g), strict=True):
        torch.testing.assert_close(a, e, **tolerance(torch.float64))


def test_model_forward_composes_the_chains_once_per_shape(monkeypatch) -> None:
    """One linchain_compose (and one batched M A) per group of same-shaped adapters in a model forward."""
    model = _gpt2(torch.float64)
    adapters.apply_linchain(model, LinChainConfig(r=3, chain_length=2, dropout=0.0))
    _randomise_B(model)
    calls = []
    original = adapters.layer.ops.linchain_compose
    monkeypatch.setattr(
        adapters.layer.ops, "linchain_compose", lambda *a, **k: calls.append(a[0].shape) or original(*a, **k)
    )
    ids = _ids()
    out = model(ids).logits
    assert calls == [(6, 2, 3, 3), (2, 2, 3, 3)]  # 2 layers x 3 Conv1D with d inputs, x 1 with 4 d
    assert all(a._factors is None for a in adapters.adapters(model).values())  # dropped after the forward
    # Each layer called on its own composes its chain itself: same model output.
    monkeypatch.setattr(adapters.model, "_compose_all", lambda layers, model: None)
    torch.testing.assert_close(model(ids).logits, out, **tolerance(torch.float64))
    model.train()
    model(ids).logits.sum().backward()
    assert all(a.mixer_weight.grad.abs().sum() > 0 for a in adapters.adapters(model).values())


@pytest.mark.parametrize("make", [_gpt2, _bert])
@pytest.mark.parametrize("k", [0, 3])
def test_merge_unmerge_and_unload(make, k) -> None:
    model = make()
    ids = _ids()
    adapters.apply_linchain(model, LinChainConfig(r=4, chain_length=k))
    _randomise_B(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    adapted = model(ids).logits
    assert (adapted - make()(ids).logits).abs().max() > 1e-3  # the adapters do something
    adapters.merge(model)
    torch.testing.assert_close(model(ids).logits, adapted, **tolerance("merge", adapted.abs().max().item()))
    adapters.unmerge(model)
    for n, p in model.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, weights[n], **tolerance(torch.float32))
    plain = adapters.merge_and_unload(model)
    assert not adapters.adapters(plain) and not hasattr(plain, "_linchain")
    torch.testing.assert_close(plain(ids).logits, adapted, **tolerance("merge", adapted.abs().max().item()))


def test_merge_adds_a_bias_to_a_bias_free_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    adapters.apply_linchain(model, LinChainConfig(r=2, chain_length=2, target_modules=["0"], dropout=0.0))
    _randomise_B(model)
    x = torch.randn(4, 6)
    y = model(x)
    adapters.merge(model)
    assert model[0].base_layer.bias is not None
    torch.testing.assert_close(model(x), y, **tolerance("merge", y.abs().max().item()))
    adapters.unmerge(model)
    assert model[0].base_layer.bias is None


def test_save_and_load_onto_a_fresh_base(tmp_path) -> None:
    model = _bert()
    config = LinChainConfig(r=4, chain_length=3, modules_to_save=["classifier"])
    adapters.apply_linchain(model, config)
    _randomise_B(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    ids = _ids()
    expected = model(ids).logits
    folder = adapters.save_adapter(model, tmp_path / "adapter")
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    fresh = _bert()
    assert not torch.allclose(fresh(ids).logits, expected)
    adapters.load_adapter(fresh, folder)
    torch.testing.assert_close(fresh(ids).logits, expected, **tolerance(torch.float32))
    with pytest.raises(ValueError, match="modules_to_save: 'classifier' matches no module of GPT2LMHeadModel"):
        adapters.load_adapter(_gpt2(), folder)
    wider = BertForSequenceClassification(
        BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    )
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in wider.named_parameters()}
    with pytest.raises(ValueError, match=r"path: bert.encoder.layer.0.attention.self.query.lora_A has shape \[4, 16\]"):
        adapters.load_adapter(wider, folder)
    # A failed load leaves the model as it was: no adapters, no hooks, nothing frozen or changed.
    assert not adapters.adapters(wider) and not hasattr(wider, "_linchain")
    after = {n: (p.detach(), p.requires_grad) for n, p in wider.named_parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n][0], w) and after[n][1] == flag for n, (w, flag) in before.items())
    adapters.load_adapter(_bert(), folder)  # and the same folder still loads onto a fitting model
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json not found"):
        adapters.load_adapter(_bert(), tmp_path)


def test_bf16_autocast_runs_through_the_fused_op() -> None:
    model = _gpt2()
    adapters.apply_linchain(model, LinChainConfig(r=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.transformer.h[0].attn.c_attn(torch.randn(2, 3, 16))
    assert out.dtype == torch.bfloat16


def test_adapters_over_a_bf16_base_train_in_fp32() -> None:
    """A base loaded in bf16 (as LLMs are): the factors and mixers are fp32, so AdamW's updates and state are; the
    forward casts them to the input's dtype: bit for bit the layer with its factors rounded to bf16."""
    model = _gpt2(torch.bfloat16)
    adapters.apply_linchain(model, LinChainConfig(r=4, chain_length=2))
    _randomise_B(model)
    layer = model.transformer.h[0].attn.c_attn
    assert {p.dtype for p in layer.parameters() if p.requires_grad} == {torch.float32}
    x = torch.randn(2, 3, 16, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(2))
    out = layer(x)
    rounded = copy.deepcopy(layer).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, rounded(x))
    out.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


def test_a_packed_quantized_weight_is_refused_not_read_as_dense() -> None:
    """bitsandbytes' Linear4bit is an ``nn.Linear`` whose weight is packed uint8: an adapter must not multiply it."""
    model = _gpt2()
    packed = model.transformer.h[0].attn.c_attn
    packed.weight = nn.Parameter(torch.zeros(packed.weight.numel() // 2, 1, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.attn\.c_attn' is a Conv1D with a packed torch\.uint8"):
        adapters.apply_linchain(model, LinChainConfig(target_modules=["c_attn"]))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="r: expected a positive integer, got 0"):
        LinChainConfig(r=0)
    with pytest.raises(ValueError, match="chain_length: expected an integer >= 0, got -1"):
        LinChainConfig(chain_length=-1)
    with pytest.raises(ValueError, match=r"dropout: expected a value in \[0, 1\)"):
        LinChainConfig(dropout=1.0)
    with pytest.raises(ValueError, match="'nope' matches no module of GPT2LMHeadModel"):
        adapters.apply_linchain(_gpt2(), LinChainConfig(target_modules=["c_attn", "nope"]))
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.ln_1' is a LayerNorm; LinChain adapts nn\.Linear"):
        adapters.apply_linchain(_gpt2(), LinChainConfig(target_modules=["ln_1"]))
    with pytest.raises(ValueError, match="modules_to_save: 'head' matches no module"):
        adapters.apply_linchain(_gpt2(), LinChainConfig(modules_to_save=["head"]))
    model = _gpt2()
    adapters.apply_linchain(model, LinChainConfig())
    with pytest.raises(ValueError, match="already has LinChain adapters"):
        adapters.apply_linchain(model, LinChainConfig())
    with pytest.raises(TypeError, match=r"base: expected nn\.Linear or Conv1D, got LayerNorm"):
        LinChainLinear(nn.LayerNorm(4), LinChainConfig())


def test_methods_train_gpt2_and_bert(tmp_path, wikitext_slice, gpt2_tokenizer, sst2_slice, bert_tokenizer) -> None:
    lm = dict(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), steps=20, batch_size=4,
        block_size=32, eval_every=20, max_eval_batches=2, progress=False, lr=3e-3,
    )  # fmt: skip
    chain = train(TrainConfig(**lm, method="linchain", output_dir=str(tmp_path / "lm"), method_options={"r": 4}))
    lines = (tmp_path / "lm" / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if json.loads(line)["split"] == "train"]
    assert len(losses) == 20 and sum(losses[-5:]) < sum(losses[:5])
    assert chain["params_trainable"] < chain["params_total"] / 10
    lora = train(TrainConfig(**lm, method="lora", output_dir=str(tmp_path / "lora"), method_options={"r": 4}))
    assert lora["params_trainable"] == chain["params_trainable"] - 8 * 3 * (4 * 4 + 4)  # 8 adapted Conv1D
    cls = dict(
        model="config:bert-tiny", tokenizer=bert_tokenizer, data=str(sst2_slice), steps=4, batch_size=4,
        max_length=24, val_size=40, eval_every=4, progress=False, lr=1e-3,
    )  # fmt: skip
    out = train(TrainConfig(**cls, method="linchain", output_dir=str(tmp_path / "cls"), method_options={"r": 2}))
    assert out["steps"] == 4  # the new head trains with the adapters (modules_to_save)
    with pytest.raises(ValueError, match="method-option: lora has no option 'chain_length'"):
        train(TrainConfig(**lm, method="lora", output_dir=str(tmp_path / "x"), method_options={"chain_length": 2}))


@pytest.mark.parametrize("targets", [["c_attn", "c_fc"], "all-linear"])
def test_lora_equals_peft_lora(targets) -> None:
    """chain_length = 0 against PEFT's LoRA (the library users compare with) on GPT-2's Conv1D layers, float64:
    the same A and B give the same logits and the same gradients for every adapter tensor."""
    peft = pytest.importorskip("peft")
    ours, theirs = _gpt2(torch.float64), _gpt2(torch.float64)
    found = adapters.apply_linchain(ours, LinChainConfig(r=4, chain_length=0, alpha=8.0, target_modules=targets))
    peft_targets = ["c_attn", "c_proj", "c_fc"] if targets == "all-linear" else targets  # PEFT skips lm_head too
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, fan_in_fan_out=True,
                                                        target_modules=peft_targets))  # fmt: skip
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert sorted(peft_layers) == sorted(found)
    _randomise_B(ours)
    with torch.no_grad():
        for name, layer in found.items():
            peft_layers[name].lora_A["default"].weight.copy_(layer.lora_A)
            peft_layers[name].lora_B["default"].weight.copy_(layer.lora_B)
    ids = _ids()
    got, expected = ours(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits, expected.logits, **tolerance(torch.float64))
    got.loss.backward()
    expected.loss.backward()
    for name, layer in found.items():
        for ours_p, theirs_p in ((layer.lora_A, peft_layers[name].lora_A["default"].weight),
                                 (layer.lora_B, peft_layers[name].lora_B["default"].weight)):  # fmt: skip
            torch.testing.assert_close(ours_p.grad, theirs_p.grad, **tolerance(torch.float64))
