"""The output folder of a run: usable or a one-line error, owned by one run at a time, cleared on ``--overwrite``.

``RunLock`` takes an exclusive ``flock`` on ``<out>/.lock`` for the whole run and writes its owner (pid, host,
start time) into it. The operating system releases the lock when the process dies, so a run killed with
``kill -9`` leaves a lock that the next start takes over (with a warning); a second live run in the same
folder stops with an error naming the holder.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from finetune_ext.errors import RunWarning, UserError
from finetune_ext.train import checkpoint

LOCK_FILE = ".lock"
# What a run writes into its folder besides checkpoints; --overwrite removes exactly these.
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "lift.png")


def check(out: Path, resume: bool, overwrite: bool) -> None:
    """What ``prepare`` and the run's claim would refuse, found without writing: ``out`` is a folder (or can
    become one) and holds checkpoints exactly when ``resume`` or ``overwrite`` says it may."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a folder")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"output_dir: cannot create {out} ({existing} is a file)")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: cannot create {out} ({existing} is not writable)")
    has_checkpoints = out.is_dir() and bool(checkpoint.folders(out))
    if resume and not has_checkpoints:
        raise UserError(f"resume: no checkpoint in {out}")
    if not resume and not overwrite and has_checkpoints:
        raise UserError(f"output_dir: {out} already holds checkpoints; pass --resume to continue or --overwrite")


def prepare(out: Path) -> None:
    """Create ``out`` if needed; a one-line error if it is not a usable folder."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"output_dir: cannot create {out} ({err.strerror or err})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output_dir: {out} is not writable")


class RunLock:
    """Exclusive ownership of an output folder for the duration of a ``with`` block."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"output_dir: cannot create {self.path} ({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_all(fd) or "another process"
            os.close(fd)
            raise UserError(
                f"output_dir: {self.path.parent} is in use by another run ({holder}); "
                "wait for it to finish or choose another --output-dir"
            ) from None
        stale = _read_all(fd)
        if stale:
            warnings.warn(f"output_dir: took over the lock of a run that is no longer running ({stale})",
                          RunWarning, stacklevel=2)  # fmt: skip
        owner = f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *_: Any) -> None:
        # The file stays (unlinking it would let a waiting opener and a new creator both lock); empty means free.
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def _read_all(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace").strip()


def clear(out: Path) -> None:
    """``--overwrite``: remove the previous run's checkpoints, ``latest``, metrics, summary and plot."""
    for folder in checkpoint.folders(out):
        checkpoint.remove(folder)
    for name in (*RUN_FILES, checkpoint.LATEST, checkpoint.LATEST + ".tmp"):
        (out / name).unlink(missing_ok=True)


def remove_temporaries(out: Path) -> None:
    """Folders left by a run killed while writing or removing a checkpoint."""
    for path in [*out.glob(checkpoint.TMP_PREFIX + "*"), *out.glob(checkpoint.TRASH_PREFIX + "*")]:
        shutil.rmtree(path, ignore_errors=True)
