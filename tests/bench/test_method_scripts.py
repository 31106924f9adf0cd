"""The method studies under benchmarks/methods/ stay runnable: each script imports against the current package
(ggpo.py once imported a reader that had moved), and the GGPO study's noisy data is what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from finetune_ext.train import glue
from finetune_ext.train.data import _hold_out
from tests.conftest import shared_data

METHODS = Path(__file__).resolve().parents[2] / "benchmarks" / "methods"
SCRIPTS = sorted(p.name for p in METHODS.glob("*.py") if not p.name.startswith("_"))


def _load(name: str, monkeypatch):
    monkeypatch.syspath_prepend(str(METHODS))  # the scripts import their helpers (_sweep) as siblings
    spec = importlib.util.spec_from_file_location(f"method_script_{name[:-3]}", METHODS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_method_script_imports(name: str, monkeypatch) -> None:
    assert callable(_load(name, monkeypatch).main)


def _rows(folder: Path) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(sentence, label) rows of a folder's train.tsv and dev.tsv, read as the trainer reads them."""
    split = glue.read(str(folder), None, None)
    return tuple([(e.texts[0], int(e.label)) for e in split[k]] for k in ("train", "test"))


def test_ggpo_noisy_data_flips_the_fraction_and_holds_out_the_clean_dev_set(tmp_path, monkeypatch) -> None:
    source_train, source_dev = _rows(shared_data("SST-2"))
    ggpo = _load("ggpo.py", monkeypatch)
    train, dev = _rows(ggpo.noisy_data(tmp_path, n=50, noise=0.2, seed=3))
    assert dev == source_dev
    kept, held_out = _hold_out(train, len(dev), seed=3)  # what the trainer does with val_size = len(dev)
    assert held_out == dev and len(kept) == 50
    original = dict(source_train)
    assert sum(original[s] != y for s, y in kept) == 10
