"""Training estimates for one layout: memory per GPU (ZeRO; activations per Korthikanti et al. 2022;
pipeline in-flight micro-batches), FLOPs (Narayanan et al. 2021), step time, MFU, time to train,
checkpoint write time and the host-CPU share a DPU would free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from aiinfra.cluster.collectives import collective_time, p2p_time
from aiinfra.cluster.plan import GB, HostCPU, MemoryBreakdown, Plan, StepTime
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.models.config import ModelConfig
from aiinfra.parallel.config import ParallelConfig

BF16 = 2

# Non-matmul (memory-bound) traffic per token per layer in one forward pass, in bytes, for
# Megatron's fused kernels: two layer norms (read + write 2h each) and two fused
# bias-dropout-residual adds (read 2 x 2h, write 2h, 1-byte mask): 22h, replicated on each TP rank
# unless sequence parallelism shards it. The MLP activation reads 2 and writes 1 bf16 tensor per
# ffn input (GELU: 4f, SwiGLU's gate*up: 6f). Unfused attention (scale-mask-softmax, dropout)
# reads and writes every score: 9 bytes per (head, key) pair.
REPLICATED_BYTES_PER_H = 22
ACT_BYTES_PER_F = {"gelu": 4, "swiglu": 6}
SCORE_BYTES = 9
ADAM_BYTES_PER_PARAM = 30  # fp32 master, m, v read + written, bf16 grad read and weight written


@dataclass(frozen=True, kw_only=True)
class EstimateOptions:
    """Modelling choices that are not part of the layout.

    `optimizer_bytes_per_param` is ZeRO's K (12 for mixed-precision Adam: fp32 master, m, v);
    `usable_memory_fraction` leaves room for the CUDA context, NCCL buffers and fragmentation.
    """

    dtype: Literal["bf16", "fp8"] = "bf16"
    flash_attention: bool = True
    overlap_dp_comm: bool = True
    optimizer_bytes_per_param: int = 12
    usable_memory_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.dtype not in ("bf16", "fp8"):
            raise ValueError(f"dtype ({self.dtype!r}) must be 'bf16' or 'fp8'")
        if self.optimizer_bytes_per_param < 0:
            raise ValueError(
                f"optimizer_bytes_per_param ({self.optimizer_bytes_per_param}) must be >= 0"
            )
        if not 0 < self.usable_memory_fraction <= 1:
            raise ValueError(
                f"usable_memory_fraction ({self.usable_memory_fraction}) must be in (0, 1]"
            )


# --- FLOPs ----------------------------------------------------------------------------------------


def layer_forward_flops(model: ModelConfig, num_tokens: int, seq_len: int) -> float:
    """Matmul FLOPs of one transformer layer's forward over `num_tokens` tokens in sequences of
    `seq_len` (for a GPT with a 4h MLP: 24*t*h^2 + 4*t*s*h, Narayanan et al. 2021)."""
    h, q, kv, f = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    mats = 3 if model.mlp == "swiglu" else 2
    dense = 2 * num_tokens * (2 * h * q + 2 * h * kv + mats * h * f)
    return dense + attention_score_flops(model, num_tokens, seq_len)


def attention_score_flops(model: ModelConfig, num_tokens: int, seq_len: int) -> float:
    """Q K^T and scores x V: 2 * 2 * s * q_size per token (no causal discount, as Megatron)."""
    return 4 * num_tokens * seq_len * model.q_size


def step_flops(model: ModelConfig, parallel: ParallelConfig) -> tuple[float, float]:
    """(hardware FLOPs with recomputation, model FLOPs without) per step. With full recompute this
    is Narayanan et al.'s 96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)); backward costs twice forward and
    the logits layer (2*B*s*h*V forward) is never recomputed."""
    s = parallel.seq_len
    tokens = parallel.tokens_per_step
    layer = layer_forward_flops(model, tokens, s)
    logits = 6 * tokens * model.hidden_size * model.vocab_size
    model_flops = 3 * model.num_layers * layer + logits
    if parallel.recompute == "full":
        extra = model.num_layers * layer
    elif parallel.recompute == "selective":
        extra = model.num_layers * attention_score_flops(model, tokens, s)
    else:
        extra = 0.0
    return model_flops + extra, model_flops


def training_days(
    num_params: float, num_tokens: float, num_gpus: int, tflops_per_gpu: float, *, recompute: bool
) -> float:
    """Narayanan et al. 2021's end-to-end estimate: 8*T*P / (n*X) seconds with recomputation
    (6*T*P without)."""
    per_token = 8 if recompute else 6
    return per_token * num_tokens * num_params / (num_gpus * tflops_per_gpu * 1e12) / 86400


# --- memory ---------------------------------------------------------------------------------------


def model_state_bytes(
    num_params: float, dp: int, zero_stage: int, optimizer_bytes_per_param: int = 12
) -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes per GPU for `num_params` parameters replicated over
    `dp` ranks: bf16 weights and gradients and K bytes of optimizer state per parameter, with
    ZeRO stage 1 sharding the optimizer state, 2 also the gradients, 3 also the weights
    (Rajbhandari et al. 2020: (2 + 2 + K) * params at stage 0)."""
    weights = BF16 * num_params / (dp if zero_stage >= 3 else 1)
    grads = BF16 * num_params / (dp if zero_stage >= 2 else 1)
    optim = optimizer_bytes_per_param * num_params / (dp if zero_stage >= 1 else 1)
    return weights, grads, optim


def stage_params(model: ModelConfig, parallel: ParallelConfig) -> float:
    """Parameters held by one GPU of the first pipeline stage (its layers and the embedding;
    with pp=1 also the untied output layer), sharded by tp."""
    h, V, L = model.hidden_size, model.vocab_size, model.num_layers
    per_layer = (model.num_params(include_embeddings=False) - h) / L
    embed = V * h
    if parallel.pp == 1 and not model.tie_word_embeddings:
        embed *= 2
    return (per_layer * L / parallel.pp + embed) / parallel.tp


def activation_bytes_per_layer(
    model: ModelConfig, parallel: ParallelConfig, flash_attention: bool, recompute: str
) -> float:
    """Bytes one layer keeps for backward, per micro-batch, per GPU (Korthikanti et al. 2022:
    s*b*h*(34 + 5*a*s/h) for a GPT without parallelism, generalised to GQA and SwiGLU). Tensor
    parallelism shards all but 10*s*b*h (layer-norm inputs, linear inputs, dropout masks) and
    sequence parallelism shards that too; selective recompute (and FlashAttention) drops the
    5*a*s^2*b attention-score term; full recompute keeps only the layer input (2*s*b*h)."""
    s, b, t = parallel.seq_len, parallel.micro_batch_size, parallel.tp
    h, q, kv, f = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    sp = parallel.sequence_parallel and t > 1
    if recompute == "full":
        return 2 * s * b * h / (t if sp else 1)
    mlp_per_f = 4 if model.mlp == "gelu" else 8  # GELU in/out; SwiGLU gate, up, silu, product
    replicated = 10 * s * b * h
    sharded = s * b * (4 * q + 4 * kv + mlp_per_f * f)
    if recompute == "none" and not flash_attention:
        sharded += 5 * model.num_heads * s * s * b
    return (replicated / (t if sp else 1)) + sharded / t


def memory_per_gpu(
    model: ModelConfig, parallel: ParallelConfig, options: EstimateOptions
) -> MemoryBreakdown:
    p, v, m = parallel.pp, parallel.interleave, parallel.num_micro_batches
    weights, grads, optim = model_state_bytes(
        stage_params(model, parallel), parallel.dp, parallel.zero_stage,
        options.optimizer_bytes_per_param,
    )  # fmt: skip
    layers = model.num_layers / p
    per_layer = activation_bytes_per_layer(
        model, parallel, options.flash_attention, parallel.recompute
    )
    # 1F1B: the first stage holds min(m, p) micro-batches in flight; interleaving adds
    # (p-1)/(p*v) more (Korthikanti et al. 2022, section 4.2.3)
    in_flight = min(m, p) * (1 + (p - 1) / (p * v) if v > 1 else 1)
    s, b, t = parallel.seq_len, parallel.micro_batch_size, parallel.tp
    logits = 8 * s * b * model.vocab_size / t  # fp32 logits and their gradient, last stage
    acts = max(per_layer * layers * in_flight, per_layer * layers) + logits
    if p > 1:  # the first stage (most in flight) and the last (logits) are different GPUs
        acts = max(per_layer * layers * in_flight, per_layer * layers + logits)
    if parallel.recompute == "full":  # the layer being recomputed holds its full activations
        acts += activation_bytes_per_layer(model, parallel, options.flash_attention, "none")
    if parallel.zero_stage == 3:  # two gathered layers in flight (prefetch)
        weights += 2 * BF16 * stage_params(model, parallel) / layers
    return MemoryBreakdown(weights=weights, gradients=grads, optimizer=optim, activations=acts)


# --- step time ------------------------------------------------------------------------------------


def check_layout(model: ModelConfig, parallel: ParallelConfig, cluster: ClusterSpec) -> None:
    """Raise ValueError if `parallel` cannot run `model` on `cluster`."""
    tp, gpn = parallel.tp, cluster.node.num_gpus
    if parallel.world_size != cluster.num_gpus:
        raise ValueError(
            f"dp*tp*pp ({parallel.dp}*{tp}*{parallel.pp} = {parallel.world_size}) must equal "
            f"the cluster's {cluster.num_gpus} GPUs"
        )
    if model.num_heads % tp:
        raise ValueError(f"tp ({tp}) must divide num_heads ({model.num_heads})")
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        raise ValueError(
            f"tp ({tp}) and num_kv_heads ({model.num_kv_heads}) must divide one another"
        )
    chunks = parallel.pp * parallel.interleave
    if model.num_layers % chunks:
        raise ValueError(
            f"pp * interleave ({parallel.pp} * {parallel.interleave}) must divide num_layers "
            f"({model.num_layers})"
        )
    if tp > gpn and tp % gpn:
        raise ValueError(f"tp ({tp}) above {gpn} GPUs per node must be a multiple of it")


def _placement(size: int, stride: int, gpn: int) -> int:
    """GPUs of a group with rank stride `stride` that share a node (ranks ordered tp, dp, pp): the
    largest divisor of `size` that fits in gpn // stride (node sizes like 72 need not divide)."""
    fit = gpn // stride
    return max((d for d in range(1, min(size, fit) + 1) if size % d == 0), default=1)


def _layer_time(
    model: ModelConfig, parallel: ParallelConfig, cluster: ClusterSpec, options: EstimateOptions
) -> tuple[float, float, float]:
    """(compute s, backward share of it, exposed TP comm s) of one layer for one micro-batch on
    one GPU: matmuls at the GPU's achievable efficiency plus memory-bound element-wise kernels."""
    gpu = cluster.node.gpu
    s, b, t = parallel.seq_len, parallel.micro_batch_size, parallel.tp
    tokens = s * b
    h, f = model.hidden_size, model.intermediate_size
    mm_rate = gpu.peak_flops(options.dtype) * gpu.matmul_efficiency
    mem_rate = gpu.memory_bandwidth_gbps * 1e9 * gpu.memory_efficiency
    sp = parallel.sequence_parallel and t > 1
    score_bytes = 0 if options.flash_attention else SCORE_BYTES * model.num_heads * s * tokens / t
    ew = REPLICATED_BYTES_PER_H * h * tokens / (t if sp else 1)
    ew += ACT_BYTES_PER_F[model.mlp] * f * tokens / t + score_bytes
    fwd = layer_forward_flops(model, tokens, s) / t / mm_rate + ew / mem_rate
    if parallel.recompute == "full":
        extra = fwd
    elif parallel.recompute == "selective":
        extra = attention_score_flops(model, tokens, s) / t / mm_rate + score_bytes / mem_rate
    else:
        extra = 0.0
    bwd = 2 * fwd + extra
    tp_comm = 0.0
    if t > 1:
        # two all-reduces forward and two backward (Megatron's f and g), two more when the forward
        # is recomputed; with sequence parallelism each becomes an all-gather plus a reduce-scatter
        # moving the same bytes
        n = 6 if parallel.recompute == "full" else 4
        per_node = _placement(t, 1, cluster.node.num_gpus)
        tp_comm = n * collective_time(cluster, "all_reduce", BF16 * tokens * h, t, per_node)
    return fwd + bwd, bwd, tp_comm


def step_time(
    model: ModelConfig, parallel: ParallelConfig, cluster: ClusterSpec, options: EstimateOptions
) -> StepTime:
    """1F1B (optionally interleaved) pipeline: (m + (p-1)/v) micro-batch slots of the slowest
    stage (the last, which also runs the logits), blocking p2p sends between stages, DP gradient
    sync after the last backward, then the optimizer step."""
    gpu, gpn = cluster.node.gpu, cluster.node.num_gpus
    p, v, m, t, dp = (
        parallel.pp,
        parallel.interleave,
        parallel.num_micro_batches,
        parallel.tp,
        parallel.dp,
    )
    s, b, h, V = parallel.seq_len, parallel.micro_batch_size, model.hidden_size, model.vocab_size
    layer, layer_bwd, layer_tp = _layer_time(model, parallel, cluster, options)
    layers = model.num_layers / p
    mm_rate = gpu.peak_flops(options.dtype) * gpu.matmul_efficiency
    mem_rate = gpu.memory_bandwidth_gbps * 1e9 * gpu.memory_efficiency
    # logits forward + backward, and cross-entropy over fp32 logits (about 4 passes of 4 bytes)
    logits = 6 * s * b * h * V / t / mm_rate + 16 * s * b * V / t / mem_rate
    slot = layers * layer + logits
    slot_tp = layers * layer_tp
    bubble = (p - 1) / v * (slot + slot_tp)
    pp_comm = 0.0
    if p > 1:
        # activations forward and gradients backward at each of v chunk boundaries; each tp rank
        # sends 1/t of the tensor (Megatron's scatter/gather optimisation)
        cross = t * dp >= gpn
        pp_comm = 2 * v * m * p2p_time(cluster, BF16 * s * b * h / t, cross)
    dp_comm = _dp_comm(model, parallel, cluster, layers * layer_bwd, m * (slot + slot_tp), options)
    params = stage_params(model, parallel) / (dp if parallel.zero_stage >= 1 else 1)
    optimizer = params * ADAM_BYTES_PER_PARAM / mem_rate
    return StepTime(
        compute=m * slot, tp_comm=m * slot_tp, pp_comm=pp_comm, dp_comm=dp_comm,
        bubble=bubble, optimizer=optimizer,
    )  # fmt: skip


def _dp_comm(
    model: ModelConfig,
    parallel: ParallelConfig,
    cluster: ClusterSpec,
    last_backward_s: float,
    compute_s: float,
    options: EstimateOptions,
) -> float:
    """Exposed gradient synchronisation. ZeRO 0-2 move one all-reduce's worth of bf16 gradients
    (stage 1/2 as reduce-scatter + parameter all-gather), hidden behind the last micro-batch's
    backward when overlapped; ZeRO-3 also gathers the weights in every micro-batch's forward and
    backward, prefetched behind compute."""
    dp, t = parallel.dp, parallel.tp
    if dp == 1:
        return 0.0
    per_node = _placement(dp, t, cluster.node.num_gpus)
    nbytes = BF16 * stage_params(model, parallel)
    sync = collective_time(cluster, "all_reduce", nbytes, dp, per_node)
    exposed = max(0.0, sync - last_backward_s) if options.overlap_dp_comm else sync
    if parallel.zero_stage == 3:
        gather = collective_time(cluster, "all_gather", nbytes, dp, per_node)
        per_step = 2 * parallel.num_micro_batches * gather
        exposed += max(0.0, per_step - compute_s) + gather / (model.num_layers / parallel.pp)
    return exposed


def estimate(
    model: ModelConfig,
    parallel: ParallelConfig,
    cluster: ClusterSpec,
    options: EstimateOptions | None = None,
) -> Plan:
    """The planner's one path: ClusterSpec + ModelConfig + ParallelConfig -> Plan."""
    options = options or EstimateOptions()
    check_layout(model, parallel, cluster)
    memory = memory_per_gpu(model, parallel, options)
    time = step_time(model, parallel, cluster, options)
    hw_flops, model_flops = step_flops(model, parallel)
    gpu = cluster.node.gpu
    capacity = gpu.memory_bytes
    plan = Plan(
        parallel=parallel,
        memory=memory,
        time=time,
        hardware_flops=hw_flops,
        model_flops=model_flops,
        num_gpus=cluster.num_gpus,
        peak_flops=gpu.peak_flops(options.dtype),
        memory_capacity=capacity,
        checkpoint_write_s=checkpoint_write_time(model, cluster, options),
        host_cpu=host_cpu(cluster),
        fits=memory.total <= capacity * options.usable_memory_fraction,
    )
    plan.notes = _notes(plan, cluster, capacity * options.usable_memory_fraction)
    return plan


def _notes(plan: Plan, cluster: ClusterSpec, usable: float) -> list[str]:
    """What a reader of the plan should know first: memory, bubble, traffic off NVLink."""
    p, t, gpn = plan.parallel, plan.time, cluster.node.num_gpus
    notes = []
    if not plan.fits:
        notes.append(f"needs {plan.memory.total / GB:.1f} GB per GPU, {usable / GB:.1f} GB usable")
    if p.tp > gpn:
        notes.append(f"tp={p.tp} spans {p.tp // gpn} nodes: TP all-reduces cross the network")
    for name, value in (("pipeline bubble", t.bubble), ("exposed gradient sync", t.dp_comm),
                        ("TP communication", t.tp_comm)):  # fmt: skip
        if value > 0.05 * t.total:
            notes.append(f"{name} is {100 * value / t.total:.0f}% of the step")
    return notes


def checkpoint_write_time(
    model: ModelConfig, cluster: ClusterSpec, options: EstimateOptions
) -> float:
    """Seconds to write bf16 weights plus optimizer state, limited by the file system's aggregate
    bandwidth or the nodes' storage NICs, whichever is lower."""
    nbytes = model.num_params() * (BF16 + options.optimizer_bytes_per_param)
    node = cluster.node
    nic_bw = cluster.num_nodes * node.storage_nics * node.nic.bytes_per_s
    fs_bw = cluster.storage_bandwidth_gbps * 1e9
    return nbytes / min(fs_bw, nic_bw) if nic_bw > 0 else nbytes / fs_bw


# A NCCL network proxy thread busy-polls one core per NIC; a kernel file-system client moves about
# 2 GB/s per core. Both move to a DPU's Arm cores; data loading stays on the host.
PROXY_CORES_PER_NIC = 1.0
STORAGE_CORES_PER_GBPS = 0.5


def host_cpu(cluster: ClusterSpec) -> HostCPU:
    """Host cores per node that a DPU offload frees while a checkpoint streams at full speed."""
    node = cluster.node
    per_node_gbps = min(
        cluster.storage_bandwidth_gbps / cluster.num_nodes,
        node.storage_nics * node.nic.bytes_per_s / 1e9,
    )
    return HostCPU(
        host_cores=node.host_cpu_cores,
        network_cores=PROXY_CORES_PER_NIC * node.num_nics,
        storage_cores=STORAGE_CORES_PER_GBPS * per_node_gbps,
    )
