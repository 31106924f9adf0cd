"""TRL's ``SFTTrainer`` with our parts: ``class PartsSFTTrainer(PartsTrainer, SFTTrainer)`` trains through our
stepper on SFT's own batches (its tokenization, EOS and label masks), with the losses ``PartsTrainer`` gives on
the same batches."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from finetune_ext.integrations.transformers import PartsTrainer
from finetune_ext.train.models import load_tokenizer

trl = pytest.importorskip("trl")
PARTS = {"adapter": "lora", "perturbation": "ggpo"}
OPTIONS = {"adapter": {"r": 4, "dropout": 0.1}}


class PartsSFTTrainer(PartsTrainer, trl.SFTTrainer):
    """What the README tells TRL users to write."""


class _Losses(TrainerCallback):
    def __init__(self) -> None:
        self.trainer, self.losses = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.losses.append(self.trainer.last_step_metrics["loss"])


def _model(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=len(tokenizer), n_positions=64))


def _run(cls, tmp_path, tokenizer, dataset, **kwargs) -> tuple[PartsTrainer, list[float]]:
    args = trl.SFTConfig(output_dir=str(tmp_path / cls.__name__), max_steps=4, per_device_train_batch_size=4,
                         learning_rate=1e-3, seed=0, report_to=[], use_cpu=True, save_strategy="no",
                         disable_tqdm=True, max_length=32)  # fmt: skip
    losses = _Losses()
    trainer = cls(model=_model(tokenizer), args=args, train_dataset=dataset, processing_class=tokenizer,
                  parts=PARTS, part_options=OPTIONS, callbacks=[losses], **kwargs)  # fmt: skip
    losses.trainer = trainer
    trainer.train()
    return trainer, losses.losses


def test_sft_trainer_with_parts_gives_parts_trainer_losses(tmp_path, gpt2_tokenizer) -> None:
    from datasets import Dataset

    tokenizer = load_tokenizer(gpt2_tokenizer)
    texts = ["the movie was good and fun", "a dull and tedious film", "great acting, weak plot", "I laughed a lot"]
    sft, sft_losses = _run(PartsSFTTrainer, tmp_path, tokenizer, Dataset.from_dict({"text": texts * 6}))
    assert type(sft.stepper).__name__ == "AdamW" and sft.transforms
    # The same tokenized rows, collator and seed: Trainer's sampler reads them in the same order.
    tokenized = sft.train_dataset
    _, plain_losses = _run(PartsTrainer, tmp_path, tokenizer, tokenized, data_collator=sft.data_collator)
    assert len(sft_losses) == 4 and all(torch.isfinite(torch.tensor(sft_losses)))
    assert sft_losses == plain_losses
