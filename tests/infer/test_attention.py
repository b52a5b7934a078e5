"""Paged attention reference and KV cache against dense causal attention on whole sequences."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from aiinfra.infer.attention import (
    AttentionMetadata,
    KVCache,
    PagedAttention,
    paged_attention,
    paged_attention_ref,
    write_kv,
)


@dataclass
class Case:
    """A batch step: every sequence has `cached` tokens already in the cache and `new` to attend."""

    kv_cache: KVCache
    meta: AttentionMetadata
    q: torch.Tensor  # [N, H, D] queries of the new tokens
    k_new: torch.Tensor  # [N, Hkv, D]
    v_new: torch.Tensor
    k_full: list[torch.Tensor]  # per sequence, [seq_len, Hkv, D] dense K (cached + new)
    v_full: list[torch.Tensor]
    q_lens: list[int]
    scale: float


def make_case(
    specs: list[tuple[int, int]],
    *,
    block_size: int,
    num_kv_heads: int = 2,
    group: int = 1,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spare_blocks: int = 3,
) -> Case:
    """specs: (num_cached_tokens, num_new_tokens) per sequence. Blocks come from a shuffled pool.

    The cached prefix is written with `write_kv` as an earlier step would; the new tokens' K/V are
    returned for the step under test to write.
    """
    gen = torch.Generator().manual_seed(seed)
    H, Hkv, D = num_kv_heads * group, num_kv_heads, head_dim
    seq_lens = [c + n for c, n in specs]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    max_blocks = max(blocks_per_seq) + 2  # extra padded columns that must never be read
    block_tables = torch.zeros(len(specs), max_blocks, dtype=torch.int32)
    cache = KVCache.allocate(
        num_layers=2,
        num_blocks=num_blocks,
        block_size=block_size,
        num_kv_heads=Hkv,
        head_dim=D,
        dtype=dtype,
        device="cpu",
    )
    # poison the pool: anything read outside a sequence's valid slots would show up as NaN
    cache.kv.fill_(float("nan"))
    k_full, v_full, slots_full = [], [], []
    for s, n in enumerate(blocks_per_seq):
        ids = perm[:n]
        perm = perm[n:]
        block_tables[s, :n] = torch.tensor(ids, dtype=torch.int32)
        pos = torch.arange(seq_lens[s])
        slots_full.append(block_tables[s].long()[pos // block_size] * block_size + pos % block_size)
        k_full.append(torch.randn(seq_lens[s], Hkv, D, generator=gen).to(dtype))
        v_full.append(torch.randn(seq_lens[s], Hkv, D, generator=gen).to(dtype))
    for layer in range(cache.num_layers):
        for s, (c, _) in enumerate(specs):
            write_kv(cache, layer, k_full[s][:c], v_full[s][:c], slots_full[s][:c])
    q_lens = [n for _, n in specs]
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    slot_mapping = torch.cat([slots_full[s][c:] for s, (c, _) in enumerate(specs)])
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        block_tables=block_tables,
        query_start_loc=qsl,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    N = int(qsl[-1])
    return Case(
        kv_cache=cache,
        meta=meta,
        q=torch.randn(N, H, D, generator=gen).to(dtype),
        k_new=torch.cat([k_full[s][c:] for s, (c, _) in enumerate(specs)]),
        v_new=torch.cat([v_full[s][c:] for s, (c, _) in enumerate(specs)]),
        k_full=k_full,
        v_full=v_full,
        q_lens=q_lens,
        scale=1.0 / math.sqrt(D),
    )


def dense_reference(case: Case) -> torch.Tensor:
    """Causal attention by the formula, in float64, on each sequence's dense K/V."""
    outs = []
    qsl = case.meta.query_start_loc.tolist()
    H = case.q.shape[1]
    for s, (k, v) in enumerate(zip(case.k_full, case.v_full, strict=True)):
        L, Hkv = k.shape[0], k.shape[1]
        q = case.q[qsl[s] : qsl[s + 1]].double()  # [q_len, H, D]
        kv_head = torch.arange(H) // (H // Hkv)
        k64, v64 = k.double()[:, kv_head], v.double()[:, kv_head]  # [L, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, k64) * case.scale
        q_pos = torch.arange(L - q.shape[0], L)
        allowed = torch.arange(L)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64))
    return torch.cat(outs)


def run_step(case: Case, layer_idx: int = 1, attn_fn=None) -> torch.Tensor:
    """Write the new tokens' K/V then attend, as the model's attn callable does."""
    if attn_fn is None:
        attn = PagedAttention(case.kv_cache, case.meta, case.scale)
        return attn(layer_idx, case.q[None], case.k_new[None], case.v_new[None])[0]
    write_kv(case.kv_cache, layer_idx, case.k_new, case.v_new, case.meta.slot_mapping)
    return attn_fn(case.q, case.kv_cache, layer_idx, case.meta, case.scale)


# (num_cached, num_new) per sequence; lengths deliberately not multiples of the block sizes
SCENARIOS = {
    "decode": [(0, 1), (12, 1), (36, 1), (5, 1), (63, 1)],
    "prefill": [(0, 7), (0, 1), (0, 33), (0, 18)],
    "chunked_prefill": [(16, 9), (5, 20), (31, 2)],
    "mixed": [(20, 1), (0, 13), (9, 1), (17, 11), (40, 1), (0, 1)],
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_ref_matches_dense(scenario: str, block_size: int, group: int) -> None:
    case = make_case(SCENARIOS[scenario], block_size=block_size, group=group, seed=block_size)
    out = run_step(case)
    # fp32 SDPA vs a float64 formula: only summation order and rounding differ (~1e-6 here)
    torch.testing.assert_close(out.double(), dense_reference(case), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ref_low_precision_cache(dtype: torch.dtype) -> None:
    case = make_case(SCENARIOS["mixed"], block_size=4, group=2, dtype=dtype)
    out = run_step(case)
    assert out.dtype == dtype
    # the reference computes in fp32 on bf16/fp16 inputs; the only error is the final rounding of
    # the output to dtype (relative 2^-8 for bf16, 2^-11 for fp16)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(out.double(), dense_reference(case), atol=tol, rtol=tol)


def test_write_kv_places_tokens_at_slots() -> None:
    case = make_case([(0, 5), (0, 3)], block_size=4, num_kv_heads=3, group=1)
    write_kv(case.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
    k_pool, v_pool = case.kv_cache.key_cache(0), case.kv_cache.value_cache(0)
    for i, slot in enumerate(case.meta.slot_mapping.tolist()):
        block, offset = divmod(slot, 4)
        # pure data movement: exact
        torch.testing.assert_close(k_pool[block, :, :, offset], case.k_new[i], atol=0, rtol=0)
        torch.testing.assert_close(v_pool[block, :, offset], case.v_new[i], atol=0, rtol=0)
    # the other layer is untouched (still the NaN poison)
    assert case.kv_cache.key_cache(1).isnan().all()


def test_layers_are_independent() -> None:
    case = make_case(SCENARIOS["decode"], block_size=4, group=2)
    out1 = run_step(case, layer_idx=1)
    # layer 0 gets different new K/V; layer 1's result must not change
    write_kv(case.kv_cache, 0, torch.zeros_like(case.k_new), case.v_new, case.meta.slot_mapping)
    out1_again = paged_attention(case.q, case.kv_cache, 1, case.meta, case.scale)
    torch.testing.assert_close(out1_again, out1, atol=0, rtol=0)


def test_ref_and_dispatch_agree_on_dispatch_path() -> None:
    case = make_case(SCENARIOS["mixed"], block_size=16, group=2)
    write_kv(case.kv_cache, 1, case.k_new, case.v_new, case.meta.slot_mapping)
    ref = paged_attention_ref(case.q, case.kv_cache, 1, case.meta, case.scale)
    out = paged_attention(case.q, case.kv_cache, 1, case.meta, case.scale)
    # a fast path may sum in another order; fp32 rounding differences only
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_bytes_per_block_matches_allocation() -> None:
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache.allocate(
            num_layers=3,
            num_blocks=5,
            block_size=16,
            num_kv_heads=4,
            head_dim=8,
            dtype=dtype,
            device="cpu",
        )
        per_block = KVCache.bytes_per_block(3, 16, 4, 8, dtype)
        assert per_block * 5 == cache.kv.numel() * cache.kv.element_size()
        assert cache.key_cache(2).shape == (5, 4, 8, 16)  # K tiles transposed: [D, block_size]
        assert cache.value_cache(2).shape == (5, 4, 16, 8)
    assert KVCache.bytes_per_block(1, 16, 4, 64, "float32") == 2 * 16 * 4 * 64 * 4


def test_bad_input_names_field() -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        KVCache.allocate(
            num_layers=1,
            num_blocks=0,
            block_size=16,
            num_kv_heads=1,
            head_dim=8,
            dtype=torch.float32,
            device="cpu",
        )
    with pytest.raises(ValueError, match="int8"):
        KVCache.bytes_per_block(1, 16, 1, 8, "int8")
    case = make_case([(0, 2)], block_size=4)
    attn = PagedAttention(case.kv_cache, case.meta, case.scale)
    with pytest.raises(ValueError, match="batch dim"):
        attn(0, case.q[None].expand(2, -1, -1, -1), case.k_new[None], case.v_new[None])
