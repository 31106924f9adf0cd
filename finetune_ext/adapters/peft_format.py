"""Adapters in PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained(base, folder)`` loads, and PEFT LoRA folders loaded into our layers.

LoRA maps one to one. LinChain is folded on export: ``lora_A = M_k⋯M_1·A`` and, with mixer biases, the
rank-space bias becomes PEFT's ``lora_B.bias = B·beff`` (``lora_bias=True``), so PEFT's output
``s·(B·A'·x + B·beff)`` is ours. Keys are ``base_model.model.<module>.lora_A.weight`` etc., as PEFT writes them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from finetune_ext.adapters.config import LinChainConfig
from finetune_ext.adapters.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    _modules_to_save,
    adapters,
    apply_linchain,
    copy_checked,
)

PREFIX = "base_model.model."
# PEFT LoRA options our layers do not have, with the value that means "not used".
_UNSUPPORTED = {
    "use_dora": False, "use_rslora": False, "lora_bias": False, "bias": "none", "rank_pattern": {},
    "alpha_pattern": {}, "layers_to_transform": None, "exclude_modules": None, "layer_replication": None,
    "target_parameters": None, "trainable_token_indices": None, "use_qalora": False,
}  # fmt: skip


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters (LinChain folded into ``lora_A``) and ``modules_to_save`` under PEFT's key names."""
    config: LinChainConfig = _config(model)
    out = {}
    with torch.no_grad():
        for name, a in adapters(model).items():
            A, c = a.factors()
            out[f"{PREFIX}{name}.lora_A.weight"] = A
            out[f"{PREFIX}{name}.lora_B.weight"] = a.lora_B
            if c is not None:
                out[f"{PREFIX}{name}.lora_B.bias"] = a.lora_B @ c
        for name in _saved_names(model, config):
            for pname, p in model.get_submodule(name).named_parameters():
                out[f"{PREFIX}{name}.{pname}"] = p
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_peft(model: nn.Module, path: str | Path) -> Path:
    """Write the model's adapters as a PEFT LoRA folder (loadable with ``PeftModel.from_pretrained``)."""
    config = _config(model)
    found = adapters(model)
    if any(a.merged for a in found.values()):
        raise ValueError("model: its adapters are merged into the base weights; unmerge(model) before save_peft")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_state_dict(model)
    targets = config.target_modules if config.target_modules != "all-linear" else sorted(found)
    peft_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "modules_to_save": _saved_names(model, config) or None,
        "fan_in_fan_out": any(a.conv1d for a in found.values()),
        "bias": "none",
        "lora_bias": any(k.endswith("lora_B.bias") for k in tensors),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2) + "\n")
    return out


def load_peft(model: nn.Module, path: str | Path) -> dict[str, nn.Module]:
    """Put the PEFT LoRA adapter in ``path`` on a fresh base ``model`` as our LoRA layers and load its weights.

    Everything is checked before the weights are copied; on any error the model is left as it was."""
    path = Path(path)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"path: {path / f} not found (expected a PEFT adapter folder)")
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"path: {path / CONFIG_FILE} is not valid JSON ({err})") from None
    config = lora_config_from_peft(data)
    try:
        tensors = {_ours(k): v for k, v in load_file(str(path / WEIGHTS_FILE)).items()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"path: {path / WEIGHTS_FILE} is not a readable safetensors file ({err})") from None
    config.modules_to_save = [t for t in config.modules_to_save if _has_module(model, t)]  # PEFT lists "score" too
    trainable = {p: p.requires_grad for p in model.parameters()}
    try:
        with torch.random.fork_rng(devices=[]):  # the fresh adapters' initial draws are overwritten below
            found = apply_linchain(model, config)
    except ValueError as err:
        raise ValueError(f"path: the adapter does not fit {type(model).__name__} ({err})") from None
    copy_checked(model, tensors, trainable)
    return found


def lora_config_from_peft(data: dict[str, Any]) -> LinChainConfig:
    """Our ``LinChainConfig`` (chain length 0) for a PEFT LoRA config; options we do not have are refused."""
    if data.get("peft_type") != "LORA":
        raise ValueError(f"adapter_config.json: peft_type {data.get('peft_type')!r} is not supported (only LORA)")
    for key, unused in _UNSUPPORTED.items():
        value = data.get(key)
        if value not in (None, {}, []) and value != unused:
            raise ValueError(f"adapter_config.json: {key}={data[key]!r} is not supported (expected {unused!r})")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if data.get(key) is None]
    if missing:
        raise ValueError(f"adapter_config.json: missing {', '.join(missing)}")
    return LinChainConfig(
        r=data["r"],
        alpha=float(data["lora_alpha"]),
        dropout=float(data.get("lora_dropout", 0.0)),
        target_modules=data["target_modules"],
        modules_to_save=data.get("modules_to_save") or [],
        chain_length=0,
    )


def _config(model: nn.Module) -> LinChainConfig:
    if not hasattr(model, "_linchain"):
        raise ValueError("model: has no adapters to export")
    return model._linchain["config"]


def _saved_names(model: nn.Module, config: LinChainConfig) -> list[str]:
    """Full names of the modules trained in full beside the adapters."""
    saved = {id(m) for m in _modules_to_save(model, config)}
    return [n for n, m in model.named_modules() if id(m) in saved]


def _has_module(model: nn.Module, suffix: str) -> bool:
    return any(n == suffix or n.endswith("." + suffix) for n, _ in model.named_modules())


def _ours(key: str) -> str:
    """PEFT key -> our parameter name (``...lora_A.weight`` -> ``...lora_A``)."""
    if not key.startswith(PREFIX):
        raise ValueError(f"path: tensor {key!r} is not a PEFT adapter key (expected the prefix {PREFIX!r})")
    key = key.removeprefix(PREFIX)
    for p in ("lora_A", "lora_B"):
        if key.endswith(f".{p}.weight"):
            return key.removesuffix(".weight")
    return key
