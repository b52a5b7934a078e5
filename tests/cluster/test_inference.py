"""Serving estimates: KV sizes of real models, memory capacity, roofline limits, replica count."""

import math

import pytest

from aiinfra.cluster.hardware import get_node
from aiinfra.cluster.inference import (
    ServingConfig,
    decode_step_time,
    kv_bytes_per_token,
    max_concurrent_seqs,
    plan_serving,
    prefill_time,
    serving_curve,
)
from aiinfra.cluster.topology import ClusterSpec
from aiinfra.models.config import get_preset


def test_kv_bytes_per_token_of_llama3():
    # Llama-3-8B: 32 layers x 8 KV heads x 128 dims x K,V x bf16 = 128 KiB per token;
    # Llama-3-70B: 80 layers -> 320 KiB
    assert kv_bytes_per_token(get_preset("llama-3-8b")) == 128 * 1024
    assert kv_bytes_per_token(get_preset("llama-3-70b")) == 320 * 1024
    assert kv_bytes_per_token(get_preset("llama-3-70b"), kv_bytes=1) == 160 * 1024


def test_max_concurrency_is_free_memory_over_kv():
    model = get_preset("llama-3-70b")
    cluster = ClusterSpec(node=get_node("h100"), num_nodes=1)
    cfg = ServingConfig(tp=4)
    free = 4 * 79.6 * 2**30 * 0.9 - model.num_params() * 2
    assert max_concurrent_seqs(model, cluster, cfg, 8192) == int(free // (320 * 1024 * 8192))
    # on one GPU the bf16 weights (141 GB) do not fit at all
    assert max_concurrent_seqs(model, cluster, ServingConfig(tp=1), 1) == 0


def test_roofline_limits():
    model = get_preset("llama-3-8b")
    cluster = ClusterSpec(node=get_node("h100"), num_nodes=1)
    gpu = cluster.node.gpu
    cfg = ServingConfig(tp=1, prompt_len=4096, output_len=2)
    # batch-1 decode reads every weight and the sequence's KV cache once: memory-bound
    nbytes = model.num_params() * 2 + 4097 * kv_bytes_per_token(model)  # mean context 4096 + 1
    mem_time = nbytes / (gpu.memory_bandwidth_gbps * 1e9 * gpu.memory_efficiency)
    assert decode_step_time(model, cluster, cfg, 1) == pytest.approx(mem_time, rel=1e-9)
    # a 4096-token prefill is compute-bound: about 2 * params * tokens FLOPs
    flops = 2 * model.num_params() * 4096
    prefill = prefill_time(model, cluster, cfg)
    assert prefill > flops / (gpu.peak_flops() * gpu.matmul_efficiency)
    assert prefill < 1.3 * flops / (gpu.peak_flops() * gpu.matmul_efficiency)
    # decode time grows with the batch (KV reads), far less than linearly
    assert decode_step_time(model, cluster, cfg, 64) < 4 * decode_step_time(model, cluster, cfg, 1)


def test_plan_serving_replicas_scale_with_rate():
    model = get_preset("llama-3-70b")
    cluster = ClusterSpec(node=get_node("h100"), num_nodes=1)
    low = plan_serving(model, cluster, ServingConfig(tp=8, request_rate=1.0))
    high = plan_serving(model, cluster, ServingConfig(tp=8, request_rate=100.0))
    assert low.meets_targets and low.tpot_s <= 0.05 and low.ttft_s <= 1.0
    assert high.num_replicas == math.ceil(100.0 / high.requests_per_s)
    assert high.num_replicas > low.num_replicas and high.num_gpus == 8 * high.num_replicas
    assert low.tokens_per_s == pytest.approx(low.requests_per_s * 256)
    # a tighter TPOT target forces a smaller batch
    tight = plan_serving(model, cluster, ServingConfig(tp=8, tpot_s=0.025))
    assert tight.batch_size < low.batch_size
    with pytest.raises(ValueError, match="tp"):
        plan_serving(model, cluster, ServingConfig(tp=16))
    with pytest.raises(ValueError, match="request_rate"):
        ServingConfig(request_rate=0)


def test_serving_curve_agrees_with_plan():
    model = get_preset("llama-3-70b")
    cluster = ClusterSpec(node=get_node("h100"), num_nodes=1)
    cfg = ServingConfig(tp=8, max_batch_size=256)
    curve = serving_curve(model, cluster, cfg)
    plan = plan_serving(model, cluster, cfg)
    assert [c[0] for c in curve] == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    tpots = [c[1] for c in curve]
    assert tpots == sorted(tpots)  # a bigger batch never decodes faster per token
    last = curve[-1]
    assert plan.batch_size == 256 and plan.tpot_s == pytest.approx(last[1])
    assert plan.tokens_per_s == pytest.approx(last[2])
