"""Triton kernels for the fused decoder layer (fused.py): RMSNorm with and without the residual
add, SiLU-and-mul, and RoPE on q and k in one launch; each keeps the signature of its torch
reference in fused.py and is tested against it (on CPU with TRITON_INTERPRET=1).

Every kernel rounds its intermediates to the output dtype where the reference's separate torch
ops do (the residual sum, the normalized value, silu(gate), each RoPE product), so in bf16 the
fused model differs from the reference only by reduction order, not by extra roundings.
"""

# Triton conventions: constexpr parameters are UPPER_CASE (N803)
# ruff: noqa: N803

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=ok)
    x32 = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=0) / n_cols + eps)
    normed = (x32 * inv_rms).to(x.dtype).to(tl.float32)  # the reference rounds to x's dtype
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [M, C] with unit stride along C (a view when the layout allows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    C = x.shape[-1]
    assert weight.shape == (C,), f"weight {tuple(weight.shape)} for hidden size {C}"
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=out_dtype, device=x.device)
    new_res = None
    r2 = x2
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        r2 = _rows(residual)
        new_res = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = triton.next_power_of_2(C)
        _rms_norm_kernel[(x2.shape[0],)](
            x2,
            r2,
            weight,
            out,
            new_res if new_res is not None else out,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_res.stride(0) if new_res is not None else 0,
            C,
            eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=_num_warps(block),
        )
    out = out.view(x.shape)
    return out, new_res.view(x.shape) if new_res is not None else None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton RMSNorm; same contract as `fused.rms_norm_ref`."""
    return _launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton residual add + RMSNorm in one pass; same contract as
    `fused.fused_add_rms_norm_ref`."""
    out, new_res = _launch_rms_norm(x, residual, weight, eps)
    assert new_res is not None
    return out, new_res


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=ok, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu's rounding
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(dtype), mask=ok)


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton SwiGLU activation; same contract as `fused.silu_and_mul_ref`."""
    d = gate_up.shape[-1] // 2
    x2 = _rows(gate_up)
    out = torch.empty((x2.shape[0], d), dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0] > 0:
        block = min(1024, triton.next_power_of_2(d))
        grid = (x2.shape[0], triton.cdiv(d, block))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), d, BLOCK=block)
    return out.view(*gate_up.shape[:-1], d)


@triton.jit
def _rotate_heads(
    src,
    stride_src_h,
    dst,
    stride_dst_h,
    num_heads,
    half,
    cos,
    sin,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate-half RoPE of num_heads heads of one token: dst = src * cos + rotate_half(src) * sin,
    each product and the sum rounded to dst's dtype as the reference's torch ops round them."""
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    ok = (h < num_heads)[:, None] & (d < half)[None, :]
    lo = src + h[:, None] * stride_src_h + d[None, :]
    x1 = tl.load(lo, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(lo + half, mask=ok, other=0.0).to(tl.float32)
    dtype = dst.dtype.element_ty
    c, s = cos[None, :], sin[None, :]
    o1 = ((x1 * c).to(dtype).to(tl.float32) + (-x2 * s).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)).to(dtype)
    out = dst + h[:, None] * stride_dst_h + d[None, :]
    tl.store(out, o1, mask=ok)
    tl.store(out + half, o2, mask=ok)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cache,
    num_q_heads,
    num_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    row = cache_ptr + pos * stride_cache
    cos = tl.load(row + d, mask=d < half, other=0.0).to(tl.float32)
    sin = tl.load(row + half + d, mask=d < half, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr + token * stride_qt,
        stride_qh,
        q_out_ptr + token * stride_qot,
        stride_qoh,
        num_q_heads,
        half,
        cos,
        sin,
        BLOCK_HQ,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr + token * stride_kt,
        stride_kh,
        k_out_ptr + token * stride_kot,
        stride_koh,
        num_k_heads,
        half,
        cos,
        sin,
        BLOCK_HK,
        BLOCK_HALF,
    )


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """[..., H, D] -> [N, H, D] with unit stride along D (a view when the layout allows)."""
    x3 = x.reshape(-1, *x.shape[-2:])
    return x3 if x3.stride(-1) == 1 else x3.contiguous()


def rotary_embedding_triton(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton RoPE of q and k in one launch (one program per token, all heads); same contract as
    `fused.rotary_embedding_ref`. q and k may be strided views (slices of a merged qkv)."""
    D = q.shape[-1]
    assert k.shape[-1] == D and cos_sin_cache.shape[-1] == D and D % 2 == 0
    assert cos_sin_cache.dtype == q.dtype == k.dtype, "the cache must have q's dtype"
    q3, k3 = _tokens(q), _tokens(k)
    pos = positions.reshape(-1)
    N = q3.shape[0]
    assert pos.shape[0] == N == k3.shape[0]
    q_out = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k3.shape, dtype=k.dtype, device=k.device)
    if N > 0:
        Hq, Hk, half = q3.shape[1], k3.shape[1], D // 2
        _rotary_kernel[(N,)](
            pos,
            q3,
            k3,
            q_out,
            k_out,
            cos_sin_cache,
            q3.stride(0),
            q3.stride(1),
            k3.stride(0),
            k3.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos_sin_cache.stride(0),
            Hq,
            Hk,
            half,
            BLOCK_HQ=triton.next_power_of_2(Hq),
            BLOCK_HK=triton.next_power_of_2(Hk),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=_num_warps(triton.next_power_of_2(Hq) * triton.next_power_of_2(half)),
        )
    return q_out.view(q.shape), k_out.view(k.shape)
