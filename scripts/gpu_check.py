"""The benchmarks of the GPU check (scripts/gpu_check.sh runs this after `pytest -m gpu`).

On a random ~1B Llama (preset bench-1b, TinyLlama-1.1B's shape) in bf16: batch-1 decode step time
against the HBM bandwidth bound (bytes of weights and K/V read per step), then offline serving
throughput of the engine and of HF static batching on the same workload, in the same run.
`--smoke` runs the same steps on the tiny model (any device, CPU included) in seconds, so the
script is known to run end to end before a GPU session spends its time on it.

Run from the repository root: PYTHONPATH=$PWD python3 scripts/gpu_check.py [--smoke] [--json F]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from aiinfra.infer import EngineConfig, LLMEngine
from aiinfra.infer.bench import (
    device_name,
    make_workload,
    measure_batch1_decode,
    run_hf_baseline,
    run_offline_bench,
)
from aiinfra.models import create_random_model_dir, get_preset

# the targets: reported, not enforced (a run that misses one still returns its figures)
TARGETS = {"throughput_vs_hf": 5.0, "batch1_bandwidth_utilization": 0.6}

PLANS: dict[str, dict[str, Any]] = {
    # sized for < 6 minutes on an H100 with model creation, graph capture and both HF batch sizes
    "full": {
        "preset": "bench-1b",
        "dtype": "bfloat16",
        "num_prompts": 512,
        "input_len": (64, 512),
        "output_len": (32, 256),
        "hf_batch_sizes": [64, 256],
        "max_num_seqs": 256,
        "max_num_batched_tokens": 8192,
        "kv_cache_memory": None,  # CUDA: sized from gpu_memory_utilization
        "batch1": {"prompt_len": 128, "warmup_steps": 32, "num_steps": 512},
        "batch1_kv_cache_memory": "1GiB",
    },
    "smoke": {
        "preset": "tiny",
        "dtype": "float32",
        "num_prompts": 8,
        "input_len": (4, 40),
        "output_len": (2, 12),
        "hf_batch_sizes": [4, 8],
        "max_num_seqs": 8,
        "max_num_batched_tokens": 256,
        "kv_cache_memory": "16MiB",
        "batch1": {"prompt_len": 16, "warmup_steps": 2, "num_steps": 8},
        "batch1_kv_cache_memory": "16MiB",
    },
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, tiny workload (CPU is fine)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--model-dir", type=Path, default=None, help="model folder (made if missing)")
    return p.parse_args(argv)


def ensure_model(preset: str, model_dir: Path) -> Path:
    """The seeded random model folder; written once (atomically), reused by a rerun."""
    if (model_dir / "config.json").exists():
        print(f"model: reusing {model_dir}")
        return model_dir
    t0 = time.perf_counter()
    config = get_preset(preset)
    tmp = Path(tempfile.mkdtemp(prefix=f"{model_dir.name}.", dir=model_dir.parent))
    create_random_model_dir(config, tmp, seed=0)
    tmp.rename(model_dir)
    took = time.perf_counter() - t0
    print(f"model: wrote {preset} ({config.num_params() / 1e9:.2f}B) to {model_dir} in {took:.0f}s")
    return model_dir


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def batch1_step(model_dir: Path, plan: dict[str, Any], device: str) -> dict[str, Any]:
    config = EngineConfig(
        model=str(model_dir),
        device=device,
        dtype=plan["dtype"],
        max_num_seqs=1,  # one graph (size 1): the path measured
        kv_cache_memory=plan["batch1_kv_cache_memory"],
    )
    engine = LLMEngine(config)
    result = measure_batch1_decode(engine, **plan["batch1"])
    del engine
    release(config.torch_device)
    return result


def throughput_step(model_dir: Path, plan: dict[str, Any], device: str) -> dict[str, Any]:
    vocab = get_preset(plan["preset"]).vocab_size
    requests = make_workload(plan["num_prompts"], 0, plan["input_len"], plan["output_len"], vocab)
    first, *more = plan["hf_batch_sizes"]
    result = run_offline_bench(
        str(model_dir),
        requests,
        baseline="hf",
        hf_batch_size=first,
        kv_cache_memory=plan["kv_cache_memory"],
        max_num_seqs=plan["max_num_seqs"],
        max_num_batched_tokens=plan["max_num_batched_tokens"],
        device=device,
        dtype=plan["dtype"],
    )
    baselines = [result["baseline"]]
    dev = torch.device(result["device"])
    for size in more:  # a larger static batch: the strongest naive baseline on a GPU
        baselines.append(
            run_hf_baseline(
                str(model_dir), requests, size, device=dev, dtype=getattr(torch, plan["dtype"])
            )
        )
        release(dev)
    best = max(baselines, key=lambda b: b["output_tok_per_s"])
    result["baselines"] = baselines
    result["ratio_vs_best_hf"] = result["output_tok_per_s"] / best["output_tok_per_s"]
    return result


def report(summary: dict[str, Any]) -> None:
    print("\n== summary")
    b1 = summary.get("batch1_decode")
    if b1:
        fwd = f", forward {b1['forward_ms']:.3f} ms (graph replay)" if b1["forward_ms"] else ""
        print(
            f"batch-1 decode: {b1['step_ms']:.3f} ms/step (engine.step){fwd}; "
            f"{b1['bytes_per_step'] / 1e9:.3f} GB read per step (weights + K/V of "
            f"{b1['mean_context_len']:.0f} tokens) -> {b1['achieved_gb_per_s']:.0f} GB/s"
        )
        if b1["hbm_gb_per_s"]:
            line = f"  HBM {b1['hbm_gb_per_s']:.0f} GB/s: step {b1['bandwidth_utilization']:.1%}"
            if b1["forward_bandwidth_utilization"] is not None:
                line += f", forward alone {b1['forward_bandwidth_utilization']:.1%}"
            print(line)
        if b1["cuda_kernels_per_step"]:
            print(f"  {b1['cuda_kernels_per_step']} CUDA kernels per decode forward")
    tp = summary.get("throughput")
    if tp:
        print(
            f"throughput: engine {tp['output_tok_per_s']:.0f} tok/s "
            f"({tp['num_requests']} requests, {tp['output_tokens']} output tokens)"
        )
        for b in tp["baselines"]:
            ratio = tp["output_tok_per_s"] / b["output_tok_per_s"]
            print(
                f"  HF static batch {b['batch_size']}: {b['output_tok_per_s']:.0f} tok/s "
                f"-> engine {ratio:.2f}x"
            )
    for name, met in summary.get("targets", {}).items():
        print(f"target {name} >= {TARGETS[name]}: {'met' if met else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = PLANS["smoke" if args.smoke else "full"]
    config = EngineConfig(model=".", device=args.device)  # validates --device early
    dev = config.torch_device
    summary: dict[str, Any] = {
        "plan": "smoke" if args.smoke else "full",
        "preset": plan["preset"],
        "dtype": plan["dtype"],
        "device": str(dev),
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "command": " ".join([sys.executable, *sys.argv]),
    }
    print(json.dumps(summary, indent=1))
    default_dir = Path(tempfile.gettempdir()) / f"aiinfra-{plan['preset']}"
    model_dir = args.model_dir or Path(os.environ.get("AIINFRA_BENCH_MODEL_DIR", default_dir))
    status = 0
    t0 = time.perf_counter()
    try:
        ensure_model(plan["preset"], model_dir)
        print("\n== batch-1 decode")
        summary["batch1_decode"] = batch1_step(model_dir, plan, args.device)
        print(json.dumps(summary["batch1_decode"], indent=1))
        write_json(args.json, summary)  # a later step killed by a timeout keeps this one
        print("\n== offline throughput: engine vs HF static batching")
        summary["throughput"] = throughput_step(model_dir, plan, args.device)
    except Exception:
        traceback.print_exc()
        summary["error"] = traceback.format_exc(limit=3)
        status = 1
    summary["seconds"] = time.perf_counter() - t0
    b1, tp = summary.get("batch1_decode"), summary.get("throughput")
    targets = {}
    if tp:
        targets["throughput_vs_hf"] = tp["ratio_vs_best_hf"] >= TARGETS["throughput_vs_hf"]
    if b1 and b1["bandwidth_utilization"] is not None:
        util = b1["bandwidth_utilization"]
        targets["batch1_bandwidth_utilization"] = util >= TARGETS["batch1_bandwidth_utilization"]
    summary["targets"] = targets
    report(summary)
    write_json(args.json, summary)
    if args.json is not None:
        print(f"wrote {args.json}")
    return status


def write_json(path: Path | None, summary: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
