"""Parameter blocks of a Hugging Face transformer for ``BlockArmijo``: embeddings, the layers (one or a
chunk per block), and the rest (final norm, pooler, head). Only parameters that require grad are included."""

from __future__ import annotations

import re

from torch import nn

from finetune_ext.errors import UserError

_LAYER = re.compile(r"^(.*?\.(?:layer|h|layers|block))\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer a parameter or module name lies in (``model.layers.3.mlp`` -> 3), or ``None``."""
    match = _LAYER.match(name + ".")
    return int(match.group(2)) if match else None


def blocks_from_model(model: nn.Module, layers_per_block: int = 1) -> list[dict]:
    """``[{"name", "params"}, ...]``: ``embeddings``, ``layers a-b`` (``layers_per_block`` layers each), ``head``.

    ``layers_per_block=1`` on a 12-layer BERT gives 14 blocks; the official PLASLS grouping of BERT-base into
    10 blocks chunks some layers in pairs, which ``layers_per_block=2`` approximates. Empty blocks are dropped.
    """
    if layers_per_block < 1:
        raise ValueError(f"layers_per_block: expected >= 1, got {layers_per_block}")
    embeddings, head, layers = [], [], {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        match = _LAYER.match(name)
        if match:
            layers.setdefault(int(match.group(2)), []).append(p)
        elif "embed" in name or ".wte." in name or ".wpe." in name:
            embeddings.append(p)
        else:
            head.append(p)
    out = [{"name": "embeddings", "params": embeddings}] if embeddings else []
    index = sorted(layers)
    for i in range(0, len(index), layers_per_block):
        chunk = index[i : i + layers_per_block]
        out.append({"name": f"layers {chunk[0]}-{chunk[-1]}", "params": [p for j in chunk for p in layers[j]]})
    if head:
        out.append({"name": "head", "params": head})
    if not out:
        raise ValueError("model: no parameter requires grad, so there is nothing to optimise")
    return out


def check_layer_spec(spec: str, what: str = "layers") -> None:
    """``spec`` is ``"last:K"`` or comma-separated layer indices (``"10,11"``)."""
    if not re.fullmatch(r"last:\d+|\d+(,\d+)*", spec):
        raise UserError(f"{what}: expected 'last:K' or comma-separated layer indices, got {spec!r}")
    if spec.startswith("last:") and int(spec.removeprefix("last:")) < 1:
        raise UserError(f"{what}: expected last:K with K >= 1, got {spec!r}")


def select_layers(model: nn.Module, spec: str, what: str = "layers") -> dict[int, list[tuple[str, nn.Parameter]]]:
    """The trainable ``(name, parameter)`` pairs of the transformer layers ``spec`` names, by layer index.

    ``spec`` is ``"last:K"`` (the last K layers) or comma-separated indices (``"10,11"``); ``what`` names the
    option in error messages.
    """
    layers: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if (match := _LAYER.match(name)) and p.requires_grad:
            layers.setdefault(int(match.group(2)), []).append((name, p))
    if not layers:
        raise UserError(f"{what}: the model has no trainable transformer layers")
    check_layer_spec(spec, what)
    if spec.startswith("last:"):
        k = int(spec.removeprefix("last:"))
        if not 1 <= k <= len(layers):
            raise UserError(f"{what}: expected last:1..last:{len(layers)}, got {spec!r}")
        return {i: layers[i] for i in sorted(layers)[-k:]}
    unknown = [i for i in map(int, spec.split(",")) if i not in layers]
    if unknown:
        raise UserError(f"{what}: no layer {unknown}; the model has 0..{max(layers)}")
    return {i: layers[i] for i in sorted(set(map(int, spec.split(","))))}


def train_only(model: nn.Module, spec: str, what: str = "layers") -> dict[int, list[tuple[str, nn.Parameter]]]:
    """Freeze every parameter but those of the layers ``spec`` names (see ``select_layers``); returns those."""
    layers = select_layers(model, spec, what)
    chosen = {id(p) for params in layers.values() for _, p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return layers
