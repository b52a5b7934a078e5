"""Serving estimates for one replica (tp GPUs of a node): KV-cache bytes per token, concurrency at a
context length, prefill and decode roofline step times, tokens/s, and replicas for a target load."""

from __future__ import annotations

import math
from dataclasses import dataclass

from aiinfra.cluster.collectives import collective_time
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.models.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class ServingConfig:
    """A replica of `tp` GPUs serving requests of `prompt_len` input and `output_len` output tokens
    at `request_rate` requests/s, under TTFT and TPOT targets in seconds."""

    tp: int = 1
    prompt_len: int = 1024
    output_len: int = 256
    request_rate: float = 10.0
    ttft_s: float = 1.0
    tpot_s: float = 0.05
    weight_bytes: float = 2.0  # bf16; 1 for fp8 weights
    kv_bytes: float = 2.0
    max_batch_size: int = 1024
    usable_memory_fraction: float = 0.9

    def __post_init__(self) -> None:
        for name in ("tp", "prompt_len", "output_len", "max_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        for name in ("request_rate", "ttft_s", "tpot_s", "weight_bytes", "kv_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be positive")
        if not 0 < self.usable_memory_fraction <= 1:
            raise ValueError(
                f"usable_memory_fraction ({self.usable_memory_fraction}) must be in (0, 1]"
            )


@dataclass(slots=True)
class ServingPlan:
    kv_bytes_per_token: float
    max_concurrent_seqs: int
    batch_size: int  # sequences decoded together, the largest meeting the targets
    prefill_s: float  # one prompt
    decode_step_s: float  # one token for each of batch_size sequences
    tokens_per_s: float  # output tokens/s per replica
    requests_per_s: float  # per replica
    num_replicas: int
    num_gpus: int
    ttft_s: float
    tpot_s: float
    meets_targets: bool

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}  # type: ignore[attr-defined]


def kv_bytes_per_token(model: ModelConfig, kv_bytes: float = 2.0) -> float:
    """K and V for every layer: 2 * layers * kv_heads * head_dim * bytes."""
    return 2 * model.num_layers * model.kv_size * kv_bytes


def max_concurrent_seqs(
    model: ModelConfig, cluster: ClusterSpec, config: ServingConfig, context_len: int
) -> int:
    """Sequences of `context_len` tokens whose KV cache fits next to the weights on tp GPUs."""
    memory = config.tp * cluster.node.gpu.memory_bytes * config.usable_memory_fraction
    free = memory - model.num_params() * config.weight_bytes
    return max(0, int(free // (kv_bytes_per_token(model, config.kv_bytes) * context_len)))


def _roofline(
    model: ModelConfig,
    cluster: ClusterSpec,
    config: ServingConfig,
    num_tokens: int,
    kv_read_tokens: float,
    attn_flops: float,
) -> float:
    """max(compute, memory) time of one forward over `num_tokens` new tokens reading the weights
    once and `kv_read_tokens` cached tokens, plus TP all-reduces (two per layer)."""
    gpu, tp = cluster.node.gpu, config.tp
    flops = 2 * model.num_params(include_embeddings=False) * num_tokens + attn_flops
    flops += 2 * model.hidden_size * model.vocab_size * num_tokens
    nbytes = model.num_params() * config.weight_bytes
    nbytes += kv_read_tokens * kv_bytes_per_token(model, config.kv_bytes)
    compute = flops / (tp * gpu.peak_flops() * gpu.matmul_efficiency)
    memory = nbytes / (tp * gpu.memory_bandwidth_gbps * 1e9 * gpu.memory_efficiency)
    comm = 0.0
    if tp > 1:
        per_node = tp  # a replica stays inside one node (checked in plan_serving)
        act = 2 * num_tokens * model.hidden_size
        comm = 2 * model.num_layers * collective_time(cluster, "all_reduce", act, tp, per_node)
    return max(compute, memory) + comm


def prefill_time(model: ModelConfig, cluster: ClusterSpec, config: ServingConfig) -> float:
    n = config.prompt_len
    attn = 2 * model.num_layers * model.q_size * n * n  # causal: half of 4*n^2*q per layer
    return _roofline(model, cluster, config, n, 0, attn)


def decode_step_time(
    model: ModelConfig, cluster: ClusterSpec, config: ServingConfig, batch_size: int
) -> float:
    """One decode step for `batch_size` sequences at the mean context (prompt + half the output)."""
    ctx = config.prompt_len + config.output_len / 2
    attn = 4 * model.num_layers * model.q_size * ctx * batch_size
    return _roofline(model, cluster, config, batch_size, batch_size * ctx, attn)


def plan_serving(model: ModelConfig, cluster: ClusterSpec, config: ServingConfig) -> ServingPlan:
    """Largest decode batch that fits the KV cache and meets TPOT; per-request TTFT is one prefill
    plus one decode step of waiting (chunked prefill between decode steps). A replica finishes
    batch_size requests every output_len decode steps plus their prefills."""
    if config.tp > cluster.node.num_gpus:
        raise ValueError(f"tp ({config.tp}) exceeds {cluster.node.num_gpus} GPUs per node")
    context = config.prompt_len + config.output_len
    cap = min(max_concurrent_seqs(model, cluster, config, context), config.max_batch_size)
    prefill = prefill_time(model, cluster, config)
    batch = 0
    lo, hi = 1, cap
    while lo <= hi:  # decode time grows with batch: binary search for the largest meeting TPOT
        mid = (lo + hi) // 2
        if (
            decode_step_time(model, cluster, config, mid) + prefill / config.output_len
            <= config.tpot_s
        ):
            batch, lo = mid, mid + 1
        else:
            hi = mid - 1
    meets = batch > 0
    batch = max(batch, 1) if cap > 0 else 0
    step = decode_step_time(model, cluster, config, max(batch, 1))
    tpot = step + prefill / config.output_len  # each step also carries 1/output_len of a prefill
    ttft = prefill + step
    meets = meets and ttft <= config.ttft_s and cap > 0
    req_s = batch / (config.output_len * tpot) if batch else 0.0
    replicas = math.ceil(config.request_rate / req_s) if req_s > 0 else 0
    return ServingPlan(
        kv_bytes_per_token=kv_bytes_per_token(model, config.kv_bytes),
        max_concurrent_seqs=max_concurrent_seqs(model, cluster, config, context),
        batch_size=batch,
        prefill_s=prefill,
        decode_step_s=step,
        tokens_per_s=req_s * config.output_len,
        requests_per_s=req_s,
        num_replicas=replicas,
        num_gpus=replicas * config.tp,
        ttft_s=ttft,
        tpot_s=tpot,
        meets_targets=meets,
    )


def serving_curve(
    model: ModelConfig, cluster: ClusterSpec, config: ServingConfig
) -> list[tuple[int, float, float]]:
    """(batch, TPOT s, output tokens/s per replica) for powers-of-two batches up to the KV limit."""
    context = config.prompt_len + config.output_len
    cap = min(max_concurrent_seqs(model, cluster, config, context), config.max_batch_size)
    prefill = prefill_time(model, cluster, config)
    curve = []
    batch = 1
    while batch <= cap:
        tpot = decode_step_time(model, cluster, config, batch) + prefill / config.output_len
        curve.append((batch, tpot, batch / tpot))
        batch *= 2
    return curve
