"""Where a LoRA-GGPO step's time goes against plain LoRA's: the host time of a step and torch.profiler's top
operators, by host (self CPU) time and by device time, for each provider of the ``ggpo_step`` benchmark.

    python benchmarks/profile_ggpo_step.py [--device cuda] [--steps 3] [--top 12]

On the H200 (run 3) ggpo took 1.15x of lora's step and no kernel of ours was large enough to explain it: the GPU
script runs this after the ``ggpo_step`` benchmark so that the next run says where the difference is. CPU: the
benchmark's small GPT-2, fp32; CUDA: GPT-2 small at 8 x 256 in bf16 autocast, as the benchmark.
"""

import argparse
import time
from collections.abc import Callable

import torch
from cases.ggpo_step import PROVIDERS, cases
from torch.profiler import ProfilerActivity, profile


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_operator(name: str) -> bool:
    return name.startswith(("aten::", "finetune_ext::"))


def _is_launch(name: str) -> bool:
    return name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def _count(prof: profile, kind: Callable[[str], bool]) -> int:
    """Profiled events of one kind: on a host-bound GPU step, time goes with operator calls and launches."""
    return sum(1 for event in prof.events() if kind(event.name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--providers", nargs="+", default=["lora", "ggpo"], choices=list(PROVIDERS))
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per provider (after 2 warm-up steps)")
    parser.add_argument("--top", type=int, default=12, help="operators listed per table")
    args = parser.parse_args()
    for name in ("steps", "top"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda requested but no CUDA device is available")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for case in cases(device, dtype, [], args.providers):
        for _ in range(2):
            case.fn()
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            case.fn()
        _sync(device)
        step_ms = (time.perf_counter() - start) / args.steps * 1e3
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                case.fn()
            _sync(device)
        print(f"\n### {case.provider}: {step_ms:.1f} ms a step (mean of {args.steps}, unprofiled), shape {case.shape}")
        print(
            f"operator calls a step: {_count(prof, _is_operator) / args.steps:.0f}; kernel launches a step: "
            f"{_count(prof, _is_launch) / args.steps:.0f}"
        )
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.top))
        if device.type == "cuda":
            print(table.table(sort_by="self_device_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
