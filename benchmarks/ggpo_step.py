"""LoRA-GGPO's cost: one training step of GPT-2 small's configuration with LoRA r = 8 on every attention and MLP
linear, plain and perturbed, side by side; then the base-weight drift of the in-place version in bf16.

    python benchmarks/ggpo_step.py [--batch 4 --seq 128 --reps 9]

The providers take turns, one step each per round, and each step's time is divided by lora's in the same
round: on a shared machine whose speed drifts by 10 % from minute to minute, pairing is what makes a 5 %
target measurable at all (the range over rounds says how well). Appends rows to
benchmarks/results/ggpo_step_cpu.csv (mode ``train-step-gpt2``; ``--out``) and writes its table beside it (``.md``).
The drift: every adapted weight of the model in bf16, 100 rounds of the in-place ``W += eps; W -= eps``
(Flat-LoRA's row stds at f = 1), against the weight before. Our fused path never writes ``W`` (tests/perturb
hash it).
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch
from cases.ggpo_step import adapted_gpt2, cases
from transformers import GPT2Config

from finetune_ext.bench.harness import device_name, run_rounds


@torch.no_grad()
def bf16_drift(rounds: int, rho: float = 0.05) -> tuple[float, float, float]:
    """(fraction of elements changed, max |dW|, ||dW||_F / ||W||_F) over every adapted weight of GPT-2 small in
    bf16 after ``rounds`` of ``W += eps; W -= eps`` (eps drawn in fp32 with row std rho/sqrt(in)·||W_i||, cast to
    bf16 as the in-place code must)."""
    _, layers = adapted_gpt2(GPT2Config(), torch.device("cpu"))
    changed = total = 0
    worst = diff_sq = norm_sq = 0.0
    for layer in layers.values():
        W0 = layer.base_weight().float()
        W = W0.bfloat16()
        start = W.float()
        std = rho / W.shape[1] ** 0.5 * start.norm(dim=1, keepdim=True)
        for _ in range(rounds):
            eps = (std * torch.randn_like(start)).bfloat16()
            W += eps
            W -= eps
        d = W.float() - start
        changed += int((d != 0).sum())
        total += d.numel()
        worst = max(worst, float(d.abs().max()))
        diff_sq += float(d.square().sum())
        norm_sq += float(start.square().sum())
    return changed / total, worst, (diff_sq / norm_sq) ** 0.5


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--reps", type=int, default=9, help="rounds: timed steps per provider")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100, help="bf16 drift: add/subtract rounds")
    parser.add_argument("--out", default="benchmarks/results/ggpo_step_cpu.csv")
    args = parser.parse_args()
    for name in ("batch", "seq", "reps", "rounds"):
        if getattr(args, name) < 1:
            sys.exit(f"ggpo_step.py: --{name}: expected >= 1, got {getattr(args, name)}")
    device = torch.device("cpu")
    full = list(cases(device, torch.float32, [], None, config=GPT2Config(), shape=(args.batch, args.seq)))
    rows, times = run_rounds(full, "train-step-gpt2", warmup=args.warmup, reps=args.reps, out=Path(args.out))
    ratios = {p: sorted(t / u for t, u in zip(ts, times["lora"], strict=True)) for p, ts in times.items()}
    changed, worst, rel = bf16_drift(args.rounds)
    lines = [
        f"GPT-2 small configuration, LoRA r = 8 on every attention and MLP linear, batch {args.batch} x {args.seq}, "
        f"fp32, {device_name(device)}; {args.reps} rounds after {args.warmup} warm-up, each provider once per "
        "round in turn; the ratio to lora is taken within each round (median, and the range over rounds).",
        "",
        "| provider | step ms (median) | vs lora (median) | vs lora (range) |",
        "|---|---|---|---|",
        *[
            f"| {r.provider} | {r.median_ms:.0f} | {statistics.median(ratios[r.provider]):.3f}x | "
            f"{ratios[r.provider][0]:.3f}x - {ratios[r.provider][-1]:.3f}x |"
            for r in rows
        ],
        "",
        f"Naive in-place perturbation in bf16, {args.rounds} rounds of W += eps; W -= eps: {100 * changed:.1f} % of "
        f"the adapted weights' elements changed, max |dW| {worst:.3g}, ||dW||_F / ||W||_F = {rel:.3g}. "
        "Ours: bit-identical (the weight is never written).",
    ]
    Path(args.out).with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
