"""The method studies under benchmarks/methods/ stay runnable: each script imports against the current package
(ggpo.py once imported a reader that had moved), and the GGPO study's noisy data is what it claims."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from finetune_ext.data import labelled
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
    split = labelled.read(str(folder), None, None)
    return tuple([(e.texts[0], int(e.label)) for e in split[k]] for k in ("train", "test"))


def test_ggpo_noisy_data_flips_the_fraction_and_keeps_dev_out_of_selection(tmp_path, monkeypatch) -> None:
    source_train, source_dev = _rows(shared_data("SST-2"))
    ggpo = _load("ggpo.py", monkeypatch)
    train, dev = _rows(ggpo.noisy_data(tmp_path, n=50, n_val=30, noise=0.2, seed=3))
    assert dev == source_dev
    assert len(train) == 80 and not set(train) & set(dev)  # the validation slice is held out of train, not dev
    original = dict(source_train)
    assert sum(original[s] != y for s, y in train) == 16


def test_paired_interval_matches_a_t_test(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(METHODS))
    from _stats import paired
    from scipy import stats

    a = {0: 0.71, 1: 0.74, 2: 0.69, 3: 0.73, 4: 0.72}
    b = {0: 0.70, 1: 0.70, 2: 0.70, 3: 0.71, 4: 0.69, 9: 0.5}  # seed 9 has no pair: left out
    d = paired(a, b)
    diffs = [a[k] - b[k] for k in a]
    low, high = stats.ttest_1samp(diffs, 0.0).confidence_interval(0.95)
    assert d.n == 5 and d.low == pytest.approx(low) and d.high == pytest.approx(high)
    assert d.verdict() == ("better" if low > 0 else "tie")
    assert paired(b, a).verdict() == ("worse" if low > 0 else "tie")
