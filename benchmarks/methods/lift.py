"""LiFT vs AdamW (weight decay swept) vs fixed explicit L2, with controls, fine-tuning the last 2 blocks of a small
pretrained GPT-2 on an overfit-prone WikiText-2 slice; test perplexity of each run's best-validation checkpoint.

    python benchmarks/methods/lift.py --seeds 0 1 2 3 4 --out benchmarks/results/lift_controls

No GPT-2 weights are reachable offline, so the base is pretrained here with our own trainer (cached under
``--work``/base, not committed): a 4-layer, 256-wide GPT-2 (GPT-2 tokenizer) on the sentences of SST-2, CoLA,
MRPC, RTE and STS-B (not WikiText), ``--pretrain-steps`` steps. Fine-tuning: ``--train-blocks`` blocks of 64
tokens of WikiText-2 train (3,200 tokens), ``--steps`` steps of batch 8 at lr 3e-3 (32 epochs: AdamW's validation
loss turns up after about 60 steps); validation (model selection, every ``--steps``/10 steps) and test
perplexity on the first ``--eval-batches`` batches of 16 blocks of WikiText-2 valid and test (CPU budget: every
forward pays the 50,257-word head). LiFT's F and its gradient use the first 8 validation batches of 8 blocks.
Methods, all on layers 2-3 only: AdamW with decoupled weight decay 0 and 0.1 (0.01 was indistinguishable from 0
in the first study); explicit L2 fixed at LiFT's initial λ (LiFT without a round; λ₀ = 100 makes the penalty's
gradient about a tenth of the loss's per coordinate, where λ = 1 was invisible); LiFT (rounds of ``--warmup``
steps, ``--rows`` SR1 rows, ``--columns`` columns), with F on the selection blocks (``lift``) and on 64 validation
blocks after them (``lift-disjoint-F``: selection never sees F, so its checkpoint is the one to report). Controls
of ``lift-disjoint-F``: ``adamw-plus-F`` (AdamW, weight decay 0.1, trained on the 50 training blocks plus F's 64
blocks, re-tokenized from their decoded text: is the gain just more data?) and ``sign-disjoint-F`` (the same
rounds with the step ``-sign(g_val)`` on the same columns and the same line search, no LP, λ fixed: is the LP
needed?). The page pairs each by seed with the baseline of lowest mean validation loss, and the controls also with
``lift-disjoint-F`` (95 % t intervals). Rows go to the CSV as runs end and the page and plot are rewritten after
each; finished (method, seed) pairs are skipped on restart.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

from _stats import paired
from _sweep import load_rows, mean_std, record

from finetune_ext.data import shared_data_dir
from finetune_ext.data.splits import load_splits
from finetune_ext.train import TrainConfig, train

FIELDS = ["method", "seed", "steps", "test_ppl", "test_ppl_final", "best_step", "val_loss", "lambda", "seconds"]
BASE = {"model_type": "gpt2", "n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 128}
SENTENCE_COLUMNS = {  # GLUE file -> columns holding sentences
    "SST-2": ["sentence"], "CoLA": [3], "MRPC": ["#1 String", "#2 String"], "RTE": ["sentence1", "sentence2"],
    "STS-B": ["sentence1", "sentence2"],
}  # fmt: skip


def glue_sentences(split: str) -> list[str]:
    """Every sentence of the GLUE folders' ``split`` file (CoLA has no header: column 3)."""
    out = []
    for task, columns in SENTENCE_COLUMNS.items():
        path = shared_data_dir() / task / f"{split}.tsv"
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        header = rows[0] if isinstance(columns[0], str) else None
        idx = [header.index(c) for c in columns] if header else columns
        out += [row[i].strip() for row in rows[1 if header else 0 :] for i in idx if len(row) > max(idx)]
    return [s for s in out if s]


def pretrain(work: Path, steps: int) -> str:
    """The cached base model folder, pretrained on GLUE sentences if it is not there yet."""
    base = work / "base"
    if (base / "config.json").exists():
        return str(base)
    corpus = work / "glue-text"
    corpus.mkdir(parents=True, exist_ok=True)
    for split, source in (("train", "train"), ("valid", "dev"), ("test", "dev")):
        (corpus / f"{split}.txt").write_text("\n".join(glue_sentences(source)) + "\n", encoding="utf-8")
    config = work / "base-config.json"
    config.write_text(json.dumps(BASE))
    out = work / "pretrain"
    cfg = TrainConfig(model=f"config:{config}", tokenizer=str(shared_data_dir() / "gpt2-tokenizer"), data=str(corpus),
                      output_dir=str(out), steps=steps, batch_size=16, block_size=64, lr=1e-3,
                      warmup_steps=steps // 20, eval_every=max(1, steps // 5), save_every=max(1, steps // 5),
                      max_eval_batches=20, resume=(out / "latest").exists())  # fmt: skip
    train(cfg)
    export(out, base)
    return str(base)


def export(run: Path, base: Path) -> None:
    """A Hugging Face model folder from a run's latest checkpoint."""
    from safetensors.torch import load_model
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(**{k: v for k, v in BASE.items() if k != "model_type"}, vocab_size=50257))
    load_model(model, str(run / (run / "latest").read_text().strip() / "model.safetensors"))
    model.save_pretrained(base)


def methods(args: argparse.Namespace) -> dict[str, dict]:
    lift = {"blocks": "last:2", "lambda_init": args.lambda_init, "val_batches": 8, "rows": args.rows,
            "columns": args.columns}  # fmt: skip
    out = {f"adamw-wd{wd:g}": {"optimizer": "adamw", "weight_decay": wd, "optimizer_options": {"layers": "last:2"}}
           for wd in (0.0, 0.1)}  # fmt: skip
    out["l2-fixed"] = {"optimizer": "lift", "optimizer_options": {**lift, "warmup_steps": args.steps + 1}}
    out["lift"] = {"optimizer": "lift", "optimizer_options": {**lift, "warmup_steps": args.warmup}}
    # F on validation blocks disjoint from the ones that select the checkpoint, and its two controls.
    disjoint = {**lift, "warmup_steps": args.warmup, "val_skip": 16 * args.eval_batches}
    out["lift-disjoint-F"] = {"optimizer": "lift", "optimizer_options": disjoint}
    out["adamw-plus-F"] = {**out["adamw-wd0.1"], "train_samples": None, "plus_f": True}
    out["sign-disjoint-F"] = {"optimizer": "lift", "optimizer_options": {**disjoint, "direction": "sign"}}
    return out


BASELINES = ("adamw-wd0", "adamw-wd0.1", "l2-fixed")
CONTROLS = ("adamw-plus-F", "sign-disjoint-F")


def plus_f_data(work: Path, seed: int, args: argparse.Namespace) -> str:
    """A WikiText-2 folder whose train.txt is the run's ``--train-blocks`` training blocks plus the 64 validation
    blocks ``lift-disjoint-F``'s F reads (decoded, one block per line); valid and test are WikiText-2's."""
    from transformers import AutoTokenizer

    wikitext = shared_data_dir() / "wikitext-2"
    tokenizer = AutoTokenizer.from_pretrained(str(shared_data_dir() / "gpt2-tokenizer"))
    splits = load_splits(str(wikitext), tokenizer, block_size=64, max_length=64, train_samples=args.train_blocks,
                         val_size=0, seed=seed)  # fmt: skip
    skip = 16 * args.eval_batches
    blocks = [*splits.train["input_ids"], *splits.val["input_ids"][skip : skip + 64]]
    out = work / f"plus-F-seed{seed}"
    out.mkdir(parents=True, exist_ok=True)
    lines = [tokenizer.decode(b).replace("\n", " ") + "\n" for b in blocks]
    (out / "train.txt").write_text("".join(lines), encoding="utf-8")
    for split in ("valid", "test"):
        (out / f"{split}.txt").write_bytes((wikitext / f"{split}.txt").read_bytes())
    return str(out)


def run(name: str, spec: dict, seed: int, base: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / "runs" / f"{name}-seed{seed}"
    spec = dict(spec)
    data = plus_f_data(work, seed, args) if spec.pop("plus_f", False) else str(shared_data_dir() / "wikitext-2")
    cfg = TrainConfig(
        model=base, tokenizer=str(shared_data_dir() / "gpt2-tokenizer"), data=data, output_dir=str(out),
        overwrite=True, seed=seed, steps=args.steps, batch_size=8, block_size=64, lr=args.lr,
        warmup_steps=args.steps // 10, eval_every=max(1, args.steps // 10), save_every=args.steps,
        max_eval_batches=args.eval_batches, eval_batch_size=16, progress=False,
        **{"weight_decay": 0.0, "train_samples": args.train_blocks, **spec},
    )  # fmt: skip
    start = time.perf_counter()
    summary = train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if "lift_lambda_0" in r]  # LiFT's last λ per block (none for the other methods)
    lam = [v for k, v in rounds[-1].items() if k.startswith("lift_lambda_")] if rounds else []
    return {"method": name, "seed": seed, "steps": summary["steps"], "test_ppl": round(summary["test"]["ppl"], 2),
            "test_ppl_final": round(summary["test_final"]["ppl"], 2), "best_step": summary["best_val"]["step"],
            "val_loss": round(summary["best_val"]["value"], 4), "lambda": " ".join(f"{v:.3g}" for v in lam),
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def write_table(done: list[dict], md: Path) -> None:
    names = list(dict.fromkeys(r["method"] for r in done))
    columns = ["method", "test perplexity (best validation)", "test perplexity (final)", "validation loss", "seeds"]
    lines = ["| " + " | ".join(columns) + " |", "|---|---|---|---|---|"]
    for name in names:
        rows = [r for r in done if r["method"] == name]
        best = mean_std([float(r["test_ppl"]) for r in rows], lambda v: f"{v:.1f}")
        final = mean_std([float(r["test_ppl_final"]) for r in rows], lambda v: f"{v:.1f}")
        val = mean_std([float(r["val_loss"]) for r in rows], lambda v: f"{v:.4f}")
        lines.append(f"| {name} | {best} | {final} | {val} | {len(rows)} |")
    md.write_text("\n".join(lines + paired_lines(done)) + "\n")
    plot(done, names, md.with_suffix(".png"))


def paired_lines(done: list[dict]) -> list[str]:
    """Test perplexity differences paired by seed: LiFT and the controls against the baseline of lowest mean
    validation loss, the controls against ``lift-disjoint-F``; negative is better."""
    by_seed = lambda name: {int(r["seed"]): float(r["test_ppl"]) for r in done if r["method"] == name}  # noqa: E731
    val = {m: statistics.mean(float(r["val_loss"]) for r in done if r["method"] == m) for m in BASELINES
           if any(r["method"] == m for r in done)}  # fmt: skip
    if not val:
        return []
    best = min(val, key=val.get)
    pairs = [(m, best) for m in ("lift", "lift-disjoint-F", *CONTROLS)] + [(m, "lift-disjoint-F") for m in CONTROLS]
    lines = ["", f"Paired by seed, test perplexity (best validation) difference with 95 % t interval (negative: "
             f"lower perplexity); the baseline of lowest validation loss is {best}.", "",
             "| comparison | difference | verdict |", "|---|---|---|"]  # fmt: skip
    for a, b in pairs:
        d = paired(by_seed(a), by_seed(b))
        lines.append(f"| {a} - {b} | {d.text(scale=1.0)} | {d.verdict(better='lower')} |")
    return lines


def plot(done: list[dict], names: list[str], path: Path) -> None:
    """Test perplexity per method, of the best-validation checkpoint and of the final model: one grey line per seed
    (the pairs the page compares), the mean in black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = sorted({r["seed"] for r in done}, key=int)
    for ax, key, title in zip(axes, ("test_ppl", "test_ppl_final"), ("best-validation checkpoint", "final model"),
                              strict=True):  # fmt: skip
        value = {(r["method"], r["seed"]): float(r[key]) for r in done}
        for seed in seeds:
            xs = [i for i, n in enumerate(names) if (n, seed) in value]
            ax.plot(xs, [value[names[i], seed] for i in xs], "-o", color="0.7", ms=3, lw=0.8)
        means = [statistics.mean(v for (n, _), v in value.items() if n == name) for name in names]
        ax.plot(range(len(names)), means, "ks", ms=6, label="mean")
        ax.set_xticks(range(len(names)), names, rotation=25)
        ax.set(title=f"WikiText-2 test perplexity, {title}", ylabel="perplexity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--work", default="runs/lift-study", help="cache of the base model and the runs")
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=40, help="LiFT: AdamW steps per round")
    parser.add_argument("--train-blocks", type=int, default=50, help="WikiText-2 training blocks of 64 tokens")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lambda-init", type=float, default=100.0)
    parser.add_argument("--rows", type=int, default=128, help="LiFT: constraint rows")
    parser.add_argument("--columns", type=int, default=5000, help="LiFT: LP columns")
    parser.add_argument("--eval-batches", type=int, default=10, help="validation/test batches of 16 blocks")
    parser.add_argument("--methods", nargs="+", help="run only these methods (default: all)")
    parser.add_argument("--out", default="benchmarks/results/lift")
    args = parser.parse_args()
    unknown = set(args.methods or []) - set(methods(args))
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; expected some of {list(methods(args))}")
    work = Path(args.work)
    base = pretrain(work, args.pretrain_steps)
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)
    for seed in args.seeds:
        for name, spec in methods(args).items():
            if args.methods and name not in args.methods:
                continue
            if any((r["method"], r["seed"]) == (name, str(seed)) for r in done):
                continue
            record(csv_path, run(name, spec, seed, base, args, work), FIELDS, done)
            write_table(done, md_path)
    write_table(done, md_path)
    print(md_path.read_text())


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
