"""Bad input and faults: mismatched arguments, a rank that never arrives, a crashed peer, stale
segments."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from aiinfra.comm import CommConfig, CommGroup, ShmConfig, all_reduce, broadcast
from aiinfra.comm.shm import PREFIX, SHM_DIR, remove_stale_segments
from tests.distributed import run_distributed

SMALL = ShmConfig(chunk_bytes=4096, slot_bytes=4096)


def _group(timeout_s: float, use_shm: bool = True) -> CommGroup:
    config = CommConfig(timeout_s=timeout_s, shm=SMALL, tuning_path=None, use_shm=use_shm)
    return CommGroup(dist.group.WORLD, config, name="faulty")


def check_mismatch(rank: int, world_size: int) -> None:
    group = _group(30.0)
    impls = ("one_shot@shm", "two_shot@shm", "cma_two_shot@shm", "ring@shm", "ring@torch")
    for impl in (*impls, "rabenseifner@torch"):
        x = torch.ones(5 + rank)  # rank 1 has one element more
        with pytest.raises(ValueError, match=r"all_reduce on group faulty: .*numel.*rank 1: 6"):
            all_reduce(x, group, impl=impl)
        x = torch.ones(5, dtype=torch.float32 if rank == 0 else torch.int32)
        with pytest.raises(ValueError, match=r"all_reduce on group faulty: .*dtype.*torch.int32"):
            all_reduce(x, group, impl=impl)
    with pytest.raises(
        ValueError, match=r"broadcast on group faulty: .*root.*rank 0: 0.*rank 1: 1"
    ):
        broadcast(torch.ones(3), group, src=rank, impl="direct@shm")
    # after the errors the group still works: every rank raised at the same point
    x = torch.full((7,), float(rank))
    all_reduce(x, group, impl="two_shot@shm")
    assert torch.equal(x, torch.full((7,), float(sum(range(world_size)))))
    with pytest.raises(ValueError, match="op"):
        all_reduce(x, group, op="prod")
    with pytest.raises(ValueError, match="impl"):
        all_reduce(x, group, impl="one_shot@torch")
    with pytest.raises(TypeError, match="tensor"):
        all_reduce([1.0], group)  # type: ignore[arg-type]


def check_timeout(rank: int, world_size: int) -> None:
    """Rank 2 never calls the collective: ranks 0 and 1 must name it, within the timeout."""
    shm_group, torch_group = _group(1.5), _group(1.5, use_shm=False)
    if rank == 2:
        time.sleep(8.0)  # alive but absent, until the others have given up
        return
    for group, impl in ((shm_group, "one_shot@shm"), (torch_group, "ring@torch")):
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            all_reduce(torch.ones(10), group, impl=impl)
        waited = time.monotonic() - start
        message = str(info.value)
        assert "all_reduce" in message and "group faulty" in message, message
        assert "rank(s) [2]" in message, message
        assert 1.4 < waited < 6.0, f"{impl}: gave up after {waited:.1f}s (timeout 1.5s)"


def check_crash(rank: int, world_size: int) -> None:
    """Rank 1 dies: rank 0 learns it from its pid long before the 30 s timeout, and says who."""
    group = _group(30.0)
    dist.barrier()
    if rank == 1:
        os._exit(0)
    for impl in ("two_shot@shm", "one_shot@shm"):  # one_shot: the C wait hands over to Python
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"all_reduce: group faulty: rank\(s\) \[1\] exited"):
            all_reduce(torch.ones(10), group, impl=impl)
        assert time.monotonic() - start < 5.0


@pytest.mark.distributed
def test_mismatched_arguments_raise_on_every_rank() -> None:
    run_distributed(check_mismatch, 2, timeout_s=120)


@pytest.mark.distributed
def test_rank_that_never_arrives_is_named() -> None:
    run_distributed(check_timeout, 3, timeout_s=120)


@pytest.mark.distributed
def test_crashed_peer_is_named() -> None:
    run_distributed(check_crash, 2, timeout_s=120)


def test_stale_segments_of_dead_processes_are_removed() -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True
    )
    dead_pid = int(dead.stdout)
    stale = os.path.join(SHM_DIR, f"{PREFIX}{dead_pid}-deadbeef")
    live = os.path.join(SHM_DIR, f"{PREFIX}{os.getpid()}-cafe")
    for path in (stale, live):
        with open(path, "wb") as f:
            f.write(b"\0" * 64)
    try:
        removed = remove_stale_segments()
        assert os.path.basename(stale) in removed and not os.path.exists(stale)
        assert os.path.exists(live)  # its creator is alive: maybe a group being built
    finally:
        for path in (stale, live):
            if os.path.exists(path):
                os.unlink(path)


def test_shm_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"chunk_bytes \(100\)"):
        ShmConfig(chunk_bytes=100)
    with pytest.raises(ValueError, match=r"yield_s \(-1"):
        ShmConfig(yield_s=-1.0)
