"""Parameter blocks of a Hugging Face transformer for ``BlockArmijo``: embeddings, the layers (one or a
chunk per block), and the rest (final norm, pooler, head). Only parameters that require grad are included."""

from __future__ import annotations

import re

from torch import nn

_LAYER = re.compile(r"^(.*?\.(?:layer|h|layers|block))\.(\d+)\.")


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
