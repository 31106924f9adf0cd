"""LiFT's LP at full size, 256 rows x 20,000 (+2 λ) columns: every HiGHS variant and ours side by side in one run.

    python benchmarks/lp_direction.py [--reps 3] [--providers reference ours-sifted]
    python benchmarks/lp_direction.py --captured runs/lift-study/base --providers reference ours ours-sifted

Each solve builds a fresh model (no warm start). Appends rows to benchmarks/results/lp_direction_cpu.csv (mode
``solve-full``, or ``solve-captured`` for an LP captured from a real LiFT round: 20 warm-up steps of the model
folder given, last 2 blocks, on 50 WikiText-2 blocks, then the round's LP) and prints the table.
``python benchmarks/bench.py --ops lp_direction`` runs the synthetic 64 x 5,002 case.
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from cases.lp_direction import cases

from finetune_ext.bench.harness import run_full_size
from finetune_ext.errors import UserError


def captured_lp(model: str) -> tuple[np.ndarray, np.ndarray]:
    """(c, rows) of the first LiFT round on ``model`` at the default 256 rows x 20,000 columns."""
    from finetune_ext.data import shared_data_dir
    from finetune_ext.lift import lp
    from finetune_ext.train import TrainConfig, train

    seen = {}
    solve = lp.LPSolver.solve

    def capture(self, c, rows, *args, **kwargs):
        seen["lp"] = (np.asarray(c), np.asarray(rows))
        return solve(self, c, rows, *args, **kwargs)

    lp.LPSolver.solve = capture
    options = {"blocks": "last:2", "lambda_init": 100.0, "val_batches": 8, "warmup_steps": 20}
    try:
        with tempfile.TemporaryDirectory() as out:
            train(TrainConfig(model=model, tokenizer=str(shared_data_dir() / "gpt2-tokenizer"), output_dir=out,
                              data=str(shared_data_dir() / "wikitext-2"), steps=20, batch_size=8, block_size=64,
                              lr=3e-3, train_samples=50, eval_every=20, max_eval_batches=2, progress=False,
                              optimizer="lift", optimizer_options=options))  # fmt: skip
    finally:
        lp.LPSolver.solve = solve
    return seen["lp"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3, help="timed solves per provider (each takes seconds)")
    parser.add_argument("--providers", nargs="+")
    parser.add_argument("--captured", metavar="MODEL", help="time the LP of a real LiFT round on this model")
    parser.add_argument("--out", default="benchmarks/results/lp_direction_cpu.csv")
    args = parser.parse_args()
    try:
        lp = captured_lp(args.captured) if args.captured else None
    except UserError as e:
        sys.exit(f"lp_direction.py: --captured: {e}")
    full = cases(torch.device("cpu"), torch.float64, [], args.providers, shape=(256, 20000), lp=lp)
    mode = "solve-captured" if lp else "solve-full"
    run_full_size(full, mode, warmup=0, reps=args.reps, out=Path(args.out))
