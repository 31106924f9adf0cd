"""``finetune-ext``: command-line entry point (``train``, ``export``, ``methods``, ``bench``, ``info``)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import typing
import warnings
from pathlib import Path

if typing.TYPE_CHECKING:
    from finetune_ext.train import TrainConfig

DTYPES = {
    **dict.fromkeys(["float32", "fp32"], "float32"),
    **dict.fromkeys(["bfloat16", "bf16"], "bfloat16"),
    **dict.fromkeys(["float16", "fp16"], "float16"),
}


def _quiet_libraries() -> None:
    """Our output only: transformers' configuration notes and torch's import-time notices stay out."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # imported by torch.utils.benchmark


def _bench(args: argparse.Namespace) -> int:
    _quiet_libraries()
    import re

    import torch

    from finetune_ext import bench

    cases = args.cases if args.cases is not None else bench.OPS
    device = _bench_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        raise ValueError("device: cuda requested but no CUDA device is available")
    for name, low in (("sizes", 1), ("reps", 1), ("warmup", 0)):
        values = getattr(args, name) if name == "sizes" else [getattr(args, name)]
        if values and min(values) < low:
            raise ValueError(f"{name}: expected integers >= {low}, got {min(values)}")
    dtype = getattr(torch, DTYPES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32"))
    sizes = args.sizes or bench.DEFAULT_SIZES[device.type]
    ops = args.ops or sorted(cases)
    unknown = set(ops) - set(cases)
    if unknown:
        raise ValueError(f"ops: unknown op(s) {sorted(unknown)}; available: {sorted(cases)}")
    if args.dry_run:
        print(f"would time {', '.join(ops)} on {device} in {dtype} at sizes {sizes} into {args.out}")
        return 0
    out, rows = Path(args.out), []
    for op in ops:  # each op's CSV is written as soon as it is timed: a run cut short keeps what it measured
        op_rows = bench.run(cases[op](device, dtype, sizes, args.providers), warmup=args.warmup, reps=args.reps)
        print(bench.format_table(op_rows), flush=True)
        bench.append_csv(op_rows, out / f"{op}_{device.type}.csv")
        if args.device_csv and op_rows:
            name = re.sub(r"[^A-Za-z0-9._-]+", "-", op_rows[0].device_name).strip("-")
            bench.append_csv(op_rows, Path(args.device_csv) / f"{name}.csv")
        rows += op_rows
    plots = bench.plot_speedup(rows, out)
    print(f"\nCSV rows appended to {out}/<op>_{device.type}.csv; plots: {', '.join(map(str, plots))}")
    return 0


def _bench_device(spec: str):
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``cuda:N`` as a ``torch.device``."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu, cuda or cuda:N, got {spec!r}")
    return device


def _train(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from finetune_ext.train import preflight, train

    cfg = train_config(args)
    if args.dry_run:
        print(json.dumps(preflight(cfg).parts.chosen, indent=2))
        return 0
    try:
        summary = train(cfg)
    except KeyboardInterrupt as err:
        print(f"finetune-ext train: {err or 'interrupted'}; continue with --resume", file=sys.stderr)
        return 130
    except FloatingPointError as err:
        print(f"finetune-ext train: {err}", file=sys.stderr)
        return 1
    keys = ("steps", "params_trainable", "params_total", "best_val", "final_val", "test")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed ``train`` arguments, each ``--<kind>-option KEY=VALUE`` list as a dict."""
    from finetune_ext.parts.options import parse_pairs
    from finetune_ext.train import TrainConfig

    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    for name in [k for k in fields if k.endswith("_options")]:
        fields[name] = parse_pairs(fields[name], name.removesuffix("s").replace("_", "-"))
    return TrainConfig(**fields)


def _export(args: argparse.Namespace) -> int:
    _quiet_libraries()
    from finetune_ext.train.export import export

    out = export(args.run_dir, args.format, args.output, weights=args.weights)
    print(f"wrote {args.format} export of {args.run_dir} ({args.weights} weights) to {out}")
    return 0


def _methods(args: argparse.Namespace) -> int:
    from finetune_ext.train import registry

    print(_catalogue_text(registry))
    print("\npresets (--method NAME): " + "; ".join(
        f"{name} = " + (", ".join(f"--{k} {v}" for k, v in parts.items()) or "the defaults")
        for name, parts in registry.PRESETS.items()
    ))  # fmt: skip
    return 0


def _catalogue_text(registry) -> str:
    lines = []
    for kind, name, doc, fields in registry.catalogue():
        lines.append(f"--{kind} {name}: {doc}")
        for field, tp, default, text in fields:
            lines.append(f"    {field} ({tp}, default {default!r}): {text}")
    return "\n".join(lines)


def _info(args: argparse.Namespace) -> int:
    import finetune_ext

    info = finetune_ext.build_info()
    print(json.dumps(info, indent=2))
    if not args.check:
        return 0
    import torch

    from finetune_ext.selfcheck import check_ops

    devices = ["cpu", "cuda"] if info["cuda_kernels"] and torch.cuda.is_available() else ["cpu"]
    failed = int(info["libstdcxx"] not in ("dynamic", "not loaded"))
    if failed:
        print(f"libstdc++ {info['libstdcxx']}  FAILED")
    for device in devices:
        for op, err, ok in check_ops(torch.device(device)):
            print(f"{device:5s} {op:32s} max |ext - reference| = {err:.3g}  {'ok' if ok else 'FAILED'}")
            failed += not ok
    return 1 if failed else 0


def add_config_arguments(parser: argparse.ArgumentParser, config: type) -> None:
    """One option per field of dataclass ``config``, typed, with its help text (``--field-name``).

    ``bool`` fields become flags (``--no-<name>`` for those that default to true); ``<kind>_options`` dicts
    become repeatable ``--<kind>-option KEY=VALUE`` options, parsed later by the part's declared types.
    """
    from finetune_ext.parts.options import field_types, parse_value, type_name

    for f in dataclasses.fields(config):
        tp, flag = field_types(config)[f.name], "--" + f.name.replace("_", "-")
        text, choices = f.metadata.get("help", ""), f.metadata.get("choices")
        if f.name.endswith("_options"):
            parser.add_argument(flag.removesuffix("s"), dest=f.name, action="append", default=[],
                                metavar="KEY=VALUE", help=f"{text} (repeatable)")  # fmt: skip
        elif tp is bool and f.default:
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false", help=text)
        elif tp is bool:
            parser.add_argument(flag, action="store_true", help=text)
        else:
            literal = next((a for a in (tp, *typing.get_args(tp)) if typing.get_origin(a) is typing.Literal), None)
            values = choices() if choices else typing.get_args(literal) if literal else None
            # A named choice (a part: `--adapter none`, or `--device`) stays a string that argparse checks, so an
            # explicit `none` is not the default and a wrong one lists the choices.
            allowed = list(values) if literal is tp else None
            convert = str if choices or allowed else functools.partial(parse_value, tp=tp, name=f.name)
            if convert is not str:
                convert.__name__ = type_name(tp)  # argparse names the type in its error message
            required = f.default is dataclasses.MISSING
            parser.add_argument(flag, type=convert, required=required, default=None if required else f.default,
                                choices=allowed, metavar="{" + ",".join(values) + "}" if values else None,
                                help=text)  # fmt: skip


def build_parser(train_options: bool = True) -> argparse.ArgumentParser:
    """The CLI's parser; ``train_options=False`` leaves out ``train``'s options, whose import (the trainer,
    transformers) takes seconds that ``--help``, ``info`` and ``bench`` do not need."""
    parser = _Parser(prog="finetune-ext", description=__doc__)
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
    b.add_argument("--device-csv", metavar="DIR", help="also append every row to DIR/<device name>.csv")
    b.add_argument("--dry-run", action="store_true", help="check the options and print the plan; time nothing")
    b.set_defaults(func=_bench, cases=None)

    t = sub.add_parser(
        "train",
        help="fine-tune a model: one stepper plus any transforms",
        description="Fine-tune a Hugging Face model with one stepper (--optimizer) plus transforms (--dropout, "
        "--adapter), each with its options (--<kind>-option KEY=VALUE), or a --method preset. Writes "
        "metrics.jsonl, curves.png, summary.json and checkpoints into --output-dir. Runs data-parallel under "
        "torchrun.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if train_options:
        from finetune_ext.train import TrainConfig, registry

        t.epilog = "parts and their options:\n" + _catalogue_text(registry)
        add_config_arguments(t, TrainConfig)
    t.add_argument("--dry-run", action="store_true",
                   help="every check the run makes before it starts (options, parts, the output folder, then the "
                   "data and model loaded and the parts applied to it), print the parts with their options "
                   "resolved, and exit: nothing is trained or written to --output-dir")  # fmt: skip
    t.set_defaults(func=_train)

    e = sub.add_parser("export", help="a run's model as a PEFT adapter folder or a merged Hugging Face model")
    e.add_argument("run_dir", help="the --output-dir of a finetune-ext train run")
    e.add_argument("--format", required=True, choices=["peft", "merged"],
                   help="peft: adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained; "
                   "merged: a full model folder (adapters merged) with its tokenizer, for AutoModel")  # fmt: skip
    e.add_argument("--output", required=True, help="folder to write (new or empty)")
    e.add_argument("--weights", choices=["best", "final"], default="best",
                   help="best-validation weights (what summary.json's test reports) or the final ones")  # fmt: skip
    e.set_defaults(func=_export)

    m = sub.add_parser("methods", help="every transform and stepper with its options, types and defaults")
    m.set_defaults(func=_methods)

    i = sub.add_parser("info", help="what was built: CUDA kernels, archs, torch version")
    i.add_argument("--check", action="store_true", help="also run every op once against its reference")
    i.set_defaults(func=_info)
    return parser


def _one_line_warnings(command: str, previous):
    """Warnings print as one line, like our errors: our run warnings (a repair or a change the run goes on with)
    as ``finetune-ext <command>: warning: ...``, any other library's with its category."""
    from finetune_ext.errors import RunWarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        kind = "" if issubclass(category, RunWarning) else f" ({category.__name__})"
        text = " ".join(str(message).split())
        print(f"finetune-ext {command}: warning{kind}: {text}", file=sys.stderr)

    return show


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``finetune-ext train: argument --device: invalid choice ...``), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def main(argv: list[str] | None = None, bench_cases: dict | None = None) -> int:
    """Run the command ``argv`` (default: the process's arguments); ``bench_cases`` replaces ``bench``'s cases
    (``benchmarks/bench.py`` adds the step-level ones). Returns the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(train_options=command == "train").parse_args(argv)
    if bench_cases is not None:
        args.cases = bench_cases
    previous = warnings.showwarning
    warnings.showwarning = _one_line_warnings(args.command, previous)
    try:
        return args.func(args)
    except ValueError as err:  # UserError and the ops' argument errors: one line, no traceback
        print(f"finetune-ext {args.command}: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous


if __name__ == "__main__":
    sys.exit(main())
