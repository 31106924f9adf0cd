"""benchmarks/gpu_run.sh, the one prepared call for a lent GPU, stays runnable: its dry run on this CPU machine
checks every command and option it would call."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _dry_run(out: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_run.sh")], env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def test_gpu_run_dry_run_passes(tmp_path, monkeypatch) -> None:
    done = _dry_run(tmp_path)
    log = (tmp_path / "gpu.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert log.count("== ") == 8 and ": exit" not in log
    assert "would time " in log and "on cuda in torch.bfloat16" in log
    assert "trainer_step: would time ours, peft, peft-patched on config:gpt2-small" in log
    assert "memory_step: would time fp32, bf16, bf16-ckpt for ours, peft on config:gpt2-small, cpu" in log
    assert "memory_step: would time bf16, nf4 for ours, peft on config:llama-1b, cpu" in log
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its cases as a sibling
    from bench import CASES

    planned = log.split("would time ", 1)[1].split(" on cuda", 1)[0].split(", ")
    assert sorted(planned) == sorted(CASES)  # the script lists its ops in priority order: every one of them
    assert "collected" in log  # pytest: the cuda tests collect
    assert "### lora: " in log and "### ggpo: " in log and "Self CPU" in log  # the profile of a step
    assert "cpu torch raised:" in log and "cpu finetune_ext raised: armijo_moments_: block_of[0] = 5" in log


def test_gpu_run_stops_when_the_kernels_do_not_load(tmp_path) -> None:
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["finetune_ext._C"] = None\n')
    done = _dry_run(tmp_path, PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    log = (tmp_path / "gpu.log").read_text()
    assert done.returncode == 1, log[-3000:]
    assert "no kernels for cpu loaded" in log and "== stopping: the build failed" in log
    assert "cuda tests" not in log and "benchmarks" not in log  # nothing after the build ran


def test_gpu_run_rejects_an_unknown_op(tmp_path) -> None:
    done = _dry_run(tmp_path, OPS="fisher_dropout fisher_dropuot")
    assert done.returncode == 2
    assert "OPS: unknown op 'fisher_dropuot'; expected some of:" in done.stderr and "lora_linear" in done.stderr
