"""A method-against-baseline study on GLUE tasks with all-MiniLM-L6-v2: the protocol both GLUE study scripts share.

For each task, training fraction, seed and variant: fine-tune for ``--epochs`` epochs (at most ``--max-steps``
steps, said in the table), select the checkpoint by the task's GLUE metric on a held-out slice of train
(``--val-size``), report that metric on the GLUE dev set (the test split here). Rows are appended to the CSV as
each run ends and runs already in it are skipped, so an interrupted sweep continues where it stopped; the table
(mean ± sd over seeds, seeds per cell, the paper's figures beside) and the plot are rewritten after every run.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _stats import paired
from _sweep import load_rows, majority_sentence, mean_std, minilm_path, record

from finetune_ext.data import shared_data_dir
from finetune_ext.train import TrainConfig, train

TASKS = {"RTE": ("acc", 128, 2490), "MRPC": ("f1", 128, 3668), "CoLA": ("mcc", 64, 8551)}  # metric, length, size
FIELDS = ["task", "fraction", "variant", "seed", "lr", "steps", "metric", "test", "test_final", "best_step", "seconds",
          "top_class_frac"]  # fmt: skip
ONE_CLASS = 0.99  # a selected checkpoint that gives one class to this share of dev is flagged


@dataclass
class Study:
    description: str
    tasks: list[str]
    variants: list[str]
    method: Callable[[str, argparse.Namespace], tuple[str, dict]]  # variant -> (--method, its options)
    paper: dict[tuple[str, str], str]  # (task, variant) -> the paper's figure, as printed in the table
    lr: dict[str, float]  # task -> learning rate
    out: str
    max_steps: int = 400  # the cap on a run's steps that sizes the study to this machine


def main(study: Study) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = _parser(study)
    args = parser.parse_args()
    _check(parser, args)
    model = minilm_path()
    csv_path, md_path, png_path = (Path(args.out + ext) for ext in (".csv", ".md", ".png"))
    done = load_rows(csv_path)
    seen = {(r["task"], float(r["fraction"]), r["variant"], int(r["seed"]), float(r["lr"])) for r in done}
    for task in args.tasks:
        metric, max_length, n_train = TASKS[task]
        lr = learning_rate(study, task, args)
        for fraction in args.fractions:
            size = round(fraction * (n_train - args.val_size))
            steps = min(math.ceil(args.epochs * size / args.batch_size), args.max_steps)
            for seed in args.seeds:
                for variant in args.variants:
                    if (task, fraction, variant, seed, lr) in seen:
                        continue
                    method, options = study.method(variant, args)
                    with tempfile.TemporaryDirectory() as out:
                        cfg = TrainConfig(
                            model=model, data=str(shared_data_dir() / task), output_dir=out, method=method,
                            method_options=options, seed=seed, steps=steps, batch_size=args.batch_size, lr=lr,
                            warmup_steps=steps // 10, max_length=max_length, train_samples=fraction,
                            val_size=args.val_size, eval_every=max(1, steps // 6), save_every=steps,
                            keep_checkpoints=1, progress=False,
                        )  # fmt: skip
                        summary = train(cfg)
                    row = {
                        "task": task, "fraction": fraction, "variant": variant, "seed": seed, "lr": lr, "steps": steps,
                        "metric": metric, "test": round(summary["test"][metric], 5),
                        "test_final": round(summary["test_final"][metric], 5),
                        "best_step": summary["best_val"]["step"],
                        "seconds": round(summary["train_seconds_this_session"], 1),
                        "top_class_frac": round(summary["test"]["top_class_frac"], 4),
                    }  # fmt: skip
                    record(csv_path, row, FIELDS, done)
                    write_table(study, done, md_path, args)
                    plot(study, _split_by_lr(study, done, args)[0], png_path)
    print(md_path.read_text())


def learning_rate(study: Study, task: str, args: argparse.Namespace) -> float:
    """``--lr`` when given, else the study's rate for the task."""
    return args.lr if args.lr is not None else study.lr[task]


def _parser(study: Study) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=study.description)
    parser.add_argument("--tasks", nargs="+", default=study.tasks, choices=list(TASKS))
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.3, 1.0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=study.variants, choices=study.variants)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=study.max_steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, help=f"every task's learning rate (default: {study.lr})")
    parser.add_argument("--val-size", type=int, default=250)
    parser.add_argument("--fisher-samples", type=int, default=256, help="guided dropout: texts for the Fisher")
    parser.add_argument("--out", default=study.out)
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "max_steps", "batch_size", "lr", "val_size", "fisher_samples"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')}: expected a positive value, got {getattr(args, name)}")
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions: expected values in (0, 1], got {args.fractions}")


def write_table(study: Study, rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    """The table of the runs at each task's learning rate; runs at other rates are listed under it."""
    table, other = _split_by_lr(study, rows, args)
    cells: dict[tuple[str, float, str], list[float]] = {}
    steps: dict[tuple[str, float], str] = {}
    for r in table:
        key = (r["task"], float(r["fraction"]))
        cells.setdefault((*key, r["variant"]), []).append(100 * float(r["test"]))
        steps[key] = r["steps"]
    keys = sorted(steps)
    tasks = sorted({t for t, _ in keys})
    metrics = ", ".join(f"{t}: dev {TASKS[t][0]}" for t in tasks)
    rates = ", ".join(f"{t} {learning_rate(study, t, args):g}" for t in tasks)
    head = " | ".join(f"{t} {f:.0%} ({steps[(t, f)]} steps)" for t, f in keys)
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), {args.epochs:g} epochs (at most {args.max_steps} steps), batch {args.batch_size}, "
        f"lr {rates}; {metrics} (x100), best validation checkpoint; mean ± sd (seeds).",
        "",
        f"| variant | {head} | paper |",
        "|---|" + "---|" * len(keys) + "---|",
    ]
    for variant in study.variants:
        row = [mean_std(cells.get((*k, variant), []), lambda v: f"{v:.1f}") for k in keys]
        paper = "; ".join(f"{t} {v}" for (t, var), v in study.paper.items() if var == variant) or "-"
        lines.append(f"| {variant} | " + " | ".join(row) + f" | {paper} |")
    flagged = [r for r in table if float(r.get("top_class_frac") or 0) >= ONE_CLASS]
    lines += ["", majority_sentence({t: TASKS[t][0] for t in tasks}),
              f"Selected checkpoints predicting one class on >= {100 * ONE_CLASS:.0f} % of dev: {len(flagged)}"
              + (" (" + ", ".join(f"{r['task']} {float(r['fraction']):.0%} {r['variant']} seed {r['seed']}"
                                  for r in flagged) + ")" if flagged else "") + ".",
              "", *_verdicts(study, table, keys)]  # fmt: skip
    if other:
        lines += ["", "Runs at other learning rates, not in the table (x100):", *_other_runs(other)]
    path.write_text("\n".join(lines) + "\n")


def _split_by_lr(study: Study, rows: list[dict], args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(rows at their task's learning rate, the others)."""
    table = [r for r in rows if float(r["lr"]) == learning_rate(study, r["task"], args)]
    return table, [r for r in rows if r not in table]


def _other_runs(rows: list[dict]) -> list[str]:
    groups: dict[tuple[str, float, str, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["task"], float(r["fraction"]), float(r["lr"]), r["variant"]), []).append(
            100 * float(r["test"])
        )
    return [f"- {t} {f:.0%}, lr {lr:g}, {v}: {mean_std(vals, lambda x: f'{x:.1f}')}"
            for (t, f, lr, v), vals in sorted(groups.items())]  # fmt: skip


def _verdicts(study: Study, rows: list[dict], keys: list) -> list[str]:
    """Per cell, each variant against the first (the baseline), paired by seed: the mean difference with its 95 %
    t interval (x100); better or worse when the interval excludes 0, else a tie."""
    base, out = study.variants[0], []
    for task, fraction in keys:

        def by_seed(variant: str, task=task, fraction=fraction) -> dict[int, float]:
            return {int(r["seed"]): float(r["test"]) for r in rows
                    if (r["task"], float(r["fraction"]), r["variant"]) == (task, fraction, variant)}  # fmt: skip

        for variant in study.variants[1:]:
            d = paired(by_seed(variant), by_seed(base))
            if d.n >= 2:
                out.append(f"- {task} {fraction:.0%}: {variant} - {base} = {d.text()}: {d.verdict()}.")
    return out


def plot(study: Study, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, variant in enumerate(study.variants):
            offset = 0.02 * (i - (len(study.variants) - 1) / 2)
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
