"""Checkpoints written atomically: everything goes into a temporary folder that is then renamed, and the
``latest`` pointer is replaced with ``os.replace``. A crash leaves the previous checkpoint intact.

Layout: ``<out>/checkpoint-<step>/{model.safetensors, state.pt, rng-rank<r>.pt}`` and ``<out>/latest``.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tmp_dir(out: Path, step: int) -> Path:
    return out / f".tmp-checkpoint-{step:07d}"


def write_rng(out: Path, step: int, rank: int) -> None:
    """Every rank writes its generator states into the checkpoint being assembled."""
    tmp = _tmp_dir(out, step)
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")


def commit(out: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int) -> Path:
    """Rank 0: add weights and state to the assembled folder, rename it into place, move ``latest``."""
    tmp = _tmp_dir(out, step)
    tmp.mkdir(parents=True, exist_ok=True)
    save_model(model, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    final = out / f"checkpoint-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = out / "latest.tmp"
    with pointer.open("w") as f:
        f.write(final.name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(pointer, out / "latest")
    for old in sorted(out.glob("checkpoint-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
    return final


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint folder, if any."""
    pointer = out / "latest"
    if not pointer.exists():
        return None
    folder = out / pointer.read_text().strip()
    return folder if (folder / "state.pt").exists() else None


def load(folder: Path, model: nn.Module, rank: int) -> dict[str, Any]:
    """Load weights into ``model``, restore this rank's RNG states, return the saved state."""
    missing, unexpected = load_model(model, str(folder / "model.safetensors"))
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}")
    rng_file = folder / f"rng-rank{rank}.pt"
    if not rng_file.exists():
        raise RuntimeError(f"checkpoint {folder} has no RNG state for rank {rank} (saved with fewer processes?)")
    set_rng_state(torch.load(rng_file, weights_only=False))
    return torch.load(folder / "state.pt", weights_only=False)
