"""Misuse and faults, round 3: nothing a run would reject gets past the pre-flight, nothing read from disk is used
unverified, and the ops and the Python API refuse what they cannot compute. One test per scenario family; the
caches' own scenarios are in tests/data/test_token_cache.py and tests/guided (Fisher cache), the benchmark
command's in tests/bench/test_harness.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from finetune_ext import ops
from finetune_ext.adapters import load_peft
from finetune_ext.cli import main
from finetune_ext.data import labelled
from finetune_ext.lift import lp_direction
from finetune_ext.optim import BlockArmijo


def _cli_train(tmp_path: Path, wikitext_slice: Path, gpt2_tokenizer: str, *args: str) -> list[str]:
    base = ["train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
            "--block-size", "32", "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--max-eval-batches", "1",
            "--no-progress", "--output-dir", str(tmp_path / "run")]  # fmt: skip
    return [*base, *args]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizer", "lift", "--optimizer-option", "val_batches=0"], "val_batches: expected an integer >= 1"),
        (["--optimizer", "lift", "--optimizer-option", "blocks=last:0"], "blocks: expected last:K with K >= 1"),
        (["--optimizer", "lift", "--optimizer-option", "lp_time_limit=-1"], "lp_time_limit: expected seconds > 0"),
        (["--optimizer", "lift", "--optimizer-option", "lambda_init=nan"], "lambda_init: expected a finite number"),
        (
            ["--optimizer", "lift", "--optimizer-option", "columns=100000000"],
            "columns: expected <= ",
        ),  # needs the model
        (["--train-samples", "0"], "train_samples: expected an integer count >= 1"),
        (["--warmup-steps", "-3"], "warmup_steps: expected >= 0, got -3"),
        (["--weight-decay", "nan"], "weight_decay: expected a finite number, got nan"),
        (["--adapter", "lora", "--adapter-option", "target_modules=c_(attn"], "is not a regular expression"),
        (["--method", "lora", "--adapter", "none"], "adapter: --method lora uses adapter 'lora'; got 'none'"),
        (["--method", "lora-ggpo", "--perturbation", "none"], "perturbation: --method lora-ggpo uses perturbation"),
        (["--tokenizer", "/no/such/tokenizer"], "tokenizer: no such folder '/no/such/tokenizer'"),
        (["--device", "tpu"], "argument --device: invalid choice: 'tpu' (choose from 'auto', 'cpu', 'cuda')"),
        (["--dtype", "bf16"], "dtype: bf16 stores the frozen base weights, and this run trains every weight"),
        (["--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8' (choose from 'fp32', 'bf16', 'fp16', 'nf4')"),
    ],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_the_preflight_refuses_before_the_output_folder_exists(
    tmp_path, wikitext_slice, gpt2_tokenizer, capsys, args, message, dry_run
) -> None:
    argv = _cli_train(tmp_path, wikitext_slice, gpt2_tokenizer, *args, *(["--dry-run"] if dry_run else []))
    if "--tokenizer" in args:  # the scenario's own tokenizer replaces the base one
        i = argv.index("--tokenizer")
        del argv[i : i + 2]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "run").exists()


def test_resume_names_each_changed_field_before_loading(tmp_path, wikitext_slice, gpt2_tokenizer, capsys) -> None:
    assert main(_cli_train(tmp_path, wikitext_slice, gpt2_tokenizer, "--adapter", "lora")) == 0
    capsys.readouterr()
    for args, changed in (
        (["--adapter", "linchain"], "adapter: 'lora' -> 'linchain'"),  # another architecture: no weight is read
        (["--adapter", "lora", "--optimizer-option", "beta1=0.5"], "optimizer.beta1: 0.9 -> 0.5"),
    ):
        assert main(_cli_train(tmp_path, wikitext_slice, gpt2_tokenizer, *args, "--resume")) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("finetune-ext train: resume: changed since the checkpoint's run:") and changed in line
        assert len(line) < 400  # the changed fields, not a dump of every option


def test_export_names_a_damaged_newest_checkpoint(tmp_path, wikitext_slice, gpt2_tokenizer, capsys) -> None:
    argv = _cli_train(tmp_path, wikitext_slice, gpt2_tokenizer, "--adapter", "lora", "--save-every", "1")
    assert main([*argv, "--keep-checkpoints", "3"]) == 0
    newest = sorted((tmp_path / "run").glob("checkpoint-*"))[-1]
    (newest / "manifest.json").unlink()
    capsys.readouterr()
    export = ["export", str(tmp_path / "run"), "--format", "peft"]
    assert main([*export, "--output", str(tmp_path / "final"), "--weights", "final"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"the newest checkpoint is damaged ({newest.name}: no readable manifest.json" in line
    assert not (tmp_path / "final").exists()
    assert main([*export, "--output", str(tmp_path / "best")]) == 0
    warned = capsys.readouterr().err
    assert f"finetune-ext export: warning: run_dir: damaged checkpoint(s) skipped ({newest.name}: " in warned
    assert (tmp_path / "best" / "adapter_model.safetensors").exists()


def test_the_ops_refuse_integer_and_degenerate_inputs() -> None:
    i64 = {"dtype": torch.int64}
    with pytest.raises(ValueError, match=r"x: expected dtype float16, bfloat16, float32 or float64, got torch\.int64"):
        ops.lora_linear(torch.ones(2, 4, **i64), torch.ones(3, 4, **i64), None, torch.ones(2, 4, **i64),
                        torch.ones(3, 2, **i64))  # fmt: skip
    with pytest.raises(ValueError, match="W: expected dtype float16, bfloat16, float32 or float64"):
        ops.linchain_compose(torch.ones(1, 1, 2, 2, **i64), None)
    assert ops.softmax_ce_hessian_vp(torch.zeros(3, 5), torch.zeros(0, 3, 5)).shape == (0, 3, 5)
    with pytest.raises(ValueError, match=r"logits: expected at least one class \(last dimension >= 1\), got 0"):
        ops.softmax_ce_hessian_vp(torch.zeros(3, 0), torch.zeros(2, 3, 0))
    with pytest.raises(ValueError, match=r"rows: expected shape \[k, 4\] with k >= 1"):
        lp_direction(np.ones(4), np.zeros((0, 4)), 1e-4)
    with pytest.raises(ValueError, match="c: expected at least one column"):
        lp_direction(np.ones(0), np.zeros((3, 0)), 1e-4)
    with pytest.raises(ValueError, match="box: expected a finite number > 0, got inf"):
        lp_direction(np.ones(4), np.ones((2, 4)), 1e-4, box=float("inf"))


def _closure(loss_fn):
    def closure():
        loss = loss_fn()
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    return closure


def test_block_armijo_skips_blocks_without_gradients_and_checks_its_blocks() -> None:
    a, b = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    b0, start = b.detach().clone(), float((a**2).sum())
    optimizer = BlockArmijo([[a], [b]])  # cycle: from step 7 on, every other step searches b, which has no gradient
    for _ in range(10):
        optimizer.step(_closure(lambda: (a**2).sum()))
    assert torch.equal(b, b0) and float((a.detach() ** 2).sum()) < start
    with pytest.raises(ValueError, match=r"parameter 0 of block 'block0' is not contiguous \(shape \[3, 4\]"):
        BlockArmijo([[torch.randn(4, 3).t().requires_grad_()]])
    c = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"expected every parameter in torch\.float32 on cpu, got parameter 0 of block"
    ):
        BlockArmijo([[a], [c]])


def test_damaged_files_are_named(tmp_path) -> None:
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]}'
    )
    (peft / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=rf"path: {peft}/adapter_model.safetensors is not a readable safetensors file"):
        load_peft(model, peft)
    (peft / "adapter_config.json").write_text("{broken")
    with pytest.raises(ValueError, match=rf"path: {peft}/adapter_config.json is not valid JSON \(.*line 1 column 2"):
        load_peft(model, peft)

    data = tmp_path / "tsv"
    data.mkdir()
    (data / "train.tsv").write_text("sentence\tlabel\nshort\t0\n" + "x" * 200_000 + "\t1\n")
    (data / "dev.tsv").write_text("sentence\tlabel\nshort\t0\n")
    with pytest.raises(ValueError, match=rf"data: {data}/train.tsv:3: field larger than field limit"):
        labelled.read(str(data), None, None)


def test_a_word_among_real_valued_labels_is_named_not_made_a_class(tmp_path, gpt2_tokenizer) -> None:
    from finetune_ext.data import load_splits
    from finetune_ext.train.models import load_tokenizer

    rows = [f"sentence number {i}\t{0.37 * i:.2f}" for i in range(40)]
    rows[6] = "sentence number 6\tn/a"
    (tmp_path / "train.tsv").write_text("sentence\tscore\n" + "\n".join(rows) + "\n")
    (tmp_path / "dev.tsv").write_text("sentence\tscore\n" + "\n".join(rows[:5]) + "\n")
    kw = {"block_size": 8, "max_length": 16, "train_samples": None, "val_size": 5, "seed": 0,
          "text_columns": ["sentence"], "label_column": "score"}  # fmt: skip
    tok = load_tokenizer(gpt2_tokenizer)
    with pytest.raises(ValueError, match=rf"{tmp_path}/train.tsv:8 column 'score' has label 'n/a' among real-valued"):
        load_splits(str(tmp_path), tok, **kw)
    assert load_splits(str(tmp_path), tok, **kw, task="classification").task == "classification"


def test_guided_dropout_on_a_family_without_sites_is_one_line(tmp_path, wikitext_slice, gpt2_tokenizer, capsys):
    from transformers import GPTNeoXConfig

    config = tmp_path / "neox.json"
    GPTNeoXConfig(num_hidden_layers=1, num_attention_heads=2, hidden_size=16, intermediate_size=32).to_json_file(config)
    argv = _cli_train(tmp_path, wikitext_slice, gpt2_tokenizer, "--model", f"config:{config}", "--dropout", "guided")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guided dropout has site maps for 'bert', 'gpt2', 'llama'" in err[0], err
    assert "got model_type 'gpt_neox'" in err[0] and not (tmp_path / "run").exists()
