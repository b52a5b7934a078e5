"""ParallelDims: the (dp, pp, tp) layout of the ranks, tp varying fastest, and the group of each
axis.

picotron's grid is the mental model: `torch.arange(world_size).view(dp, pp, tp)`; the ranks of one
tp group are consecutive (they talk most, so they share a host), a pp group strides by tp, a dp
group by pp*tp."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

AXES = ("dp", "pp", "tp")


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    dp: int = 1
    pp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for axis in AXES:
            value = getattr(self, axis)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{axis} ({value!r}) must be a positive integer")

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def validate(self, world_size: int) -> None:
        if self.world_size != world_size:
            raise ValueError(
                f"dp ({self.dp}) x pp ({self.pp}) x tp ({self.tp}) = {self.world_size}"
                f" must equal world_size ({world_size})"
            )

    def coords(self, rank: int) -> dict[str, int]:
        """{"dp": i, "pp": j, "tp": k} of `rank` in the grid."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank ({rank}) must be in [0, {self.world_size})")
        return {
            "dp": rank // (self.pp * self.tp),
            "pp": rank // self.tp % self.pp,
            "tp": rank % self.tp,
        }

    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        return (dp * self.pp + pp) * self.tp + tp

    def axis_ranks(self, rank: int, axis: str) -> list[int]:
        """The global ranks in `rank`'s group along `axis` (other coordinates fixed), in order."""
        if axis not in AXES:
            raise ValueError(f"axis ({axis!r}) must be one of {AXES}")
        c = self.coords(rank)
        return [self.rank_of(**{**c, axis: i}) for i in range(getattr(self, axis))]

    def axis_groups(self, axis: str) -> list[list[int]]:
        """Every group along `axis`, each a list of global ranks, ordered by their lowest rank."""
        groups = {tuple(self.axis_ranks(r, axis)) for r in range(self.world_size)}
        return [list(g) for g in sorted(groups)]

    def build(self, rank: int, world_size: int) -> ParallelMesh:
        """Collective on the default group: create the process group of every axis."""
        self.validate(world_size)
        c = self.coords(rank)
        groups = {}
        for axis in AXES:
            group, _ = dist.new_subgroups_by_enumeration(self.axis_groups(axis))
            groups[axis] = group
        return ParallelMesh(
            dims=self,
            rank=rank,
            dp_rank=c["dp"],
            pp_rank=c["pp"],
            tp_rank=c["tp"],
            dp_group=groups["dp"],
            pp_group=groups["pp"],
            tp_group=groups["tp"],
            dp_ranks=self.axis_ranks(rank, "dp"),
            pp_ranks=self.axis_ranks(rank, "pp"),
            tp_ranks=self.axis_ranks(rank, "tp"),
        )


@dataclass(slots=True)
class ParallelMesh:
    """This rank's place in the grid and the torch.distributed group of each axis."""

    dims: ParallelDims
    rank: int
    dp_rank: int
    pp_rank: int
    tp_rank: int
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    tp_group: dist.ProcessGroup
    dp_ranks: list[int]
    pp_ranks: list[int]
    tp_ranks: list[int]
