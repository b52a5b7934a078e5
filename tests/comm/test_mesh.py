"""ParallelDims: the grid against torch.arange(world).view(dp, pp, tp), and real groups per axis."""

from __future__ import annotations

import pytest
import torch

from aiinfra.comm import CommConfig, CommGroup, ParallelDims, all_reduce
from tests.distributed import run_distributed


@pytest.mark.parametrize("dp,pp,tp", [(2, 2, 2), (1, 3, 2), (4, 1, 1), (2, 1, 3)])
def test_axis_ranks_follow_the_grid(dp: int, pp: int, tp: int) -> None:
    dims = ParallelDims(dp=dp, pp=pp, tp=tp)
    grid = torch.arange(dims.world_size).view(dp, pp, tp)  # tp varies fastest
    for rank in range(dims.world_size):
        i, j, k = (int(v) for v in (grid == rank).nonzero()[0])
        assert dims.coords(rank) == {"dp": i, "pp": j, "tp": k}
        assert dims.axis_ranks(rank, "tp") == grid[i, j, :].tolist()
        assert dims.axis_ranks(rank, "pp") == grid[i, :, k].tolist()
        assert dims.axis_ranks(rank, "dp") == grid[:, j, k].tolist()
    for axis in ("dp", "pp", "tp"):
        groups = dims.axis_groups(axis)
        assert sorted(r for g in groups for r in g) == list(range(dims.world_size))


def test_validation_names_degrees_and_world_size() -> None:
    with pytest.raises(ValueError, match=r"tp \(0\)"):
        ParallelDims(tp=0)
    with pytest.raises(
        ValueError, match=r"dp \(2\) x pp \(1\) x tp \(2\) = 4 must equal world_size \(6\)"
    ):
        ParallelDims(dp=2, tp=2).validate(6)
    with pytest.raises(ValueError, match="axis"):
        ParallelDims().axis_ranks(0, "ep")


def check_mesh(rank: int, world_size: int) -> None:
    mesh = ParallelDims(dp=2, tp=2).build(rank, world_size)
    assert (mesh.dp_rank, mesh.tp_rank) == (rank // 2, rank % 2)
    for axis, pg, ranks in (
        ("tp", mesh.tp_group, mesh.tp_ranks),
        ("dp", mesh.dp_group, mesh.dp_ranks),
    ):
        group = CommGroup(pg, CommConfig(tuning_path=None), name=axis)
        assert group.ranks == ranks and group.rank == ranks.index(rank)
        x = torch.full((5,), float(rank))
        all_reduce(x, group)
        assert torch.equal(x, torch.full((5,), float(sum(ranks)))), (axis, x)
        group.destroy()


@pytest.mark.distributed
def test_build_gives_working_groups_per_axis() -> None:
    run_distributed(check_mesh, 4)
