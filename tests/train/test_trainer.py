"""The training loop end to end on tiny models and real data slices."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_ext.optim.parts import AdamW, Armijo, warmup_linear_decay
from finetune_ext.testing import tolerance
from finetune_ext.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]


def _records(out: Path, split: str) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / (out / "latest").read_text().strip() / "model.safetensors"))


def test_gpt2_on_wikitext_loss_falls(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    cfg = TrainConfig(
        model="config:gpt2-tiny",
        tokenizer=gpt2_tokenizer,
        data=str(wikitext_slice),
        output_dir=str(tmp_path / "run"),
        steps=30,
        batch_size=8,
        lr=2e-3,
        block_size=64,
        eval_every=10,
        save_every=15,
        progress=False,
    )
    summary = train(cfg)
    out = Path(cfg.output_dir)
    train_loss = [r["loss"] for r in _records(out, "train")]
    val = _records(out, "val")
    assert len(train_loss) == 30 and [r["step"] for r in val] == [10, 20, 30]
    assert sum(train_loss[-5:]) / 5 < sum(train_loss[:5]) / 5 - 0.5
    assert val[-1]["loss"] < val[0]["loss"]
    assert summary["test"]["ppl"] == pytest.approx(math.exp(summary["test"]["loss"]))
    assert summary["best_val"] == {"metric": "loss", "value": val[-1]["loss"], "step": 30}
    assert summary["params_trainable"] == summary["params_total"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-0000015", "checkpoint-0000030"]


def test_bert_on_sst2_loss_falls(tmp_path, sst2_slice, gpt2_tokenizer) -> None:
    cfg = TrainConfig(
        model="config:bert-tiny",
        tokenizer=gpt2_tokenizer,
        data=str(sst2_slice),
        output_dir=str(tmp_path / "run"),
        steps=40,
        batch_size=16,
        lr=1e-3,
        max_length=48,
        val_size=100,
        eval_every=20,
        save_every=40,
        progress=False,
    )
    summary = train(cfg)
    train_loss = [r["loss"] for r in _records(Path(cfg.output_dir), "train")]
    assert sum(train_loss[-8:]) / 8 < sum(train_loss[:8]) / 8
    assert 0.0 <= summary["test"]["acc"] <= 1.0 and "ppl" not in summary["test"]
    val = _records(Path(cfg.output_dir), "val")
    best = max(val, key=lambda r: (r["acc"], -r["step"]))
    assert summary["best_val"] == {"metric": "acc", "value": best["acc"], "step": best["step"]}


def _interrupt_during_call(monkeypatch, stepper: type, at: list[int]) -> None:
    """``stepper.step`` sends SIGINT to this process during step number ``at[0]`` (0: never), as Ctrl-C would."""
    step = stepper.step

    def interrupting(self, ctx):
        if ctx.step + 1 == at[0]:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, ctx)

    monkeypatch.setattr(stepper, "step", interrupting)


@pytest.mark.parametrize(
    ("stepper", "options", "changed"),
    [(AdamW, {}, None), (Armijo, {"init_step_size": 0.01}, {"init_step_size": 0.02})],
)
def test_interrupted_and_resumed_run_equals_uninterrupted(
    stepper, options, changed, tmp_path, wikitext_slice, gpt2_tokenizer, monkeypatch
) -> None:
    at = [0]
    _interrupt_during_call(monkeypatch, stepper, at)
    run = dict(
        model="config:gpt2-tiny",  # dropout on: the masks must be keyed by the step
        tokenizer=gpt2_tokenizer,
        data=str(wikitext_slice),
        optimizer=stepper.name,
        optimizer_options=options,
        steps=6,
        batch_size=4,
        grad_accum=2,
        lr=1e-3,
        warmup_steps=2,
        block_size=32,
        eval_every=2,
        save_every=5,
        max_eval_batches=2,
        eval_batch_size=8,
        progress=False,
    )
    whole = tmp_path / "whole"
    train(TrainConfig(**run, output_dir=str(whole)))

    parts = tmp_path / "parts"
    at[0] = 3
    with pytest.raises(KeyboardInterrupt, match="interrupted after step 3"):
        train(TrainConfig(**run, output_dir=str(parts)))
    at[0] = 0
    assert (parts / "latest").read_text() == "checkpoint-0000003"
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(TrainConfig(**run, output_dir=str(parts)))
    with pytest.raises(ValueError, match=r"resume: changed since the checkpoint's run: seed: 0 -> 1;"):
        train(TrainConfig(**{**run, "seed": 1}, output_dir=str(parts), resume=True))
    if changed is not None:
        with pytest.raises(ValueError, match=r"resume: changed since .*: optimizer.init_step_size: 0.01 -> 0.02;"):
            train(TrainConfig(**{**run, "optimizer_options": changed}, output_dir=str(parts), resume=True))
    train(TrainConfig(**run, output_dir=str(parts), resume=True))
    _assert_same_run(whole, parts)


def _assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical final weights, train records (but for the timing) and validation losses."""
    wa, wb = _final_weights(a), _final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    untimed = [[{k: v for k, v in r.items() if k != "step_ms"} for r in _records(o, "train")] for o in (a, b)]
    assert untimed[0] == untimed[1]
    assert [r["loss"] for r in _records(a, "val")] == [r["loss"] for r in _records(b, "val")]


def test_two_gloo_processes_match_one(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout) -> None:
    args = [
        "train", "--model", gpt2_no_dropout, "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--steps", "4", "--batch-size", "8", "--grad-accum", "2", "--lr", "1e-3", "--block-size", "32",
        "--eval-every", "2", "--save-every", "4", "--device", "cpu", "--no-progress", "--max-eval-batches", "2",
        "--eval-batch-size", "8",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "finetune_ext.cli", *args, "--output-dir", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*launcher, "-m", "finetune_ext.cli", *args, "--output-dir", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-6000:]
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    a, b = _final_weights(tmp_path / "one"), _final_weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=key)
    loss_one = [r["loss"] for r in _records(tmp_path / "one", "train")]
    loss_two = [r["loss"] for r in _records(tmp_path / "two", "train")]
    assert loss_two == pytest.approx(loss_one, rel=1e-5)


def test_gradient_accumulation_matches_one_big_batch(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout):
    base = dict(model=gpt2_no_dropout, tokenizer=gpt2_tokenizer, data=str(wikitext_slice), steps=3, batch_size=8)
    base |= dict(lr=1e-3, block_size=32, eval_every=3, max_eval_batches=1, progress=False)
    train(TrainConfig(**base, grad_accum=1, output_dir=str(tmp_path / "a")))
    train(TrainConfig(**base, grad_accum=4, output_dir=str(tmp_path / "b")))
    a, b = _final_weights(tmp_path / "a"), _final_weights(tmp_path / "b")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=key)


def test_linear_schedule() -> None:
    f = warmup_linear_decay(warmup_steps=4, total_steps=10)
    assert [f(s) for s in range(10)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
