"""``--gradient-checkpointing``: the recomputed forward draws the same dropout masks and weight noise, so every
random transform gives the gradients it gives without checkpointing."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

from finetune_ext.data import micro_batches
from finetune_ext.parts import StepContext
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig
from finetune_ext.train.models import enable_gradient_checkpointing
from finetune_ext.train.trainer import preflight

LORA = {"r": 2, "dropout": 0.2}
CASES = {  # every random transform, on a Llama-layout model and on GPT-2 in turn
    "guided dropout": ("llama", {"dropout": "guided", "dropout_options": {"fisher_samples": 4, "fisher_cache": None}}),
    "gaussian dropout": ("gpt2", {"dropout": "gaussian"}),
    "lora dropout": ("qwen2", {"adapter": "lora", "adapter_options": LORA}),
    "linchain dropout": ("gpt2", {"adapter": "linchain", "adapter_options": LORA}),
    "flat-lora": ("mistral", {"adapter": "lora", "adapter_options": LORA, "perturbation": "flat-lora"}),
    "ggpo": ("llama", {"adapter": "lora", "adapter_options": LORA, "perturbation": "ggpo",
                       "perturbation_options": {"ramp": "constant"}}),
    "mgpo": ("gpt2", {"adapter": "linchain", "adapter_options": LORA, "perturbation": "mgpo"}),
}  # fmt: skip


def _gradients(tmp_path, data, tokenizer, family: str, parts: dict, checkpointing: str) -> dict[str, torch.Tensor]:
    """Gradients of one keyed step after two AdamW steps (so GGPO and MGPO have gradients and moments to use)."""
    cfg = TrainConfig(model=f"config:{family}-tiny", tokenizer=tokenizer, data=str(data), output_dir=str(tmp_path),
                      block_size=32, progress=False, seed=0, **parts)  # fmt: skip
    run = preflight(cfg)
    model, stepper = run.model, run.parts.stepper
    model.train()
    if checkpointing == "ours":
        enable_gradient_checkpointing(model)
    elif checkpointing == "plain":  # torch's checkpoint without our context: the recompute is not keyed
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    for step in range(3):
        batches = micro_batches(run.splits.train, torch.arange(4 * step, 4 * step + 4), run.task, run.device, 1, 0, 1)
        for transform in run.parts.transforms:
            transform.before_step(step, stepper)
        ctx = StepContext(model, batches, nullcontext, step, 0)
        if step < 2:
            stepper.step(ctx)
            for transform in run.parts.transforms:
                transform.after_step(step, stepper)
    model.zero_grad()
    ctx.forward_backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_gradients_equal_plain_ones(case, tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    family, parts = CASES[case]
    plain = _gradients(tmp_path / "a", wikitext_slice, gpt2_tokenizer, family, parts, "off")
    checkpointed = _gradients(tmp_path / "b", wikitext_slice, gpt2_tokenizer, family, parts, "ours")
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], **tolerance(torch.float32), msg=name)


def test_without_the_key_the_recompute_draws_other_masks(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    family, parts = CASES["lora dropout"]
    plain = _gradients(tmp_path / "a", wikitext_slice, gpt2_tokenizer, family, parts, "off")
    unkeyed = _gradients(tmp_path / "b", wikitext_slice, gpt2_tokenizer, family, parts, "plain")
    assert any(not torch.allclose(unkeyed[n], plain[n], **tolerance(torch.float32)) for n in plain)


def test_a_checkpointed_run_follows_the_plain_one(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    """``--gradient-checkpointing`` end to end on the Llama layout with a chain, dropout and weight noise."""
    import json

    from finetune_ext.train import train

    losses = {}
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        train(TrainConfig(model="config:llama-tiny", tokenizer=gpt2_tokenizer, data=str(wikitext_slice),
                          output_dir=str(out), steps=4, batch_size=4, block_size=32, lr=1e-3, eval_every=4,
                          max_eval_batches=1, progress=False, dropout="gaussian", adapter="linchain",
                          adapter_options=LORA, perturbation="ggpo", perturbation_options={"ramp": "constant"},
                          gradient_checkpointing=checkpointing))  # fmt: skip
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[checkpointing] = torch.tensor([r["loss"] for r in rows if r["split"] == "train"])
    assert len(losses[True]) == 4
    torch.testing.assert_close(losses[True], losses[False], **tolerance(torch.float32))
