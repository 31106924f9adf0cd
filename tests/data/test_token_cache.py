"""The token cache: a second load reads the ids back instead of tokenizing, any change to the text or the
tokenizer misses, an unreadable file is tokenized again, a failed write leaves no file, ``off`` writes nothing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finetune_ext import safefiles
from finetune_ext.data import splits as data
from finetune_ext.errors import RunWarning
from finetune_ext.train.models import load_tokenizer


def _load(folder: Path, tokenizer, block_size: int = 32) -> dict[str, torch.Tensor]:
    s = data.load_splits(str(folder), tokenizer, block_size=block_size, max_length=32, train_samples=None,
                         val_size=0, seed=0)  # fmt: skip
    return {"train": s.train["input_ids"], "val": s.val["input_ids"], "test": s.test["input_ids"]}


def _no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenized although the cache holds these ids")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("FINETUNE_EXT_CACHE", str(folder))
    return folder


@pytest.fixture
def tokenizer(gpt2_tokenizer):
    return load_tokenizer(gpt2_tokenizer)


def test_second_load_reads_the_cache_and_equals_tokenizing(cache, tokenizer, wikitext_slice, monkeypatch) -> None:
    monkeypatch.setenv("FINETUNE_EXT_CACHE", "off")
    direct = _load(wikitext_slice, tokenizer)
    monkeypatch.setenv("FINETUNE_EXT_CACHE", str(cache))
    first = _load(wikitext_slice, tokenizer)
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 3  # one file per split
    monkeypatch.setattr(data, "tokenize_lines", _no_tokenizing)
    second = _load(wikitext_slice, tokenizer, block_size=16)  # blocks are cut after the cache
    for split in direct:
        assert torch.equal(first[split], direct[split])
        assert torch.equal(second[split].flatten()[: direct[split].numel()], direct[split].flatten())


def test_changed_text_or_tokenizer_misses(cache, tokenizer, wikitext_slice, tmp_path, monkeypatch) -> None:
    _load(wikitext_slice, tokenizer)
    edited = tmp_path / "edited"
    edited.mkdir()
    for split in ("train", "valid", "test"):
        (edited / f"{split}.txt").write_text((wikitext_slice / f"{split}.txt").read_text() + " one more line\n")
    _load(edited, tokenizer)
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 6
    tokenizer.add_tokens(["one more"])  # the tokenizer's definition changes, so do the ids
    with_token = _load(edited, tokenizer)
    assert len(list((cache / "tokens").glob("*.safetensors"))) == 9
    monkeypatch.setenv("FINETUNE_EXT_CACHE", "off")
    assert all(torch.equal(with_token[k], v) for k, v in _load(edited, tokenizer).items())


def test_unreadable_file_is_tokenized_again(cache, tokenizer, wikitext_slice) -> None:
    first = _load(wikitext_slice, tokenizer)
    for file in (cache / "tokens").glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[:40])
    with pytest.warns(UserWarning, match="token cache: .* is unreadable"):
        again = _load(wikitext_slice, tokenizer)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: read back without a warning
        third = _load(wikitext_slice, tokenizer)
    assert all(torch.equal(first[k], third[k]) for k in first)


def test_a_failed_write_warns_and_leaves_no_file(cache, tokenizer, wikitext_slice, monkeypatch) -> None:
    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(safefiles, "save_file", disk_full)
        with pytest.warns(UserWarning, match=r"token cache: cannot write .* \(No space left on device\)"):
            first = _load(wikitext_slice, tokenizer)
    assert list((cache / "tokens").iterdir()) == []
    assert all(torch.equal(first[k], v) for k, v in _load(wikitext_slice, tokenizer).items())
    assert len(list((cache / "tokens").iterdir())) == 3


def test_changed_id_bytes_are_reported_removed_and_tokenized_again(cache, tokenizer, wikitext_slice) -> None:
    first = _load(wikitext_slice, tokenizer)
    file = max((cache / "tokens").iterdir(), key=lambda f: f.stat().st_size)  # the training split's ids
    raw = bytearray(file.read_bytes())
    raw[-5] ^= 0x01  # a bit of the last id flipped; the header (and its offsets) intact
    file.write_bytes(bytes(raw))
    with pytest.warns(RunWarning, match=rf"token cache: {file} does not match its digest .*tokenizing again"):
        again = _load(wikitext_slice, tokenizer)
    assert all(torch.equal(first[k], v) for k, v in again.items())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _load(wikitext_slice, tokenizer)  # written anew, intact


def test_cached_ids_beyond_the_vocabulary_are_recomputed(cache, tokenizer, wikitext_slice) -> None:
    first = _load(wikitext_slice, tokenizer)
    file = max((cache / "tokens").iterdir(), key=lambda f: f.stat().st_size)
    ids = load_file(file)["ids"]
    ids[0] = len(tokenizer) + 7
    save_file({"ids": ids}, file, metadata={"sha256": safefiles.digest({"ids": ids})})  # a consistent digest
    with pytest.warns(RunWarning, match=rf"{file} holds token ids outside the vocabulary \[0, {len(tokenizer)}\)"):
        again = _load(wikitext_slice, tokenizer)
    assert all(torch.equal(first[k], v) for k, v in again.items())


def test_off_writes_nothing(tmp_path, tokenizer, wikitext_slice, monkeypatch) -> None:
    monkeypatch.setenv("FINETUNE_EXT_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _load(wikitext_slice, tokenizer)
    assert not (tmp_path / "xdg").exists() and not (tmp_path / "home").exists()


def test_labelled_splits_are_cached_per_rows_and_max_length(
    cache, tokenizer, gpt2_tokenizer, sst2_slice, monkeypatch
) -> None:
    def load(tok, max_length: int = 32, seed: int = 0):
        return data.load_splits(str(sst2_slice), tok, block_size=32, max_length=max_length, train_samples=None,
                                val_size=100, seed=seed)  # fmt: skip

    monkeypatch.setenv("FINETUNE_EXT_CACHE", "off")
    direct = load(load_tokenizer(gpt2_tokenizer))
    monkeypatch.setenv("FINETUNE_EXT_CACHE", str(cache))
    load(tokenizer)  # a fresh tokenizer: its first call leaves truncation and padding set, which must not count
    monkeypatch.setattr(type(tokenizer), "__call__", _no_tokenizing)
    again = load(tokenizer)
    for split in ("train", "val", "test"):
        mine, theirs = getattr(again, split), getattr(direct, split)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) and mine[k].dtype == theirs[k].dtype for k in mine)
    for other in (dict(max_length=16), dict(seed=1)):  # other settings, other held-out rows: both miss
        with pytest.raises(AssertionError, match="tokenized although"):
            load(tokenizer, **other)
    for side in ("padding_side", "truncation_side"):  # the other side pads or cuts other positions: a miss
        with monkeypatch.context() as patch, pytest.raises(AssertionError, match="tokenized although"):
            patch.setattr(tokenizer, side, "left")
            load(tokenizer)


def test_progress_bar_only_while_tokenizing(cache, tokenizer, wikitext_slice, capsys) -> None:
    def load(progress: bool) -> str:
        data.load_splits(str(wikitext_slice), tokenizer, block_size=32, max_length=32, train_samples=None,
                         val_size=0, seed=0, progress=progress)  # fmt: skip
        return capsys.readouterr().err

    assert load(progress=False) == ""
    (cache / "tokens").rename(cache / "old")  # the next load tokenizes again
    shown = load(progress=True)
    assert all(f"tokenize {split}" in shown for split in ("train", "valid", "test")), shown
    assert load(progress=True) == ""  # read from the cache: nothing to show
