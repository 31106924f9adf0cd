"""``finetune-ext train`` from the command line: help, a run, and one-line errors for user mistakes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune_ext.cli import build_parser, main
from finetune_ext.parts import options
from finetune_ext.train import TrainConfig, registry

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "finetune_ext.cli", *args], env=env, capture_output=True, text=True, check=False
    )


def test_help_documents_every_option_and_part() -> None:
    parser = build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    dests = {a.dest for a in train._actions if a.dest != "help"}
    assert dests == {*TrainConfig.__dataclass_fields__, "dry_run"}  # every config field, plus the CLI's own
    assert all(a.help for a in train._actions)
    text = train.format_help()
    for kind, names in registry.PARTS.items():
        for name in names:
            assert f"--{kind} {name}:" in text
    assert "init_step_size (float, default 0.1)" in text and "--adapter-option KEY=VALUE" in text


def test_top_level_help_does_not_import_the_trainer() -> None:
    """``finetune-ext --help`` lists the commands without importing the trainer (transformers: seconds)."""
    script = (
        "import sys\nfrom finetune_ext.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('finetune_ext.train.trainer' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "fine-tune a model" in out.stdout and out.stdout.split()[-1] == "False"


def test_methods_lists_parts_options_and_presets(capsys) -> None:
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "--adapter linchain: LinChain adapters" in out
    assert "    chain_length (int, default 3): number of r x r mixers" in out
    assert "--optimizer armijo: Per-block Armijo" in out and "linchain = --adapter linchain" in out


def test_train_dry_run_prints_the_resolved_parts_and_touches_nothing(
    tmp_path, wikitext_slice, gpt2_tokenizer, capsys
) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", "config:gpt2-tiny", "--data", str(wikitext_slice), "--output-dir", str(out),
            "--tokenizer", gpt2_tokenizer, "--block-size", "32", "--dry-run"]  # fmt: skip
    assert main([*args, "--method", "lora-ggpo", "--optimizer", "armijo", "--adapter-option", "r=4"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert {kind: part["name"] for kind, part in chosen.items()} == {
        "dropout": "standard",
        "adapter": "lora",
        "perturbation": "ggpo",
        "optimizer": "armijo",
    }
    assert chosen["adapter"]["options"]["r"] == 4 and chosen["optimizer"]["options"]["c"] == 0.5
    assert main([*args, "--optimizer", "armijo", "--optimizer-option", "c=2"]) == 2
    assert (
        capsys.readouterr().err.strip()
        == "finetune-ext train: optimizer-option (armijo): c: expected a value in (0, 1), got 2.0"
    )
    assert main([*args[:3], "--data", str(tmp_path / "missing"), *args[5:]]) == 2
    assert capsys.readouterr().err.startswith(f"finetune-ext train: data: no such file or folder '{tmp_path}/missing'")
    assert not out.exists()  # the data and model were loaded and the parts applied; nothing was written


def test_option_values_are_parsed_by_their_declared_type() -> None:
    from finetune_ext.adapters.config import LinChainConfig

    built = options.build(LinChainConfig, {"r": "4", "mixer_bias": "false", "target_modules": "c_attn,c_fc"}, "x")
    assert (built.r, built.mixer_bias, built.target_modules) == (4, False, ["c_attn", "c_fc"])
    assert options.build(LinChainConfig, {"target_modules": '["q", "v"]'}, "x").target_modules == ["q", "v"]
    assert options.build(LinChainConfig, {"target_modules": r".*\.c_attn"}, "x").target_modules == r".*\.c_attn"
    with pytest.raises(ValueError, match="init: expected one of 'kaiming', 'identity', got 'xavier'"):
        options.build(LinChainConfig, {"init": "xavier"}, "x")


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
            "method: unknown 'sgdx'; available: adamw, lora, linchain, guided-dropout, gaussian-dropout, armijo, lift",
        ),
        (["--adapter", "lorax"], "adapter: unknown 'lorax'; available: none, lora, linchain"),
        (["--adapter", "lora", "--adapter-option", "r=x"], "adapter-option (lora): r: expected int, got 'x'"),
        (
            ["--optimizer-option", "nope=1"],
            "optimizer-option (adamw): unknown option(s) nope; valid: beta1, beta2, eps",
        ),
        (["--dropout-option", "p=0.1"], "dropout-option: dropout 'standard' takes no options, got p"),
        (["--method", "lora", "--adapter", "linchain"], "adapter: --method lora uses adapter 'lora'; got 'linchain'"),
        (["--block-size", "300"], "block_size: 300 exceeds the model's context 256"),
        (["--max-length", "0"], "max_length: expected an integer >= 1, got 0"),
        (["--batch-size", "6", "--grad-accum", "4"], "batch_size: 6 must be divisible by grad_accum x processes"),
        (["--resume"], "resume: no checkpoint in"),
        (["--method-option", "oops"], "method-option: expected KEY=VALUE, got 'oops'"),
        (["--method-option", "bogus=1"], "method-option: adamw has no option 'bogus'; valid: beta1, beta2, eps"),
        (
            ["--method", "guided-dropout", "--method-option", "bogus=1"],
            "method-option: guided-dropout has no option 'bogus'; valid: beta1, beta2, eps, fisher_cache",
        ),
        (
            ["--method", "guided-dropout", "--method-option", "p_max=1.5"],
            "dropout-option (guided): p_max: expected a value in [0, 1), got 1.5",
        ),
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
