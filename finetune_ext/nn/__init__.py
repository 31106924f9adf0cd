"""Modules built on the fused ops, the helpers that place them in a model, and the interface between weight
perturbations and the adapted layers they act on (``PerturbableLayer``, ``WeightPerturbation``)."""

from torch import nn

from finetune_ext.nn.dropout import FisherDropout, GaussianDropout
from finetune_ext.nn.perturbation import PerturbableLayer, WeightPerturbation


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` of ``model`` (``"transformer.h.0.mlp.dropout"``); returns it."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return module


__all__ = ["FisherDropout", "GaussianDropout", "PerturbableLayer", "WeightPerturbation", "replace_module"]
