"""Kill a tiny training run at many points and resume it each time, as a user would after a crash.

``python faults_driver.py OUT DATA TOKENIZER`` trains the same run twice: once without interruption into
``OUT/whole`` and once into ``OUT/chain``, where each process is killed at the next point of ``POINTS`` and the
next one resumes (``--resume`` whenever a checkpoint folder exists, as a user would), until a last process
finishes. It prints one JSON line per process: the point and how the process ended. Every run is a forked child
of this process, which imports but never computes: forking after torch has started its thread pool can hang the
child.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import signal
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot  # noqa: F401  (imported once here rather than in every child that plots)
import torch

from finetune_ext.train import TrainConfig, train

RUN = dict(
    model="config:gpt2-tiny",  # dropout on: the masks must be keyed by the step
    steps=12,
    batch_size=4,
    grad_accum=2,
    lr=1e-3,
    warmup_steps=2,
    block_size=32,
    eval_every=3,
    save_every=2,
    keep_checkpoints=2,
    max_eval_batches=2,
    eval_batch_size=4,
    progress=False,
)


@dataclass(frozen=True)
class Point:
    """Stop the process at the ``nth`` call of ``target`` (``module:attribute.path``) that ``match`` accepts."""

    label: str
    target: str
    nth: int = 1
    action: str = "kill-before"  # kill-before | kill-after | torn-write | torn-file | sigterm | sigterm-twice
    match: str = ""  # a substring the call's first path-like or text argument must contain


FWD_BWD = "finetune_ext.parts.contracts:StepContext.forward_backward"
METRICS_WRITE = "finetune_ext.train.metrics:MetricsLog._write"
CKPT = "finetune_ext.train.checkpoint:"

# In order: each is reached by the process that resumes after the previous one. The last two come after the final step.
POINTS = [
    Point("before the first step's forward", FWD_BWD, 1),
    Point("between micro-batches (half the gradient accumulated)", "torch.autograd:backward", 3),
    Point("after backward, before the optimizer step", FWD_BWD, 2, "kill-after"),
    Point("inside the optimizer step (weights updated, schedule not)", "torch.optim:AdamW.step", 2, "kill-after"),
    Point("after the step, before its metrics line", "finetune_ext.train.metrics:MetricsLog.log", 3),
    Point("mid-write of a train metrics line (torn line)", METRICS_WRITE, 2, "torn-write", '"train"'),
    Point("while rewriting metrics.jsonl on resume", METRICS_WRITE, 1, "torn-write"),
    Point("at the start of an evaluation", "finetune_ext.train.trainer:evaluate", 1),
    Point("mid-evaluation (second batch)", "finetune_ext.train.metrics:make_batch", 2),
    Point("mid-write of a val metrics line (torn line)", METRICS_WRITE, 1, "torn-write", '"val"'),
    Point("checkpoint: after the RNG states, before the weights", CKPT + "write_rng", 1, "kill-after"),
    Point("checkpoint: mid-write of model.safetensors", CKPT + "save_model", 1, "torn-file"),
    Point("checkpoint: files written, before the manifest", CKPT + "_digest", 1),
    Point("checkpoint: mid-write of the manifest", CKPT + "_write_synced", 1, "torn-write", "manifest"),
    Point("checkpoint: manifest written, before the rename", CKPT + "_write_synced", 1, "kill-after", "manifest"),
    Point("checkpoint: renamed, before `latest` moves", CKPT + "point_latest", 2),
    Point("checkpoint: mid-write of `latest`", CKPT + "_write_synced", 1, "torn-write", "latest"),
    Point("SIGTERM mid-step (checkpoint at the end of the step)", FWD_BWD, 2, "sigterm"),
    Point("prune: old checkpoint renamed to trash, before deletion", "shutil:rmtree", 1, "kill-before", ".trash-"),
    Point("startup: while removing a stale trash folder", "shutil:rmtree", 1, "torn-file", ".trash-"),
    Point("resume: weights restored, before the parts' state", CKPT + "load", 1, "kill-after"),
    Point("two SIGTERMs mid-step (stop at once, no checkpoint)", FWD_BWD, 2, "sigterm-twice"),
    Point("after a checkpoint is committed", CKPT + "commit", 1, "kill-after"),
    Point("end: before the report", "finetune_ext.train.trainer:_report", 1),
    Point("end: summary written, before the plot", "finetune_ext.train.trainer:plot_curves", 1),
]


def _resolve(target: str) -> tuple[Any, str]:
    module, path = target.split(":")
    owner: Any = importlib.import_module(module)
    *parents, attr = path.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr


def _matches(args: tuple, needle: str) -> bool:
    return not needle or any(needle in str(a) for a in args if isinstance(a, (str, Path)))


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _torn(args: tuple, real) -> None:
    """Write half of the text: ``_write_synced(path, text)`` and ``MetricsLog._write(self, text, ...)``."""
    real(args[0], args[1][: len(args[1]) // 2], *args[2:])


def _torn_file(args: tuple, real) -> None:
    """``save_model(model, file)``: write it, then cut it in half. ``rmtree(folder)``: delete one file only."""
    if real.__name__ == "rmtree":
        files = sorted(p for p in Path(args[0]).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        return
    real(*args)
    file = Path(args[1])
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def arm(point: Point) -> None:
    """Patch ``point.target`` so that its ``nth`` matching call stops this process as ``point.action`` says."""
    owner, attr = _resolve(point.target)
    real = getattr(owner, attr)
    seen = [0]

    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        if not _matches(args, point.match):
            return real(*args, **kwargs)
        seen[0] += 1
        if seen[0] != point.nth:
            return real(*args, **kwargs)
        if point.action == "kill-before":
            _die()
        if point.action == "torn-write":
            _torn(args, real)
            _die()
        if point.action == "torn-file":
            _torn_file(args, real)
            _die()
        if point.action in ("sigterm", "sigterm-twice"):
            os.kill(os.getpid(), signal.SIGTERM)
            if point.action == "sigterm-twice":
                os.kill(os.getpid(), signal.SIGTERM)
        out = real(*args, **kwargs)
        if point.action == "kill-after":
            _die()
        return out

    setattr(owner, attr, wrapper)


def run_child(out: Path, data: str, tokenizer: str, point: Point | None) -> str:
    """Fork a process that trains (resuming if ``out`` holds a checkpoint) with ``point`` armed; how it ended."""
    resume = any(out.glob("checkpoint-*"))
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            torch.set_num_threads(1)
            if point is not None:
                arm(point)
            train(TrainConfig(**RUN, data=data, tokenizer=tokenizer, output_dir=str(out), resume=resume))
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.WEXITSTATUS(status)}"


def main() -> None:
    out, data, tokenizer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    print(json.dumps({"point": None, "run": "whole", "ended": run_child(out / "whole", data, tokenizer, None)}))
    for point in [*POINTS, None]:
        ended = run_child(out / "chain", data, tokenizer, point)
        print(json.dumps({"point": point.label if point else None, "run": "chain", "ended": ended}), flush=True)


if __name__ == "__main__":
    main()
