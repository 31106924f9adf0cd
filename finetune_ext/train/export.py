"""``finetune-ext export``: a run's model as a PEFT adapter folder or as a merged Hugging Face model folder.

The model is rebuilt from the run's newest intact checkpoint: the base model and tokenizer named in its
config, the run's adapters put on it, then the checkpoint's weights (``final``) or the best-validation ones
(``best``, what summary.json's ``test`` reports) loaded in.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, load_model
from torch import nn

from finetune_ext.adapters.model import apply_linchain, merge_and_unload
from finetune_ext.adapters.peft_format import save_peft
from finetune_ext.errors import RunWarning, UserError
from finetune_ext.train import checkpoint, registry
from finetune_ext.train.models import cast_frozen, load_tokenizer, quantize_4bit
from finetune_ext.train.models import load_model as load_base


def export(run_dir: str | Path, fmt: Literal["peft", "merged"], output: str | Path, weights: str = "best") -> Path:
    """Write the run's adapters (``peft``) or its whole model with adapters merged (``merged``) into ``output``."""
    if fmt not in ("peft", "merged"):
        raise UserError(f"format: expected peft or merged, got {fmt!r}")
    if weights not in ("best", "final"):
        raise UserError(f"weights: expected best or final, got {weights!r}")
    folder, state = _newest_checkpoint(Path(run_dir), weights)
    cfg = state["config"]
    adapter = cfg["parts"].get("adapter", {}).get("name", "none")
    if fmt == "peft" and adapter not in ("lora", "linchain"):
        raise UserError(f"format: the run in {run_dir} trained without adapters (--adapter {adapter}); use merged")
    if fmt == "merged" and cfg.get("dtype") == "nf4":
        raise UserError(f"format: the run in {run_dir} has a 4-bit base, which cannot take the merged update; use peft")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output: {out} exists and is not an empty folder")
    tokenizer = load_tokenizer(cfg["tokenizer"] or cfg["model"].removeprefix("config:"))
    task = {"cls": "classification"}.get(state["model"]["task"], state["model"]["task"])  # runs before one vocabulary
    torch.manual_seed(cfg["seed"])  # a base built from a configuration: the run's initialisation, checked below
    model = load_base(cfg["model"], task, tokenizer, num_labels=state["model"]["num_labels"])
    if cfg.get("dtype") == "nf4":  # the adapters wrap the 4-bit layers, as in the run
        quantize_4bit(model)
    if adapter in ("lora", "linchain"):
        part = registry.build("adapter", adapter, cfg["parts"]["adapter"]["options"])
        apply_linchain(model, part.model_config(model, task))
    if state.get("base_digest") is not None:  # what the run froze: all but the checkpoint's trained state
        trained = checkpoint.trained_names(folder)
        for name, param in model.named_parameters():
            param.requires_grad_(name in trained)
    cast_frozen(model, cfg.get("dtype", "fp32"))  # as the run stored its base (the digest covers the dtype)
    _load_weights(model, folder, state, weights)
    model.float()
    model.eval()
    if fmt == "peft":
        if cfg["model"].startswith("config:"):
            note = "export --format merged to keep them"
            warnings.warn(f"the base model {cfg['model']} is built from a configuration with random weights, which "
                          f"the adapter needs: {note}", RunWarning, stacklevel=2)  # fmt: skip
        save_peft(model, out)
        return out
    if adapter in ("lora", "linchain"):
        merge_and_unload(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _newest_checkpoint(run: Path, weights: str) -> tuple[Path, dict[str, Any]]:
    """The run's newest intact checkpoint and its saved state, verified as ``--resume`` verifies them. A damaged
    newer checkpoint is named: with ``weights="final"`` it is an error (the intact one holds older weights), with
    ``best`` a warning (its best-validation weights are the best up to its own step)."""
    if not run.is_dir() or not checkpoint.folders(run):
        raise UserError(f"run_dir: {run} is not a finetune-ext run (no checkpoint-* folder)")
    folder, damaged = checkpoint.newest_intact(run)
    reasons = "; ".join(f"{p.name}: {why}" for p, why in damaged.items())
    if folder is None:
        raise UserError(f"run_dir: no intact checkpoint in {run} ({reasons})")
    if damaged and weights == "final":
        raise UserError(
            f"run_dir: the newest checkpoint is damaged ({reasons}); the newest intact one, {folder.name}, holds "
            f"older weights than the run's final ones: export --weights best, or resume the run to finish it"
        )
    if damaged:
        warnings.warn(f"run_dir: damaged checkpoint(s) skipped ({reasons}); exporting the best weights up to "
                      f"{folder.name}", RunWarning, stacklevel=3)  # fmt: skip
    state = checkpoint.read_state(folder)
    if "model" not in state:
        raise UserError(f"run_dir: {folder} was written by an older finetune-ext without the model's task; re-run it")
    return folder, state


def _load_weights(model: nn.Module, folder: Path, state: dict[str, Any], weights: str) -> None:
    best = state.get("best_state") if weights == "best" else None
    if weights == "best" and best is None:
        warnings.warn(f"{folder} has no best-validation weights (no validation ran); exporting the final ones",
                      RunWarning, stacklevel=3)  # fmt: skip
    digest = state.get("base_digest")
    if digest is not None:  # the checkpoint holds the trained state; the rebuilt base must be the one trained on
        checkpoint.check_base(model, digest, folder, "run_dir")
    if best is None and digest is None:  # the whole model, as the run saved it
        missing, _ = load_model(model, str(folder / "model.safetensors"), strict=False)
    else:  # a trained state (the best-validation one, or the checkpoint's over a frozen base): one name per tensor
        trained = best if best is not None else load_file(str(folder / "model.safetensors"))
        missing, _ = checkpoint.load_trained_state(model, trained)
    if missing:
        raise UserError(f"run_dir: {folder} does not fit the rebuilt model (missing {sorted(missing)[:3]})")
