"""Every combination of transforms with every stepper, on a tiny GPT-2 and a tiny BERT, and every pair of them on
tiny Llama-family models (Llama, Mistral, Qwen2): a few steps train, and resuming from the middle checkpoint
reproduces the uninterrupted run bit for bit."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file

from finetune_ext.optim.parts import AdamW
from finetune_ext.parts import StepContext, Transform
from finetune_ext.parts.options import option
from finetune_ext.train import TrainConfig, registry, train

ROOT = Path(__file__).resolve().parents[2]
SMALL = {  # options that keep each part quick on tiny models
    "guided": {"fisher_samples": 4, "fisher_cache": None},
    "lora": {"r": 2},
    "linchain": {"r": 2, "chain_length": 2},
    "armijo": {"init_step_size": 0.01},
    "lift": {"warmup_steps": 2, "rows": 4, "columns": 16, "val_batches": 1, "line_evals": 3},
}
COMBINATIONS = list(itertools.product(*(registry.PARTS[k] for k in ("dropout", "adapter", "optimizer"))))
PERTURBATIONS = [p for p in registry.PARTS["perturbation"] if p != "none"]
# A perturbation needs adapters: each with both adapters under AdamW, and with LoRA under the other steppers.
PERTURBED = [(p, a, "adamw") for p in PERTURBATIONS for a in ("lora", "linchain")]
PERTURBED += [(p, "lora", o) for p in PERTURBATIONS for o in registry.PARTS["optimizer"] if o != "adamw"]


# The Llama layout: every pair of choices of two kinds (dropout and adapter, dropout and stepper, adapter and
# stepper) once, in 9 runs (the orthogonal array L9), three on each family; each perturbation once.
DECODERS = ("llama", "mistral", "qwen2")
_KINDS = [list(registry.PARTS[k]) for k in ("dropout", "adapter", "optimizer")]
DECODER_COMBINATIONS = [(_KINDS[0][i], _KINDS[1][j], _KINDS[2][(i + j) % 3], DECODERS[(i + 2 * j) % 3])
                        for i in range(3) for j in range(3)]  # fmt: skip
DECODER_PERTURBED = [(p, "linchain", ("adamw", "armijo", "adamw")[i], DECODERS[i % 3])
                     for i, p in enumerate(PERTURBATIONS)]  # fmt: skip


def _config(model: str, data, tokenizer: str, out: Path, dropout: str, adapter: str, optimizer: str,
            perturbation: str = "none", **extra):  # fmt: skip
    task = dict(max_length=24, val_size=24) if model == "config:bert-tiny" else dict(block_size=32)
    return TrainConfig(
        model=model, tokenizer=tokenizer, data=str(data), output_dir=str(out), steps=4, batch_size=4, lr=1e-3,
        eval_every=2, save_every=2, max_eval_batches=1, eval_batch_size=4, progress=False,
        dropout=dropout, adapter=adapter, optimizer=optimizer, dropout_options=SMALL.get(dropout, {}),
        adapter_options=SMALL.get(adapter, {}), optimizer_options=SMALL.get(optimizer, {}), perturbation=perturbation,
        perturbation_options={"ramp": "constant"} if perturbation in ("flat-lora", "ggpo") else {}, **task, **extra,
    )  # fmt: skip


def _resume_from_middle(whole: Path, resumed: Path, cfg: TrainConfig) -> None:
    """Start a fresh folder from ``whole``'s step-2 checkpoint and its log, then resume it to the end."""
    resumed.mkdir()
    shutil.copytree(whole / "checkpoint-0000002", resumed / "checkpoint-0000002")
    (resumed / "latest").write_text("checkpoint-0000002")
    shutil.copy(whole / "metrics.jsonl", resumed / "metrics.jsonl")
    train(TrainConfig(**{**cfg.__dict__, "output_dir": str(resumed), "resume": True}))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoint-0000004" / "model.safetensors"))


def _train_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timing = ("_ms", "_seconds")
    return [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows if r["split"] == "train"]


def _check_combination(cfg: TrainConfig, tmp_path: Path) -> None:
    summary = train(cfg)
    assert summary["steps"] == 4
    assert {k: v["name"] for k, v in summary["config"]["parts"].items()} == {
        "dropout": cfg.dropout, "adapter": cfg.adapter, "optimizer": cfg.optimizer, "perturbation": cfg.perturbation,
    }  # fmt: skip
    if cfg.adapter != "none":
        assert summary["params_trainable"] < summary["params_total"] / 10
    _resume_from_middle(Path(cfg.output_dir), tmp_path / "resumed", cfg)
    a, b = _weights(Path(cfg.output_dir)), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _train_records(Path(cfg.output_dir)) == _train_records(tmp_path / "resumed")


@pytest.mark.parametrize(("dropout", "adapter", "optimizer"), COMBINATIONS)
def test_gpt2_combination_trains_and_resumes_exactly(dropout, adapter, optimizer, tmp_path, wikitext_slice,
                                                      gpt2_tokenizer) -> None:  # fmt: skip
    cfg = _config("config:gpt2-tiny", wikitext_slice, gpt2_tokenizer, tmp_path / "whole", dropout, adapter, optimizer)
    _check_combination(cfg, tmp_path)


@pytest.mark.parametrize(("dropout", "adapter", "optimizer"), COMBINATIONS)
def test_bert_combination_trains_and_resumes_exactly(dropout, adapter, optimizer, tmp_path, sst2_slice,
                                                      bert_tokenizer) -> None:  # fmt: skip
    cfg = _config("config:bert-tiny", sst2_slice, bert_tokenizer, tmp_path / "whole", dropout, adapter, optimizer)
    _check_combination(cfg, tmp_path)


@pytest.mark.parametrize(("dropout", "adapter", "optimizer", "family"), DECODER_COMBINATIONS)
def test_llama_family_combination_trains_and_resumes_exactly(dropout, adapter, optimizer, family, tmp_path,
                                                             wikitext_slice, gpt2_tokenizer) -> None:  # fmt: skip
    cfg = _config(f"config:{family}-tiny", wikitext_slice, gpt2_tokenizer, tmp_path / "whole", dropout, adapter,
                  optimizer)  # fmt: skip
    _check_combination(cfg, tmp_path)


@pytest.mark.parametrize(("perturbation", "adapter", "optimizer", "family"), DECODER_PERTURBED)
def test_llama_family_perturbed_combination_trains_and_resumes_exactly(
    perturbation, adapter, optimizer, family, tmp_path, wikitext_slice, gpt2_tokenizer
) -> None:
    cfg = _config(f"config:{family}-tiny", wikitext_slice, gpt2_tokenizer, tmp_path / "whole", "standard", adapter,
                  optimizer, perturbation)  # fmt: skip
    _check_combination(cfg, tmp_path)


@pytest.mark.parametrize(("perturbation", "adapter", "optimizer"), PERTURBED)
def test_perturbed_combination_trains_and_resumes_exactly(perturbation, adapter, optimizer, tmp_path, wikitext_slice,
                                                          gpt2_tokenizer) -> None:  # fmt: skip
    cfg = _config("config:gpt2-tiny", wikitext_slice, gpt2_tokenizer, tmp_path / "whole", "standard", adapter,
                  optimizer, perturbation)  # fmt: skip
    _check_combination(cfg, tmp_path)


@dataclass
class ProbeOptions:
    every: int = option(1, "record every N steps")


class ProbeTransform(Transform):
    """Test transform: records, every ``every`` steps, whether the stepper holds Adam moments yet."""

    name = "probe"
    Options = ProbeOptions
    seen: ClassVar[list[tuple[int, bool]]] = []

    def apply(self, model, run) -> None:
        type(self).seen = []

    def before_step(self, step: int, stepper) -> None:
        if step % self.options.every == 0:
            type(self).seen.append((step, bool(stepper.optimizer.state)))


def test_a_new_transform_is_one_class_and_one_registration(tmp_path, monkeypatch, wikitext_slice, gpt2_tokenizer):
    monkeypatch.setitem(registry.PARTS["dropout"], "probe", "tests.train.test_composition:ProbeTransform")
    cfg = _config("config:gpt2-tiny", wikitext_slice, gpt2_tokenizer, tmp_path / "p", "probe", "lora", "adamw")
    cfg.dropout_options = {"every": "2"}
    train(cfg)
    assert ProbeTransform.seen == [(0, False), (2, True)]  # the hook reads the stepper's state


def test_linchain_guided_dropout_armijo_from_the_cli(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    args = [
        "train", "--model", "config:gpt2-tiny", "--tokenizer", gpt2_tokenizer, "--data", str(wikitext_slice),
        "--adapter", "linchain", "--dropout", "guided", "--optimizer", "armijo", "--adapter-option", "r=4",
        "--dropout-option", "fisher_samples=4", "--dropout-option", "fisher_cache=null",
        "--optimizer-option", "init_step_size=0.01", "--steps", "3", "--batch-size", "4", "--block-size", "32",
        "--eval-every", "3", "--max-eval-batches", "1", "--output-dir", str(tmp_path / "run"), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-m", "finetune_ext.cli", *args], env=env, capture_output=True, text=True,
                         check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    parts = json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["parts"]
    assert [parts[k]["name"] for k in ("dropout", "adapter", "optimizer")] == ["guided", "linchain", "armijo"]
    assert parts["adapter"]["options"]["r"] == 4 and parts["dropout"]["options"]["fisher_cache"] is None


def test_ctx_reevaluation_draws_the_same_masks(wikitext_slice, gpt2_tokenizer) -> None:
    from finetune_ext.train.models import load_model, load_tokenizer

    tok = load_tokenizer(gpt2_tokenizer)
    model = load_model("config:gpt2-tiny", "lm", tok).train()
    ids = torch.randint(0, 1000, (2, 16))
    ctx = StepContext(model, [{"input_ids": ids, "labels": ids}], lambda: torch.autocast("cpu", enabled=False), 3, 0)
    first = ctx.forward_backward()
    assert ctx.loss() == first == ctx.loss()
    other = StepContext(model, ctx.micro_batches, ctx.autocast, 4, 0)
    assert other.loss() != first  # another step draws other masks


class ValidatingAdamW(AdamW):
    """Test stepper: AdamW that evaluates the validation split before its first step."""

    name = "validating"
    seen: ClassVar[list[dict]] = []

    def setup(self, model, run) -> None:
        super().setup(model, run)
        type(self).seen = [run.evaluate_val(model)]
        assert not hasattr(run, "test")  # the test split stays out of the parts' reach


def test_a_stepper_may_evaluate_the_validation_split(tmp_path, monkeypatch, wikitext_slice, gpt2_tokenizer) -> None:
    monkeypatch.setitem(registry.PARTS["optimizer"], "validating", "tests.train.test_composition:ValidatingAdamW")
    cfg = _config("config:gpt2-tiny", wikitext_slice, gpt2_tokenizer, tmp_path / "v", "standard", "none", "validating")
    summary = train(cfg)
    (before,) = ValidatingAdamW.seen
    assert set(before) == {"loss", "acc", "ppl"} and before["loss"] > summary["final_val"]["loss"]
