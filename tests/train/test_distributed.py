"""The process group's lifetime: joined and left by the run, unless the caller had joined it."""

from __future__ import annotations

import os
import socket

import torch.distributed as dist
import torch.multiprocessing as mp

from finetune_ext.train.distributed import process_group


def _rank(rank: int, ports: tuple[int, int], results) -> None:
    for joined_before, port in zip((False, True), ports, strict=True):
        _join_and_leave(rank, port, joined_before, results)


def _join_and_leave(rank: int, port: int, joined_before: bool, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    if joined_before:
        dist.init_process_group("gloo")
    with process_group("cpu") as (ddp, device):
        dist.barrier()  # as a run's collectives do: no rank leaves before all are connected
        inside = (ddp.rank, ddp.world, dist.is_initialized(), device.type)
    results.put((joined_before, inside, dist.is_initialized()))
    if joined_before:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_run_leaves_the_group_it_joined_and_keeps_the_callers() -> None:
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=((_free_port(), _free_port()), results), nprocs=2)
    got = sorted(results.get() for _ in range(4))
    assert [g[1][2] for g in got] == [True] * 4  # a group inside the block
    assert sorted(g[1][:2] for g in got) == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [(g[0], g[2]) for g in got] == [(False, False), (False, False), (True, True), (True, True)]
