"""The Triton paged attention and K/V write against the torch reference.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy on CPU tensors),
which checks the indexing, masking and online softmax; GPU numerics are checked by the gpu-marked
test (scripts/gpu_check.sh).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # read when the kernels are decorated, so before the module below is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from aiinfra.infer.attention import paged_attention, paged_attention_ref, write_kv_ref  # noqa: E402
from aiinfra.infer.triton_attention import paged_attention_triton, write_kv_triton  # noqa: E402
from tests.infer.test_attention import SCENARIOS, make_case  # noqa: E402

interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors need TRITON_INTERPRET=1"
)


@interpreted
@pytest.mark.parametrize("scenario", list(SCENARIOS))
# the interpreter is slow: a covering subset of the (block size, GQA group) grid
@pytest.mark.parametrize(("block_size", "group"), [(1, 4), (4, 2), (16, 1), (16, 2)])
def test_triton_matches_ref(scenario: str, block_size: int, group: int) -> None:
    case = make_case(SCENARIOS[scenario], block_size=block_size, group=group, seed=block_size)
    write_kv_triton(case.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
    ref = paged_attention_ref(case.q, case.kv_cache, 0, case.meta, case.scale)
    out = paged_attention_triton(case.q, case.kv_cache, 0, case.meta, case.scale)
    # fp32 both (the interpreter's dots are numpy fp32); other summation order: ~5e-7 here
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_write_kv_matches_ref(dtype: torch.dtype) -> None:
    case = make_case([(3, 9), (0, 17), (10, 1)], block_size=4, group=1, dtype=dtype)
    other = make_case([(3, 9), (0, 17), (10, 1)], block_size=4, group=1, dtype=dtype)
    write_kv_triton(case.kv_cache, 1, case.k_new, case.v_new, case.meta.slot_mapping)
    write_kv_ref(other.kv_cache, 1, case.k_new, case.v_new, case.meta.slot_mapping)
    # pure data movement: exact (NaN poison compared as equal where nothing was written)
    torch.testing.assert_close(case.kv_cache.kv, other.kv_cache.kv, atol=0, rtol=0, equal_nan=True)


@interpreted
def test_triton_write_kv_strided_slices() -> None:
    """k/v as views of one packed [N, 3 * Hkv, D] projection (as the fused qkv gives them): the
    kernel reads them in place, so a wrong stride would scramble heads or tokens."""
    case = make_case([(3, 9), (0, 17), (10, 1)], block_size=4, group=2)
    other = make_case([(3, 9), (0, 17), (10, 1)], block_size=4, group=2)
    Hkv = case.k_new.shape[1]
    packed = torch.cat([torch.randn_like(case.k_new), case.k_new, case.v_new], dim=1)
    k, v = packed[:, Hkv : 2 * Hkv], packed[:, 2 * Hkv :]
    assert not k.is_contiguous() and k.stride(-1) == 1
    write_kv_triton(case.kv_cache, 0, k, v, case.meta.slot_mapping)
    write_kv_ref(other.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
    torch.testing.assert_close(case.kv_cache.kv, other.kv_cache.kv, atol=0, rtol=0, equal_nan=True)


@interpreted
def test_triton_odd_head_dim_and_long_queries() -> None:
    case = make_case([(5, 1), (0, 70), (33, 40)], block_size=16, group=2, head_dim=24)
    write_kv_ref(case.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
    ref = paged_attention_ref(case.q, case.kv_cache, 0, case.meta, case.scale)
    out = paged_attention_triton(case.q, case.kv_cache, 0, case.meta, case.scale)
    # fp32, other summation order (see test_triton_matches_ref)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_gpu(dtype: torch.dtype) -> None:
    case = make_case(SCENARIOS["mixed"], block_size=16, group=2, dtype=dtype)
    case.kv_cache.kv = case.kv_cache.kv.cuda()
    case.meta.slot_mapping = case.meta.slot_mapping.cuda()
    case.meta.block_tables = case.meta.block_tables.cuda()
    case.meta.query_start_loc = case.meta.query_start_loc.cuda()
    case.meta.seq_lens = case.meta.seq_lens.cuda()
    q, k, v = case.q.cuda(), case.k_new.cuda(), case.v_new.cuda()
    write_kv_ref(case.kv_cache, 0, k, v, case.meta.slot_mapping)
    ref = paged_attention_ref(q, case.kv_cache, 0, case.meta, case.scale)
    out = paged_attention(q, case.kv_cache, 0, case.meta, case.scale)  # dispatches to Triton
    # fp32 with IEEE dots: summation order only; bf16/fp16: P is rounded to dtype before P @ V
    tol = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
