"""The C++/OpenMP paged attention and K/V write against the torch reference."""

from __future__ import annotations

import logging
import os
import random
import time
from pathlib import Path

import pytest
import torch

import aiinfra.infer.attention as attention
from aiinfra.infer.attention import (
    paged_attention,
    paged_attention_cpu,
    paged_attention_ref,
    write_kv,
    write_kv_ref,
)
from tests.infer.test_attention import SCENARIOS, make_case

ext = attention.cpu_extension()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ kernel could not be built here")


def ref_and_fast(case, layer_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    write_kv_ref(case.kv_cache, layer_idx, case.k_new, case.v_new, case.meta.slot_mapping)
    ref = paged_attention_ref(case.q, case.kv_cache, layer_idx, case.meta, case.scale)
    fast = paged_attention_cpu(case.q, case.kv_cache, layer_idx, case.meta, case.scale)
    return ref, fast


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_fast_matches_ref(scenario: str, block_size: int, group: int) -> None:
    case = make_case(SCENARIOS[scenario], block_size=block_size, group=group, seed=block_size)
    ref, fast = ref_and_fast(case)
    # fp32 both, but the kernel sums in another order (online softmax over blocks, 8 partial
    # sums per dot product) and uses a 20-ulp polynomial exp (at::vec exp_u20): ~1e-6 here
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


# head_dim 24: not a multiple of the SIMD width (masked tails); 128: the widest register-blocked
# path; block 32: two key vectors per block; long queries: several query tiles per sequence
@pytest.mark.parametrize(
    ("head_dim", "block_size", "specs"),
    [
        (24, 16, [(5, 1), (0, 19), (33, 40)]),
        (128, 16, [(70, 1), (0, 37), (20, 5)]),
        (64, 32, [(100, 1), (0, 65), (31, 34), (64, 1)]),
        (64, 16, [(0, 150), (17, 100)]),
    ],
)
def test_fast_shapes(head_dim: int, block_size: int, specs: list[tuple[int, int]]) -> None:
    case = make_case(specs, block_size=block_size, group=2, head_dim=head_dim)
    ref, fast = ref_and_fast(case)
    # fp32, other summation order and exp polynomial (see test_fast_matches_ref)
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


def test_fast_random_batches() -> None:
    rng = random.Random(0)
    for trial in range(6):
        specs = [(rng.randint(0, 80), rng.choice([1, 1, 1, rng.randint(1, 40)])) for _ in range(7)]
        case = make_case(
            specs, block_size=rng.choice([4, 8, 16]), group=rng.choice([1, 2, 4]), seed=trial
        )
        ref, fast = ref_and_fast(case)
        # fp32, other summation order and exp polynomial (see test_fast_matches_ref)
        torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_low_precision(dtype: torch.dtype) -> None:
    case = make_case(SCENARIOS["mixed"], block_size=16, group=2, dtype=dtype)
    ref, fast = ref_and_fast(case)
    assert fast.dtype == dtype
    # both compute in fp32 from the same bf16/fp16 inputs; the outputs differ by at most one
    # rounding of the result to dtype (2^-8 relative for bf16, 2^-11 for fp16)
    tol = 8e-3 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol, rtol=tol)


def test_fast_fp32_queries_on_a_bf16_cache() -> None:
    case = make_case(SCENARIOS["mixed"], block_size=16, group=2, dtype=torch.bfloat16)
    case.q = case.q.float() + 1e-3 * torch.randn_like(case.q.float())  # not bf16-representable
    ref, fast = ref_and_fast(case)
    assert fast.dtype == torch.float32
    # both compute in fp32 from fp32 q and the same bf16 K/V: fp32 summation-order differences only
    torch.testing.assert_close(fast, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_kv_matches_ref(dtype: torch.dtype) -> None:
    case = make_case([(3, 9), (0, 17), (10, 1)], block_size=4, group=1, dtype=dtype)
    other = make_case([(3, 9), (0, 17), (10, 1)], block_size=4, group=1, dtype=dtype)
    write_kv(case.kv_cache, 1, case.k_new, case.v_new, case.meta.slot_mapping)
    write_kv_ref(other.kv_cache, 1, case.k_new, case.v_new, case.meta.slot_mapping)
    # pure data movement: exact (NaN poison compared as equal where nothing was written)
    torch.testing.assert_close(case.kv_cache.kv, other.kv_cache.kv, atol=0, rtol=0, equal_nan=True)


def test_write_kv_casts_to_cache_dtype() -> None:
    case = make_case([(0, 5)], block_size=4, dtype=torch.bfloat16)
    write_kv(case.kv_cache, 0, case.k_new.float(), case.v_new.float(), case.meta.slot_mapping)
    block, offset = divmod(int(case.meta.slot_mapping[2]), 4)
    # exact: the fp32 values were made from bf16 ones
    torch.testing.assert_close(
        case.kv_cache.value_cache(0)[block, :, offset], case.v_new[2], atol=0, rtol=0
    )


def test_strided_inputs_and_wider_index_types() -> None:
    case = make_case(SCENARIOS["mixed"], block_size=4, group=2)
    expected = make_case(SCENARIOS["mixed"], block_size=4, group=2)
    ref_k, ref_v = expected.k_new, expected.v_new
    write_kv_ref(expected.kv_cache, 0, ref_k, ref_v, expected.meta.slot_mapping)
    ref = paged_attention_ref(expected.q, expected.kv_cache, 0, expected.meta, expected.scale)
    # the model hands over views: heads-major copies transposed back, so not contiguous
    k = case.k_new.transpose(0, 1).contiguous().transpose(0, 1)
    v = case.v_new.transpose(0, 1).contiguous().transpose(0, 1)
    q = case.q.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (k.is_contiguous() or q.is_contiguous())
    meta = case.meta
    meta.slot_mapping = meta.slot_mapping.int()
    meta.block_tables, meta.query_start_loc = meta.block_tables.long(), meta.query_start_loc.long()
    write_kv(case.kv_cache, 0, k, v, meta.slot_mapping)
    out = paged_attention(q, case.kv_cache, 0, meta, case.scale)
    # fp32, other summation order and exp polynomial (see test_fast_matches_ref)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_dispatch_uses_the_kernel() -> None:
    case = make_case(SCENARIOS["decode"], block_size=16, group=2)
    write_kv(case.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
    fast = paged_attention_cpu(case.q, case.kv_cache, 0, case.meta, case.scale)
    # same code path, same thread count: bit-identical
    torch.testing.assert_close(
        paged_attention(case.q, case.kv_cache, 0, case.meta, case.scale), fast, atol=0, rtol=0
    )


def test_openmp_threads_follow_torch() -> None:
    before = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert ext.omp_threads_in_region() == n
    finally:
        torch.set_num_threads(before)


def test_thread_count_does_not_change_results() -> None:
    # big enough (64 x 300 keys x 4 query heads) to run parallel rather than on the calling thread
    case = make_case([(299, 1)] * 60 + [(100, 40)] * 4, block_size=16, group=2)
    write_kv(case.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_attention_cpu(case.q, case.kv_cache, 0, case.meta, case.scale)
        torch.set_num_threads(2)
        two = paged_attention_cpu(case.q, case.kv_cache, 0, case.meta, case.scale)
    finally:
        torch.set_num_threads(before)
    # each (sequence, kv head, query tile) is computed by one thread in a fixed order: exact
    torch.testing.assert_close(one, two, atol=0, rtol=0)


def test_fallback_when_the_build_fails(monkeypatch, caplog) -> None:
    def broken_load(**kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(attention, "_cpu_ext", None)
    monkeypatch.setattr(attention, "_cpu_ext_failed", False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_load)
    case = make_case(SCENARIOS["mixed"], block_size=4, group=2)
    with caplog.at_level(logging.WARNING, logger="aiinfra.infer.attention"):
        write_kv(case.kv_cache, 0, case.k_new, case.v_new, case.meta.slot_mapping)
        out = paged_attention(case.q, case.kv_cache, 0, case.meta, case.scale)
    assert "no C++ compiler" in caplog.text
    assert caplog.text.count("unavailable") == 1  # warned once, not per call
    ref = paged_attention_ref(case.q, case.kv_cache, 0, case.meta, case.scale)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # it is the reference


def test_stale_build_lock_is_removed(monkeypatch, tmp_path) -> None:
    seen = {}

    def fake_load(**kwargs):
        seen["lock_left"] = (Path(kwargs["build_directory"]) / "lock").exists()
        return ext

    monkeypatch.setenv("AIINFRA_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(attention, "_cpu_ext", None)
    monkeypatch.setattr(attention, "_cpu_ext_failed", False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", fake_load)
    lock = attention._extension_dir() / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    old = time.time() - 2 * attention._STALE_LOCK_S
    os.utime(lock, (old, old))
    assert attention.cpu_extension() is ext
    assert seen == {"lock_left": False}
