"""Tokens per second and peak memory of a LoRA step on the GPT-2-small configuration (``--model``: another
``config:`` model), ours beside Trainer + PEFT, in fp32, bf16 (base weights in bf16, bf16 autocast), bf16 with
gradient checkpointing and nf4 (QLoRA: the layers' linear weights 4-bit through bitsandbytes, the rest bf16; PEFT's
side is the same quantized model with PEFT LoRA; models with ``nn.Linear`` layers, such as ``config:llama-1b``).

Language modelling on WikiText-2 blocks of ``--block-size`` tokens, ``--batch-size`` blocks a step (the same
blocks both sides), LoRA r = 8 / alpha 16 / dropout 0.05 on every linear layer, AdamW at lr 1e-4. Each
(door, setting) runs in a fresh process; the step time is the median over the steps after ``--warmup``, tokens
per second = batch x block / that median, and the peak memory is the process's peak resident set (CPU: the
model, the data and every step; ours evaluates one 1-block batch at the end; ``torch.cuda.max_memory_allocated``
on a GPU).

    python benchmarks/memory_step.py                       # CPU, one thread
    python benchmarks/memory_step.py --device cuda --data-root .whl/data
    python benchmarks/memory_step.py --device cuda --model config:llama-1b --settings bf16 nf4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from methods._sweep import append_row
from trainer_step import LORA, ROOT, StepTimer

from finetune_ext.bench.harness import device_name
from finetune_ext.train.models import TINY_CONFIGS

SETTINGS = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16-ckpt": ("bf16", True), "nf4": ("nf4", False)}
DOORS = ("ours", "peft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="holds wikitext-2/")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="config:gpt2-small", help="a config: model (nf4: one with nn.Linear)")
    parser.add_argument("--settings", nargs="+", default=["fp32", "bf16", "bf16-ckpt"], choices=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_step_cpu"))
    parser.add_argument("--dry-run", action="store_true", help="check the options and inputs, run nothing")
    parser.add_argument("--worker", nargs=2, metavar=("DOOR", "SETTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    for needed in ("wikitext-2/train.txt", "gpt2-tokenizer"):
        if not (Path(args.data_root) / needed).exists():
            sys.exit(f"--data-root: {Path(args.data_root) / needed} not found")
    configs = [f"config:{name}" for name in TINY_CONFIGS if not name.startswith("bert")]  # causal LMs
    if args.model not in configs:
        sys.exit(f"--model: expected one of {', '.join(configs)}, got {args.model!r}")
    if "nf4" in args.settings and "gpt2" in args.model:
        sys.exit(f"--settings nf4: {args.model} has Conv1D layers, which are not quantized; use a Llama-family model")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU here")
    if args.dry_run:
        print(
            f"memory_step: would time {', '.join(args.settings)} for {', '.join(DOORS)} on {args.model}, {args.device}"
        )
        return
    if args.worker:
        print(json.dumps(_worker(args, *args.worker)))
        return
    rows = []
    for setting in args.settings:
        for door in DOORS:
            result = _run(args, door, setting)
            ms = statistics.median(result["ms"][args.warmup :])
            rows.append({"device": args.device, "model": args.model, "setting": setting, "door": door,
                         "threads": args.threads,
                         "median_ms": round(ms, 1), "tokens_per_s": round(args.batch_size * args.block_size / ms * 1e3),
                         "peak_mb": round(result["peak_mb"]), "machine": _machine(args)})  # fmt: skip
            print(rows[-1], flush=True)
    for row in rows:
        append_row(Path(args.out).with_suffix(".csv"), row, list(row))


def _run(args, door: str, setting: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", door, setting, "--data-root", args.data_root, "--device", args.device,
           "--model", args.model,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--block-size", str(args.block_size),
           "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _worker(args, door: str, setting: str) -> dict:
    torch.set_num_threads(args.threads)
    dtype, checkpointing = SETTINGS[setting]
    with tempfile.TemporaryDirectory() as tmp:
        ms = _ours(args, tmp, dtype, checkpointing) if door == "ours" else _peft(args, tmp, dtype, checkpointing)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"ms": ms, "peak_mb": peak}


def _ours(args, tmp: str, dtype: str, checkpointing: bool) -> list[float]:
    from finetune_ext.train.trainer import TrainConfig, train

    cfg = TrainConfig(model=args.model, tokenizer=str(Path(args.data_root) / "gpt2-tokenizer"),
                      data=str(Path(args.data_root) / "wikitext-2"), output_dir=tmp, adapter="lora",
                      adapter_options={**LORA, "target_modules": "all-linear"}, steps=args.steps,
                      batch_size=args.batch_size, block_size=args.block_size, lr=1e-4, eval_every=10**6,
                      save_every=10**6, max_eval_batches=1, eval_batch_size=1, progress=False, device=args.device,
                      dtype=dtype, gradient_checkpointing=checkpointing)  # fmt: skip
    train(cfg)
    lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    return [r["step_ms"] for r in map(json.loads, lines) if r.get("split") == "train"]


def _peft(args, tmp: str, dtype: str, checkpointing: bool) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from finetune_ext.data import load_splits
    from finetune_ext.train.models import load_model, load_tokenizer, quantize_4bit

    tokenizer = load_tokenizer(str(Path(args.data_root) / "gpt2-tokenizer"))
    splits = load_splits(str(Path(args.data_root) / "wikitext-2"), tokenizer, block_size=args.block_size,
                         max_length=args.block_size, train_samples=None, val_size=0, seed=0)  # fmt: skip
    blocks = [{"input_ids": b, "labels": b} for b in splits.train["input_ids"][: args.batch_size * args.steps]]
    torch.manual_seed(0)
    model = load_model(args.model, "lm", tokenizer).to(args.device)
    if dtype == "nf4":
        quantize_4bit(model)  # the same 4-bit layers as ours; PEFT's LoRA goes over them
    if dtype in ("bf16", "nf4"):
        model.to(torch.bfloat16)  # PEFT keeps the adapters in fp32 (autocast_adapter_dtype)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], task_type="CAUSAL_LM",
                      target_modules="all-linear", fan_in_fan_out=args.model == "config:gpt2-small")  # fmt: skip
    model = get_peft_model(model, lora)
    targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                              learning_rate=1e-4, weight_decay=0.01, use_cpu=args.device == "cpu", report_to=[],
                              save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=dtype != "fp32",
                              activation_checkpointing=checkpointing,
                              activation_checkpointing_kwargs={"use_reentrant": False})  # fmt: skip
    timer = StepTimer()
    Trainer(model=model, args=targs, train_dataset=blocks, data_collator=default_data_collator,
            callbacks=[timer]).train()  # fmt: skip
    return timer.ms


def _machine(args) -> str:
    torch.set_num_threads(args.threads)
    return device_name(torch.device(args.device))


if __name__ == "__main__":
    main()
