"""LiFT's LP at full size, 256 rows x 20,000 (+2 λ) columns: every HiGHS variant and ours side by side in one run.

    python benchmarks/lp_direction.py [--reps 3] [--providers reference ours-sifted]

Each solve builds a fresh model (no warm start). Appends rows to benchmarks/results/lp_direction_cpu.csv (mode
``solve-full``) and prints the table. ``finetune-ext bench --ops lp_direction`` runs the 64 x 5,002 case.
"""

import argparse
from pathlib import Path

import torch

from finetune_ext.bench.harness import run_full_size
from finetune_ext.bench.lp_direction import cases

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed solves per provider (each takes seconds)")
    parser.add_argument("--providers", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/lp_direction_cpu.csv")
    args = parser.parse_args()
    full = cases(torch.device("cpu"), torch.float64, [], args.providers, shape=(256, 20000))
    run_full_size(full, "solve-full", warmup=0, reps=args.reps, out=Path(args.out))
