"""Where text comes from: the hub, local text files, the shared data folder; line tokenization."""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from finetune_ext.errors import UserError

HUB_LM = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1"), "wikitext-103": ("wikitext", "wikitext-103-raw-v1")}


def shared_data_dir() -> Path:
    """``$FINETUNE_EXT_DATA``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("FINETUNE_EXT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def lm_texts(data: str) -> dict[str, list[str]]:
    """The ``train``, ``valid`` and ``test`` lines of a language-modelling source (hub name or folder)."""
    if data in HUB_LM:
        ds = load_hub(data, HUB_LM[data])
        return {"train": ds["train"]["text"], "valid": ds["validation"]["text"], "test": ds["test"]["text"]}
    path = Path(data).expanduser()
    out = {}
    for split in ("train", "valid", "test"):
        file = path / f"{split}.txt"
        if not file.exists():
            raise UserError(f"data: missing {file} (a language-modelling folder needs train.txt, valid.txt, test.txt)")
        out[split] = read_text(file).splitlines(keepends=True)
    return out


def load_hub(name: str, spec: tuple[str, str]):
    """The hub data set ``spec`` (a one-line ``UserError`` naming ``name`` when it cannot be loaded)."""
    import datasets

    try:
        return datasets.load_dataset(*spec)
    except Exception as err:  # network, cache and hub errors have no common type
        raise UserError(f"data: cannot load {name!r} from the hub ({str(err).strip().splitlines()[0]})") from None


def tokenize_lines(tokenizer: PreTrainedTokenizerBase, lines: list[str], desc: str | None = None) -> list[int]:
    """The lines' token ids, concatenated (no special tokens); a progress bar labelled ``desc`` if given."""
    ids: list[int] = []
    with tqdm(total=len(lines), desc=desc, unit="line", disable=desc is None) as bar:
        for chunk in _batched(lines, 1000):
            for row in tokenizer(chunk, add_special_tokens=False)["input_ids"]:
                ids.extend(row)
            bar.update(len(chunk))
    return ids


def read_text(file: Path) -> str:
    """The file as UTF-8 text; an error naming the line of the first byte that is not UTF-8."""
    raw = file.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise UserError(f"data: {file}:{line} is not UTF-8 (byte {raw[err.start]:#04x}); convert it to UTF-8") from None


def _batched(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]
