"""Every training part, by kind and name, imported only when a run (or ``finetune-ext methods``) needs it.

A run takes one choice per kind. Transforms apply in the order of ``TRANSFORM_KINDS`` (dropout before
adapters: guided dropout reads the Fisher of the model as it comes; perturbations after adapters: they
perturb adapted layers), then the stepper is set up. A kind's
``None`` entry is its no-op choice. Adding a part is one file with a ``Transform`` or ``Stepper`` subclass
and one line here. ``PRESETS`` are the one-word ``--method`` names of earlier releases.
"""

from __future__ import annotations

import importlib
from typing import Any

from finetune_ext.errors import UserError
from finetune_ext.parts import Part
from finetune_ext.parts import options as opts

PARTS: dict[str, dict[str, str | None]] = {
    "dropout": {
        "standard": None,
        "guided": "finetune_ext.guided.parts:GuidedDropout",
        "gaussian": "finetune_ext.guided.parts:GaussianDropoutTransform",
    },
    "adapter": {
        "none": None,
        "lora": "finetune_ext.adapters.parts:LoRA",
        "linchain": "finetune_ext.adapters.parts:LinChain",
    },
    "perturbation": {
        "none": None,
        "flat-lora": "finetune_ext.perturb.parts:FlatLoRA",
        "ggpo": "finetune_ext.perturb.parts:GGPO",
        "mgpo": "finetune_ext.perturb.parts:MGPO",
    },
    "optimizer": {
        "adamw": "finetune_ext.optim.parts:AdamW",
        "armijo": "finetune_ext.optim.parts:Armijo",
        "lift": "finetune_ext.lift.parts:LiFT",
    },
}
TRANSFORM_KINDS = ("dropout", "adapter", "perturbation")
STEPPER_KIND = "optimizer"
NOOP_HELP = {
    "dropout": "the model's own dropout, unchanged",
    "adapter": "no adapter: every parameter trains",
    "perturbation": "the gradient at the weights themselves",
}
DEFAULTS = {kind: next(iter(names)) for kind, names in PARTS.items()}

PRESETS: dict[str, dict[str, str]] = {
    "adamw": {},
    "lora": {"adapter": "lora"},
    "linchain": {"adapter": "linchain"},
    "guided-dropout": {"dropout": "guided"},
    "gaussian-dropout": {"dropout": "gaussian"},
    "armijo": {"optimizer": "armijo"},
    "lift": {"optimizer": "lift"},
    "lora-ggpo": {"adapter": "lora", "perturbation": "ggpo"},
}


def part_class(kind: str, name: str) -> type[Part] | None:
    """The class registered as ``--<kind> <name>`` (``None`` for the kind's no-op choice)."""
    if kind not in PARTS:
        raise UserError(f"part kind: expected one of {', '.join(PARTS)}, got {kind!r}")
    if name not in PARTS[kind]:
        raise UserError(f"{kind}: unknown {name!r}; available: {', '.join(PARTS[kind])}")
    path = PARTS[kind][name]
    if path is None:
        return None
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def build(kind: str, name: str, values: dict[str, Any]) -> Part | None:
    """The part ``--<kind> <name>`` with its options built from ``values`` (strings parsed by type)."""
    cls = part_class(kind, name)
    if cls is None:
        if values:
            raise UserError(f"{kind}-option: {kind} {name!r} takes no options, got {', '.join(values)}")
        return None
    return cls(opts.build(cls.Options, values, f"{kind}-option ({name})"))


def expand_preset(method: str, values: dict[str, Any]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """(choice per kind, options per kind) of preset ``method``; each option goes to the part declaring it."""
    if method not in PRESETS:
        raise UserError(f"method: unknown {method!r}; available: {', '.join(PRESETS)}")
    choices = {**DEFAULTS, **PRESETS[method]}
    owners = {kind: part_class(kind, name) for kind, name in choices.items()}
    routed: dict[str, dict[str, Any]] = {kind: {} for kind in PARTS}
    for key, value in values.items():
        kinds = [k for k, cls in owners.items() if cls is not None and key in opts.field_types(cls.Options)]
        if not kinds:
            valid = sorted({f for cls in owners.values() if cls for f in opts.field_types(cls.Options)})
            raise UserError(f"method-option: {method} has no option {key!r}; valid: {', '.join(valid) or 'none'}")
        if len(kinds) > 1:
            raise UserError(f"method-option: {key!r} is an option of {' and '.join(kinds)}; use --<kind>-option")
        routed[kinds[0]][key] = value
    return choices, routed


def catalogue() -> list[tuple[str, str, str, list[tuple[str, str, Any, str]]]]:
    """``(kind, name, description, option rows)`` of every part, for ``finetune-ext methods`` and the help."""
    rows = []
    for kind, names in PARTS.items():
        for name in names:
            cls = part_class(kind, name)
            if cls is None:
                rows.append((kind, name, NOOP_HELP[kind], []))
            else:
                doc = (cls.__doc__ or "").strip().splitlines()[0]
                rows.append((kind, name, doc, opts.describe(cls.Options)))
    return rows
