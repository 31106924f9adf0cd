"""Every Python example in the README runs as written (from a checkout with ``../shared`` beside it)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from finetune_ext import cli
from finetune_ext.train import check_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _fenced(language: str) -> list[tuple[int, str]]:
    """(line of the first code line, code) of every ``language`` block in the README."""
    return [(README.count("\n", 0, m.start()) + 2, m.group(1))
            for m in re.finditer(rf"```{language}\n(.*?)```", README, re.DOTALL)]  # fmt: skip


BLOCKS = _fenced("python")


def test_the_readme_has_python_examples() -> None:
    assert len(BLOCKS) >= 3


def test_the_readme_is_a_guide_not_a_log() -> None:
    """At most 250 lines; no dates, commit hashes or run numbers (history is CHANGELOG.md's, studies are
    benchmarks/results/'s); every local link resolves."""
    assert README.count("\n") <= 250
    date, commit, run = r"\b20\d\d-\d\d-\d\d\b", r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", r"\brun \d+\b"
    assert re.findall(f"{date}|{commit}|{run}", README) == []
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links and [link for link in links if "://" not in link and not (ROOT / link).exists()] == []


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


def _shell_commands() -> list[tuple[int, list[str]]]:
    """(line, argv after ``finetune-ext``) of every ``finetune-ext`` command in the README's bash blocks."""
    found = []
    for first, block in _fenced("bash"):
        for offset, command in _logical_lines(block):
            words = shlex.split(command, comments=True)
            if words and words[0].endswith("finetune-ext"):
                found.append((first + offset, words[1:]))
    return found


def _logical_lines(block: str) -> list[tuple[int, str]]:
    """Lines joined across trailing backslashes, each with the index of its first physical line."""
    out, start, parts = [], 0, []
    for i, line in enumerate(block.splitlines()):
        if not parts:
            start = i
        parts.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            out.append((start, " ".join(parts)))
            parts = []
    return out


COMMANDS = _shell_commands()


def test_the_readme_has_train_and_export_commands() -> None:
    assert {argv[0] for _, argv in COMMANDS} >= {"train", "export"}


@pytest.mark.parametrize(("line", "argv"), COMMANDS, ids=[f"README.md:{line}" for line, _ in COMMANDS])
def test_readme_command_is_valid(line: int, argv: list[str], tmp_path: Path) -> None:
    """Each command's options exist and take its values (a train command: every option and part checked, as
    ``train`` does before touching any file); an empty folder stands in for $MINILM (README.md: the MiniLM model)."""
    argv = [str(tmp_path) if a == "$MINILM" else a for a in argv]
    args = cli.build_parser(train_options=argv[0] == "train").parse_args(argv)
    if argv[0] == "train":
        check_config(cli.train_config(args))
