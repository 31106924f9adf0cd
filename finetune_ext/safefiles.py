"""Safetensors files that carry a SHA-256 digest of their tensors, written atomically and verified on reading:
what the caches (token ids, Fisher estimates) use so that nothing read from disk is trusted unverified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors as stored (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` with their digest to ``path`` through a temporary file and a rename (``OSError`` on a
    full or read-only disk; no partial file is left)."""
    stored = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(stored, str(tmp), metadata={"sha256": digest(stored)})
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def load(path: Path) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``(tensors, "")`` if ``path`` reads and matches its digest, else ``(None, what is wrong)``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            saved = (f.metadata() or {}).get("sha256")
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        return None, f"is unreadable ({err})"
    if saved is None:
        return None, "carries no digest"
    if digest(tensors) != saved:
        return None, "does not match its digest (damaged)"
    return tensors, ""
