"""Plan: what the planner predicts for one layout on one cluster (memory, step time and its terms,
FLOPs, MFU, checkpoint and host-CPU figures), as small records the CLI and search read."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiinfra.parallel.config import ParallelConfig

GB = 1e9


@dataclass(slots=True)
class MemoryBreakdown:
    """Bytes per GPU on the fullest pipeline stage."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    total: float = 0.0

    def __post_init__(self) -> None:
        self.total = self.weights + self.gradients + self.optimizer + self.activations


@dataclass(slots=True)
class StepTime:
    """Seconds per step: `compute` is the steady-state pipeline (TP comm inside it reported
    apart), `bubble` the pipeline fill and drain."""

    compute: float
    tp_comm: float
    pp_comm: float
    dp_comm: float
    bubble: float
    optimizer: float

    @property
    def total(self) -> float:
        return (
            self.compute + self.tp_comm + self.pp_comm + self.dp_comm + self.bubble + self.optimizer
        )

    def as_dict(self) -> dict[str, float]:
        names = ("compute", "tp_comm", "pp_comm", "dp_comm", "bubble", "optimizer")
        return {n: getattr(self, n) for n in names} | {"total": self.total}


@dataclass(slots=True)
class HostCPU:
    """Host cores busy with work a SmartNIC/DPU can take over (NCCL network proxies, the storage
    client during checkpoints) out of `host_cores` per node."""

    host_cores: int
    network_cores: float
    storage_cores: float

    @property
    def dpu_freed_share(self) -> float:
        return (self.network_cores + self.storage_cores) / self.host_cores


@dataclass(slots=True)
class Plan:
    """What `estimate()` predicts for one layout on one cluster."""

    parallel: ParallelConfig
    memory: MemoryBreakdown
    time: StepTime
    hardware_flops: float  # per step, recomputation included (Megatron's TFLOP/s convention)
    model_flops: float  # per step, without recomputation (MFU's convention)
    num_gpus: int
    peak_flops: float
    memory_capacity: float
    checkpoint_write_s: float
    host_cpu: HostCPU
    fits: bool
    notes: list[str] = field(default_factory=list)

    @property
    def step_time_s(self) -> float:
        return self.time.total

    @property
    def tflops_per_gpu(self) -> float:
        return self.hardware_flops / self.step_time_s / self.num_gpus / 1e12

    @property
    def mfu(self) -> float:
        return self.model_flops / self.step_time_s / self.num_gpus / self.peak_flops

    @property
    def tokens_per_s(self) -> float:
        return self.parallel.tokens_per_step / self.step_time_s

    def days_to_train(self, num_tokens: float) -> float:
        return num_tokens / self.tokens_per_s / 86400

    def as_dict(self) -> dict[str, object]:
        p = self.parallel
        return {
            "layout": p.describe(),
            "tp": p.tp, "pp": p.pp, "dp": p.dp, "zero_stage": p.zero_stage,
            "micro_batch_size": p.micro_batch_size, "global_batch_size": p.batch_size,
            "seq_len": p.seq_len, "recompute": p.recompute, "interleave": p.interleave,
            "sequence_parallel": p.sequence_parallel,
            "step_time_s": self.step_time_s,
            "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu,
            "tokens_per_s": self.tokens_per_s,
            "memory_gb_per_gpu": self.memory.total / GB,
            "memory_capacity_gb": self.memory_capacity / GB,
            "fits": self.fits,
            "memory_gb": {k: getattr(self.memory, k) / GB
                          for k in ("weights", "gradients", "optimizer", "activations")},
            "time_s": self.time.as_dict(),
            "checkpoint_write_s": self.checkpoint_write_s,
            "dpu_freed_host_cpu_share": self.host_cpu.dpu_freed_share,
            "notes": list(self.notes),
        }  # fmt: skip
