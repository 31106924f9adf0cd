"""Which SR1 pairs give LiFT better curvature rows: one mini-batch step's (w, ∇f), or gradients averaged over the
steps between records (``pair_gradients=step|mean``)?

    python benchmarks/methods/lift_sr1_pairs.py [--seeds 0 1 2 3 4]

A 2-layer, 64-wide GPT-2 from its configuration (``config:gpt2-tiny``, GPT-2 tokenizer), LiFT on its last
block over 64-token WikiText-2 blocks: ``--warmup`` AdamW steps of batch 8, ``--pairs`` records, then at the round
the SR1 rows ``B[S, J]`` (``--rows`` rows S among the regularized coordinates, the ``--columns`` largest
|validation gradient| J) beside the exact Hessian rows of f on ``--hvp-batch`` training blocks. Agreement per
row: the cosine between the SR1 row and the exact one; per run the median over rows and the relative Frobenius
error ``‖B - H‖ / ‖H‖``. The two modes run on the same seeds and data; differences are paired by seed with a 95 %
t interval. Rows go to benchmarks/results/lift_sr1_pairs.csv as runs end (finished runs are skipped), the table
to ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from _stats import paired
from _sweep import load_rows, mean_std, record

from finetune_ext.data import shared_data_dir
from finetune_ext.lift import parts as lift_parts
from finetune_ext.train import TrainConfig, train

FIELDS = ["mode", "seed", "cosine_median", "relative_error", "records"]


def measure(mode: str, seed: int, args: argparse.Namespace) -> dict:
    """Train to the first round with ``pair_gradients=mode``; compare its SR1 rows with exact HVP rows there."""
    seen: dict = {}
    original = lift_parts.LiFT._h_rows

    def both(self, S, J):
        rows = original(self, S, J)
        if not seen:
            self.options.curvature = "hvp"
            exact = original(self, S, J)
            self.options.curvature = "sr1"
            cos = torch.nn.functional.cosine_similarity(rows, exact, dim=1)
            seen.update(cosine_median=float(cos.median()), relative_error=float((rows - exact).norm() / exact.norm()),
                        records=len(self.records))  # fmt: skip
        return rows

    options = {"blocks": "last:1", "warmup_steps": args.warmup, "pairs": args.pairs, "rows": args.rows,
               "columns": args.columns, "hvp_batch": args.hvp_batch, "val_batches": 4, "pair_gradients": mode,
               "lambda_init": 1.0}  # fmt: skip
    lift_parts.LiFT._h_rows = both
    try:
        with tempfile.TemporaryDirectory() as out:
            train(TrainConfig(model=f"config:{args.config}", tokenizer=str(shared_data_dir() / "gpt2-tokenizer"),
                              data=str(shared_data_dir() / "wikitext-2"), output_dir=out, seed=seed,
                              steps=args.warmup, batch_size=8, block_size=64, lr=1e-3, eval_every=args.warmup,
                              max_eval_batches=2, progress=False, optimizer="lift",
                              optimizer_options=options))  # fmt: skip
    finally:
        lift_parts.LiFT._h_rows = original
    return {"mode": mode, "seed": seed, **{k: round(v, 5) if isinstance(v, float) else v for k, v in seen.items()}}


def write_table(done: list[dict], path: Path) -> None:
    def col(mode: str, key: str) -> dict[int, float]:
        return {int(r["seed"]): float(r[key]) for r in done if r["mode"] == mode}

    lines = [
        "| pairs | median row cosine with exact HVP rows | relative error ‖B - H‖/‖H‖ | seeds |",
        "|---|---|---|---|",
    ]
    for mode in ("step", "mean"):
        cos, err = col(mode, "cosine_median"), col(mode, "relative_error")
        fmt = lambda v: f"{v:.3f}"  # noqa: E731
        lines.append(
            f"| {mode} | {mean_std(list(cos.values()), fmt)} | {mean_std(list(err.values()), fmt)} | {len(cos)} |"
        )
    d_cos = paired(col("mean", "cosine_median"), col("step", "cosine_median"))
    d_err = paired(col("mean", "relative_error"), col("step", "relative_error"))
    lines += ["", f"mean - step, paired by seed (95 % t interval): cosine {d_cos.text(1.0, 3)} ({d_cos.verdict()}), "
              f"relative error {d_err.text(1.0, 3)} ({d_err.verdict('lower')})."]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--config", default="gpt2-tiny", help="a config: name (tiny GPT-2 family)")
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--columns", type=int, default=2000)
    parser.add_argument("--hvp-batch", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results/lift_sr1_pairs")
    args = parser.parse_args()
    for name in ("warmup", "pairs", "rows", "columns", "hvp_batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    csv_path, md_path = Path(args.out + ".csv"), Path(args.out + ".md")
    done = load_rows(csv_path)
    for seed in args.seeds:
        for mode in ("step", "mean"):
            if any(r["mode"] == mode and int(r["seed"]) == seed for r in done):
                continue
            record(csv_path, measure(mode, seed, args), FIELDS, done)
            write_table(done, md_path)
    print(md_path.read_text() if md_path.exists() else json.dumps(done))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
