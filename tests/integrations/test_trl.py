"""TRL's ``SFTTrainer`` with our parts: ``class PartsSFTTrainer(PartsTrainer, SFTTrainer)`` trains through our
stepper on SFT's own batches (chat template, completion-only label masks), with the losses ``PartsTrainer`` gives
on the same batches."""

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


CHAT = (  # a minimal chat template (the shared GPT-2 tokenizer has none); TRL marks the assistant's turn itself
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_sft_on_a_chat_dataset_trains_on_the_completions_only(tmp_path, gpt2_tokenizer) -> None:
    from datasets import Dataset

    tokenizer = load_tokenizer(gpt2_tokenizer)
    tokenizer.chat_template = CHAT
    pairs = [("is the film good", "yes, very"), ("was it dull", "no, not at all"), ("rate it", "four stars")]
    rows = [{"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs * 8]  # fmt: skip
    sft, losses = _run(PartsSFTTrainer, tmp_path, tokenizer, Dataset.from_list(rows))
    assert type(sft.stepper).__name__ == "AdamW" and sft.transforms  # our stepper and LoRA + GGPO
    assert sft.args.completion_only_loss is not False and len(losses) == 4
    batch = sft.data_collator([sft.train_dataset[i] for i in range(4)])
    labels, ids = batch["labels"], batch["input_ids"]
    prompt = tokenizer.apply_chat_template(rows[0]["prompt"], tokenize=True, add_generation_prompt=True)["input_ids"]
    n = len(prompt) - 1  # the last prompt token ("assistant: "'s space) merges with the completion's first word
    assert n > 5 and ids[0, :n].tolist() == prompt[:n]
    assert (labels[0, :n] == -100).all()  # the prompt carries no loss
    assert (labels[0][labels[0] != -100] == ids[0][labels[0] != -100]).all() and (labels[0] != -100).any()
    _, plain = _run(PartsTrainer, tmp_path, tokenizer, sft.train_dataset, data_collator=sft.data_collator)
    assert losses == plain  # our stepper took SFT's masked labels as they are
