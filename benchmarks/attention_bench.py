"""Paged attention microbenchmark: ms per layer of the torch reference vs the fast path.

Shapes are bench-32m's (8 heads, 4 kv heads, head_dim 64, block 16). The decode case is the
issue's: 128 sequences, context uniform in [64, 764] (average ~414). Prefill cases are a full
token budget of fresh prompts and a chunk continuing a cached prefix. Baselines in the same run:
the layer's linear layers on the same tokens (linear_ms); for decode, summing as many bytes as the
K/V reads (stream_ms, the memory-bandwidth floor); for equal-length fresh prompts, SDPA on dense
unpaged tensors (sdpa_dense_ms).

    python benchmarks/attention_bench.py [--threads 2] [--repeat 20] [--json PATH] [--clock cpu]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from aiinfra.infer.attention import (
    AttentionMetadata,
    KVCache,
    cpu_extension,
    paged_attention,
    paged_attention_ref,
    write_kv,
    write_kv_ref,
)

H, HKV, D, BLOCK = 8, 4, 64, 16


def build(
    cached: list[int], new: list[int], dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, KVCache, AttentionMetadata, torch.Tensor, torch.Tensor]:
    """A batch step over shuffled blocks: returns q, the filled cache, metadata, new k and v."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    per_seq = [-(-s // BLOCK) for s in seq_lens]
    num_blocks = sum(per_seq) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(len(seq_lens), max(per_seq), dtype=torch.int32)
    start = 0
    for s, n in enumerate(per_seq):
        tables[s, :n] = perm[start : start + n].to(torch.int32)
        start += n
    cache = KVCache.allocate(
        num_layers=1,
        num_blocks=num_blocks,
        block_size=BLOCK,
        num_kv_heads=HKV,
        head_dim=D,
        dtype=dtype,
        device="cpu",
    )
    cache.kv.normal_(generator=gen)
    slots = []
    for s, (c, n) in enumerate(zip(cached, new, strict=True)):
        pos = torch.arange(c, c + n)
        slots.append(tables[s].long()[pos // BLOCK] * BLOCK + pos % BLOCK)
    qsl = torch.tensor([0, *new]).cumsum(0).to(torch.int32)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots),
        block_tables=tables,
        query_start_loc=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_query_len=max(new),
        max_seq_len=max(seq_lens),
    )
    N = sum(new)
    q = torch.randn(N, H, D, generator=gen).to(dtype)
    k = torch.randn(N, HKV, D, generator=gen).to(dtype)
    v = torch.randn(N, HKV, D, generator=gen).to(dtype)
    return q, cache, meta, k, v


def gather_sdpa(q: torch.Tensor, cache: KVCache, meta: AttentionMetadata) -> torch.Tensor:
    """The issue's first baseline: gather all blocks by advanced indexing, one masked SDPA."""
    S, L = meta.seq_lens.shape[0], meta.max_seq_len
    nb = -(-L // BLOCK)
    tables = meta.block_tables[:, :nb].long()
    k = cache.key_cache(0)[tables].permute(0, 2, 1, 3, 4).reshape(S, HKV, nb * BLOCK, D)
    v = cache.value_cache(0)[tables].permute(0, 2, 1, 3, 4).reshape(S, HKV, nb * BLOCK, D)
    k, v = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    mask = torch.arange(nb * BLOCK)[None, :] < meta.seq_lens[:, None]  # decode only
    out = F.scaled_dot_product_attention(
        q[:, :, None], k, v, attn_mask=mask[:, None, None], scale=1 / math.sqrt(D)
    )
    return out[:, :, 0]


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeat: int,
    slow: tuple[str, ...] = (),
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median ms of each fn, timed round-robin so all see the same load on a shared machine.

    The `slow` ones (the references, ~1 s) get only 3 of the rounds.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for i in range(repeat):
        for name, fn in fns.items():
            if name in slow and i >= 3:
                continue
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


def linear_layers(num_tokens: int) -> Callable[[], object]:
    """One bench-32m layer's matmuls (qkv, o, gate+up, down) for num_tokens tokens: the baseline."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, 512, generator=gen)
    h = torch.randn(num_tokens, 1408, generator=gen)
    w_qkv, w_o = torch.randn(512, 1024, generator=gen), torch.randn(512, 512, generator=gen)
    w_gate_up, w_down = torch.randn(512, 2816, generator=gen), torch.randn(1408, 512, generator=gen)
    return lambda: (x @ w_qkv, x @ w_o, x @ w_gate_up, h @ w_down)


def dense_causal_sdpa(num_seqs: int, seq_len: int, dtype: torch.dtype) -> Callable[[], object]:
    """Fresh prompts of one length as dense [S, H, L, D] tensors, SDPA is_causal with GQA: what a
    prefill would cost without paging (no gather, no mask), the bar for a long-query torch path."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(num_seqs, H, seq_len, D, generator=gen).to(dtype)
    k = torch.randn(num_seqs, HKV, seq_len, D, generator=gen).to(dtype)
    v = torch.randn(num_seqs, HKV, seq_len, D, generator=gen).to(dtype)
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def stream(cache: KVCache, meta: AttentionMetadata) -> Callable[[], object]:
    """Summing as many cache bytes as decode attention must read: the memory-bandwidth floor."""
    num_tokens = int(meta.seq_lens.sum())
    flat = torch.ones(2 * num_tokens * HKV * D, dtype=cache.dtype)
    return lambda: flat.sum()


def run_case(
    name: str,
    cached: list[int],
    new: list[int],
    dtype: torch.dtype,
    repeat: int,
    clock: Callable[[], float],
) -> dict[str, float | str]:
    q, cache, meta, k, v = build(cached, new, dtype)
    scale = 1 / math.sqrt(D)
    fns: dict[str, Callable[[], object]] = {
        "ref_ms": lambda: paged_attention_ref(q, cache, 0, meta, scale),
        "fast_ms": lambda: paged_attention(q, cache, 0, meta, scale),
        "linear_ms": linear_layers(q.shape[0]),
    }
    slow = ("ref_ms",)
    if meta.max_query_len == 1:
        fns["stream_ms"] = stream(cache, meta)
        fns["write_kv_ref_ms"] = lambda: write_kv_ref(cache, 0, k, v, meta.slot_mapping)
        fns["write_kv_ms"] = lambda: write_kv(cache, 0, k, v, meta.slot_mapping)
        if dtype == torch.float32:
            fns["gather_sdpa_ms"] = lambda: gather_sdpa(q, cache, meta)
            slow += ("gather_sdpa_ms",)
    if not any(cached) and len(set(new)) == 1:
        fns["sdpa_dense_ms"] = dense_causal_sdpa(len(new), new[0], dtype)
    row: dict[str, float | str] = {"case": name, "dtype": str(dtype).removeprefix("torch.")}
    row.update(time_interleaved(fns, repeat, slow, clock))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: the calling thread's CPU time (needs --threads 1); steadier on a busy machine",
    )
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        raise SystemExit(f"--clock cpu needs --threads 1 (got --threads {args.threads})")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    if cpu_extension() is None:
        raise SystemExit("the C++ kernel could not be built; nothing to compare")
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(64, 765, (128,), generator=gen).tolist()
    cases = {
        "decode 128 seqs, ctx ~414": ([c - 1 for c in ctx], [1] * 128),
        "prefill 8 x 512": ([0] * 8, [512] * 8),
        "chunked prefill 512 cached + 512": ([512], [512]),
        "mixed 120 decode + 1 x 256 prefill": ([c - 1 for c in ctx[:120]] + [0], [1] * 120 + [256]),
    }
    print(
        f"threads={args.threads} clock={args.clock}  "
        "(ms per layer, medians, timed round-robin with the baselines)"
    )
    rows = []
    for name, (cached, new) in cases.items():
        for dtype in (torch.float32, torch.bfloat16):
            row = run_case(name, cached, new, dtype, args.repeat, clock)
            rows.append(row)
            times = "".join(f"  {k}={v:.2f}" for k, v in row.items() if k.endswith("_ms"))
            ratio = float(row["ref_ms"]) / float(row["fast_ms"])
            versus = float(row["fast_ms"]) / float(row["linear_ms"])
            label = f"{name:<36} {row['dtype']:<9}"
            print(f"{label}{times}  ref/fast={ratio:.1f}x  fast/linear={versus:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "clock": args.clock, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
