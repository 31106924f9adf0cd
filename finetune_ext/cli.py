"""``finetune-ext``: command-line entry point (``bench``, ``info``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DTYPES = {
    **dict.fromkeys(["float32", "fp32"], "float32"),
    **dict.fromkeys(["bfloat16", "bf16"], "bfloat16"),
    **dict.fromkeys(["float16", "fp16"], "float16"),
}


def _bench(args: argparse.Namespace) -> int:
    import torch

    from finetune_ext import bench

    device = torch.device(
        "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("finetune-ext bench: --device cuda but no CUDA device is available")
    dtype = getattr(torch, DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = args.sizes or bench.DEFAULT_SIZES[device.type]
    ops = args.ops or sorted(bench.OPS)
    unknown = set(ops) - set(bench.OPS)
    if unknown:
        raise SystemExit(f"finetune-ext bench: unknown op(s) {sorted(unknown)}; available: {sorted(bench.OPS)}")
    cases = (c for op in ops for c in bench.OPS[op](device, dtype, sizes, args.providers))
    total = 2 * len(ops) * len(sizes) * len(args.providers)  # forward and backward per provider and size
    rows = bench.run(cases, warmup=args.warmup, reps=args.reps, total=total)
    print(bench.format_table(rows))
    out = Path(args.out)
    csv_path = out / f"{'_'.join(ops)}_{device.type}.csv"
    bench.append_csv(rows, csv_path)
    plots = bench.plot_speedup(rows, out)
    print(f"\nCSV rows appended to {csv_path}; plots: {', '.join(map(str, plots))}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import finetune_ext

    print(json.dumps(finetune_ext.build_info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="op microbenchmarks: providers over a size sweep -> table, CSV, PNG")
    b.add_argument("--ops", nargs="+", help="ops to run (default: all)")
    b.add_argument("--providers", nargs="+", default=["reference", "compile", "ext", "F.dropout"])
    b.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    b.add_argument("--sizes", nargs="+", type=int, help="element counts (default depends on the device)")
    b.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    b.add_argument("--reps", type=int, default=20, help="timed calls; the median is reported (>= 20)")
    b.add_argument("--out", default="bench-out", help="folder for the CSV and PNG files")
    b.set_defaults(func=_bench)

    i = sub.add_parser("info", help="what was built: CUDA kernels, archs, torch version")
    i.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"finetune-ext {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
