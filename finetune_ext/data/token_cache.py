"""Tokenized data cached on disk, keyed by the texts, the tokenizer and how it was called.

Tokenizing WikiText-2 took 4.4 s on the 2-core dev machine, on every run, resume and sweep point (WikiText-103 is
50 times larger); reading the ids back took 0.13 s. The tensors are saved as
``<cache>/tokens/<sha256>.safetensors``, where the hash covers the texts, the tokenizer's complete definition and
the call's settings, so any change to one of them misses. Integer tensors are stored as int32 and read back as
int64. ``$FINETUNE_EXT_CACHE`` sets the folder (default ``$XDG_CACHE_HOME/finetune_ext``, else
``~/.cache/finetune_ext``); ``FINETUNE_EXT_CACHE=off`` turns it off. Tokenizers without a serialisable
definition (the slow, pure-Python ones) are never cached. Each file carries a SHA-256 digest of its tensors,
checked on every read with the token ids' range: a damaged entry is reported with its path, removed and computed
again."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from finetune_ext import safefiles
from finetune_ext.errors import RunWarning

ID_KEYS = ("ids", "input_ids")  # token ids, checked against the vocabulary on every read

VERSION = "2"  # part of every key: bump when the ids a tokenization gives, or the file format, change


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when ``FINETUNE_EXT_CACHE=off``."""
    env = os.environ.get("FINETUNE_EXT_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "finetune_ext"


def cached(
    tokenizer: PreTrainedTokenizerBase,
    texts: Iterable[str],
    settings: str,
    compute: Callable[[], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``compute()``, from the cache when these texts went through this tokenizer with these settings before."""
    folder, key = cache_dir(), _key(tokenizer, texts, settings)
    if folder is None or key is None:
        return compute()
    file = folder / "tokens" / f"{key}.safetensors"
    if file.exists():
        hit, problem = _read(file, len(tokenizer))
        if hit is not None:
            return hit
        warnings.warn(f"token cache: {file} {problem}; removed it, tokenizing again", RunWarning, stacklevel=2)
        with contextlib.suppress(OSError):
            file.unlink()
    out = compute()
    _save(out, file)
    return out


def _key(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], settings: str) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    # Truncation and padding are left in the backend by the last call, so they are not the tokenizer's (the
    # call's `settings` are): cleared here, transformers sets them again on its next call.
    backend.no_truncation()
    backend.no_padding()
    h = hashlib.sha256(f"{VERSION}\0{type(tokenizer).__name__}\0{settings}\0".encode())
    h.update(backend.to_str().encode())
    for text in texts:
        raw = text.encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    return h.hexdigest()


def _read(file: Path, vocab_size: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached tensors (int64 ids) if ``file`` is intact and its ids lie in the vocabulary; else ``None`` and
    what is wrong with it."""
    stored, problem = safefiles.load(file)
    if stored is None:
        return None, problem
    for key in ID_KEYS:
        ids = stored.get(key)
        if ids is not None and ids.numel() and not (int(ids.min()) >= 0 and int(ids.max()) < vocab_size):
            return None, f"holds token ids outside the vocabulary [0, {vocab_size})"
    return {k: v.long() if v.dtype == torch.int32 else v for k, v in stored.items()}, ""


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Written under a temporary name and renamed, so a killed run or a second rank never leaves half a file."""
    try:
        safefiles.save({k: v.int() if v.dtype == torch.int64 else v for k, v in tensors.items()}, file)
    except OSError as err:  # a full or read-only disk costs the next run a tokenization, nothing more
        warnings.warn(f"token cache: cannot write {file} ({err.strerror or err})", RunWarning, stacklevel=3)
