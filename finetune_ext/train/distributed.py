"""Launch: joining the ``torchrun`` process group, picking the device, deferring Ctrl-C/SIGTERM to a step's end."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from finetune_ext.errors import UserError
from finetune_ext.parts.distributed import Dist


@contextlib.contextmanager
def process_group(device_arg: str, sharded: bool = False) -> Iterator[tuple[Dist, torch.device]]:
    """Join the ``torchrun`` process group if there is one (NCCL on GPUs, gloo on CPU); pick the device.
    ``sharded``: the run shards its model with FSDP (in one process there is nothing to shard).

    A group joined here is left again on the way out: one left to interpreter shutdown can abort the process
    (gloo's worker threads still hold tensors then). After a run that ended well the ranks meet at a barrier
    first, so that none tears its connections down while another still works (rank 0 writes the summary and
    plot last); after an error they do not wait for each other. A group the caller joined before stays joined.
    """
    if device_arg not in ("auto", "cpu", "cuda"):
        raise UserError(f"device: expected auto, cpu or cuda, got {device_arg!r}")
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if world == 1:
        yield Dist(), torch.device("cuda" if use_cuda else "cpu")
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    joined_here = not dist.is_initialized()
    if joined_here:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        yield Dist(rank, world, local, sharded), torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if joined_here:
            dist.barrier()
    finally:
        if joined_here:
            dist.destroy_process_group()


class Interrupt:
    """Defers SIGINT/SIGTERM to the end of the current step, so a checkpoint can be written there.

    A second signal interrupts at once. Under DDP the flag is all-reduced every step so that all
    processes stop after the same step.
    """

    def __init__(self, ddp: Dist, device: torch.device) -> None:
        self.ddp, self.device, self.requested, self.previous = ddp, device, False, {}

    def __enter__(self) -> Interrupt:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt(signal.Signals(signum).name)
        self.requested = True

    def stop_now(self) -> bool:
        if self.ddp.world == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def __exit__(self, *_: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
