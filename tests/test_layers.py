"""The import contract of ARCHITECTURE.md: every import inside the package (module level or inside a function)
points to the same package or to a lower layer, and the method packages load without the run."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "finetune_ext"

# Lowest first. A module may import its own top-level package and anything in a lower layer, nothing else.
LAYERS: list[tuple[str, ...]] = [
    ("_build_meta", "errors", "testing", "safefiles"),
    ("_devices", "reference"),
    ("ops",),
    ("_loader",),
    ("nn", "curvature", "data"),
    ("parts",),
    ("adapters", "guided", "perturb", "optim", "lift"),
    ("train", "bench", "selfcheck"),
    ("cli", "integrations"),
]
# Imports between the method packages, each declared: LiFT's warm-up is the AdamW stepper and its blocks are
# optim's layer selection.
SIBLING_EDGES = {("lift", "optim")}
ROOT_IMPORTS = {"ops", "nn", "_loader"}  # finetune_ext/__init__.py: what `import finetune_ext` loads


def _layer(top: str) -> int:
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"finetune_ext.{top} is in no layer of tests/test_layers.py: add it to LAYERS")


def _top(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "finetune_ext" and len(parts) > 1 else None


def _imports(file: Path) -> list[tuple[int, str]]:
    """(line, imported top-level subpackage of finetune_ext) of every import in ``file``."""
    here = file.relative_to(PACKAGE.parent).with_suffix("").parts
    package = here[:-1]
    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _top(a.name)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            if base == "finetune_ext":
                found += [(node.lineno, a.name) for a in node.names]
            else:
                found.append((node.lineno, _top(base)))
    return [(line, top) for line, top in found if top]


def violations() -> list[str]:
    """Every import that points up or sideways without a declared edge, as ``file:line: a -> b``."""
    bad = []
    for file in sorted(PACKAGE.rglob("*.py")):
        rel = file.relative_to(PACKAGE)
        me = rel.parts[0].removesuffix(".py")
        for line, top in _imports(file):
            if top == me:
                continue
            if rel.as_posix() == "__init__.py":
                ok = top in ROOT_IMPORTS
            else:
                ok = _layer(top) < _layer(me) or (me, top) in SIBLING_EDGES
            if not ok:
                bad.append(f"finetune_ext/{rel}:{line}: {me} -> {top}")
    return bad


def test_imports_point_down() -> None:
    assert violations() == []


def test_the_contract_catches_an_upward_import(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "finetune_ext"
    (fake / "optim").mkdir(parents=True)
    (fake / "optim" / "bad.py").write_text("def f():\n    from finetune_ext.train import trainer\n")
    (fake / "optim" / "ok.py").write_text("from finetune_ext.parts import Stepper\nfrom . import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    assert violations() == ["finetune_ext/optim/bad.py:2: optim -> train"]


@pytest.mark.parametrize("module", ["finetune_ext.optim", "finetune_ext.adapters", "finetune_ext.ops"])
def test_method_packages_load_without_the_run(module: str) -> None:
    run = ("finetune_ext.train", "transformers.trainer")
    code = (
        f"import json, sys, warnings; warnings.simplefilter('ignore'); import {module}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({run!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
