"""``finetune-ext train`` from the command line: help, a run, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_ext.cli import build_parser, main
from finetune_ext.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "finetune_ext.cli", *args], env=env, capture_output=True, text=True, check=False
    )


def test_help_documents_every_option() -> None:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions if a.dest != "help"}
    assert dests == {f for f in TrainConfig.__dataclass_fields__ if f != "method_options"} | {"method_option"}
    assert all(a.help for a in train._actions)


def test_cli_run_with_bf16_and_accumulation(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    out = tmp_path / "run"
    res = _cli(
        "train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--steps", "3", "--batch-size", "4", "--grad-accum", "2", "--block-size", "32", "--bf16",
        "--eval-every", "3", "--max-eval-batches", "1", "--output-dir", str(out), "--no-progress",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["steps"] == 3
    assert json.loads((out / "summary.json").read_text())["config"]["bf16"] is True


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "config:nope"], "model: unknown config 'nope'"),
        (["--model", "./no/such/model"], "model: no such folder './no/such/model'"),
        (["--data", "/no/such/data"], "data: no such file or folder '/no/such/data'"),
        (
            ["--method", "sgdx"],
            "method: unknown 'sgdx'; available: ['adamw', 'armijo', 'gaussian-dropout', 'guided-dropout', 'linchain', "
            "'lora']",
        ),
        (["--block-size", "300"], "block_size: 300 exceeds the model's context 256"),
        (["--batch-size", "6", "--grad-accum", "4"], "batch_size: 6 must be divisible by grad_accum x processes"),
        (["--resume"], "resume: no checkpoint in"),
        (["--method-option", "oops"], "method-option: expected KEY=VALUE, got 'oops'"),
        (["--method-option", "bogus=1"], "method-option: adamw takes no arguments"),
        (
            ["--method", "guided-dropout", "--method-option", "bogus=1"],
            "method-option: guided-dropout got an unexpected keyword argument 'bogus'",
        ),
        (["--method", "guided-dropout", "--method-option", "p_max=1.5"], r"p_max: expected a value in [0, 1), got 1.5"),
    ],
)
def test_user_mistakes_give_one_line(tmp_path, wikitext_slice, gpt2_tokenizer, args, message, capsys) -> None:
    base = {"--model": "config:gpt2-tiny", "--data": str(wikitext_slice), "--tokenizer": gpt2_tokenizer}
    for key in args[::2]:
        base.pop(key, None)
    flat = [x for kv in base.items() for x in kv]
    code = main(["train", *flat, *args, "--output-dir", str(tmp_path / "run"), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
