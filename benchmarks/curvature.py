"""Curvature products against curvlinops, side by side in one run: 16 exact Hessian and GGN products w.r.t. one
GPT-2 block, in gradients, with the matmul-FLOP bound.

    pip install curvlinops-for-pytorch     # a dev dependency: its HessianLinearOperator and GGNLinearOperator
    python benchmarks/curvature.py [--device cpu] [--reps 20]

The cases are ``python benchmarks/bench.py --ops hvp_block``'s (on CPU a 2-layer, 128-wide GPT-2 at batch 2 x 64, blocks
0 and 1; on GPU GPT-2 small at 8 x 512, blocks 0 and 11; fp32). Appends the timings to
benchmarks/results/curvature_<device>.csv and writes benchmarks/results/curvature_<device>.md: per block and
provider the median time, the time in gradients and its ratio to the FLOP bound (``flop_bound``: one gradient
plus, per vector, a tangent forward pass and a backward pass from the logits to the block).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from cases.curvature import HVP_VECTORS, flop_bound, hvp_cases, setup

from finetune_ext.bench import append_csv, run


def write_table(rows, bounds: dict[str, float], path: Path, device_name: str) -> None:
    lines = [
        f"{HVP_VECTORS} products w.r.t. one GPT-2 block, fp32, on {device_name}; median of the timed runs; "
        "gradients = time / one gradient's time; FLOP bound in gradients (matmul FLOPs, torch.utils.flop_counter).",
        "",
        "| block | provider | median ms | gradients | FLOP bound | x bound |",
        "|---|---|---|---|---|---|",
    ]
    for mode in dict.fromkeys(r.mode for r in rows):
        of_mode = {r.provider: r for r in rows if r.mode == mode}
        unit = of_mode["gradient"].median_ms
        bound = bounds[mode]
        for provider, r in of_mode.items():
            grads = r.median_ms / unit
            ratio = f"{grads / bound:.2f}" if provider != "gradient" else "-"
            lines.append(f"| {mode} | {provider} | {r.median_ms:.1f} | {grads:.1f} | {bound:.1f} | {ratio} |")
    lines += [
        "",
        "`reference`: a double-backward loop over the vectors; `exact`, `ggn`: ours (batched forward-over-reverse, "
        "fused softmax Hessian); `curvlinops-*`: curvlinops' HessianLinearOperator / GGNLinearOperator on the same "
        "model, parameters, batch, loss and 16 vectors. The FLOP bound counts matmul FLOPs only; a gradient also "
        "spends time in the softmax over the vocabulary and in autograd, so a product can take fewer gradients "
        "than the bound (x bound under 1). Command: `python benchmarks/curvature.py` (threads: see the device).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device(args.device)
    model, batch, blocks = setup(device)
    bounds = {
        f"{HVP_VECTORS}vec-{b.removeprefix('transformer.').rstrip('.')}": flop_bound(model, batch, b) for b in blocks
    }
    rows = run(hvp_cases(device, torch.float32, [], None), warmup=2, reps=args.reps)
    out = Path(args.out)
    append_csv(rows, out / f"curvature_{device.type}.csv")
    write_table(rows, bounds, out / f"curvature_{device.type}.md", rows[0].device_name)
    print((out / f"curvature_{device.type}.md").read_text())


if __name__ == "__main__":
    main()
