"""Benchmark harness shared by every op: time providers over a sweep, write long-format CSV, table and plots.

Timing: ``warmup`` untimed calls, then ``reps`` timed blocks of back-to-back calls (synchronised at the block
ends on GPU, garbage collection off, as ``timeit`` does); we report the median and the 20th/80th percentiles of
the per-call times. ``torch.utils.benchmark.Timer`` is not used: each of its ``timeit`` calls adds at least two
warm-up calls, which triples the time of cases that take one call a block. Peak memory is the CUDA allocator's
peak during the timed calls above what was allocated before; on CPU it is not measured (left empty).
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

BLOCK_S = 2e-3  # a timed block lasts about this long
CSV_FIELDS = [
    "op", "mode", "provider", "shape", "numel", "dtype", "device", "device_name",
    "median_ms", "p20_ms", "p80_ms", "gb_per_s", "peak_mb", "commit", "timestamp",
]  # fmt: skip


@dataclass
class Case:
    """One timed call: ``fn()`` of ``provider`` moving ``useful_bytes`` (each input read, output written once)."""

    op: str
    mode: str
    provider: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    useful_bytes: int
    fn: Callable[[], object]


@dataclass
class Row:
    op: str
    mode: str
    provider: str
    shape: str
    numel: int
    dtype: str
    device: str
    device_name: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    gb_per_s: float
    peak_mb: float | None
    commit: str
    timestamp: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def select_providers(available: dict[str, Callable], wanted: list[str] | None) -> dict[str, Callable]:
    """The providers to run, in ``available``'s order when ``wanted`` is ``None``; unknown names are an error."""
    if wanted is None:
        return available
    unknown = set(wanted) - set(available)
    if unknown:
        raise ValueError(f"providers: unknown {sorted(unknown)}, expected some of {sorted(available)}")
    return {name: available[name] for name in wanted}


def device_name(device: torch.device) -> str:
    """Marketing name of the GPU, or the CPU model with its thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> list[float]:
    """Milliseconds per call in each of ``reps`` blocks, after ``warmup`` calls.

    A block runs enough calls to last about ``BLOCK_S`` (one call for slow ones) and is synchronised with CUDA
    at its ends, so launch overhead and host-device syncs do not dominate short kernels.
    """
    for _ in range(warmup):
        fn()
    number = max(1, int(BLOCK_S * 1e3 / max(block_ms(fn, device, 1), 1e-6)))
    return [block_ms(fn, device, number) for _ in range(reps)]


def block_ms(fn: Callable[[], object], device: torch.device, number: int) -> float:
    """Milliseconds per call over ``number`` back-to-back calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    collecting = gc.isenabled()
    gc.disable()
    try:
        sync(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        sync(device)
        return (time.perf_counter() - start) * 1e3 / number
    finally:
        if collecting:
            gc.enable()


def measure(case: Case, warmup: int, reps: int, commit: str) -> Row:
    """Time one case and return its CSV row."""
    peak_mb = None
    if case.device.type == "cuda":
        torch.cuda.synchronize(case.device)
        base = torch.cuda.memory_allocated(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
    times = time_ms(case.fn, case.device, warmup, reps)
    if case.device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(case.device) - base) / 2**20
    return row_of(case, times, commit, peak_mb)


def row_of(case: Case, times: list[float], commit: str, peak_mb: float | None = None) -> Row:
    """The CSV row of a case timed ``times`` (ms per call)."""
    median = statistics.median(times)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [median] * 4
    return Row(
        op=case.op,
        mode=case.mode,
        provider=case.provider,
        shape="x".join(map(str, case.shape)),
        numel=int(torch.Size(case.shape).numel()),
        dtype=str(case.dtype).removeprefix("torch."),
        device=case.device.type,
        device_name=device_name(case.device),
        median_ms=median,
        p20_ms=q[0],
        p80_ms=q[3],
        gb_per_s=case.useful_bytes / (median * 1e-3) / 1e9,
        peak_mb=peak_mb,
        commit=commit,
    )


def run(
    cases: Iterable[Case], warmup: int = 5, reps: int = 20, total: int | None = None, progress: bool = True
) -> list[Row]:
    """Measure every case (a progress bar on stderr) and return the rows.

    Cases are consumed lazily so that each size's tensors are freed before the next size is built.
    """
    from tqdm.auto import tqdm

    if reps < 20:
        raise ValueError(f"reps: expected at least 20 timed runs, got {reps}")
    commit = git_commit()
    return [measure(c, warmup, reps, commit) for c in tqdm(cases, desc="bench", total=total, disable=not progress)]


def run_full_size(cases: Iterable[Case], mode: str, warmup: int, reps: int, out: Path) -> list[Row]:
    """Time cases that take seconds each (few reps, mode renamed to ``mode``), print each row as it lands, append
    them to ``out`` and return them: the body of the ``benchmarks/*.py`` full-size scripts."""
    commit = git_commit()
    rows = []
    for case in cases:
        case.mode = mode
        rows.append(measure(case, warmup=warmup, reps=reps, commit=commit))
        print(format_table(rows[-1:]), flush=True)
    print(format_table(rows))
    append_csv(rows, out)
    return rows


def run_rounds(
    cases: list[Case], mode: str, warmup: int, reps: int, out: Path
) -> tuple[list[Row], dict[str, list[float]]]:
    """Time cases that take seconds each in ``reps`` rounds, each case once per round in turn, so that a slow
    spell of a shared machine falls on every case alike; append the rows to ``out``. Returns the rows and each
    provider's times by round, for ratios paired within a round."""
    commit = git_commit()
    for case in cases:
        case.mode = mode
        for _ in range(warmup):
            case.fn()
    times: dict[str, list[float]] = {case.provider: [] for case in cases}
    for _ in range(reps):
        for case in cases:
            times[case.provider].append(block_ms(case.fn, case.device, 1))
    rows = [row_of(case, times[case.provider], commit) for case in cases]
    print(format_table(rows))
    append_csv(rows, out)
    return rows, times


def append_csv(rows: list[Row], path: Path) -> None:
    """Append rows to a long-format CSV (header written once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.5g}" if isinstance(v, float) else v) for k, v in asdict(row).items()})


def format_table(rows: list[Row]) -> str:
    """A plain-text table, one line per row, with the speedup over the ``reference`` provider."""
    ref = {(r.op, r.mode, r.shape, r.dtype): r.median_ms for r in rows if r.provider == "reference"}
    names = ("op", "mode", "shape", "dtype", "provider")
    text = [[str(getattr(r, n)) for n in names] for r in rows]
    widths = [max([len(n), *(len(t[i]) for t in text)]) + 2 for i, n in enumerate(names)]
    header = "".join(n.ljust(w) for n, w in zip(names, widths, strict=True))
    header += f"{'ms':>10}{'GB/s':>10}{'peak MB':>9}{'vs ref':>8}"
    lines = [header, "-" * len(header)]
    for r, t in zip(rows, text, strict=True):
        base = ref.get((r.op, r.mode, r.shape, r.dtype))
        speed = f"{base / r.median_ms:.2f}x" if base else "-"
        peak = f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-"
        lines.append(
            "".join(v.ljust(w) for v, w in zip(t, widths, strict=True))
            + f"{r.median_ms:>10.4f}{r.gb_per_s:>10.1f}{peak:>9}{speed:>8}"
        )
    return "\n".join(lines)


def plot_speedup(rows: list[Row], out_dir: Path) -> list[Path]:
    """One PNG per op: speedup over ``reference`` against the number of elements, one line per provider/mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for op in sorted({r.op for r in rows}):
        op_rows = [r for r in rows if r.op == op]
        ref = {(r.mode, r.numel, r.dtype): r.median_ms for r in op_rows if r.provider == "reference"}
        if not ref:
            continue  # nothing to be faster than (lift_rows: its unit is one gradient, read from the table)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for mode, provider, dtype in sorted(
            {(r.mode, r.provider, r.dtype) for r in op_rows if r.provider != "reference"}
        ):
            pts = sorted(
                (r.numel, ref[(mode, r.numel, dtype)] / r.median_ms)
                for r in op_rows
                if (r.mode, r.provider, r.dtype) == (mode, provider, dtype) and (mode, r.numel, dtype) in ref
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{provider} {mode} {dtype}")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements")
        ax.set_ylabel("speedup over reference")
        ax.set_title(f"{op} on {op_rows[0].device_name}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{op}_{op_rows[0].device}.png"
        out_dir.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
