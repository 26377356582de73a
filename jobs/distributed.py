"""The process group: one way to start it, for the job's ranks and for `orch bench`'s."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import PartialState

from jobs.compat import reset_accelerate_state
from orchestrator.core.config import COLLECTIVE_TIMEOUT_S


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job."""

    rank: int
    world: int
    device: torch.device


def start_process_group(device: str, backend: str, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> Ranks:
    """Join the group that RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT describe (submitit's
    TorchDistributedEnvironment exports them in a job, `launch` in a benchmark). accelerate's PartialState picks
    the device and starts the group, passing `timeout` on to init_process_group: a collective whose peer is gone
    fails after `timeout_s` (gloo raises; NCCL's watchdog aborts the process) instead of after the backend's default
    (10 min for NCCL, 30 for gloo)."""
    state = PartialState(cpu=device == "cpu", backend=backend, timeout=timedelta(seconds=timeout_s))
    return Ranks(state.process_index, state.num_processes, state.device)


def agree(rank: int, decide: Callable[[], Any]) -> Any:
    """Rank 0 decides, every rank gets the same answer; if deciding fails, every rank fails (none waits forever)."""
    answer: list[Any] = [None, None]
    error: Exception | None = None
    if rank == 0:
        try:
            answer[0] = decide()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error, answer[1] = err, f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(answer, src=0)
    if error is not None:
        raise error
    if answer[1] is not None:
        raise PeerFailed(f"rank 0 failed: {answer[1]}")
    return answer[0]


class PeerFailed(RuntimeError):
    """Another rank failed first; its own report says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, device: str, backend: str, fn: Callable[..., None], *args: Any) -> None:
    """Call fn(ranks, *args) on `world` ranks on this machine: in this process for one rank, else in spawned
    processes. The rendezvous variables are gone afterwards: a job started from this process later sets its own."""
    names = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        if world == 1:
            rank_main(0, world, device, backend, fn, args)
        else:
            mp.spawn(rank_main, args=(world, device, backend, fn, args), nprocs=world, join=True)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def rank_main(rank: int, world: int, device: str, backend: str, fn: Callable[..., None], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    if device == "cpu" and "OMP_NUM_THREADS" in os.environ:  # torch started in this process before the setting
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    ranks = start_process_group(device, backend)
    try:
        fn(ranks, *args)
    finally:
        dist.destroy_process_group()
        reset_accelerate_state()
