"""LiFT's curvature rows for one block of GPT-2 small's configuration on CPU (7.1M parameters, batch 2 x 64):
one gradient, exact HVP rows, and compact-SR1 rows from 50 pairs (and building that matrix), side by side.

    python benchmarks/lift_rows.py [--reps 2] [--rows 256] [--chunk 4]

Appends rows to benchmarks/results/lift_rows_cpu.csv (mode ``<rows>rows-gpt2``) and prints the table, then each
provider's time in gradients. ``python benchmarks/bench.py --ops lift_rows`` runs the small CPU (or GPU-size) case.
"""

import argparse
import sys
from pathlib import Path

import torch
from cases.lift_rows import cases
from transformers import GPT2Config

from finetune_ext.bench.harness import run_full_size

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="timed calls per provider")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per provider first")
    parser.add_argument("--rows", type=int, default=256, help="constraint rows (HVP rows cost one product each)")
    parser.add_argument("--chunk", type=int, default=4, help="HVP rows per batched call (memory: 32 needs > 21 GB)")
    parser.add_argument("--providers", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/lift_rows_cpu.csv")
    args = parser.parse_args()
    for name in ("rows", "chunk", "reps"):
        if getattr(args, name) < 1:
            sys.exit(f"lift_rows.py: --{name}: expected >= 1, got {getattr(args, name)}")
    full = cases(
        torch.device("cpu"), torch.float32, [], args.providers, config=GPT2Config(), rows=args.rows, chunk=args.chunk
    )
    rows = run_full_size(full, f"{args.rows}rows-gpt2", warmup=args.warmup, reps=args.reps, out=Path(args.out))
    unit = next((r.median_ms for r in rows if r.provider == "gradient"), None)
    for r in rows:
        print(
            f"{r.provider:>9}: {r.median_ms / 1e3:8.3f} s" + (f" = {r.median_ms / unit:7.1f} gradients" if unit else "")
        )
