"""Modules built on the fused ops, the helpers that place them in a model, and the interface between weight
perturbations and the adapted layers they act on (``PerturbableLayer``, ``WeightPerturbation``)."""

import torch
from torch import nn

from finetune_ext.nn.dropout import FisherDropout, GaussianDropout
from finetune_ext.nn.perturbation import PerturbableLayer, WeightPerturbation


def replace_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the dotted path ``name`` of ``model`` (``"transformer.h.0.mlp.dropout"``); returns it."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return module


OUTPUT_MODULE = "output_dropout"


def insert_output_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at ``name`` = ``"<path>.output_dropout"`` and apply it to the output of ``<path>`` (the first
    tensor of a tuple output) through a forward hook, registered once: later calls replace the module only.

    For models that ship without a dropout module where one belongs (Llama, Mistral, Qwen2): the parameters of
    ``<path>`` keep their names, and adapters placed inside it later are covered."""
    path, _, child = name.rpartition(".")
    if child != OUTPUT_MODULE:
        raise ValueError(f"name: expected '<module path>.{OUTPUT_MODULE}', got {name!r}")
    owner = model.get_submodule(path)
    if OUTPUT_MODULE not in owner._modules:
        owner.register_forward_hook(_apply_output_module)
    setattr(owner, OUTPUT_MODULE, module)
    return module


def _apply_output_module(owner: nn.Module, args: tuple, output):
    module = owner._modules[OUTPUT_MODULE]
    if isinstance(output, torch.Tensor):
        return module(output)
    return (module(output[0]), *output[1:])


__all__ = [
    "FisherDropout",
    "GaussianDropout",
    "PerturbableLayer",
    "WeightPerturbation",
    "insert_output_module",
    "replace_module",
]
