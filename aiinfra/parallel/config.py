"""ParallelConfig: one description of a 3D-parallel training layout (dp x tp x pp, ZeRO, batch,
recompute, interleaving), shared by the trainer and the cluster planner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """A layout of `dp * tp * pp` ranks.

    Batch sizes count sequences of `seq_len` tokens; `global_batch_size` is the whole step
    (all dp replicas, all micro-batches) and defaults to `dp * micro_batch_size` (no gradient
    accumulation). `interleave` is the number of virtual pipeline stages (model chunks) per pp rank
    (1 = plain 1F1B); `recompute` is activation recomputation as in Korthikanti et al. 2022.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    micro_batch_size: int = 1
    global_batch_size: int | None = None
    seq_len: int = 2048
    recompute: Literal["none", "selective", "full"] = "none"
    interleave: int = 1
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "micro_batch_size", "seq_len", "interleave"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.zero_stage not in (0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            raise ValueError(f"zero_stage ({self.zero_stage!r}) must be 0, 1, 2 or 3")
        if self.recompute not in RECOMPUTE:
            raise ValueError(
                f"recompute ({self.recompute!r}) must be one of {', '.join(RECOMPUTE)}"
            )
        if not isinstance(self.sequence_parallel, bool):
            raise TypeError(f"sequence_parallel ({self.sequence_parallel!r}) must be a bool")
        gbs = self.global_batch_size
        if gbs is not None:
            if not isinstance(gbs, int) or isinstance(gbs, bool) or gbs <= 0:
                raise ValueError(f"global_batch_size ({gbs!r}) must be a positive integer")
            if gbs % (self.micro_batch_size * self.dp):
                raise ValueError(
                    f"global_batch_size ({gbs}) must be a multiple of micro_batch_size * dp "
                    f"({self.micro_batch_size} * {self.dp})"
                )
        if self.interleave > 1:
            if self.pp == 1:
                raise ValueError(f"interleave ({self.interleave}) needs pp > 1 (pp is 1)")
            if self.num_micro_batches % self.pp:
                # interleaved 1F1B runs micro-batches in groups of pp (Narayanan et al. 2021)
                raise ValueError(
                    f"interleave ({self.interleave}) needs the number of micro-batches "
                    f"({self.num_micro_batches}) to be a multiple of pp ({self.pp})"
                )

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def batch_size(self) -> int:
        """The global batch in sequences (global_batch_size, or dp * micro_batch_size)."""
        if self.global_batch_size is None:
            return self.dp * self.micro_batch_size
        return self.global_batch_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per step on each dp replica (gradient accumulation steps)."""
        return self.batch_size // (self.dp * self.micro_batch_size)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def describe(self) -> str:
        parts = [f"tp={self.tp}", f"pp={self.pp}", f"dp={self.dp}", f"zero={self.zero_stage}"]
        parts.append(f"mb={self.micro_batch_size}")
        if self.interleave > 1:
            parts.append(f"v={self.interleave}")
        parts.append(f"recompute={self.recompute}")
        if self.sequence_parallel:
            parts.append("sp")
        return " ".join(parts)
