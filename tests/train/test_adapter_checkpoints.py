"""Checkpoints of runs with a frozen base hold the trained state and a digest of the base: small, checked at
resume and export, and the best-validation state without a second copy of the model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from finetune_ext.errors import UserError
from finetune_ext.train import TrainConfig, checkpoint, train
from finetune_ext.train.models import load_model, load_tokenizer


def _lora_run(tmp_path, data, tokenizer, model: str, **extra) -> TrainConfig:
    cfg = TrainConfig(model=model, tokenizer=tokenizer, data=str(data), output_dir=str(tmp_path), steps=2,
                      batch_size=2, block_size=32, eval_every=1, save_every=2, max_eval_batches=1, eval_batch_size=2,
                      progress=False,
                      adapter="lora", adapter_options={"r": 8}, **extra)  # fmt: skip
    train(cfg)
    return cfg


def test_a_gpt2_small_lora_checkpoint_is_at_most_twice_adapter_and_optimizer(
    tmp_path, wikitext_slice, gpt2_tokenizer
) -> None:
    _lora_run(tmp_path, wikitext_slice, gpt2_tokenizer, "config:gpt2-small")
    folder = checkpoint.folders(tmp_path)[-1]
    state = checkpoint.read_state(folder)
    trained = load_file(folder / "model.safetensors")
    adapter_bytes = sum(t.numel() * t.element_size() for k, t in trained.items() if "lora_" in k)
    assert adapter_bytes > 0 and all("lora_" in k or "attn.bias" in k for k in trained)  # no base weight
    size = sum(f.stat().st_size for f in folder.iterdir())
    assert size <= 2 * (adapter_bytes + 2 * adapter_bytes)  # adapters + AdamW's two moments
    assert state["best_state"].keys() == trained.keys() and state["base_digest"]


def test_resume_and_export_refuse_another_base(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    cfg = _lora_run(tmp_path / "run", wikitext_slice, gpt2_tokenizer, "config:gpt2-tiny", seed=3)
    folder = checkpoint.folders(tmp_path / "run")[-1]
    digest = checkpoint.read_state(folder)["base_digest"]
    tokenizer = load_tokenizer(gpt2_tokenizer)
    torch.manual_seed(4)  # another initialisation of the same configuration
    other = load_model(cfg.model, "lm", tokenizer)
    from finetune_ext.adapters import LinChainConfig, apply_linchain

    apply_linchain(other, LinChainConfig(r=8, chain_length=0))
    with pytest.raises(UserError, match="the base model's frozen weights differ from those checkpoint-0000002"):
        checkpoint.load(folder, other, 0, digest)
    torch.manual_seed(3)  # the run's: the same base, and the checkpoint loads
    same = load_model(cfg.model, "lm", tokenizer)
    apply_linchain(same, LinChainConfig(r=8, chain_length=0))
    checkpoint.load(folder, same, 0, digest)
    trained = load_file(folder / "model.safetensors")
    assert all(torch.equal(same.state_dict()[k], v) for k, v in trained.items())


def test_a_full_fine_tune_still_saves_every_weight(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    cfg = TrainConfig(model="config:gpt2-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice),
                      output_dir=str(tmp_path), steps=2, batch_size=2, block_size=32, eval_every=2, save_every=2,
                      max_eval_batches=1, progress=False)  # fmt: skip
    train(cfg)
    folder = checkpoint.folders(tmp_path)[-1]
    assert checkpoint.read_state(folder)["base_digest"] is None
    assert "transformer.h.0.attn.c_attn.weight" in load_file(folder / "model.safetensors")
