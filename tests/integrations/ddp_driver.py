"""One ``PartsTrainer`` run for the DDP test: ``python ddp_driver.py OUT DATA TOKENIZER MODEL`` in one process or
under ``torch.distributed.run``; the global batch is 4 either way, read in order; rank 0 writes the step losses
and the trained adapter weights to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from finetune_ext.data import load_splits
from finetune_ext.integrations.transformers import PartsTrainer
from finetune_ext.train.models import load_model, load_tokenizer


class InOrder(PartsTrainer):
    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.trainer, self.losses = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.losses.append(self.trainer.last_step_metrics["loss"])


def main(out: Path, data: str, tokenizer: str, model_spec: str) -> None:
    tok = load_tokenizer(tokenizer)
    splits = load_splits(data, tok, block_size=32, max_length=32, train_samples=None, val_size=0, seed=0)
    blocks = splits.train["input_ids"][:24]
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    torch.manual_seed(0)
    model = load_model(model_spec, "lm", tok)
    args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=4 // max(1, _world()),
                             max_steps=4, learning_rate=1e-2, seed=0, report_to=[], save_strategy="no",
                             disable_tqdm=True, use_cpu=True, ddp_backend="gloo" if _world() > 1 else None)  # fmt: skip
    losses = Losses()
    trainer = InOrder(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator,
                      processing_class=tok, parts={"adapter": "lora", "perturbation": "ggpo"},
                      part_options={"adapter": {"r": 2, "dropout": 0.0}}, callbacks=[losses])  # fmt: skip
    losses.trainer = trainer
    trainer.train()
    if trainer.args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "losses.json").write_text(json.dumps({"world": trainer.args.world_size, "losses": losses.losses}))
        adapters = {k: v.detach().contiguous() for k, v in model.state_dict().items() if "lora_" in k}
        save_file(adapters, str(out / "adapters.safetensors"))


def _world() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:5])
