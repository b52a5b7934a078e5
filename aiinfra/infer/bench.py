"""Offline serving throughput: the engine on a workload of {prompt_token_ids, max_tokens} requests
(greedy, ignore_eos), against HF transformers `generate` in static batches, and the matmul roofline;
batch-1 decode step time against the memory-bandwidth bound (bytes read per step / HBM bandwidth).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch

from aiinfra.infer.engine import EngineConfig, LLMEngine
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.models import ModelConfig

logger = logging.getLogger(__name__)


def make_workload(
    n: int, seed: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab: int
) -> list[dict]:
    """Random requests; the same random.Random call sequence as shared/bench/make_workload.py."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*input_len))]
        out.append({"prompt_token_ids": prompt, "max_tokens": rng.randint(*output_len)})
    return out


def load_workload(path: str | Path) -> list[dict]:
    requests = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            ids, max_tokens = r.get("prompt_token_ids"), r.get("max_tokens")
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) for t in ids):
                raise ValueError(f"{path}:{lineno}: prompt_token_ids ({ids!r:.40}) must be ints")
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise ValueError(f"{path}:{lineno}: max_tokens ({max_tokens!r}) must be >= 1")
            requests.append({"prompt_token_ids": ids, "max_tokens": max_tokens})
    if not requests:
        raise ValueError(f"workload ({path}) has no requests")
    return requests


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def run_engine(engine: LLMEngine, requests: list[dict]) -> dict[str, Any]:
    """Add every request at once and step until done; per-step figures for the report."""
    for i, r in enumerate(requests):
        engine.add_request(f"bench-{i}", r["prompt_token_ids"], _greedy(r["max_tokens"]))
    peak_usage, util_at_peak, steps = -1.0, 0.0, 0
    t0 = time.perf_counter()
    output_tokens = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
        stats = engine.get_stats()
        if stats.kv_cache_usage > peak_usage:  # saturation: the step holding the most KV
            peak_usage, util_at_peak = stats.kv_cache_usage, stats.kv_cache_token_utilization
    seconds = time.perf_counter() - t0
    stats = engine.get_stats()
    output_tokens = sum(r["max_tokens"] for r in requests)
    return {
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tok_per_s": output_tokens / seconds,
        "steps": steps,
        "kv_cache_usage_peak": peak_usage,
        "kv_cache_utilization_at_saturation": util_at_peak,
        "prefix_cache_hit_rate": stats.prefix_cache_hit_rate,
        "preemptions": stats.num_preemptions,
    }


def run_hf_baseline(
    model_dir: str,
    requests: list[dict],
    batch_size: int,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The naive baseline: transformers `generate` on static batches in request order, left
    padded; each batch runs to its longest max_tokens, only the requested tokens count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()  # type: ignore[arg-type]  # transformers types .to oddly
    pad = 0

    def run_batch(batch: list[dict]) -> None:
        width = max(len(r["prompt_token_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            p = r["prompt_token_ids"]
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        n = max(r["max_tokens"] for r in batch)
        model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=n,
            min_new_tokens=n,  # ignore_eos
            do_sample=False,
            pad_token_id=pad,
        )

    with torch.inference_mode():
        run_batch(requests[:2])  # warm-up, as the engine's
        t0 = time.perf_counter()
        for i in range(0, len(requests), batch_size):
            run_batch(requests[i : i + batch_size])
        _synchronize(device)
        seconds = time.perf_counter() - t0
    output_tokens = sum(r["max_tokens"] for r in requests)
    return {
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tok_per_s": output_tokens / seconds,
        "batch_size": batch_size,
    }


def _synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _release_memory(device: str | torch.device) -> None:
    """Give a finished run's CUDA memory back, so the next run (or the KV profiling) sees it."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def workload_flops(config: ModelConfig, requests: list[dict]) -> float:
    """Model FLOPs of the workload: every token but the last output token is computed once
    (linear layers 2 * params, attention 4 * q_size * context per layer), logits once per
    output token."""
    h, L = config.hidden_size, config.num_layers
    linear = config.num_params(include_embeddings=False) - L * 2 * h - h  # minus the norms
    total = 0.0
    for r in requests:
        n = len(r["prompt_token_ids"]) + r["max_tokens"] - 1
        total += 2 * linear * n
        total += L * 4 * config.q_size * n * (n + 1) / 2  # token at position p sees p+1 keys
        total += 2 * h * config.vocab_size * r["max_tokens"]
    return total


def measure_matmul_flops(
    seconds: float = 2.0,
    *,
    shape: tuple[int, int, int] = (4096, 512, 1408),
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """GEMM FLOP/s of this device at a prefill shape (m, k, n): [m, k] x [k, n]; the default is
    bench-32m's MLP at 4096 tokens."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.mm(a, b)
    _synchronize(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10 if torch.device(device).type == "cuda" else 1):
            torch.mm(a, b)
            count += 1
        _synchronize(device)
    return 2 * m * k * n * count / (time.perf_counter() - t0)


# HBM bandwidth in bytes/s by device name (vendor datasheets); the most specific match wins
HBM_BANDWIDTH = {
    "H100 PCIe": 2.0e12,
    "H100 NVL": 3.9e12,
    "H100": 3.35e12,  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    "H200": 4.8e12,
    "A100-SXM4-80GB": 2.039e12,
    "A100 80GB PCIe": 1.935e12,
    "A100": 1.555e12,  # 40 GB
}


def hbm_bandwidth(name: str) -> float | None:
    """The card's HBM bandwidth (bytes/s) from its name, None when unknown."""
    hits = [key for key in HBM_BANDWIDTH if key in name]
    return HBM_BANDWIDTH[max(hits, key=len)] if hits else None


def decode_bytes_per_step(config: ModelConfig, itemsize: int, context_len: float) -> float:
    """Bytes one decode step of one sequence must read: every weight once (the lm_head, a full
    matrix even when tied, but of the embedding table only the new token's row) and the K/V of
    context_len tokens in each layer."""
    h = config.hidden_size
    weights = config.num_params(include_embeddings=False) + config.vocab_size * h + h
    kv = context_len * config.num_layers * 2 * config.num_kv_heads * config.dim_per_head
    return itemsize * (weights + kv)


def measure_batch1_decode(
    engine: LLMEngine, *, prompt_len: int = 128, num_steps: int = 256, warmup_steps: int = 16
) -> dict[str, Any]:
    """One greedy sequence alone in the engine: seconds per decode step (engine.step: schedule,
    forward, sample), and with CUDA graphs the forward alone (the size-1 graph replayed);
    bytes read per step and the bandwidth they imply."""
    assert not engine.has_unfinished_requests()
    rng = random.Random(0)
    prompt = [rng.randrange(engine.model_config.vocab_size) for _ in range(prompt_len)]
    engine.add_request("batch1", prompt, _greedy(warmup_steps + num_steps + 2))
    for _ in range(1 + warmup_steps):  # the prefill, then decodes
        engine.step()
    dev = engine.device
    _synchronize(dev)
    t0 = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    step_s = (time.perf_counter() - t0) / num_steps
    forward_s = _time_graph_replay(engine)
    kernels = _count_decode_kernels(engine) if dev.type == "cuda" else None
    engine.abort_request("batch1")
    # decode step k (after the prefill) computes position prompt_len + k - 1 and so reads
    # prompt_len + k tokens of K/V; the timed steps are k = warmup_steps + 1 ... + num_steps
    context = prompt_len + warmup_steps + (num_steps + 1) / 2
    mc, itemsize = engine.model_config, engine.dtype.itemsize
    nbytes = decode_bytes_per_step(mc, itemsize, context)
    bw = hbm_bandwidth(device_name(dev)) if dev.type == "cuda" else None
    out: dict[str, Any] = {
        "step_ms": step_s * 1e3,
        "forward_ms": forward_s * 1e3 if forward_s is not None else None,
        "cuda_graphs": engine.model_runner.graph_runner is not None,
        "cuda_kernels_per_step": kernels,
        "mean_context_len": context,
        "bytes_per_step": nbytes,
        "achieved_gb_per_s": nbytes / step_s / 1e9,
        "hbm_gb_per_s": bw / 1e9 if bw else None,
        "bandwidth_utilization": nbytes / step_s / bw if bw else None,
        "forward_bandwidth_utilization": (
            nbytes / forward_s / bw if bw and forward_s is not None else None
        ),
    }
    return out


def _time_graph_replay(engine: LLMEngine, repeats: int = 200) -> float | None:
    """Seconds per replay of the size-1 decode graph on its buffers as the last step left them
    (it rewrites that step's K/V slot with the same values), timed with CUDA events; None
    without captured graphs."""
    graphs = engine.model_runner.graph_runner
    if graphs is None or not graphs.is_captured:
        return None
    graph = graphs.graphs[1]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def _count_decode_kernels(engine: LLMEngine) -> int | None:
    """CUDA kernels one batch-1 decode forward launches (what a CUDA graph replays), counted by
    the profiler on an eager forward of the static buffers; None without graphs or a profiler.
    Each costs a few microseconds even when tiny: the figure says how far fusion could go."""
    graphs = engine.model_runner.graph_runner
    if graphs is None:
        return None
    from torch.profiler import ProfilerActivity, profile

    try:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            graphs.forward(1)  # the last step's inputs again: rewrites its K/V slot identically
            torch.cuda.synchronize(engine.device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a diagnostic only: no profiler (CUPTI) must not fail the benchmark
        logger.warning("could not count the decode step's CUDA kernels", exc_info=True)
        return None


BENCH_CPU_KV_CACHE_MEMORY = "4GiB"


def run_offline_bench(
    model_dir: str,
    requests: list[dict],
    *,
    baseline: str | None,
    hf_batch_size: int,
    kv_cache_memory: int | str | None,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    device: str = "auto",
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
) -> dict[str, Any]:
    """The engine (and the HF baseline when baseline="hf", on the same device and dtype) on the
    same requests; prints a table and returns the figures as a JSON-able dict. kv_cache_memory
    None: 4GiB on CPU, the gpu_memory_utilization budget on CUDA."""
    if baseline not in (None, "hf"):
        raise ValueError(f"baseline ({baseline!r}) must be 'hf' or omitted")
    if hf_batch_size < 1:
        raise ValueError(f"hf_batch_size ({hf_batch_size}) must be >= 1")
    config = EngineConfig(
        model=model_dir,
        device=device,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        kv_cache_memory=kv_cache_memory,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    dev, torch_dtype = config.torch_device, config.torch_dtype
    if kv_cache_memory is None and dev.type == "cpu":
        config = dataclasses.replace(config, kv_cache_memory=BENCH_CPU_KV_CACHE_MEMORY)
    load_before = os.getloadavg()[0]
    engine = LLMEngine(config)
    run_engine(engine, requests[:4])  # warm-up: the same first 4 requests vLLM's script uses
    result = run_engine(engine, requests)
    mc = engine.model_config
    peak = measure_matmul_flops(
        shape=(max_num_batched_tokens, mc.hidden_size, mc.intermediate_size),
        device=dev,
        dtype=torch_dtype,
    )
    flops = workload_flops(mc, requests)
    roofline = result["output_tokens"] / (flops / peak)
    result |= {
        "engine": "aiinfra",
        "device": str(dev),
        "device_name": device_name(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "cuda_graphs": engine.model_runner.graph_runner is not None,
        "num_kv_blocks": engine.block_manager.num_blocks,
        "num_requests": len(requests),
        "workload_tflop": flops / 1e12,
        "matmul_gflop_per_s": peak / 1e9,
        "roofline_tok_per_s": roofline,
        "fraction_of_roofline": result["output_tok_per_s"] / roofline,
        "max_num_batched_tokens": max_num_batched_tokens,
        "max_num_seqs": max_num_seqs,
        "threads": torch.get_num_threads(),
        # other processes on the machine distort timings: say how busy it was
        "load_avg_1m": [load_before, os.getloadavg()[0]],
    }
    del engine
    _release_memory(dev)
    if dev.type == "cuda":  # what the baseline does not get back (should be ~0)
        result["cuda_gib_held_after_engine"] = torch.cuda.memory_allocated(dev) / 2**30
    if baseline == "hf":
        base = run_hf_baseline(model_dir, requests, hf_batch_size, device=dev, dtype=torch_dtype)
        _release_memory(dev)
        result["baseline"] = base
        result["ratio"] = result["output_tok_per_s"] / base["output_tok_per_s"]
    _print_table(result)
    return result


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"offline throughput, {result['num_requests']} requests, {result['device_name']}"
    table = Table(title=title)
    for col in ("engine", "output tokens", "seconds", "output tok/s", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(
        "aiinfra",
        str(result["output_tokens"]),
        f"{result['seconds']:.1f}",
        f"{result['output_tok_per_s']:.1f}",
        f"{result['ratio']:.2f}x" if "ratio" in result else "",
    )
    if "baseline" in result:
        b = result["baseline"]
        table.add_row(
            f"HF static (batch {b['batch_size']})",
            str(b["output_tokens"]),
            f"{b['seconds']:.1f}",
            f"{b['output_tok_per_s']:.1f}",
            "1.00x",
        )
    table.add_row(
        "matmul roofline",
        "",
        "",
        f"{result['roofline_tok_per_s']:.1f}",
        f"{result['fraction_of_roofline']:.0%} reached",
    )
    console = Console()
    console.print(table)
    console.print(
        f"KV utilization at saturation {result['kv_cache_utilization_at_saturation']:.1%} "
        f"(peak block usage {result['kv_cache_usage_peak']:.1%}), prefix hit rate "
        f"{result['prefix_cache_hit_rate']:.1%}, preemptions {result['preemptions']}, "
        f"{result['steps']} steps"
    )
