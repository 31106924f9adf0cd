"""PEFT's adapter format: our LoRA/LinChain exported and loaded by PEFT, PEFT LoRA loaded into ours, the
``finetune-ext export`` command (peft and merged) and its one-line errors."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from finetune_ext import adapters
from finetune_ext.adapters import LinChainConfig
from finetune_ext.adapters.peft_format import load_peft, save_peft
from finetune_ext.cli import main
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train
from finetune_ext.train.checkpoint import folders

peft = pytest.importorskip("peft")


def _gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=16, vocab_size=50)).eval()


def _bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50)
    config.num_labels = 3
    return BertForSequenceClassification(config).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))


def _train_like(model: torch.nn.Module) -> None:
    """Non-zero B and a moved head, as after training."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)


def _assert_logits_close(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    with torch.no_grad():
        got, expected = ours(_ids()).logits, theirs(_ids()).logits
    torch.testing.assert_close(got, expected, **tolerance(torch.float32, scale=expected.abs().max().item()))


@pytest.mark.parametrize(
    "make, config",
    [
        (_gpt2, LinChainConfig(r=4, chain_length=0, dropout=0.0)),  # GPT-2 Conv1D, LoRA, all-linear
        (_gpt2, LinChainConfig(r=4, chain_length=3, dropout=0.1)),  # LinChain folded, mixer biases -> lora_B.bias
        (_bert, LinChainConfig(r=2, chain_length=0, target_modules=["query", "value"], modules_to_save=["classifier"])),
        (_bert, LinChainConfig(r=2, chain_length=2, mixer_bias=False, target_modules="all-linear")),
    ],
)
def test_peft_loads_our_export(tmp_path, make, config) -> None:
    base = make()
    ours = copy.deepcopy(base)
    adapters.apply_linchain(ours, config)
    _train_like(ours)
    ours.eval()
    save_peft(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    _assert_logits_close(ours, theirs)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == config.r and saved["lora_alpha"] == config.alpha
    assert saved["lora_bias"] == (config.chain_length > 0 and config.mixer_bias)


def test_peft_round_trip_through_ours_is_exact(tmp_path) -> None:
    base = _bert()
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.05, task_type="SEQ_CLS", target_modules=["query", "value", "dense"]
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    _train_like(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    found = load_peft(ours, tmp_path / "peft")
    peft_layers = [n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")]
    assert sorted(found) == sorted(peft_layers) and all(a.chain_length == 0 for a in found.values())
    _assert_logits_close(ours.eval(), theirs.eval())
    save_peft(ours, tmp_path / "again")
    first, again = (
        load_file(tmp_path / "peft" / "adapter_model.safetensors"),
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
    )
    assert sorted(first) == sorted(again)
    for key, tensor in first.items():
        assert torch.equal(tensor, again[key]), key
    old, new = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "again"))
    for key in ("r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "use_dora"):
        assert old[key] == new[key], key
    assert sorted(old["target_modules"]) == sorted(new["target_modules"])


def test_load_peft_refuses_what_does_not_fit(tmp_path) -> None:
    gpt2 = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    gpt2.save_pretrained(tmp_path / "gpt2")
    bert = _bert()
    before = {n: p.clone() for n, p in bert.state_dict().items()}
    flags = {n: p.requires_grad for n, p in bert.named_parameters()}
    with pytest.raises(ValueError, match=r"^path: the adapter does not fit BertForSequenceClassification"):
        load_peft(bert, tmp_path / "gpt2")
    assert not adapters.adapters(bert) and not hasattr(bert, "_linchain")
    assert all(torch.equal(p, before[n]) for n, p in bert.state_dict().items())
    assert {n: p.requires_grad for n, p in bert.named_parameters()} == flags
    wider = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    wider.save_pretrained(tmp_path / "wider")
    small = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=50))
    with pytest.raises(ValueError, match=r"lora_A has shape \[2, 16\], the model \[2, 8\]"):
        load_peft(small, tmp_path / "wider")
    assert not adapters.adapters(small)
    merged = _gpt2()
    adapters.apply_linchain(merged, LinChainConfig(r=2))
    adapters.merge(merged)
    with pytest.raises(ValueError, match=r"merged into the base weights; unmerge\(model\) before save_peft"):
        save_peft(merged, tmp_path / "merged")
    dora = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_peft(_gpt2(), tmp_path / "dora")
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    (tmp_path / "gpt2" / "adapter_config.json").write_text(json.dumps({**config, "target_modules": None}))
    with pytest.raises(ValueError, match=r"adapter_config\.json: missing target_modules"):
        load_peft(_gpt2(), tmp_path / "gpt2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, wikitext_slice, gpt2_tokenizer):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), steps=4, batch_size=4,
        block_size=32, eval_every=2, max_eval_batches=1, progress=False, lr=3e-3, output_dir=str(out),
        method="linchain", method_options={"r": 4},
    )  # fmt: skip
    train(cfg)
    return out


def test_export_merged_and_peft_give_the_runs_model(tmp_path, lora_run, capsys) -> None:
    assert main([
        "export", str(lora_run), "--format", "merged", "--output", str(tmp_path / "merged"), "--weights", "final"
    ]) == 0  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    ours = _run_model(lora_run)
    torch.testing.assert_close(merged(_ids()).logits, ours(_ids()).logits, **tolerance("merge", scale=1.0))
    assert (
        main(["export", str(lora_run), "--format", "peft", "--output", str(tmp_path / "peft"), "--weights", "final"])
        == 0
    )
    assert "finetune-ext export: warning: the base model config:gpt2-tiny is built from" in capsys.readouterr().err
    base = _run_base(lora_run)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    _assert_logits_close(ours, theirs)


def test_export_of_a_full_fine_tunes_best_weights_with_a_tied_head(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    """The best-validation state keeps one name per tensor (GPT-2's head is its tied embedding): export finds it."""
    cfg = TrainConfig(model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), steps=2,
                      batch_size=4, block_size=32, eval_every=1, max_eval_batches=1, progress=False,
                      output_dir=str(tmp_path / "run"))  # fmt: skip
    summary = train(cfg)
    assert main(["export", str(tmp_path / "run"), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.lm_head.weight is merged.transformer.wte.weight and summary["best_val"]["step"] in (1, 2)


def test_export_errors_are_one_line(tmp_path, lora_run, capsys) -> None:
    cases = [
        (["export", str(tmp_path), "--format", "peft", "--output", str(tmp_path / "o")], "is not a finetune-ext run"),
        (["export", str(lora_run), "--format", "peft", "--output", str(lora_run)], "exists and is not an empty folder"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err and err.startswith("finetune-ext export: ")


def test_export_best_before_any_validation_says_it_exports_the_final_weights(
    tmp_path, wikitext_slice, gpt2_tokenizer, capsys
) -> None:
    """A run stopped before its first validation: the newest checkpoint has no best weights."""
    cfg = TrainConfig(
        model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice), steps=2, batch_size=2,
        block_size=16, eval_every=100, save_every=1, keep_checkpoints=2, progress=False,
        output_dir=str(tmp_path / "run"), method="linchain", method_options={"r": 4},
    )  # fmt: skip
    train(cfg)
    shutil.rmtree(folders(tmp_path / "run")[-1])  # the last step validates; drop its checkpoint
    assert main(["export", str(tmp_path / "run"), "--format", "merged", "--output", str(tmp_path / "merged")]) == 0
    assert "has no best-validation weights (no validation ran); exporting the final ones" in capsys.readouterr().err


def _run_model(run) -> torch.nn.Module:
    """The run's final model, rebuilt by hand: tiny GPT-2 with LinChain r=4 and the checkpoint's trained weights."""
    model = _run_base(run)
    adapters.apply_linchain(model, LinChainConfig(r=4))
    missing, unexpected = model.load_state_dict(load_file(folders(run)[-1] / "model.safetensors"), strict=False)
    assert not unexpected and all(not p.requires_grad for n, p in model.named_parameters() if n in missing)
    return model.eval()


def _run_base(run) -> torch.nn.Module:
    """The run's base model: its configuration initialised from the run's seed, as the run built it (the
    checkpoint holds only the trained weights, and a digest of these)."""
    from finetune_ext.train.checkpoint import read_state
    from finetune_ext.train.models import load_model as build
    from finetune_ext.train.models import load_tokenizer

    cfg = read_state(folders(run)[-1])["config"]
    torch.manual_seed(cfg["seed"])
    return build(cfg["model"], "lm", load_tokenizer(cfg["tokenizer"])).eval()
