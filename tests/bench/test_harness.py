"""The benchmark harness end to end on a tiny sweep: rows, CSV, table, plot, and the CLI's errors."""

from __future__ import annotations

import csv
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.cases import ggpo_step, lift_rows, lp_direction
from finetune_ext import bench
from finetune_ext.bench.harness import CSV_FIELDS, Case, run_rounds, time_ms
from finetune_ext.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_run_writes_rows_csv_table_and_plot(tmp_path) -> None:
    cases = bench.OPS["fisher_dropout"](torch.device("cpu"), torch.float32, [4096, 8192], ["reference", "ext"])
    rows = bench.run(cases, warmup=1, reps=20, progress=False)
    assert {(r.provider, r.mode) for r in rows} == {(p, m) for p in ("reference", "ext") for m in ("fwd", "bwd")}
    assert all(r.median_ms > 0 and r.p20_ms <= r.median_ms <= r.p80_ms for r in rows)
    fwd = next(r for r in rows if r.provider == "ext" and r.mode == "fwd" and r.numel == 8192)
    # x read + y written + 1024 keep probabilities, at the measured median.
    assert fwd.gb_per_s == pytest.approx((2 * 8192 * 4 + 1024 * 4) / (fwd.median_ms * 1e-3) / 1e9)

    path = tmp_path / "out.csv"
    bench.append_csv(rows, path)
    bench.append_csv(rows[:1], path)
    with path.open() as f:
        written = list(csv.DictReader(f))
    assert list(written[0]) == CSV_FIELDS and len(written) == len(rows) + 1
    assert written[0]["device"] == "cpu" and written[0]["commit"]

    table = bench.format_table(rows)
    assert "ext" in table and "reference" in table and "1.00x" in table
    (png,) = bench.plot_speedup(rows, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_too_few_reps_is_refused() -> None:
    with pytest.raises(ValueError, match="reps: expected at least 20 timed runs, got 5"):
        bench.run([], reps=5)


def test_cli_bench_and_errors(tmp_path, capsys) -> None:
    args = ["bench", "--ops", "fisher_dropout", "--device", "cpu", "--sizes", "2048", "--providers", "reference", "ext"]
    args += ["--out", str(tmp_path), "--device-csv", str(tmp_path / "by-device")]
    assert main(args) == 0
    assert "fisher_dropout" in capsys.readouterr().out
    assert (tmp_path / "fisher_dropout_cpu.csv").exists() and (tmp_path / "fisher_dropout_cpu.png").exists()
    (device_csv,) = (tmp_path / "by-device").iterdir()  # every row again, in one file named after the device
    assert device_csv.read_text() == (tmp_path / "fisher_dropout_cpu.csv").read_text()
    assert main(["bench", "--device", "cpu", "--sizes", "2048", "--providers", "nope", "--out", str(tmp_path)]) == 2
    assert "providers: unknown ['nope']" in capsys.readouterr().err
    bad_options = [
        (["--ops", "nope"], "ops: unknown op(s) ['nope']"),
        (["--sizes", "0"], "sizes: expected"),
        (["--device", "tpu"], "device: expected auto, cpu, cuda or cuda:N, got 'tpu'"),
        (["--reps", "0"], "reps: expected integers >= 1"),
    ]
    for bad, message in bad_options:
        assert main(["bench", *bad, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_lora_linear_cases_include_peft_when_installed() -> None:
    """Every lora_linear provider runs forward + backward; PEFT's layer joins when peft is importable."""
    pytest.importorskip("peft")
    cases = list(bench.OPS["lora_linear"](torch.device("cpu"), torch.float32, [768 * 4], None))
    assert {c.provider for c in cases} == {"reference", "lora", "ext", "ext-lora", "merged", "peft"}
    for case in cases:
        grads = case.fn()
        assert grads[0].shape == (4, 768) and all(torch.isfinite(g).all() for g in grads), case.provider
        if case.provider == "peft":
            assert len(grads) == 3  # gradients of x, lora_A, lora_B


def test_lift_rows_cases_give_rows_of_the_right_shape_and_no_speedup_plot(tmp_path) -> None:
    cases = {c.provider: c for c in lift_rows.cases(torch.device("cpu"), torch.float32, [], None)}
    assert set(cases) == {"gradient", "hvp", "sr1-build", "sr1"}
    assert tuple(cases["hvp"].fn().shape) == cases["hvp"].shape  # 16 rows over the block's parameters
    assert tuple(cases["sr1"].fn().shape) == (16, 20000)  # 16 rows on the LP's columns
    rows = bench.run([cases["sr1"]], warmup=0, reps=20, progress=False)
    assert bench.plot_speedup(rows, tmp_path) == []  # no reference provider: nothing to plot


def test_ggpo_step_cases_run_every_provider() -> None:
    cases = list(ggpo_step.cases(torch.device("cpu"), torch.float32, [], None))
    assert [c.provider for c in cases] == ["lora", "ggpo", "flat-lora", "naive"]
    losses = {c.provider: [c.fn() for _ in range(2)] for c in cases}
    assert all(math.isfinite(v) for values in losses.values() for v in values)
    assert losses["ggpo"][0] != losses["lora"][0] != losses["flat-lora"][0]  # the noise changes the loss


def test_lp_direction_cases_solve_one_lp_with_every_provider_silently(capfd) -> None:
    cases = list(lp_direction.cases(torch.device("cpu"), torch.float64, [], None, shape=(16, 400)))
    assert [c.provider for c in cases] == ["reference", "ipm", "ipm-nocrossover", "simplex", "scipy", "ours",
                                           "ours-sifted"]  # fmt: skip
    assert all(c.fn() == "Optimal" and c.shape == (16, 402) for c in cases)
    assert capfd.readouterr().out == ""  # HiGHS prints a banner from its constructor unless silenced


def test_time_ms_calls_a_slow_function_once_per_block_and_times_it() -> None:
    calls = []
    times = time_ms(lambda: (calls.append(1), time.sleep(0.005)), torch.device("cpu"), warmup=2, reps=3)
    assert len(calls) == 2 + 1 + 3  # warm-ups, the probe that sizes the blocks, one call per block
    assert len(times) == 3 and all(5.0 <= t < 50.0 for t in times)


def test_run_rounds_times_every_case_once_per_round_in_turn(tmp_path) -> None:
    calls: list[str] = []
    cases = [
        Case("op", "mode", name, (2,), torch.float32, torch.device("cpu"), 0, lambda name=name: calls.append(name))
        for name in ("a", "b")
    ]
    rows, times = run_rounds(cases, "full", warmup=1, reps=3, out=tmp_path / "rows.csv")
    assert calls[-6:] == ["a", "b"] * 3 and calls[:2] == ["a", "b"]  # warm-ups first, then rounds
    assert [r.provider for r in rows] == ["a", "b"] and {r.mode for r in rows} == {"full"}
    assert all(len(t) == 3 and all(x > 0 for x in t) for t in times.values())
    with (tmp_path / "rows.csv").open() as f:
        assert [r["provider"] for r in csv.DictReader(f)] == ["a", "b"]


def test_gaussian_perturb_cases_ext_is_the_reference() -> None:
    cases = {c.provider: c for c in bench.OPS["gaussian_perturb"](torch.device("cpu"), torch.float32, [768 * 8], None)}
    assert set(cases) == {"reference", "eager", "ext"}
    assert torch.equal(cases["ext"].fn(), cases["reference"].fn())
    assert cases["eager"].fn().shape == (768, 8)


def test_bench_prints_only_our_output(tmp_path) -> None:
    """No transformers configuration notes, torch import notices or autograd warnings reach the user."""
    args = ["--ops", "armijo_step", "--device", "cpu", "--providers", "adamw-fused", "--warmup", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench.py"), *args, "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    chatter = [line for line in re.split(r"[\r\n]", done.stderr) if line.strip() and not line.startswith("bench: ")]
    assert chatter == []
    assert "armijo_step" in done.stdout


def test_curvature_keeps_torch_internal_notices_out() -> None:
    """Forward-mode AD loads torch's decompositions through the deprecated torch.jit.script on first use."""
    code = (
        "import torch; from finetune_ext import curvature; w = torch.randn(3, requires_grad=True); "
        "curvature.hvp(lambda p: (p[0] ** 3).sum(), (w,), (torch.randn(2, 3),))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "jit.script" not in done.stderr, done.stderr
