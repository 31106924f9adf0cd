"""The API reference has something to say: everything a package exports has a docstring."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = [
    "ops",
    "nn",
    "curvature",
    "data",
    "parts",
    "adapters",
    "guided",
    "perturb",
    "optim",
    "lift",
    "train",
    "integrations",
]


@pytest.mark.parametrize("package", PACKAGES)
def test_exports_have_docstrings(package: str) -> None:
    module = importlib.import_module(f"finetune_ext.{package}")
    assert inspect.getdoc(module), f"finetune_ext.{package} has no docstring"
    missing = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
            missing.append(name)
    assert missing == [], f"finetune_ext.{package}: no docstring on {missing}"
