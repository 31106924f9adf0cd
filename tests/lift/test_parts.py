"""The LiFT stepper end to end on a tiny GPT-2: rounds move λ and lower the validation loss on an overfit-prone
slice, an LP without a usable point leaves weights and λ alone, bad options give one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_ext.cli import main
from finetune_ext.lift import LPResult, LPSolver
from finetune_ext.lift import parts as stepper
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"warmup_steps": 3, "rows": 16, "columns": 256, "val_batches": 2, "line_evals": 8, "lambda_init": 0.05}


def _config(out: Path, wikitext_slice, gpt2_tokenizer, model: str, **options) -> TrainConfig:
    return TrainConfig(
        model=model, tokenizer=gpt2_tokenizer, data=str(wikitext_slice), output_dir=str(out), steps=6,
        batch_size=4, lr=3e-3, block_size=32, train_samples=8, eval_every=6, save_every=6, max_eval_batches=2,
        eval_batch_size=8, progress=False, optimizer="lift", optimizer_options={**OPTIONS, **options},
    )  # fmt: skip


def _rounds(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "lift_round" in r]


def test_rounds_move_lambda_and_lower_the_validation_loss(tmp_path, wikitext_slice, gpt2_tokenizer,
                                                          gpt2_no_dropout) -> None:  # fmt: skip
    summary = train(_config(tmp_path / "run", wikitext_slice, gpt2_tokenizer, gpt2_no_dropout))
    rounds = _rounds(tmp_path / "run")
    assert [r["lift_round"] for r in rounds] == [1, 2] and all(r["lift_lp_status"] == "Optimal" for r in rounds)
    for r in rounds:
        assert r["lift_t"] > 0 and r["lift_val_after"] < r["lift_val_before"] and r["lift_evals"] <= 8
        assert (r["lift_rows"], r["lift_cols"]) == (16, 256 + 2)  # two blocks: two λ columns
    lambdas = [(r["lift_lambda_0"], r["lift_lambda_1"]) for r in rounds]
    assert lambdas[0] != (0.05, 0.05) and min(min(pair) for pair in lambdas) >= 0.0
    assert (tmp_path / "run" / "lift.png").read_bytes()[:4] == b"\x89PNG"
    frozen = [k for k in summary["config"]["parts"]["optimizer"]["options"]]
    assert "blocks" in frozen and summary["params_trainable"] < summary["params_total"]


def _ridge(p: int = 120, n: int = 150, n_val: int = 600, scale: float = 10.0):
    """A ridge regression ``f = ‖X w - y‖²/n + λ ‖w‖²/p`` with its exact minimiser ``w*(λ)``, the validation
    loss F and the λ that minimises ``F(w*(λ))`` (the closed form on a fine log grid)."""
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(p, generator=g, dtype=torch.float64)
    X, Xv = (scale * torch.randn(m, p, generator=g, dtype=torch.float64) for m in (n, n_val))
    y, yv = (A @ w_true + 2 * scale * torch.randn(len(A), generator=g, dtype=torch.float64) for A in (X, Xv))
    eye = torch.eye(p, dtype=torch.float64)

    def hessian(lam: float) -> torch.Tensor:
        return 2 * X.T @ X / n + 2 * lam / p * eye

    def w_star(lam: float) -> torch.Tensor:
        return torch.linalg.solve(hessian(lam), 2 * X.T @ y / n)

    def F(w: torch.Tensor) -> float:
        return float(((Xv @ w - yv) ** 2).mean())

    grid = torch.logspace(-2, 6, 321, dtype=torch.float64).tolist()
    best = min(grid, key=lambda lam: F(w_star(lam)))
    return hessian, w_star, F, (lambda w: 2 * Xv.T @ (Xv @ w - yv) / n_val), best


@pytest.mark.parametrize("start", [0.01, 100.0])
def test_lambda_moves_to_the_validation_optimum_of_a_ridge_regression(start: float) -> None:
    """LiFT's round on a problem with a known answer: the lower level solved exactly each round (what the warm-up
    approximates), the LP over every coordinate and log λ with the stepper's balanced columns, the golden-section
    search on F, then the stepper's λ update. From 100x too small and 100x too large, λ ends within 10 % of the
    validation-optimal λ*, and F at the end is F(w*(λ*))."""
    from finetune_ext.lift.rows import FlatParams, log_lambda_columns, step_log_lambda
    from finetune_ext.lift.search import golden_section

    hessian, w_star, F, grad_F, lam_opt = _ridge()
    p = hessian(1.0).shape[0]
    flat = FlatParams([[torch.nn.Parameter(torch.zeros(1, p, dtype=torch.float64))]])  # one λ block, N = p
    lam, rows, solver = torch.tensor([start * lam_opt], dtype=torch.float64), torch.arange(p), LPSolver()
    for _ in range(6):
        w0 = w_star(float(lam[0]))
        H = hessian(float(lam[0]))
        columns, unit = log_lambda_columns(flat, w0, rows, lam, float(H.abs().max()))
        result = solver.solve(torch.cat([grad_F(w0), torch.zeros(1, dtype=torch.float64)]), torch.cat([H, columns], 1),
                              1e-4, 1.0)  # fmt: skip
        d = torch.as_tensor(result.d) / torch.as_tensor(result.d).norm()
        t = golden_section(lambda t, w0=w0, d=d: F(w0 + t * d[:p]), first=0.1, tol=1e-4, max_evals=25).t
        lam = step_log_lambda(lam, t * d[p:], unit, cap=2.302585)
    assert abs(float(torch.log(lam[0] / lam_opt))) < 0.1
    assert F(w_star(float(lam[0]))) == pytest.approx(F(w_star(lam_opt)), rel=1e-3)


@pytest.mark.parametrize("mode", ["step", "mean"])
def test_sr1_records_are_single_steps_or_means_since_the_last_record(mode: str) -> None:
    from finetune_ext.lift.rows import FlatParams

    lift = stepper.LiFT(stepper.LiFTOptions(warmup_steps=6, pairs=2, pair_gradients=mode))  # a record every 2 steps
    param = torch.nn.Parameter(torch.zeros(2, 2))
    lift.flat, lift.records, lift.pending = FlatParams([[param]]), [], None
    for offset in range(6):
        with torch.no_grad():
            param.fill_(float(offset))
        param.grad = torch.full((2, 2), 10.0 * offset)
        lift._record(offset)
    got = [(float(w[0]), float(g[0])) for w, g in lift.records]
    expected = [(0.0, 0.0), (2.0, 20.0), (4.0, 40.0)] if mode == "step" else [(0.5, 5.0), (2.5, 25.0), (4.5, 45.0)]
    assert got == expected


def test_an_unusable_lp_leaves_weights_and_lambda_unchanged(tmp_path, wikitext_slice, gpt2_tokenizer,
                                                            gpt2_no_dropout, monkeypatch) -> None:  # fmt: skip
    moved: list[dict] = []
    monkeypatch.setattr(
        LPSolver, "solve", lambda self, *a, **k: LPResult(None, float("nan"), "Time limit reached", 1.0)
    )
    original = __import__("finetune_ext.lift.parts", fromlist=["LiFT"]).LiFT._move
    monkeypatch.setattr("finetune_ext.lift.parts.LiFT._move", lambda self, *a: moved.append(1) or original(self, *a))
    train(_config(tmp_path / "run", wikitext_slice, gpt2_tokenizer, gpt2_no_dropout, warmup_steps=6))
    (entry,) = _rounds(tmp_path / "run")
    assert entry["lift_lp_status"] == "Time limit reached" and "lift_t" not in entry and moved == []
    assert (entry["lift_lambda_0"], entry["lift_lambda_1"]) == (0.05, 0.05)


def test_the_round_applies_exactly_the_searched_step(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout):
    """Weights after a round = weights before + t* d on the chosen columns only (others untouched)."""
    seen = {}
    original = stepper.LiFT._move

    def spy(self, d, J, w0, batches):
        out = original(self, d, J, w0, batches)
        seen.update(w0=w0, w1=self.flat.values(), J=J, t=out["lift_t"], d=d / d.norm())
        return out

    cfg = _config(tmp_path / "run", wikitext_slice, gpt2_tokenizer, gpt2_no_dropout, warmup_steps=6)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stepper.LiFT, "_move", spy)
        train(cfg)
    step = seen["w1"] - seen["w0"]
    outside = torch.ones_like(step, dtype=torch.bool)
    outside[seen["J"]] = False
    assert torch.equal(step[outside], torch.zeros_like(step[outside]))
    expected = seen["t"] * seen["d"][: len(seen["J"])]
    scale = seen["w0"].abs().max().item()  # the weights are float32: their rounding is relative to their size
    torch.testing.assert_close(step[seen["J"]], expected, **tolerance(torch.float32, scale))


def test_the_sign_control_steps_along_minus_the_sign_of_the_validation_gradient_without_an_lp(
    tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout, monkeypatch
) -> None:
    seen = {}
    original_gradient, original_move = stepper.LiFT._val_gradient, stepper.LiFT._move
    monkeypatch.setattr(LPSolver, "solve", lambda *a, **k: pytest.fail("direction=sign must not solve an LP"))
    monkeypatch.setattr(stepper.LiFT, "_val_gradient", lambda self, b: seen.setdefault("g", original_gradient(self, b)))
    monkeypatch.setattr(
        stepper.LiFT, "_move", lambda self, d, J, *a: seen.update(d=d, J=J) or original_move(self, d, J, *a)
    )
    train(_config(tmp_path / "run", wikitext_slice, gpt2_tokenizer, gpt2_no_dropout, warmup_steps=6, direction="sign"))
    (entry,) = _rounds(tmp_path / "run")
    J = torch.topk(seen["g"].abs(), OPTIONS["columns"]).indices.sort().values
    assert torch.equal(seen["J"], J) and torch.equal(seen["d"][: len(J)], -seen["g"][J].sign())
    assert not seen["d"][len(J) :].any() and (entry["lift_lambda_0"], entry["lift_lambda_1"]) == (0.05, 0.05)
    assert "lift_lp_status" not in entry and entry["lift_t"] > 0


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("blocks=7", "blocks: no layer [7]; the model has 0..1"),
        ("blocks=last:3", "blocks: expected last:1..last:2, got 'last:3'"),
        ("columns=100000000", "columns: expected <= "),
        ("rows=100000000", "rows: expected <= "),
        ("delta=0", "delta: expected > 0, got 0.0"),
        ("curvature=exact", "curvature: expected one of 'sr1', 'hvp', got 'exact'"),
        ("val_skip=100000", "val_skip: the validation split has "),
    ],
)
def test_bad_options_give_one_line(option, message, tmp_path, wikitext_slice, gpt2_tokenizer, capsys) -> None:
    args = ["train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
            "--optimizer", "lift", "--optimizer-option", option, "--output-dir", str(tmp_path / "run"), "--steps", "1",
            "--block-size", "32", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_two_gloo_processes_match_one(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout) -> None:
    """Gradients and validation quantities reduce across ranks, the LP runs on rank 0: the same run. Eight
    line-search evaluations: a longer golden-section search ends among points whose validation losses tie to
    float32 rounding, where the one- and two-process sums pick different ones."""
    args = [
        "train", "--model", gpt2_no_dropout, "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--optimizer", "lift", "--optimizer-option", "warmup_steps=2", "--optimizer-option", "rows=16",
        "--optimizer-option", "columns=256", "--optimizer-option", "val_batches=2",
        "--optimizer-option", "line_evals=8", "--steps", "4", "--batch-size", "8", "--lr", "1e-3", "--block-size",
        "32", "--eval-every", "4", "--save-every", "4", "--max-eval-batches", "2", "--eval-batch-size", "8",
        "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = {
        "one": [sys.executable, "-m", "finetune_ext.cli"],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "finetune_ext.cli"],
    }  # fmt: skip
    for name, prefix in launch.items():
        res = subprocess.run([*prefix, *args, "--output-dir", str(tmp_path / name)], env=env, capture_output=True,
                             text=True, timeout=600, check=False)  # fmt: skip
        assert res.returncode == 0, res.stderr[-6000:]
    one, two = (load_file(str(tmp_path / n / "checkpoint-0000004" / "model.safetensors")) for n in ("one", "two"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], **tolerance(torch.float32), msg=key)
    rounds = [[(r["lift_lp_status"], r["lift_lambda_0"]) for r in _rounds(tmp_path / n)] for n in ("one", "two")]
    assert [s for s, _ in rounds[0]] == [s for s, _ in rounds[1]] == ["Optimal", "Optimal"]
    assert [lam for _, lam in rounds[1]] == pytest.approx([lam for _, lam in rounds[0]], rel=1e-5)


# A CLI run that stalls once its step-3 checkpoint (after LiFT's first round) is written, so the test can kill it.
_STALL_AFTER_SAVE = """
import sys, time
from finetune_ext.train import trainer
from finetune_ext.cli import main
save = trainer._save
def stalled(run):
    save(run)
    if run.step == 3:
        print("saved", flush=True)
        time.sleep(600)
trainer._save = stalled
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_between_rounds_then_resume_equals_the_uninterrupted_run(
    tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout
) -> None:
    args = [
        "train", "--model", gpt2_no_dropout, "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--optimizer", "lift", *[f"--optimizer-option={k}={v}" for k, v in OPTIONS.items()], "--steps", "6",
        "--batch-size", "4", "--lr", "3e-3", "--block-size", "32", "--train-samples", "8", "--eval-every", "3",
        "--save-every", "3", "--max-eval-batches", "2", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    res = subprocess.run([sys.executable, "-m", "finetune_ext.cli", *args, "--output-dir", str(whole)], env=env,
                         capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    proc = subprocess.Popen([sys.executable, "-c", _STALL_AFTER_SAVE, *args, "--output-dir", str(killed)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "saved"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL and [r["lift_round"] for r in _rounds(killed)] == [1]
    res = subprocess.run([sys.executable, "-m", "finetune_ext.cli", *args, "--output-dir", str(killed), "--resume"],
                         env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = (load_file(str(o / "checkpoint-0000006" / "model.safetensors")) for o in (whole, killed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if not k.endswith(("_ms", "_seconds"))} for r in _rounds(o)]
               for o in (whole, killed)]  # fmt: skip
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
