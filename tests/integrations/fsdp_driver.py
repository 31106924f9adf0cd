"""The runs of the Trainer FSDP test: ``python -m torch.distributed.run --nproc_per_node 2 fsdp_driver.py OUT MODEL
DATA TOKENIZER ddp|fsdp``. ``MODEL`` (a saved tiny Llama) is loaded whole (DDP) or sharded by transformers as it
loads (``distributed_config=DistributedConfig(fsdp_size=2)``: FSDP2); the global batch is 4, read in order, with
activation checkpointing. Rank 0 writes each run's step losses and trained weights (whole) to OUT, and under FSDP
the one-line refusals of a part that cannot shard and of tensor parallelism."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, TrainingArguments, default_data_collator
from transformers.distributed import DistributedConfig

from finetune_ext.data import load_splits
from finetune_ext.integrations.transformers import PartsTrainer
from finetune_ext.parts.distributed import full_tensor
from finetune_ext.train.models import load_tokenizer
from tests.integrations.ddp_driver import InOrder, Losses

RUNS = {
    "adapter": ({"adapter": "linchain", "dropout": "guided"},
                {"adapter": {"r": 2}, "dropout": {"fisher_samples": 4, "fisher_cache": None}}),
    "full": ({"dropout": "gaussian"}, {}),
}  # fmt: skip


def trainer(out: Path, model, dataset, parts, options, callbacks=()) -> PartsTrainer:
    args = TrainingArguments(output_dir=str(out / "hf"), per_device_train_batch_size=2, max_steps=4,
                             learning_rate=1e-2, seed=0, report_to=[], save_strategy="no", disable_tqdm=True,
                             use_cpu=True, ddp_backend="gloo", activation_checkpointing=True)  # fmt: skip
    torch.manual_seed(0)  # the parts initialise from the same state whether or not loading sharded drew from it
    return InOrder(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator, parts=parts,
                   part_options=options, callbacks=list(callbacks))  # fmt: skip


def main(out: Path, model_dir: str, data: str, tokenizer: str, mode: str) -> None:
    tok = load_tokenizer(tokenizer)
    splits = load_splits(data, tok, block_size=32, max_length=32, train_samples=None, val_size=0, seed=0)
    dataset = [{"input_ids": b, "labels": b} for b in splits.train["input_ids"][:16]]
    load = {"distributed_config": DistributedConfig(fsdp_size=2)} if mode == "fsdp" else {}
    results = {}
    for name, (parts, options) in RUNS.items():
        model = AutoModelForCausalLM.from_pretrained(model_dir, **load)
        losses = Losses()
        losses.trainer = trainer(out, model, dataset, parts, options, [losses])
        losses.trainer.train()
        weights = {k: full_tensor(p.detach()).contiguous() for k, p in model.named_parameters() if p.requires_grad}
        results[name] = (losses.losses, weights)
    if mode == "fsdp":
        refused = {"armijo": (load, {"optimizer": "armijo"}),
                   "tp": ({"distributed_config": DistributedConfig(tp_size=2)}, {"adapter": "lora"})}  # fmt: skip
        for name, (how, parts) in refused.items():
            try:
                trainer(out, AutoModelForCausalLM.from_pretrained(model_dir, **how), dataset, parts, {})
            except ValueError as err:
                results[name] = str(err)
    if torch.distributed.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for name in RUNS:
            save_file(results[name][1], str(out / f"{name}.safetensors"))
        losses = {name: results[name][0] for name in RUNS}
        refusals = {name: results.get(name) for name in ("armijo", "tp")}
        (out / "results.json").write_text(json.dumps({"losses": losses, "refused": refusals}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:6])
