"""Tokenized data cached on disk, keyed by the texts, the tokenizer and how it was called.

Tokenizing WikiText-2 took 4.4 s on the 2-core dev machine, on every run, resume and sweep point (WikiText-103 is
50 times larger); reading the ids back took 0.13 s. The tensors are saved as
``<cache>/tokens/<sha256>.safetensors``, where the hash covers the texts, the tokenizer's complete definition and
the call's settings, so any change to one of them misses. Integer tensors are stored as int32 and read back as
int64. ``$FINETUNE_EXT_CACHE`` sets the folder (default ``$XDG_CACHE_HOME/finetune_ext``, else
``~/.cache/finetune_ext``); ``FINETUNE_EXT_CACHE=off`` turns it off. Tokenizers without a serialisable
definition (the slow, pure-Python ones) are never cached."""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

VERSION = "1"  # part of every key: bump when the ids a tokenization gives change meaning


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
        try:
            return {k: v.long() if v.dtype == torch.int32 else v for k, v in load_file(file).items()}
        except (SafetensorError, OSError) as err:
            warnings.warn(f"token cache: {file} is unreadable ({err}); tokenizing again", stacklevel=2)
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


def _save(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Written under a temporary name and renamed, so a killed run or a second rank never leaves half a file."""
    tmp = file.with_suffix(f".{os.getpid()}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.int() if v.dtype == torch.int64 else v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, file)
    except OSError as err:  # a full or read-only disk costs the next run a tokenization, nothing more
        with contextlib.suppress(OSError):
            tmp.unlink()
        warnings.warn(f"token cache: cannot write {file} ({err.strerror or err})", stacklevel=3)
