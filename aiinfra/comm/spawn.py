"""Local multi-process launch: fn(rank, world_size, *args) on gloo ranks of this host; it fails,
never hangs, when a rank raises or the run passes its deadline. Used by benchmarks and tests."""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
) -> None:
    """Start world_size spawned ranks with a gloo group; re-raise the first rank failure and kill
    every rank when the whole run exceeds timeout_s. fn must be a module-level function."""
    port = free_port()
    ctx = mp.start_processes(
        _entry,
        args=(fn, world_size, port, pg_timeout_s, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                name = getattr(fn, "__name__", repr(fn))
                raise TimeoutError(f"{name} (world_size={world_size}) ran over {timeout_s}s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, pg_timeout_s: float, args: tuple
) -> None:
    torch.set_num_threads(1)  # ranks share the host's cores: no oversubscription
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=pg_timeout_s),
    )
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()
