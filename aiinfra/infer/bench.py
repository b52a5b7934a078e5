"""Offline serving throughput: the engine on a workload of {prompt_token_ids, max_tokens} requests
(greedy, ignore_eos), against HF transformers `generate` in static batches, and the matmul roofline.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from aiinfra.infer.engine import EngineConfig, LLMEngine
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.models import ModelConfig


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


def run_hf_baseline(model_dir: str, requests: list[dict], batch_size: int) -> dict[str, Any]:
    """The naive baseline: transformers `generate` on static batches in request order, left
    padded; each batch runs to its longest max_tokens, only the requested tokens count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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
            input_ids=ids,
            attention_mask=mask,
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
        seconds = time.perf_counter() - t0
    output_tokens = sum(r["max_tokens"] for r in requests)
    return {
        "output_tokens": output_tokens,
        "seconds": seconds,
        "output_tok_per_s": output_tokens / seconds,
        "batch_size": batch_size,
    }


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


def measure_matmul_flops(seconds: float = 2.0) -> float:
    """fp32 GEMM FLOP/s of this machine at a prefill shape ([4096, 512] x [512, 1408])."""
    a, b = torch.randn(4096, 512), torch.randn(512, 1408)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return 2 * 4096 * 512 * 1408 * n / (time.perf_counter() - t0)


def run_offline_bench(
    model_dir: str,
    requests: list[dict],
    *,
    baseline: str | None,
    hf_batch_size: int,
    kv_cache_memory: int | str,
    max_num_seqs: int,
    max_num_batched_tokens: int,
) -> dict[str, Any]:
    """The engine (and the HF baseline when baseline="hf") on the same requests; prints a table
    and returns the figures as a JSON-able dict."""
    if baseline not in (None, "hf"):
        raise ValueError(f"baseline ({baseline!r}) must be 'hf' or omitted")
    if hf_batch_size < 1:
        raise ValueError(f"hf_batch_size ({hf_batch_size}) must be >= 1")
    config = EngineConfig(
        model=model_dir,
        kv_cache_memory=kv_cache_memory,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    load_before = os.getloadavg()[0]
    engine = LLMEngine(config)
    run_engine(engine, requests[:4])  # warm-up: the same first 4 requests vLLM's script uses
    result = run_engine(engine, requests)
    peak = measure_matmul_flops()
    flops = workload_flops(engine.model_config, requests)
    roofline = result["output_tokens"] / (flops / peak)
    result |= {
        "engine": "aiinfra",
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
    if baseline == "hf":
        base = run_hf_baseline(model_dir, requests, hf_batch_size)
        result["baseline"] = base
        result["ratio"] = result["output_tok_per_s"] / base["output_tok_per_s"]
    _print_table(result)
    return result


def _print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"offline throughput, {result['num_requests']} requests")
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
