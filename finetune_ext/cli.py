"""``finetune-ext``: command-line entry point (``train``, ``bench``, ``info``)."""

from __future__ import annotations

import argparse
import dataclasses
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
    rows = bench.run(cases, warmup=args.warmup, reps=args.reps)
    print(bench.format_table(rows))
    out = Path(args.out)
    csv_paths = []
    for op in ops:
        csv_paths.append(out / f"{op}_{device.type}.csv")
        bench.append_csv([r for r in rows if r.op == op], csv_paths[-1])
    plots = bench.plot_speedup(rows, out)
    print(f"\nCSV rows appended to {', '.join(map(str, csv_paths))}; plots: {', '.join(map(str, plots))}")
    return 0


def _train(args: argparse.Namespace) -> int:
    import transformers

    from finetune_ext.train import METHODS, TrainConfig, UserError, train

    transformers.logging.set_verbosity_error()  # our errors are one line; keep the library's chatter out

    options = {}
    for item in args.method_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"method-option: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value  # a bare string
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**fields, method_options=options)
    if config.method not in METHODS:
        raise UserError(f"method: unknown {config.method!r}; available: {sorted(METHODS)}")
    try:
        summary = train(config)
    except KeyboardInterrupt as err:
        print(f"finetune-ext train: {err or 'interrupted'}; continue with --resume", file=sys.stderr)
        return 130
    except FloatingPointError as err:
        print(f"finetune-ext train: {err}", file=sys.stderr)
        return 1
    keys = ("steps", "params_trainable", "params_total", "best_val", "final_val", "test")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def _info(args: argparse.Namespace) -> int:
    import finetune_ext

    print(json.dumps(finetune_ext.build_info(), indent=2))
    return 0


def _train_defaults() -> dict:
    from finetune_ext.train.trainer import TrainConfig

    return {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="op microbenchmarks: providers over a size sweep -> table, CSV, PNG")
    b.add_argument("--ops", nargs="+", help="ops to run (default: all)")
    b.add_argument("--providers", nargs="+", help="providers to time (default: all of each op's)")
    b.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    b.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    b.add_argument("--sizes", nargs="+", type=int, help="element counts (default depends on the device)")
    b.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    b.add_argument("--reps", type=int, default=20, help="timed calls; the median is reported (>= 20)")
    b.add_argument("--out", default="bench-out", help="folder for the CSV and PNG files")
    b.set_defaults(func=_bench)

    defaults = _train_defaults()  # one source of truth: TrainConfig
    t = sub.add_parser(
        "train",
        help="fine-tune a model with one of the methods",
        description="Fine-tune a Hugging Face model. Writes metrics.jsonl, curves.png, summary.json and "
        "checkpoints into --output-dir. Runs data-parallel under torchrun.",
    )
    t.add_argument(
        "--model",
        required=True,
        help="hub id, local folder, config:gpt2-tiny|gpt2-small|bert-tiny, or config:<config.json>",
    )
    t.add_argument(
        "--data",
        required=True,
        help="wikitext-2 | wikitext-103 | sst2 (hub), or a folder with train/valid/test.txt or train.tsv + dev.tsv",
    )
    t.add_argument("--tokenizer", help="hub id or folder (default: the model's)")
    t.add_argument("--method", default=defaults["method"], help="training method (default: adamw)")
    t.add_argument(
        "--method-option", action="append", default=[], metavar="KEY=VALUE", help="method-specific option (repeatable)"
    )
    t.add_argument(
        "--output-dir", default=defaults["output_dir"], help="where metrics, plots, summary and checkpoints go"
    )
    t.add_argument(
        "--seed", type=int, default=defaults["seed"], help="seed for initialisation, data order, subsets and dropout"
    )
    t.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps")
    t.add_argument(
        "--batch-size",
        type=int,
        default=defaults["batch_size"],
        help="sequences per optimizer step, over all processes",
    )
    t.add_argument("--grad-accum", type=int, default=defaults["grad_accum"], help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=defaults["lr"], help="peak learning rate")
    t.add_argument(
        "--weight-decay", type=float, default=defaults["weight_decay"], help="AdamW weight decay (matrices only)"
    )
    t.add_argument(
        "--warmup-steps",
        type=int,
        default=defaults["warmup_steps"],
        help="linear warm-up steps, then linear decay to 0",
    )
    t.add_argument(
        "--max-grad-norm", type=float, default=defaults["max_grad_norm"], help="gradient clipping norm (0: off)"
    )
    t.add_argument("--block-size", type=int, default=defaults["block_size"], help="tokens per language-modelling block")
    t.add_argument(
        "--max-length",
        type=int,
        default=defaults["max_length"],
        help="tokens per classification example (padded/truncated)",
    )
    t.add_argument(
        "--train-samples", type=float, help="low-data runs: a count (>= 1) or fraction (< 1) of the training set"
    )
    t.add_argument(
        "--val-size",
        type=float,
        default=defaults["val_size"],
        help="classification: held-out slice of train for model selection (count or fraction)",
    )
    t.add_argument(
        "--eval-every", type=int, default=defaults["eval_every"], help="evaluate on the validation split every N steps"
    )
    t.add_argument("--eval-batch-size", type=int, default=defaults["eval_batch_size"], help="batch size for evaluation")
    t.add_argument("--max-eval-batches", type=int, help="cap evaluation at N batches (quick runs)")
    t.add_argument(
        "--save-every", type=int, default=defaults["save_every"], help="checkpoint every N steps (and at the end)"
    )
    t.add_argument(
        "--keep-checkpoints", type=int, default=defaults["keep_checkpoints"], help="how many checkpoints to keep"
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its latest checkpoint")
    t.add_argument("--overwrite", action="store_true", help="start over in an --output-dir that holds checkpoints")
    t.add_argument("--bf16", action="store_true", help="bf16 autocast for forward passes")
    t.add_argument(
        "--device", default=defaults["device"], choices=["auto", "cpu", "cuda"], help="default: cuda if available"
    )
    t.add_argument(
        "--select-metric",
        choices=["loss", "acc"],
        default=defaults["select_metric"],
        help="validation metric that selects the reported model (default: loss for LM, acc for classification)",
    )
    t.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    t.set_defaults(func=_train)

    i = sub.add_parser("info", help="what was built: CUDA kernels, archs, torch version")
    i.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # UserError and the ops' argument errors: one line, no traceback
        print(f"finetune-ext {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
