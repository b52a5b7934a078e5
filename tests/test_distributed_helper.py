"""run_distributed itself: a rank's exception reaches the test; a hang fails, never stalls."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from tests.distributed import run_distributed


def _all_reduce_ok(rank: int, world_size: int) -> None:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    assert t.item() == world_size * (world_size + 1) / 2


def _rank1_raises(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 failed on purpose")


def _rank0_hangs(rank: int, world_size: int) -> None:
    if rank == 0:
        time.sleep(600)


@pytest.mark.distributed
def test_run_distributed_passes_raises_and_times_out():
    run_distributed(_all_reduce_ok, 2)
    with pytest.raises(ProcessRaisedException, match="rank 1 failed on purpose"):
        run_distributed(_rank1_raises, 2)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="_rank0_hangs"):
        run_distributed(_rank0_hangs, 2, timeout_s=15)
    assert time.monotonic() - start < 60
