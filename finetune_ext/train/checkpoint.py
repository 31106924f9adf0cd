"""Checkpoints: written atomically, verified on resume, pruned only within their own run.

Layout: ``<out>/checkpoint-<step>/{model.safetensors, state.pt, rng-rank<r>.pt, manifest.json}`` and
``<out>/latest`` (the newest one's name). A checkpoint is assembled in ``.tmp-checkpoint-<step>``; its
``manifest.json`` (run id, step, size and SHA-256 of every file) is written last, then the folder is renamed
into place and ``latest`` replaced with ``os.replace``, so a crash at any point leaves the previous checkpoint
intact. Resuming verifies checkpoints newest first against their manifests and takes the first intact one.
Pruning removes only checkpoints whose manifest names the current run, oldest step first; a folder is renamed
to ``.trash-*`` before it is deleted, so an interrupted prune never leaves half a checkpoint under its name.

When part of the model is frozen (adapters, LiFT's blocks), ``model.safetensors`` holds only the trained state
(``trained_state``: parameters that require grad, and buffers) and ``state.pt`` a SHA-256 digest of the frozen
parameters (``frozen_digest``), which resume and export check against the model they rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from finetune_ext.errors import UserError
from finetune_ext.parts.distributed import full_tensor, is_sharded, shard_like

LATEST, MANIFEST = "latest", "manifest.json"
TMP_PREFIX, TRASH_PREFIX = ".tmp-checkpoint-", ".trash-"
_NAME = re.compile(r"checkpoint-(\d+)")


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


def name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def folders(out: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` folder in ``out``, by step."""
    found = [(int(m[1]), p) for p in out.glob("checkpoint-*") if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _tmp_dir(out: Path, step: int) -> Path:
    return out / f"{TMP_PREFIX}{step:07d}"


def write_rng(out: Path, step: int, rank: int) -> None:
    """Every rank writes its generator states into the checkpoint being assembled."""
    tmp = _tmp_dir(out, step)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
    except OSError as err:
        _abandon(tmp, step, err)


def commit(
    out: Path, step: int, model: nn.Module, state: dict[str, Any], keep: int, run_id: str,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:  # fmt: skip
    """Rank 0: add weights, state and manifest to the assembled folder, rename it into place, move ``latest``,
    prune this run's older checkpoints. The weights are ``weights`` (the trained state, when the base is frozen:
    ``trained_state``, gathered on every process) or else the whole ``model``. A write error (disk full) removes
    the temporary folder and raises a ``UserError``; the previous checkpoint stays as it was."""
    tmp = _tmp_dir(out, step)
    final = out / name(step)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        if weights is None:
            save_model(model, str(tmp / "model.safetensors"))
        else:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        torch.save(state, tmp / "state.pt")
        files = {p.name: _digest(p) for p in sorted(tmp.iterdir())}
        _write_synced(tmp / MANIFEST, json.dumps({"run_id": run_id, "step": step, "files": files}, indent=1))
        if final.exists():
            remove(final)
        os.replace(tmp, final)
        point_latest(out, final)
    except OSError as err:
        _abandon(tmp, step, err)
    mine = [f for f in folders(out) if f != final and _run_id(f) == run_id]
    for old in mine[: max(len(mine) + 1 - keep, 0)] if keep > 0 else []:
        remove(old)
    return final


def _abandon(tmp: Path, step: int, err: OSError) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
    raise UserError(
        f"checkpoint: cannot write {name(step)} in {tmp.parent} ({err.strerror or err}); "
        "the previous checkpoint is intact"
    ) from None


def _write_synced(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _digest(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return {"size": path.stat().st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def _manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _run_id(folder: Path) -> str | None:
    manifest = _manifest(folder)
    return manifest.get("run_id") if isinstance(manifest, dict) else None


def remove(folder: Path) -> None:
    """Rename out of the ``checkpoint-*`` namespace first, then delete."""
    trash = folder.with_name(TRASH_PREFIX + folder.name)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def damage(folder: Path) -> str | None:
    """Why ``folder`` is not an intact checkpoint (``None`` if it is): its manifest against its files."""
    manifest = _manifest(folder)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return f"no readable {MANIFEST} (written before it completed?)"
    for file, expected in manifest["files"].items():
        path = folder / file
        if not path.is_file():
            return f"{file} is missing"
        if _digest(path) != expected:
            return f"{file} does not match its checksum"
    return None


def newest_intact(out: Path) -> tuple[Path | None, dict[Path, str]]:
    """The newest intact checkpoint and, newer than it, the damaged ones with the reason."""
    damaged = {}
    for folder in reversed(folders(out)):
        reason = damage(folder)
        if reason is None:
            return folder, damaged
        damaged[folder] = reason
    return None, damaged


def point_latest(out: Path, folder: Path) -> None:
    _write_synced(out / (LATEST + ".tmp"), folder.name)
    os.replace(out / (LATEST + ".tmp"), out / LATEST)


def read_state(folder: Path) -> dict[str, Any]:
    """The saved run state of checkpoint ``folder`` (config, step, part states), without touching a model."""
    return torch.load(folder / "state.pt", weights_only=False)


def load(
    folder: Path, model: nn.Module, rank: int, base_digest: str | None = None, model_digest: str | None = None
) -> None:
    """Load the weights of checkpoint ``folder`` into ``model`` and restore this rank's RNG states.
    ``base_digest``: the checkpoint holds only the trained state, and the model's frozen parameters must have
    this digest (``model_digest``: theirs, computed before the model was sharded; else computed here)."""
    load_weights(folder, model, base_digest, "resume", model_digest)
    rng_file = folder / f"rng-rank{rank}.pt"
    if not rng_file.exists():
        raise UserError(f"resume: checkpoint {folder} has no RNG state for rank {rank} (saved with fewer processes?)")
    set_rng_state(torch.load(rng_file, weights_only=False))


def load_weights(
    folder: Path, model: nn.Module, base_digest: str | None, what: str, model_digest: str | None = None
) -> None:
    """The checkpoint's ``model.safetensors`` into ``model``: every tensor, or (``base_digest`` given) the
    trained state over a base whose frozen parameters are checked against the digest; a sharded model takes its
    shard of each."""
    if base_digest is not None:
        check_base(model, base_digest, folder, what, model_digest)
    if base_digest is None and not is_sharded(model):
        missing, unexpected = load_model(model, str(folder / "model.safetensors"))
    else:  # the trained state (over a frozen base, or of a sharded full fine-tune), each shard taking its part
        missing, unexpected = load_trained_state(model, load_file(str(folder / "model.safetensors")))
    if missing or unexpected:
        raise UserError(
            f"{what}: checkpoint {folder} does not fit the model: missing {missing}, unexpected {unexpected}"
        )


def trained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changes: parameters that require grad and the persistent buffers (one name per tensor),
    whole: FSDP shards are gathered (a collective: every process calls it)."""
    return {k: full_tensor(v) for k, v in _trained_tensors(model).items()}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Copy ``state`` (whole tensors, as ``trained_state`` returns them) into the model's trained tensors, each
    FSDP shard taking its part; returns the trained names ``state`` lacks and the names it has beyond them."""
    own = _trained_tensors(model)
    with torch.no_grad():
        for key, value in state.items():
            if key in own:
                own[key].copy_(shard_like(value.to(own[key].dtype), own[key]))
    return [k for k in own if k not in state], [k for k in state if k not in own]


def _trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad and registered buffers, by state-dict name (not the extra entries a layer's
    ``state_dict`` adds, such as a 4-bit layer's quantization state: they belong to the frozen base)."""
    # By name: under FSDP a unit's parameters are other objects while it is gathered (after a forward).
    kept = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    out, seen = {}, set()
    for key, value in model.state_dict(keep_vars=True).items():
        if key in kept and id(value) not in seen:
            seen.add(id(value))
            out[key] = value.detach()
    return out


def frozen_digest(model: nn.Module, trained: Collection[str] | None = None) -> str | None:
    """SHA-256 of the frozen parameters (names, dtypes, shapes, bytes); ``None`` when every parameter trains.
    Frozen: not requiring grad, or (``trained`` given: the names a checkpoint holds) not in ``trained``."""
    named = model.named_parameters(remove_duplicate=True)
    frozen = sorted((n, p) for n, p in named if (n not in trained if trained is not None else not p.requires_grad))
    if not frozen:
        return None
    h = hashlib.sha256()
    for n, p in frozen:
        h.update(f"{n}:{p.dtype}:{tuple(p.shape)};".encode())
        h.update(p.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trained_names(folder: Path) -> set[str]:
    """The names of the tensors in the checkpoint's ``model.safetensors``."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def check_base(model: nn.Module, digest: str, folder: Path, what: str, model_digest: str | None = None) -> None:
    """A ``UserError`` unless the model's parameters outside the checkpoint's trained state have the digest the
    checkpoint recorded."""
    if (model_digest or frozen_digest(model, trained_names(folder))) != digest:
        raise UserError(
            f"{what}: the base model's frozen weights differ from those {folder.name} was trained on "
            "(another model, seed or revision?); the checkpoint holds only the trained weights"
        )
