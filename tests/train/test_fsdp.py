"""``--fsdp``: two gloo processes with the model sharded by FSDP2 give DDP's run and resume bit for bit, with adapters
over a frozen base and as a full fine-tune; parts that cannot shard are refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune_ext.cli import main
from finetune_ext.testing import tolerance

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _args(wikitext_slice: Path, gpt2_tokenizer: str, out: Path) -> list[str]:
    return [
        "train", "--model", "config:llama-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--steps", "4", "--batch-size", "8", "--lr", "1e-2", "--block-size", "32", "--eval-every", "2",
        "--save-every", "2", "--keep-checkpoints", "3", "--device", "cpu", "--no-progress", "--max-eval-batches", "3",
        "--eval-batch-size", "8", "--adapter", "linchain", "--dropout", "guided", "--dtype", "bf16",
        "--gradient-checkpointing", "--output-dir", str(out),
    ]  # fmt: skip


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*LAUNCH, "-m", "finetune_ext.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


def _losses(out: Path, split: str) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == split]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step:07d}" / "model.safetensors"))


def test_fsdp_equals_ddp_and_resumes_bit_for_bit(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    """LinChain adapters, guided dropout, a bf16 base and gradient checkpointing on a tiny Llama: sharded and
    replicated runs agree within the fp32 tolerance (the gradients are reduced in another order), and a sharded run
    resumed from its step-2 checkpoint ends on the uninterrupted run's weights and AdamW moments exactly."""
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, extra in ((ddp, []), (fsdp, ["--fsdp"])):
        done = _launch([*_args(wikitext_slice, gpt2_tokenizer, out), *extra])
        assert done.returncode == 0, done.stderr[-6000:]
    summaries = [json.loads((out / "summary.json").read_text()) for out in (ddp, fsdp)]
    assert [(s["processes"], s["sharded"]) for s in summaries] == [(2, False), (2, True)]
    assert _losses(fsdp, "train") == pytest.approx(_losses(ddp, "train"), rel=1e-5)
    assert _losses(fsdp, "val") == pytest.approx(_losses(ddp, "val"), rel=1e-5)
    a, b = _weights(ddp, 4), _weights(fsdp, 4)
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=key)

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed, ignore=shutil.ignore_patterns("checkpoint-0000004"))
    (resumed / "latest").write_text("checkpoint-0000002")
    done = _launch([*_args(wikitext_slice, gpt2_tokenizer, resumed), "--fsdp", "--resume"])
    assert done.returncode == 0, done.stderr[-6000:]
    for key, value in _weights(fsdp, 4).items():
        assert torch.equal(_weights(resumed, 4)[key], value), key
    moments = [torch.load(out / "checkpoint-0000004" / "state.pt", weights_only=False)["parts"]["optimizer"]
               for out in (fsdp, resumed)]  # fmt: skip
    shapes = {tuple(v.shape) for v in a.values()}
    for i, state in moments[0]["optimizer"]["state"].items():
        assert type(state["exp_avg"]) is torch.Tensor and tuple(state["exp_avg"].shape) in shapes  # whole, not a shard
        for k, v in state.items():
            assert torch.equal(moments[1]["optimizer"]["state"][i][k], v), (i, k)


def test_a_sharded_full_fine_tune_equals_ddp_resumes_and_exports(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    """Every weight trains: the checkpoint holds them whole (gathered), a resume shards them again, and a
    one-process export reads the sharded run's checkpoint."""
    from finetune_ext.train.export import export

    args = _args(wikitext_slice, gpt2_tokenizer, tmp_path / "x")
    args = [*args[: args.index("--adapter")], "--steps", "2", "--save-every", "1", "--eval-every", "1"]
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    for out, extra in ((ddp, []), (fsdp, ["--fsdp"])):
        done = _launch([*args, "--output-dir", str(out), *extra])
        assert done.returncode == 0, done.stderr[-6000:]
    assert _losses(fsdp, "train") == pytest.approx(_losses(ddp, "train"), rel=1e-5)
    a, b = _weights(ddp, 2), _weights(fsdp, 2)
    assert len(b) >= len(a) - 1 and "model.embed_tokens.weight" in b  # every weight (a tied head once)
    for key in b:
        torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=key)
    shutil.rmtree(fsdp / "checkpoint-0000002")
    (fsdp / "latest").write_text("checkpoint-0000001")
    done = _launch([*args, "--output-dir", str(fsdp), "--fsdp", "--resume"])
    assert done.returncode == 0, done.stderr[-6000:]
    assert all(torch.equal(_weights(fsdp, 2)[k], v) for k, v in b.items())
    assert (export(fsdp, "merged", tmp_path / "merged") / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        (["--optimizer", "armijo"], "fsdp: optimizer armijo does not run on FSDP shards (its line search"),
        (["--optimizer", "lift"], "fsdp: optimizer lift does not run on FSDP shards (its LP and line search"),
        (["--adapter", "lora", "--perturbation", "ggpo"], "fsdp: perturbation ggpo does not run on FSDP shards"),
    ],
)
def test_parts_that_cannot_shard_are_refused_in_one_line(parts, message, tmp_path, wikitext_slice, gpt2_tokenizer,
                                                         capsys) -> None:  # fmt: skip
    args = ["train", "--model", "config:llama-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
            "--output-dir", str(tmp_path / "run"), "--fsdp", "--dry-run", "--no-progress", *parts]  # fmt: skip
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
