"""Triton paged attention and K/V write for CUDA, beside the torch reference (same signatures).

One program per (sequence, kv head, tile of query tokens): its rows are the tile's tokens times the
query heads sharing that kv head (GQA), so each K/V chunk is loaded once for all of them. Keys are
walked in chunks through the block table with an online softmax (FlashAttention-2 / flash-decoding
style); a query at absolute position p sees keys 0..p. Tested on CPU with TRITON_INTERPRET=1.
"""

# Triton conventions: constexpr parameters are UPPER_CASE (N803), and an if/else on a constexpr
# compiles only the taken branch, which reads clearer than a ternary here (SIM108)
# ruff: noqa: N803, SIM108

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aiinfra.infer.attention import AttentionMetadata, KVCache

# keys per inner step; any cache block size works (a chunk may span several cache blocks)
BLOCK_N = 32
MIN_ROWS = 16  # tl.dot needs at least 16 rows on GPUs


@triton.jit
def _paged_attention_kernel(
    q_ptr,
    out_ptr,
    k_ptr,
    v_ptr,
    block_tables_ptr,
    qsl_ptr,
    seq_lens_ptr,
    scale,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vo,
    stride_bt,
    head_dim,
    block_size,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    tok_begin = tl.program_id(2) * BLOCK_M
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tok_begin >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len  # absolute position of the sequence's first query

    rows = tl.arange(0, ROWS)
    tok = tok_begin + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_M * GROUP) & (tok < q_len)
    pos = first_pos + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim

    row_offsets = (q_start + tok)[:, None] * stride_qn + head[:, None] * stride_qh
    q = tl.load(q_ptr + row_offsets + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = (q.to(tl.float32) * scale).to(k_ptr.dtype.element_ty)

    # finite start, so rows that see no key of a chunk (or none at all) never compute inf - inf
    m = tl.full([ROWS], -1.0e30, tl.float32)
    row_sum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    last_pos = first_pos + tl.minimum(tok_begin + BLOCK_M, q_len) - 1
    for key0 in range(0, last_pos + 1, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        key_ok = keys <= last_pos
        table = block_tables_ptr + seq * stride_bt
        block = tl.load(table + keys // block_size, mask=key_ok, other=0)
        offset = keys % block_size
        # K tiles are stored transposed, [head_dim, block_size]: gather K^T [BLOCK_D, BLOCK_N]
        k_ptrs = (
            k_ptr
            + block[None, :].to(tl.int64) * stride_kb
            + kv_head * stride_kh
            + d[:, None] * stride_kd
            + offset[None, :]
        )
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & key_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        visible = row_ok[:, None] & (keys[None, :] <= pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        row_sum = row_sum * alpha + tl.sum(p, axis=1)
        v_ptrs = (
            v_ptr
            + block[:, None].to(tl.int64) * stride_vb
            + kv_head * stride_vh
            + offset[:, None] * stride_vo
            + d[None, :]
        )
        v = tl.load(v_ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / tl.where(row_sum > 0, row_sum, 1.0)[:, None]
    row_offsets = (q_start + tok)[:, None] * stride_qn + head[:, None] * stride_qh
    out_ptrs = out_ptr + row_offsets + d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kb,
    stride_kch,
    stride_kd,
    stride_vb,
    stride_vch,
    stride_vo,
    head_dim,
    block_size,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token)
    block = slot // block_size
    offset = slot % block_size
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    k = tl.load(k_ptr + token * stride_kn + head * stride_kh + d, mask=d_ok)
    v = tl.load(v_ptr + token * stride_vn + head * stride_vh + d, mask=d_ok)
    k_dst = k_cache_ptr + block * stride_kb + head * stride_kch + d * stride_kd + offset
    v_dst = v_cache_ptr + block * stride_vb + head * stride_vch + offset * stride_vo + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=d_ok)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=d_ok)


def write_kv_triton(
    kv_cache: KVCache, layer_idx: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Triton K/V write; same contract as `attention.write_kv_ref`."""
    N, Hkv, D = k.shape
    if N == 0:
        return
    # the kernel needs unit stride only within a head: q/k/v slices of one projection need no copy
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    k_cache, v_cache = kv_cache.key_cache(layer_idx), kv_cache.value_cache(layer_idx)
    _write_kv_kernel[(N, Hkv)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        D,
        kv_cache.block_size,
        BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs K >= 16
    )


def paged_attention_triton(
    q: torch.Tensor,
    kv_cache: KVCache,
    layer_idx: int,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Triton paged attention; same contract as `attention.paged_attention_ref`."""
    N, H, D = q.shape
    Hkv = kv_cache.num_kv_heads
    group = H // Hkv
    q = q.contiguous()
    out = torch.empty_like(q)
    if N == 0:
        return out
    # decode-only steps get one token per program; prefill tiles fill >= MIN_ROWS rows
    block_m = 1 if meta.max_query_len == 1 else max(1, 64 // group)
    rows = max(MIN_ROWS, triton.next_power_of_2(block_m * group))
    k_cache, v_cache = kv_cache.key_cache(layer_idx), kv_cache.value_cache(layer_idx)
    grid = (meta.num_seqs, Hkv, triton.cdiv(meta.max_query_len, block_m))
    _paged_attention_kernel[grid](
        q,
        out,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        meta.block_tables.stride(0),
        D,
        kv_cache.block_size,
        GROUP=group,
        BLOCK_M=block_m,
        ROWS=rows,
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(D)),  # tl.dot needs K >= 16
        # fp32 caches: exact fp32 products, not TF32, so greedy outputs match the reference
        IEEE=kv_cache.dtype == torch.float32,
    )
    return out
