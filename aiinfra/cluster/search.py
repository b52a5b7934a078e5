"""Layout search: enumerate (tp, pp, dp, ZeRO stage, micro-batch, recompute, interleaving), drop
layouts that do not fit in memory, rank the rest by step time, and say why the winner wins; across
cluster sizes, rank by days to train or by GPU-hours (cost)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from aiinfra.cluster.topology import ClusterSpec
from aiinfra.cluster.training import EstimateOptions, Plan, estimate
from aiinfra.models.config import ModelConfig
from aiinfra.parallel.config import ParallelConfig

MICRO_BATCH_SIZES = (1, 2, 4, 8)
RECOMPUTE: tuple[Literal["none", "selective", "full"], ...] = ("none", "selective", "full")
INTERLEAVE = (1, 2, 4)


@dataclass(slots=True)
class SearchResult:
    plans: list[Plan]  # layouts that fit, fastest first
    num_considered: int
    num_too_big: int
    explanation: str = ""
    rejected: list[Plan] = field(default_factory=list)  # the fastest few that did not fit

    @property
    def best(self) -> Plan | None:
        return self.plans[0] if self.plans else None


def candidate_layouts(
    model: ModelConfig, num_gpus: int, gpus_per_node: int, global_batch_size: int, seq_len: int
) -> list[ParallelConfig]:
    """Every valid layout. Sequence parallelism is on whenever tp > 1 (it only saves memory);
    ZeRO-2/3 only without pipelining (gradients accumulate across micro-batches there)."""
    layouts = []
    for tp in _tp_sizes(model, gpus_per_node):
        for pp in _divisors(model.num_layers):
            if num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            for mb in MICRO_BATCH_SIZES:
                if global_batch_size % (dp * mb):
                    continue
                num_micro = global_batch_size // (dp * mb)
                for v in INTERLEAVE:
                    if v > 1 and (pp == 1 or model.num_layers % (pp * v) or num_micro % pp):
                        continue
                    for zero in (0, 1, 2, 3) if pp == 1 else (0, 1):
                        for rc in RECOMPUTE:
                            layouts.append(
                                ParallelConfig(
                                    dp=dp, tp=tp, pp=pp, zero_stage=zero, micro_batch_size=mb,
                                    global_batch_size=global_batch_size, seq_len=seq_len,
                                    recompute=rc, interleave=v, sequence_parallel=tp > 1,
                                )
                            )  # fmt: skip
    return layouts


def _tp_sizes(model: ModelConfig, gpus_per_node: int) -> list[int]:
    sizes = []
    tp = 1
    while tp <= gpus_per_node:
        heads_ok = model.num_heads % tp == 0
        kv_ok = model.num_kv_heads % tp == 0 or tp % model.num_kv_heads == 0
        if heads_ok and kv_ok:
            sizes.append(tp)
        tp *= 2
    return sizes


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def search(
    model: ModelConfig,
    cluster: ClusterSpec,
    global_batch_size: int,
    seq_len: int,
    options: EstimateOptions | None = None,
) -> SearchResult:
    options = options or EstimateOptions()
    layouts = candidate_layouts(
        model, cluster.num_gpus, cluster.node.num_gpus, global_batch_size, seq_len
    )
    if not layouts:
        raise ValueError(
            f"global_batch_size ({global_batch_size}) admits no layout on {cluster.num_gpus} GPUs "
            "(it must be a multiple of the data-parallel size)"
        )
    plans = [estimate(model, layout, cluster, options) for layout in layouts]
    fits = sorted((p for p in plans if p.fits), key=_rank_key)
    too_big = sorted((p for p in plans if not p.fits), key=_rank_key)
    result = SearchResult(fits, len(plans), len(too_big), rejected=too_big[:5])
    if not fits:
        result.explanation = (
            f"no layout fits in {cluster.node.gpu.memory_gib:g} GiB per GPU; the smallest needs "
            f"{min(p.memory.total for p in plans) / 1e9:.1f} GB"
        )
    elif len(fits) == 1:
        result.explanation = f"{fits[0].parallel.describe()} is the only layout that fits"
    else:
        result.explanation = explain(fits[0], runner_up(fits), cluster)
    return result


def _rank_key(plan: Plan) -> tuple[float, float]:
    # equal times (e.g. ZeRO 0 vs 1 with hidden gradient sync): prefer the smaller footprint
    return round(plan.step_time_s, 6), plan.memory.total


def runner_up(plans: list[Plan]) -> Plan:
    """The fastest plan with another (tp, pp) shape; the second plan if all share the winner's."""
    best = plans[0].parallel
    for plan in plans[1:]:
        if (plan.parallel.tp, plan.parallel.pp) != (best.tp, best.pp):
            return plan
    return plans[1]


def explain(winner: Plan, other: Plan, cluster: ClusterSpec) -> str:
    """Why `winner` beats `other`, from the step-time terms that differ most."""
    w, o = winner.parallel, other.parallel
    gain = other.step_time_s / winner.step_time_s - 1
    wt, ot = winner.time.as_dict(), other.time.as_dict()
    diffs = sorted(((ot[k] - wt[k], k) for k in wt if k != "total"), reverse=True)
    reasons = [_reason(k, winner, other, cluster) for d, k in diffs if d > 0.01 * wt["total"]]
    head = (
        f"{w.describe()} beats {o.describe()} by {100 * gain:.1f}% "
        f"({winner.step_time_s:.3f} s vs {other.step_time_s:.3f} s per step)"
    )
    if not reasons:
        reasons = ["the terms differ by under 1% each"]
    costs = [
        f"it pays {_fmt(-d)} more {k.replace('_', ' ')}"
        for d, k in diffs
        if d < -0.01 * wt["total"]
    ]
    return head + ": " + "; ".join(reasons[:3]) + (" (" + "; ".join(costs) + ")" if costs else "")


def _reason(term: str, winner: Plan, other: Plan, cluster: ClusterSpec) -> str:
    w, o, gpn = winner.parallel, other.parallel, cluster.node.num_gpus
    d = _fmt(other.time.as_dict()[term] - winner.time.as_dict()[term])
    if term == "tp_comm":
        if o.tp > gpn >= w.tp:
            return f"tp={w.tp} keeps TP traffic on NVLink while tp={o.tp} crosses the network ({d})"
        return f"less tensor-parallel all-reduce traffic with tp={w.tp} vs tp={o.tp} ({d})"
    if term == "bubble":
        return (
            f"a smaller pipeline bubble: pp={w.pp}, v={w.interleave}, "
            f"{w.num_micro_batches} micro-batches vs pp={o.pp}, v={o.interleave}, "
            f"{o.num_micro_batches} ({d})"
        )
    if term == "compute":
        if w.recompute != o.recompute:
            return f"recompute={w.recompute} recomputes less than recompute={o.recompute} ({d})"
        if w.micro_batch_size != o.micro_batch_size:
            return (
                f"micro-batch {w.micro_batch_size} vs {o.micro_batch_size} changes the per-GPU "
                f"work of the slowest stage ({d})"
            )
        return f"less compute on the slowest GPU with tp={w.tp}, pp={w.pp} ({d})"
    if term == "pp_comm":
        return f"fewer or cheaper pipeline sends (pp={w.pp}, v={w.interleave}) ({d})"
    if term == "dp_comm":
        return f"less exposed gradient synchronisation (dp={w.dp}, zero={w.zero_stage}) ({d})"
    return f"a cheaper optimizer step ({d})"


def _fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if abs(seconds) < 1 else f"{seconds:.2f} s"


@dataclass(slots=True)
class SizeOption:
    """The best layout on one cluster size, and what training `num_tokens` on it takes."""

    num_gpus: int
    result: SearchResult
    days: float  # inf when nothing fits
    gpu_hours: float

    def as_dict(self) -> dict[str, object]:
        best = self.result.best
        return {
            "num_gpus": self.num_gpus,
            "days_to_train": self.days,
            "gpu_hours": self.gpu_hours,
            "best": best.as_dict() if best else None,
        }


def compare_sizes(
    model: ModelConfig,
    cluster: ClusterSpec,
    gpu_counts: list[int],
    global_batch_size: int,
    seq_len: int,
    num_tokens: float,
    objective: Literal["time", "cost"] = "time",
    options: EstimateOptions | None = None,
) -> list[SizeOption]:
    """Which cluster: search each size of `cluster`'s node type and rank the sizes by days to
    train (`time`) or by GPU-hours (`cost`: price is GPU-hours times the hourly rate). Sizes where
    nothing fits or the batch admits no layout come last."""
    if objective not in ("time", "cost"):
        raise ValueError(f"objective ({objective!r}) must be 'time' or 'cost'")
    options_out = []
    for n in gpu_counts:
        sized = ClusterSpec.for_gpus(
            cluster.node, n, fabric=cluster.fabric, oversubscription=cluster.oversubscription,
            switch_radix=cluster.switch_radix,
            storage_bandwidth_gbps=cluster.storage_bandwidth_gbps,
        )  # fmt: skip
        try:
            result = search(model, sized, global_batch_size, seq_len, options)
        except ValueError as e:
            result = SearchResult([], 0, 0, explanation=str(e))
        days = result.best.days_to_train(num_tokens) if result.best else float("inf")
        options_out.append(SizeOption(n, result, days, days * 24 * n))
    key = (lambda o: o.days) if objective == "time" else (lambda o: o.gpu_hours)
    return sorted(options_out, key=key)
