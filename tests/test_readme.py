"""Every Python example in the README runs as written (from a checkout with ``../shared`` beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = [
    (README.count("\n", 0, m.start()) + 2, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", README, re.DOTALL)
]


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_example_runs(line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = ROOT.parent / "shared"
    if not shared.is_dir():
        pytest.skip("needs ../shared beside the checkout")
    (tmp_path / "shared").symlink_to(shared)
    checkout = tmp_path / "main"  # examples write runs/...; keep them out of the real checkout
    checkout.mkdir()
    monkeypatch.chdir(checkout)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__readme__"})
