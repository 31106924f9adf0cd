"""LinChain as a PEFT custom module: ``get_peft_model`` trains the mixers, ``save_pretrained`` /
``PeftModel.from_pretrained`` keep them, and merge / unmerge are exact (mixer biases included)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertModel

from finetune_ext.adapters.peft_linchain import LinChainLoraLinear, linchain_config, perturbable_config
from finetune_ext.testing import tolerance


def _base() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    return BertModel(config).eval()


def _lora(k: int = 3) -> LoraConfig:
    return linchain_config(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0), k)


def _trained(k: int = 3):
    model = get_peft_model(_base(), _lora(k))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # as after training: B != 0, mixers moved
                p.normal_(std=0.2)
    return model


def test_the_layer_is_base_plus_the_chained_update() -> None:
    model = _trained()
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    assert isinstance(layer, LinChainLoraLinear) and len(layer.lora_mixer["default"]) == 3
    x = torch.randn(5, 32, dtype=torch.float64)
    A, B = (m.weight.double() for m in (layer.lora_A["default"], layer.lora_B["default"]))
    h = x @ A.T
    for mixer in layer.lora_mixer["default"]:
        h = h @ mixer.weight.double().T + mixer.bias.double()
    base = layer.base_layer
    expected = x @ base.weight.double().T + base.bias.double() + layer.scaling["default"] * h @ B.T
    got = layer.double()(x)
    torch.testing.assert_close(got, expected, **tolerance(torch.float64))


def test_training_reaches_the_mixers() -> None:
    names = [n for n, p in get_peft_model(_base(), _lora()).named_parameters() if p.requires_grad]
    model = _trained()  # B != 0: at initialisation (B = 0) no gradient reaches A or the mixers, as in LoRA
    assert any("lora_mixer" in n for n in names) and all("lora_" in n for n in names)
    model.train()
    model(input_ids=torch.randint(0, 50, (2, 6))).last_hidden_state.square().mean().backward()
    mixer = model.base_model.model.encoder.layer[0].attention.self.query.lora_mixer["default"][0]
    assert mixer.weight.grad is not None and mixer.weight.grad.abs().sum() > 0


def test_save_and_load_keep_the_mixers(tmp_path) -> None:
    model = _trained().eval()
    x = torch.randint(0, 50, (2, 7))
    expected = model(input_ids=x).last_hidden_state
    model.save_pretrained(tmp_path)
    config = linchain_config(LoraConfig.from_pretrained(tmp_path), chain_length=3)
    loaded = PeftModel.from_pretrained(_base(), tmp_path, config=config).eval()
    assert torch.equal(loaded(input_ids=x).last_hidden_state, expected)


def test_merge_and_unmerge_are_exact() -> None:
    model = _trained().eval()
    x = torch.randint(0, 50, (2, 7))
    expected = model(input_ids=x).last_hidden_state
    layer = model.base_model.model.encoder.layer[0].attention.self.query
    before = (layer.base_layer.weight.clone(), layer.base_layer.bias.clone())
    model.merge_adapter()
    torch.testing.assert_close(model(input_ids=x).last_hidden_state, expected, **tolerance(torch.float32))
    model.unmerge_adapter()
    for now, then in zip((layer.base_layer.weight, layer.base_layer.bias), before, strict=True):
        torch.testing.assert_close(now, then, **tolerance(torch.float32))
    merged = model.merge_and_unload()
    assert type(merged.encoder.layer[0].attention.self.query) is torch.nn.Linear
    torch.testing.assert_close(merged(input_ids=x).last_hidden_state, expected, **tolerance(torch.float32))


def test_bad_chain_length_is_refused() -> None:
    with pytest.raises(ValueError, match="chain_length: expected an integer >= 1, got 0"):
        _lora(0)


@pytest.mark.parametrize("chain_length", [0, 3])
def test_ggpo_acts_on_peft_layers_as_on_ours(chain_length: int) -> None:
    """The same weights as PEFT layers and as our ``LinChainLinear``: GGPO finds both, draws the same row stds and
    noise (keyed by module name), and a training forward gives the same output within fp32."""
    from finetune_ext.adapters import LinChainConfig, apply_linchain
    from finetune_ext.parts import OptimSettings, RunContext
    from finetune_ext.perturb import GGPO
    from finetune_ext.perturb.parts import GGPOOptions

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0)
    peft_model = get_peft_model(
        _base(), linchain_config(lora, chain_length) if chain_length else perturbable_config(lora)
    )
    ours = _base()
    apply_linchain(ours, LinChainConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["query", "value"],
                                        chain_length=chain_length))  # fmt: skip
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "adapter_params"):
                mine = ours.get_submodule(name)
                for theirs, own in zip(module.adapter_params(), (mine.lora_A, mine.lora_B), strict=True):
                    own.copy_(theirs.normal_(std=0.2))
                for i, mixer in enumerate(module.lora_mixer["default"] if chain_length else []):
                    mine.mixer_weight[i].copy_(mixer.weight)
                    mine.mixer_bias[i].copy_(mixer.bias)
    run = RunContext("classification", None, {}, {}, lambda m: {}, 0, 10, OptimSettings(1e-3, 0.0, 0, 1.0), "")
    x = torch.randint(0, 50, (2, 7))
    outputs = []
    for model in (peft_model.base_model.model, ours):
        ggpo = GGPO(GGPOOptions(ramp="constant", rho=0.5))
        ggpo.apply(model, run)
        assert len(ggpo.layers) == 4
        model.train()
        model.embeddings.dropout.p = model.encoder.layer[0].attention.self.dropout.p = 0.0
        for layer in model.encoder.layer:
            layer.attention.self.dropout.p = layer.attention.output.dropout.p = layer.output.dropout.p = 0.0
        ggpo.before_step(0, None)
        outputs.append(model(input_ids=x).last_hidden_state)
    torch.testing.assert_close(outputs[0], outputs[1], **tolerance(torch.float32))
    assert not torch.allclose(outputs[0], peft_model.base_model.model.eval()(input_ids=x).last_hidden_state)
