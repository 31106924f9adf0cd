"""``PartsTrainer``: our parts inside ``transformers.Trainer`` give the CLI's losses step for step when the data
order is the same, restore every part's state through Trainer's checkpoints, and refuse bad parts in one line."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler
from transformers import TrainerCallback, TrainingArguments, default_data_collator

from finetune_ext.data import Stream, load_splits
from finetune_ext.integrations.transformers import PartsTrainer
from finetune_ext.train import TrainConfig, train
from finetune_ext.train.models import load_model, load_tokenizer

STEPS, BATCH, SEED = 6, 4, 0
COMPOSED = {"adapter": "linchain", "dropout": "guided", "perturbation": "ggpo", "optimizer": "armijo"}
OPTIONS = {"adapter": {"r": 4}, "dropout": {"fisher_samples": 4, "fisher_cache": None},
           "optimizer": {"init_step_size": 0.01}}  # fmt: skip
GPT2, LLAMA = "config:gpt2-tiny", "config:llama-tiny"
LIFT = {"optimizer": {"blocks": "last:1", "warmup_steps": 3, "rows": 8, "columns": 64, "pairs": 2, "val_batches": 2}}


class _InOrder(PartsTrainer):
    """Reads the training set in the order given (the test lays it out as our trainer's stream reads it)."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class _Losses(TrainerCallback):
    """Each optimizer step's loss as the stepper reported it."""

    def __init__(self) -> None:
        self.trainer: PartsTrainer | None = None

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.losses.append(self.trainer.last_step_metrics["loss"])


def _cli_losses(tmp_path, data, tokenizer, parts: dict, options: dict, grad_accum: int = 1, spec: str = GPT2,
                **extra) -> list[float]:  # fmt: skip
    kinds = {kind: name for kind, name in parts.items()}
    cfg = TrainConfig(model=spec, tokenizer=tokenizer, data=str(data), output_dir=str(tmp_path / "cli"),
                      seed=SEED, steps=STEPS, batch_size=BATCH, grad_accum=grad_accum, block_size=32, lr=1e-3,
                      warmup_steps=2, **extra,
                      eval_every=STEPS, save_every=STEPS, max_eval_batches=1, progress=False, **kinds,
                      **{f"{k}_options": v for k, v in options.items()})  # fmt: skip
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    return [e["loss"] for e in log if e["split"] == "train"]


def _trainer(tmp_path, data, tokenizer, parts: dict, options: dict, grad_accum: int = 1, spec: str = GPT2,
             **args) -> _InOrder:  # fmt: skip
    tok = load_tokenizer(tokenizer)
    splits = load_splits(str(data), tok, block_size=32, max_length=32, train_samples=None, val_size=0, seed=SEED)
    stream = Stream(len(splits.train["input_ids"]), BATCH, SEED)
    order = torch.cat([stream.indices(step) for step in range(STEPS)])
    blocks = splits.train["input_ids"][order]
    dataset = [{"input_ids": b, "labels": b} for b in blocks]
    validation = [{"input_ids": b, "labels": b} for b in splits.val["input_ids"]]  # our trainer's validation split
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)  # as our trainer seeds before it builds the model
    model = load_model(spec, "lm", tok)
    settings = dict(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH // grad_accum,
                    gradient_accumulation_steps=grad_accum, max_steps=STEPS,
                    learning_rate=1e-3, warmup_steps=2, weight_decay=0.01, lr_scheduler_type="constant", seed=SEED,
                    report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True)  # fmt: skip
    training = TrainingArguments(**{**settings, **args})
    losses = _Losses()
    trainer = _InOrder(model=model, args=training, train_dataset=dataset, eval_dataset=validation,
                       data_collator=default_data_collator, processing_class=tok, parts=parts, part_options=options,
                       callbacks=[losses])  # fmt: skip
    trainer.losses, losses.trainer = [], trainer
    return trainer


@pytest.mark.parametrize(
    ("parts", "options", "grad_accum", "model"),
    [
        ({"adapter": "lora"}, {"adapter": {"r": 4}}, 1, GPT2),
        (COMPOSED, OPTIONS, 1, GPT2),
        (COMPOSED, OPTIONS, 2, GPT2),
        ({"optimizer": "lift"}, LIFT, 1, GPT2),
        ({"dropout": "gaussian"}, {}, 1, GPT2),
        ({"adapter": "lora", "perturbation": "flat-lora"}, {"adapter": {"r": 4}}, 1, GPT2),
        ({"adapter": "lora", "perturbation": "mgpo"}, {"adapter": {"r": 4}}, 1, GPT2),
        (COMPOSED, OPTIONS, 1, LLAMA),
        ({"optimizer": "lift"}, LIFT, 1, LLAMA),
        ({"adapter": "lora", "dropout": "gaussian", "perturbation": "mgpo"}, {"adapter": {"r": 4}}, 1, LLAMA),
        ({"adapter": "lora", "perturbation": "flat-lora"}, {"adapter": {"r": 4}}, 1, LLAMA),
    ],
    ids=[
        "lora",
        "linchain+guided+ggpo+armijo",
        "the same, 2 micro-batches a step",
        "lift",
        "gaussian dropout",
        "flat-lora",
        "mgpo",
        "llama: linchain+guided+ggpo+armijo",
        "llama: lift",
        "llama: lora+gaussian+mgpo",
        "llama: flat-lora",
    ],  # with the first two, and on Llama: every registered part
)
def test_the_trainer_door_gives_the_cli_losses(
    tmp_path, wikitext_slice, gpt2_tokenizer, parts, options, grad_accum, model
) -> None:
    cli = _cli_losses(tmp_path, wikitext_slice, gpt2_tokenizer, parts, options, grad_accum, model)
    trainer = _trainer(tmp_path, wikitext_slice, gpt2_tokenizer, parts, options, grad_accum, model)
    trainer.train()
    assert len(trainer.losses) == STEPS
    assert trainer.losses == cli  # bit for bit: the same parts, keys, data order and initialisation


def test_trainer_bf16_is_our_bf16(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    parts, options = {"adapter": "lora"}, {"adapter": {"r": 4}}
    cli = _cli_losses(tmp_path, wikitext_slice, gpt2_tokenizer, parts, options, bf16=True)
    trainer = _trainer(tmp_path, wikitext_slice, gpt2_tokenizer, parts, options, bf16=True)
    trainer.train()
    assert trainer.losses == cli  # Trainer's autocast context is handed to the stepper's StepContext


def test_trainer_activation_checkpointing_is_our_gradient_checkpointing(tmp_path, wikitext_slice, gpt2_tokenizer):
    cli = _cli_losses(tmp_path, wikitext_slice, gpt2_tokenizer, COMPOSED, OPTIONS, gradient_checkpointing=True)
    trainer = _trainer(tmp_path, wikitext_slice, gpt2_tokenizer, COMPOSED, OPTIONS, activation_checkpointing=True)
    trainer.train()
    assert trainer.model.is_activation_checkpointing
    assert trainer.losses == cli  # the same recompute keys through both doors


@pytest.mark.parametrize(
    ("parts", "options", "kind", "key"),
    [({"adapter": "lora", "perturbation": "ggpo"}, {"adapter": {"r": 4}}, "perturbation", "grad_norms"),
     ({"optimizer": "lift"}, LIFT, "optimizer", "lambda")],
    ids=["lora+ggpo", "lift"],
)  # fmt: skip
def test_trainer_checkpoints_carry_the_parts_state(
    tmp_path, wikitext_slice, gpt2_tokenizer, parts, options, kind, key
) -> None:
    whole = _trainer(tmp_path / "whole", wikitext_slice, gpt2_tokenizer, parts, options)
    whole.train()
    first = _trainer(tmp_path / "cut", wikitext_slice, gpt2_tokenizer, parts, options, save_strategy="steps",
                     save_steps=3)  # fmt: skip
    first.args.max_steps = 3
    first.train()
    resumed = _trainer(tmp_path / "cut", wikitext_slice, gpt2_tokenizer, parts, options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "hf" / "checkpoint-3"))
    assert first.losses + resumed.losses == whole.losses
    state, expected = (t.parts[kind].state_dict()[key] for t in (resumed, whole))
    if isinstance(state, dict):
        assert state and all(torch.equal(v, expected[k]) for k, v in state.items())
    else:
        assert torch.equal(state, expected)


@pytest.mark.parametrize(
    ("parts", "options", "message"),
    [
        ({"adapter": "lorax"}, {}, "adapter: unknown 'lorax'; available: none, lora, linchain"),
        ({"adapter": "lora"}, {"adapter": {"r": 0}}, "adapter-option (lora): r: expected a positive integer, got 0"),
        ({"perturbation": "ggpo"}, {}, "parts: perturbation 'ggpo' does not run without a adapter"),
        ({"optimizr": "adamw"}, {}, "parts: unknown kind(s) ['optimizr']"),
    ],
)
def test_bad_parts_are_one_line_errors(parts, options, message) -> None:
    with pytest.raises(ValueError) as err:
        PartsTrainer(model=torch.nn.Linear(2, 2), parts=parts, part_options=options)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_two_gloo_processes_match_one(tmp_path, wikitext_slice, gpt2_tokenizer, gpt2_no_dropout) -> None:
    """DDP through Trainer (gloo on CPU), launched by ``torchrun`` and by ``accelerate launch``: two processes of 2
    examples give one process's losses and adapters of 4 (fp32 tolerance: the gradients are averaged across
    processes in another order)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from finetune_ext.testing import tolerance

    root = Path(__file__).resolve().parents[2]
    driver = str(Path(__file__).with_name("ddp_driver.py"))
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    launch = {
        "one": [sys.executable],
        "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                       "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", "0"],
    }  # fmt: skip
    for name, prefix in launch.items():
        args = [driver, str(tmp_path / name), str(wikitext_slice), gpt2_tokenizer, gpt2_no_dropout]
        done = subprocess.run([*prefix, *args], env=env, capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-6000:]
    one = json.loads((tmp_path / "one" / "losses.json").read_text())
    a = load_file(str(tmp_path / "one" / "adapters.safetensors"))
    assert (one["world"], len(one["losses"])) == (1, 4) and a
    for name in ("two", "accelerate"):
        two = json.loads((tmp_path / name / "losses.json").read_text())
        assert two["world"] == 2, name
        torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), **tolerance(torch.float32))
        b = load_file(str(tmp_path / name / "adapters.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], **tolerance(torch.float32), msg=f"{name}: {key}")


def test_trainers_fsdp_is_refused_in_one_line(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1, fsdp=True)
    refusal = r"fsdp: PartsTrainer does not run under Accelerate.s FSDP plugin .* distributed_config=DistributedConfig"
    with pytest.raises(ValueError, match=refusal) as err:
        PartsTrainer(model=model, args=args, train_dataset=[], parts={"adapter": "lora"})
    assert "\n" not in str(err.value)


def _quantized_llama(tmp_path):
    """A tiny Llama saved and loaded back in 4-bit NF4 by ``from_pretrained(quantization_config=...)`` (bitsandbytes'
    CPU backend), as users load theirs."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=nf4, device_map="cpu")


def test_qlora_through_peft_patch_trains_in_parts_trainer(tmp_path, monkeypatch) -> None:
    """A 4-bit model with PEFT LoRA, patched: every adapted layer runs the op without a weight (the packed weights
    only through bitsandbytes, unchanged), and Trainer's steps move the adapters."""
    import peft

    from finetune_ext import ops
    from finetune_ext.integrations.peft import patch

    model = peft.get_peft_model(_quantized_llama(tmp_path), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    packed = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert patch(model) == 4 and packed
    calls = []
    original = ops.lora_linear
    monkeypatch.setattr(ops, "lora_linear", lambda *a, **k: calls.append(a[1] is None) or original(*a, **k))
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_steps=3, bf16=True,
                             per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no")  # fmt: skip
    trainer = PartsTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
    trainer.train()
    assert calls and all(calls) and len(calls) % 4 == 0
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in packed.items())
    assert any(not torch.equal(params[n], p) for n, p in before.items() if "lora_B" in n)


def test_our_adapter_on_a_quantized_model_is_refused_in_one_line(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"adapter: Trainer takes a quantized model only with PEFT adapters") as err:
        PartsTrainer(model=_quantized_llama(tmp_path), parts={"adapter": "lora"})
    assert "\n" not in str(err.value)


def test_trainers_fp16_scales_the_loss_in_our_stepper(tmp_path) -> None:
    """``fp16=True``: Trainer's fp16 autocast, our AdamW's dynamic loss scale (Trainer's own scaler never sees a
    gradient: the stepper steps)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    ids = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(1))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3, fp16=True,
                             per_device_train_batch_size=4, save_strategy="no", learning_rate=1e-2)  # fmt: skip
    trainer = PartsTrainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                           parts={"adapter": "lora"})  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.last_step_metrics["loss_scale"] == 2.0**16 and "skipped" not in trainer.last_step_metrics
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_lift_needs_an_eval_dataset(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=r"eval_dataset: optimizer 'lift' evaluates a validation split; pass"):
        PartsTrainer(model=model, args=args, train_dataset=[], parts={"optimizer": "lift"})


def test_the_trainer_door_gives_the_cli_losses_on_a_bert_classifier(tmp_path, sst2_slice, bert_tokenizer) -> None:
    """Tiny BERT on SST-2 sentences: the Trainer reads the same batches as our trainer (a collator that cuts each
    batch after its longest example, as ours does), and gives the same losses bit for bit."""
    from finetune_ext.data import make_batch

    parts = {"adapter": "lora", "dropout": "guided", "perturbation": "ggpo", "optimizer": "armijo"}
    options = {"adapter": {"r": 4}, "dropout": {"fisher_samples": 4, "fisher_cache": None},
               "optimizer": {"init_step_size": 0.01}}  # fmt: skip
    common = dict(max_length=24, seed=SEED)
    cfg = TrainConfig(model="config:bert-tiny", tokenizer=bert_tokenizer, data=str(sst2_slice), val_size=50,
                      output_dir=str(tmp_path / "cli"), steps=STEPS, batch_size=BATCH, lr=1e-3, warmup_steps=2,
                      eval_every=STEPS, save_every=STEPS, progress=False, **common, **parts,
                      **{f"{k}_options": v for k, v in options.items()})  # fmt: skip
    train(cfg)
    log = [json.loads(line) for line in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    cli = [e["loss"] for e in log if e["split"] == "train"]

    tok = load_tokenizer(bert_tokenizer)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    splits = load_splits(str(sst2_slice), tok, block_size=32, train_samples=None, val_size=50, **common)
    model = load_model("config:bert-tiny", splits.task, tok, num_labels=2)
    stream = Stream(len(splits.train["input_ids"]), BATCH, SEED)
    order = torch.cat([stream.indices(step) for step in range(STEPS)]).tolist()

    def collate(rows: list[int]) -> dict:
        return make_batch(splits.train, torch.tensor(rows), splits.task, torch.device("cpu"))

    training = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH, max_steps=STEPS,
                                 learning_rate=1e-3, warmup_steps=2, seed=SEED, report_to=[], save_strategy="no",
                                 disable_tqdm=True, use_cpu=True, remove_unused_columns=False)  # fmt: skip

    class OurSplit(_InOrder):  # the parts see our trainer's training split (the Fisher samples from it)
        def _tensors(self, dataset):
            return splits.train if dataset is not None else {}

    losses = _Losses()
    trainer = OurSplit(model=model, args=training, train_dataset=order, data_collator=collate, processing_class=tok,
                       parts=parts, part_options=options, callbacks=[losses])  # fmt: skip
    trainer.losses, losses.trainer = [], trainer
    trainer.train()
    assert trainer.losses == cli


def test_a_peft_model_takes_the_perturbation_on_its_own_lora_layers(tmp_path, wikitext_slice, gpt2_tokenizer) -> None:
    """GPT-2 (Conv1D layers) made a PEFT model with perturbable LoRA layers: GGPO needs no adapter part of ours,
    draws noise on PEFT's layers, trains, and leaves the base weights untouched."""
    from peft import LoraConfig, get_peft_model

    from finetune_ext.adapters.peft_linchain import PerturbableLoraLinear, perturbable_config

    tok = load_tokenizer(gpt2_tokenizer)
    splits = load_splits(str(wikitext_slice), tok, block_size=32, max_length=32, train_samples=None, val_size=0,
                         seed=SEED)  # fmt: skip
    torch.manual_seed(SEED)
    base = load_model("config:gpt2-tiny", "lm", tok)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    model = get_peft_model(base, perturbable_config(lora))
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    dataset = [{"input_ids": b, "labels": b} for b in splits.train["input_ids"][:16]]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                             report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=True)  # fmt: skip
    trainer = PartsTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        parts={"perturbation": "ggpo"},
        part_options={"perturbation": {"ramp": "constant"}},
    )
    ggpo = trainer.parts["perturbation"]
    assert len(ggpo.layers) == 4 and all(isinstance(m, PerturbableLoraLinear) for m in ggpo.layers.values())
    trainer.train()
    assert all(g.grad_norms is not None for g in ggpo.groups)  # it read PEFT's adapter gradients
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_parameters() if k in frozen)
