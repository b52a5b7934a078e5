"""Where the engine's time goes on a workload: linear layers, paged attention, the rest of the
model, sampling, and host-side Python (scheduler, batch building, outputs), from cProfile.

Usage: python benchmarks/engine_profile.py MODEL_DIR [WORKLOAD.jsonl] [--json OUT]
Without a workload file: the standard one (128 requests, prompts 64-512, outputs 32-256).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

from aiinfra.infer.bench import load_workload, make_workload, run_engine
from aiinfra.infer.engine import EngineConfig, LLMEngine


def _time(stats: pstats.Stats, filename_part: str, name: str, cumulative: bool = True) -> float:
    total = 0.0
    for (filename, _, func), (_, _, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
        if filename_part in filename and func == name:
            total += cumtime if cumulative else tottime
    return total


def categorize(stats: pstats.Stats) -> dict[str, float]:
    """Split LLMEngine.step's time: linear layers (the GEMMs), paged attention (K/V write +
    kernel), the model's other torch ops (norms, rotary, SiLU, embedding), sampling, and host
    Python (scheduling, building the batch tensors, updating sequences, outputs)."""
    step = _time(stats, "engine.py", "step")
    model = _time(stats, "model_runner.py", "compute_logits")
    prepare = _time(stats, "model_runner.py", "prepare")
    linear = _time(stats, "~", "<built-in method torch._C._nn.linear>", cumulative=False)
    attention = _time(stats, "attention.py", "__call__")
    sampler = _time(stats, "sampler.py", "__call__")
    return {
        "linear": linear,
        "attention": attention,
        "model other": model - prepare - linear - attention,
        "sampler": sampler,
        "host": step - model - sampler + prepare,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("workload", nargs="?")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--json")
    args = parser.parse_args()
    requests = (
        load_workload(args.workload)
        if args.workload
        else make_workload(128, 0, (64, 512), (32, 256), 8192)
    )
    engine = LLMEngine(
        EngineConfig(
            model=args.model,
            kv_cache_memory="4GiB",
            max_num_batched_tokens=args.max_num_batched_tokens,
        )
    )
    run_engine(engine, requests[:4])
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    result = run_engine(engine, requests)
    profiler.disable()
    wall = time.perf_counter() - t0
    parts = categorize(pstats.Stats(profiler))
    total = sum(parts.values())
    print(f"{result['output_tokens']} output tokens in {wall:.1f} s under cProfile")
    for name, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:12s} {seconds:8.2f} s  {seconds / total:6.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": wall, "parts_s": parts, **result}, f, indent=2)


if __name__ == "__main__":
    main()
