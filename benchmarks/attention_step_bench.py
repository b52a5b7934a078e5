"""Share of paged attention in a whole bench-32m decode step (the issue's decode shape).

128 sequences, context uniform in [64, 764] (average ~414), fp32, random weights; the model runs
with `PagedAttention` as its `attn`, and the K/V write + attention calls are timed inside the step.

    python benchmarks/attention_step_bench.py [--threads 2] [--repeat 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from aiinfra.infer.attention import AttentionMetadata, KVCache, PagedAttention
from aiinfra.models import build_model, get_preset

NUM_SEQS, BLOCK = 128, 16


def build_step(cfg, gen: torch.Generator) -> tuple[KVCache, AttentionMetadata, torch.Tensor]:
    """A filled cache over shuffled blocks, decode metadata and the positions of the new tokens."""
    ctx = torch.randint(64, 765, (NUM_SEQS,), generator=gen)
    per_seq = (ctx + BLOCK - 1) // BLOCK
    num_blocks = int(per_seq.sum()) + 1
    cache = KVCache.allocate(
        num_layers=cfg.num_layers,
        num_blocks=num_blocks,
        block_size=BLOCK,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.dim_per_head,
        dtype=torch.float32,
        device="cpu",
    )
    cache.kv.normal_(generator=gen)
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros(NUM_SEQS, int(per_seq.max()), dtype=torch.int32)
    start = 0
    for s, n in enumerate(per_seq.tolist()):
        tables[s, :n] = perm[start : start + n].to(torch.int32)
        start += n
    pos = ctx - 1
    slots = tables[torch.arange(NUM_SEQS), pos // BLOCK].long() * BLOCK + pos % BLOCK
    meta = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        query_start_loc=torch.arange(NUM_SEQS + 1, dtype=torch.int32),
        seq_lens=ctx.to(torch.int32),
        max_query_len=1,
        max_seq_len=int(ctx.max()),
    )
    return cache, meta, pos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = get_preset("bench-32m")
    model = build_model(cfg, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    cache, meta, pos = build_step(cfg, gen)
    ids = torch.randint(0, cfg.vocab_size, (NUM_SEQS,), generator=gen)
    attn = PagedAttention(cache, meta, cfg.dim_per_head**-0.5)
    attn_s = [0.0]

    def timed_attn(layer_idx, q, k, v):
        t0 = time.perf_counter()
        out = attn(layer_idx, q, k, v)
        attn_s[0] += time.perf_counter() - t0
        return out

    @torch.inference_mode()
    def step() -> torch.Tensor:
        hidden = model.model(ids[None], pos[None], attn=timed_attn)
        return model.compute_logits(hidden[0])

    step()  # warm-up (and the C++ build on a fresh machine)
    runs = []
    for _ in range(args.repeat):
        attn_s[0] = 0.0
        t0 = time.perf_counter()
        step()
        runs.append((time.perf_counter() - t0, attn_s[0]))
    step_s, a_s = sorted(runs)[len(runs) // 2]  # the median step
    print(
        f"threads={args.threads}: decode step {step_s * 1e3:.1f} ms, K/V write + attention "
        f"{a_s * 1e3:.1f} ms ({a_s / step_s:.0%}); {NUM_SEQS / step_s:.0f} tokens/s at batch "
        f"{NUM_SEQS}"
    )


if __name__ == "__main__":
    main()
