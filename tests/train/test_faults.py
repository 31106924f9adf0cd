"""The trainer under faults and misuse: kills at many points resume to the uninterrupted run bit for bit, and
every user mistake or damaged file ends in a one-line error or a warned repair, never a lost or mixed run."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune_ext.cli import main
from finetune_ext.errors import RunWarning, UserError
from finetune_ext.train import TrainConfig, checkpoint, rundir, train
from tests.train.faults_driver import POINTS
from tests.train.test_trainer import _assert_same_run, _records

ROOT = Path(__file__).resolve().parents[2]


def test_killed_at_every_point_then_resumed_equals_uninterrupted(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    driver = [sys.executable, str(ROOT / "tests/train/faults_driver.py"), str(tmp_path), str(wikitext_slice)]
    done = subprocess.run([*driver, gpt2_tokenizer], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    ended = [json.loads(line) for line in done.stdout.splitlines()]
    assert ended[0] == {"point": None, "run": "whole", "ended": "exit 0"}
    expected = ["exit 130" if p.action.startswith("sigterm") else "signal SIGKILL" for p in POINTS] + ["exit 0"]
    assert [(e["point"], e["ended"]) for e in ended[1:]] == list(
        zip([p.label for p in POINTS] + [None], expected, strict=True)
    ), done.stderr[-3000:]
    whole, chain = tmp_path / "whole", tmp_path / "chain"
    _assert_same_run(whole, chain)
    assert [r["step"] for r in _records(chain, "train")] == list(range(1, 13))
    summaries = [json.loads((o / "summary.json").read_text()) for o in (whole, chain)]
    assert summaries[0]["test"] == summaries[1]["test"] and summaries[0]["best_val"] == summaries[1]["best_val"]
    names = sorted(p.name for p in chain.iterdir() if p.name.startswith(("checkpoint-", ".tmp", ".trash")))
    assert names == ["checkpoint-0000010", "checkpoint-0000012"]  # kept 2, no temporaries left
    assert (chain / "latest").read_text() == "checkpoint-0000012"
    assert all(checkpoint.damage(chain / n) is None for n in names)


def _run(data: Path, tokenizer: str, out: Path, **kw) -> dict:
    cfg = dict(model="config:gpt2-tiny", tokenizer=tokenizer, data=str(data), output_dir=str(out), steps=4)
    cfg |= dict(batch_size=4, lr=1e-3, block_size=32, eval_every=2, save_every=1, keep_checkpoints=2)
    cfg |= dict(max_eval_batches=1, eval_batch_size=8, progress=False)
    return train(TrainConfig(**{**cfg, **kw}))


def _checkpoints(out: Path) -> list[str]:
    return [p.name for p in checkpoint.folders(out)]


def test_overwrite_starts_clean_and_prunes_only_its_own_run(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    out = tmp_path / "run"
    _run(wikitext_slice, gpt2_tokenizer, out, steps=6)
    assert _checkpoints(out) == ["checkpoint-0000005", "checkpoint-0000006"]
    foreign = out / "checkpoint-0000099"  # a checkpoint of another run copied in after the old one ended
    _run(wikitext_slice, gpt2_tokenizer, out, steps=6, overwrite=True)  # clears, then trains afresh
    os.replace(out / "checkpoint-0000006", foreign)
    with pytest.raises(UserError, match="already holds checkpoints"):
        _run(wikitext_slice, gpt2_tokenizer, out, steps=3)
    _run(wikitext_slice, gpt2_tokenizer, out, steps=3, overwrite=True)
    assert _checkpoints(out) == ["checkpoint-0000002", "checkpoint-0000003"]  # the foreign one went with --overwrite
    assert [r["step"] for r in _records(out, "train")] == [1, 2, 3]
    assert (out / (out / "latest").read_text()).is_dir()
    with pytest.raises(UserError, match="resume, overwrite: pass one of them"):
        _run(wikitext_slice, gpt2_tokenizer, out, resume=True, overwrite=True)


def test_pruning_never_touches_another_runs_checkpoints(tmp_path) -> None:
    model = torch.nn.Linear(3, 2)
    for step, run_id in [(1, "mine"), (2, "other"), (3, "mine"), (4, "mine")]:
        checkpoint.commit(tmp_path, step, model, {"step": step}, keep=2, run_id=run_id)
    assert _checkpoints(tmp_path) == ["checkpoint-0000002", "checkpoint-0000003", "checkpoint-0000004"]
    assert (tmp_path / "latest").read_text() == "checkpoint-0000004"


def test_second_run_in_the_same_folder_is_refused_and_a_stale_lock_taken_over(
    tmp_path, wikitext_slice, gpt2_tokenizer
) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with rundir.RunLock(out), pytest.raises(UserError, match=rf"in use by another run \(pid {os.getpid()} on "):
        _run(wikitext_slice, gpt2_tokenizer, out)
    assert not (out / "metrics.jsonl").exists()
    (out / ".lock").write_text("pid 999999 on elsewhere since 2026-01-01 00:00:00")  # left by a killed run
    with pytest.warns(RunWarning, match=r"took over the lock of a run that is no longer running \(pid 999999"):
        _run(wikitext_slice, gpt2_tokenizer, out, steps=1)
    assert (out / ".lock").read_text() == ""  # released at the end


def test_resume_rejects_changed_computation_and_records_applied_changes(
    tmp_path, wikitext_slice, gpt2_tokenizer, capsys
) -> None:
    out = tmp_path / "run"
    _run(wikitext_slice, gpt2_tokenizer, out, steps=2)
    with pytest.raises(
        UserError, match=r"resume: changed since the checkpoint's run: lr: 0.001 -> 0.01, weight_decay: 0.01 -> 0.5;"
    ):
        _run(wikitext_slice, gpt2_tokenizer, out, steps=2, resume=True, lr=1e-2, weight_decay=0.5)
    with pytest.warns(RunWarning, match=r"resume: applying changed option\(s\) eval_every 2 -> 1"):
        summary = _run(wikitext_slice, gpt2_tokenizer, out, steps=2, resume=True, eval_every=1)
    assert summary["config"]["eval_every"] == 1 and summary["config"]["lr"] == 1e-3
    assert summary["resumes"] == [{"step": 2, "changed": {"eval_every": (2, 1)}}]
    args = ["train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
            "--output-dir", str(out), "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--block-size", "32",
            "--save-every", "1", "--max-eval-batches", "1", "--no-progress", "--resume",
            "--eval-every", "3", "--eval-batch-size", "8"]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "finetune-ext train: warning: resume: applying changed option(s) eval_every 2 -> 3\n" in err, err


def test_label_only_in_dev_is_an_error_before_training(tmp_path, sst2_slice, gpt2_tokenizer) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.tsv").write_text((sst2_slice / "train.tsv").read_text())
    dev = (sst2_slice / "dev.tsv").read_text().splitlines()
    dev[3] = dev[3].rsplit("\t", 1)[0] + "\t2"
    (data / "dev.tsv").write_text("\n".join(dev) + "\n")
    with pytest.raises(UserError, match=rf"data: {data / 'dev.tsv'}:4 column 'label' has label 2, which the training"):
        _run(data, gpt2_tokenizer, tmp_path / "run", model="config:bert-tiny", max_length=16)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, wikitext_slice, gpt2_tokenizer, monkeypatch):
    out = tmp_path / "run"
    real, calls = checkpoint.save_model, [0]

    def full(model, filename):
        calls[0] += 1
        if calls[0] == 2:
            Path(filename).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
        return real(model, filename)

    monkeypatch.setattr(checkpoint, "save_model", full)
    with pytest.raises(
        UserError, match=r"checkpoint: cannot write checkpoint-0000002 .*No space left on device.*intact"
    ):
        _run(wikitext_slice, gpt2_tokenizer, out)
    assert _checkpoints(out) == ["checkpoint-0000001"] and not list(out.glob(".tmp*"))
    assert (out / "latest").read_text() == "checkpoint-0000001"
    (out / ".tmp-checkpoint-0000077").mkdir()  # as a kill mid-write would leave it
    monkeypatch.setattr(checkpoint, "save_model", real)
    _run(wikitext_slice, gpt2_tokenizer, out, resume=True)
    assert not list(out.glob(".tmp*")) and (out / "latest").read_text() == "checkpoint-0000004"


def test_damaged_checkpoint_falls_back_to_the_newest_intact(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(wikitext_slice, gpt2_tokenizer, whole, steps=5)
    _run(wikitext_slice, gpt2_tokenizer, parts, steps=5, keep_checkpoints=5)
    (parts / "checkpoint-0000005" / "state.pt").unlink()
    (parts / "checkpoint-0000004" / "model.safetensors").write_bytes(b"")
    model = parts / "checkpoint-0000003" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit of rot
    model.write_bytes(bytes(data))
    with pytest.warns(RunWarning, match="damaged") as caught:
        _run(wikitext_slice, gpt2_tokenizer, parts, steps=5, resume=True, keep_checkpoints=5)
    text = " | ".join(str(w.message) for w in caught)
    assert "checkpoint-0000005 is damaged (state.pt is missing)" in text
    assert "checkpoint-0000004 is damaged (model.safetensors does not match its checksum)" in text
    assert "checkpoint-0000003 is damaged (model.safetensors does not match its checksum)" in text
    assert "resuming from checkpoint-0000002" in text
    _assert_same_run(whole, parts)
    for name in ("checkpoint-0000003", "checkpoint-0000004", "checkpoint-0000005"):
        assert checkpoint.damage(parts / name) is None  # written anew by the resumed run
    for folder in checkpoint.folders(parts):
        (folder / "manifest.json").write_text("{")
    with pytest.raises(UserError, match=r"resume: no intact checkpoint in .*checkpoint-0000001: no readable manifest"):
        _run(wikitext_slice, gpt2_tokenizer, parts, steps=5, resume=True, keep_checkpoints=5)


def test_torn_metrics_line_is_dropped_on_resume(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    _run(wikitext_slice, gpt2_tokenizer, whole)
    _run(wikitext_slice, gpt2_tokenizer, parts, keep_checkpoints=4)
    for step in (3, 4):  # as if killed while writing step 3's metrics line
        checkpoint.remove(parts / checkpoint.name(step))
    kept = [line for line in (parts / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 2]
    (parts / "metrics.jsonl").write_text("\n".join(kept) + '\n{"step": 3, "split": "tra')
    (parts / "latest").write_text("checkpoint-0000002")
    with pytest.warns(RunWarning, match="metrics: dropped 1 unreadable line"):
        _run(wikitext_slice, gpt2_tokenizer, parts, resume=True, keep_checkpoints=4)
    _assert_same_run(whole, parts)


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        (1.5, r"train_samples: expected an integer count >= 1 or a fraction in \(0, 1\], got 1.5"),
        (0, r"train_samples: expected an integer count >= 1 or a fraction in \(0, 1\], got 0"),
        (-0.5, r"train_samples: .* got -0.5"),
        (10**9, r"train_samples: asked for 1000000000 examples, the training set has"),
    ],
)
def test_train_samples_must_be_a_count_or_a_fraction(tmp_path, wikitext_slice, gpt2_tokenizer, amount, message):
    with pytest.raises(UserError, match=message):
        _run(wikitext_slice, gpt2_tokenizer, tmp_path / "run", train_samples=amount)


def test_one_and_one_point_zero_differ(wikitext_slice, gpt2_tokenizer) -> None:
    from finetune_ext.data.splits import count_examples

    counts = [count_examples(50, amount, "n") for amount in (1, 1.0, 0.5, 7.0)]
    assert counts == [1, 50, 25, 7]


def test_non_utf8_data_names_file_and_line(tmp_path, gpt2_tokenizer) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("a line\n" * 5)
    (data / "valid.txt").write_bytes(b"fine\nalso fine\ncaf\xe9 latin-1\n")
    with pytest.raises(UserError, match=rf"data: {data / 'valid.txt'}:3 is not UTF-8 \(byte 0xe9\)"):
        _run(data, gpt2_tokenizer, tmp_path / "run")


@pytest.mark.parametrize("kind", ["file", "proc", "under-a-file"])
def test_unusable_output_dir_is_one_line(tmp_path, wikitext_slice, gpt2_tokenizer, kind, capsys) -> None:
    (tmp_path / "a-file").write_text("")
    out = {"file": tmp_path / "a-file", "proc": Path("/proc/finetune-ext-run"), "under-a-file": tmp_path / "a-file/x"}
    args = ["train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
            "--steps", "1", "--no-progress", "--output-dir", str(out[kind])]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("finetune-ext train: output_dir: ") and str(out[kind]) in err
    assert len(err.strip().splitlines()) == 1, err
