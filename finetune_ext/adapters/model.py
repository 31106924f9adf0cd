"""Put LinChain adapters on a model, merge them, save and load them.

Adapters wrap the targeted module instances (``parent.<name> = LinChainLinear(module)``); no class is patched.
A forward pre-hook on the model composes every adapter's chain and its ``M A`` in one ``linchain_compose`` and one
``bmm`` per group of same-shaped adapters before each forward, and a hook after it drops the composed tensors.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from finetune_ext.adapters.config import LinChainConfig
from finetune_ext.adapters.layer import LinChainLinear, chain_factors, quantized_base
from finetune_ext.nn import keys, replace_module

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# First name components of output heads, which "all-linear" leaves alone (as PEFT does).
HEAD_NAMES = ("lm_head", "classifier", "score", "cls", "qa_outputs")
_ADAPTER_PARAMS = ("lora_A", "lora_B", "mixer_weight", "mixer_bias")


def adapters(model: nn.Module) -> dict[str, LinChainLinear]:
    """The model's adapters by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LinChainLinear)}


def _matches(name: str, config: LinChainConfig) -> bool:
    targets = config.target_modules
    if targets == "all-linear":
        return name.split(".")[0] not in HEAD_NAMES
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def find_targets(model: nn.Module, config: LinChainConfig) -> list[str]:
    """Names of the modules ``config.target_modules`` selects; a clear error for a miss or a non-linear match."""
    names = []
    for name, module in model.named_modules():
        if not name or not _matches(name, config):
            continue
        packed = isinstance(module, (nn.Linear, Conv1D)) and not module.weight.is_floating_point()
        if packed and not quantized_base(module):
            raise ValueError(
                f"target_modules: {name!r} is a {type(module).__name__} with a packed {module.weight.dtype} weight; "
                "adapters run over dense layers and bitsandbytes' quantized ones only"
            )
        if isinstance(module, (nn.Linear, Conv1D)):
            names.append(name)
        elif config.target_modules != "all-linear":
            raise ValueError(
                f"target_modules: {name!r} is a {type(module).__name__}; LinChain adapts nn.Linear and Conv1D only"
            )
    if isinstance(config.target_modules, list):
        for t in config.target_modules:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ValueError(f"target_modules: {t!r} matches no module of {type(model).__name__}")
    if not names:
        raise ValueError(f"target_modules: {config.target_modules!r} matches no module of {type(model).__name__}")
    return names


def apply_linchain(model: nn.Module, config: LinChainConfig) -> dict[str, LinChainLinear]:
    """Freeze ``model``, wrap the targeted layers in adapters and return them (by name).

    Only adapter parameters and those of ``config.modules_to_save`` train.
    """
    if adapters(model):
        raise ValueError("model: already has LinChain adapters (merge_and_unload or use a fresh model)")
    saved = _modules_to_save(model, config)
    targets = find_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        replace_module(model, name, LinChainLinear(model.get_submodule(name), config, site=keys.site_id(name)))
    for module in saved:
        for p in module.parameters():
            p.requires_grad_(True)
    found = adapters(model)
    pre = model.register_forward_pre_hook(lambda module, args: _compose_all(found.values(), module))
    post = model.register_forward_hook(lambda module, args, out: _clear(found.values()), always_call=True)
    model._linchain = {"config": config, "hooks": (pre, post)}
    return found


def _modules_to_save(model: nn.Module, config: LinChainConfig) -> list[nn.Module]:
    out = []
    for t in config.modules_to_save:
        hits = [m for n, m in model.named_modules() if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"modules_to_save: {t!r} matches no module of {type(model).__name__}")
        out += hits
    return out


def _compose_all(layers, model: nn.Module) -> None:
    """Each chained adapter's ``(M A, beff)`` for this forward: one ``linchain_compose`` and one ``bmm`` per group
    of adapters with the same shapes, instead of a product (and its backward) per layer. Not under activation
    checkpointing: a layer's recomputed forward runs without this hook, so each layer composes its own chain
    (``linchain_linear``) in the forward and in the recompute alike."""
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5; earlier: the other name
    if checkpointing or (checkpointing is None and getattr(model, "is_gradient_checkpointing", False)):
        return
    groups: dict[tuple, list[LinChainLinear]] = defaultdict(list)
    for a in layers:
        if a.mixer_weight is not None and not a.merged:
            w = a.mixer_weight
            groups[(a.r, a.chain_length, a.lora_A.shape[1], w.dtype, w.device, a.mixer_bias is not None)].append(a)
    for group in groups.values():
        _, beff, A = chain_factors(group)
        # unbind: one backward node for the group (select's, one a layer, would each fill a zero [N, r, in])
        cs = beff.unbind(0) if beff is not None else [None] * len(group)
        for a, factors in zip(group, zip(A.unbind(0), cs, strict=True), strict=True):
            a._factors = factors


def _clear(layers) -> None:
    for a in layers:
        a._factors = None


def merge(model: nn.Module) -> None:
    """Fold every adapter into its base layer; the model then runs at dense speed."""
    for a in adapters(model).values():
        a.merge()


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``."""
    for a in adapters(model).values():
        a.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge, then put the base layers back in place of the adapters and remove the hooks."""
    for name, a in adapters(model).items():
        a.merge()
        replace_module(model, name, a.base_layer)
    state = model.__dict__.pop("_linchain", None)
    for h in state["hooks"] if state else ():
        h.remove()
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters and those of ``modules_to_save``, by their names in ``model``."""
    config: LinChainConfig = model._linchain["config"]
    saved = {id(p) for m in _modules_to_save(model, config) for p in m.parameters()}
    return {
        n: p.detach() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in _ADAPTER_PARAMS or id(p) in saved
    }


def save_adapter(model: nn.Module, path: str | Path) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (adapter weights only) into ``path``."""
    if not hasattr(model, "_linchain"):
        raise ValueError("model: has no LinChain adapters to save")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.contiguous().cpu() for n, t in adapter_state_dict(model).items()}
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(model._linchain["config"].to_dict(), indent=2) + "\n")
    return out


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, LinChainLinear]:
    """Put the adapters saved in ``path`` on a fresh base ``model`` (same architecture) and load their weights.

    Everything is checked before the weights are copied; on any error the model is left as it was (no adapters,
    its parameters' ``requires_grad`` restored)."""
    path = Path(path)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"path: {path / f} not found (expected a folder written by save_adapter)")
    config = LinChainConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    tensors = load_file(str(path / WEIGHTS_FILE))
    trainable = {p: p.requires_grad for p in model.parameters()}
    with torch.random.fork_rng(devices=[]):  # the fresh adapters' initial draws are overwritten below
        found = apply_linchain(model, config)
    copy_checked(model, tensors, trainable)
    return found


def copy_checked(model: nn.Module, tensors: dict[str, torch.Tensor], trainable: dict[nn.Parameter, bool]) -> None:
    """Copy ``tensors`` into the adapters just put on ``model`` if they fit exactly; otherwise remove the
    adapters again (``requires_grad`` flags back to ``trainable``) and raise a one-line ``ValueError``."""
    expected = adapter_state_dict(model)
    try:
        _check_fits(expected, tensors)
    except ValueError:
        _remove_adapters(model, trainable)
        raise
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name])


def _check_fits(expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"path: adapter weights do not fit this model; missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, target in expected.items():
        if tensors[name].shape != target.shape:
            raise ValueError(f"path: {name} has shape {list(tensors[name].shape)}, the model {list(target.shape)}")


def _remove_adapters(model: nn.Module, trainable: dict[nn.Parameter, bool]) -> None:
    """Undo ``apply_linchain`` without merging: base layers back in place, hooks removed, flags restored."""
    for name, a in adapters(model).items():
        replace_module(model, name, a.base_layer)
    for h in model.__dict__.pop("_linchain")["hooks"]:
        h.remove()
    for p, flag in trainable.items():
        p.requires_grad_(flag)
