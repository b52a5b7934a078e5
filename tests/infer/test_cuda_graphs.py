"""The CUDA-graph decode path: bucket selection, static buffers and padding.

On CPU the graph runner runs "graph-compatible eager" (the same static buffers and padded batches,
no capture) and must give the plain path's greedy tokens while preemption and 1-token prefill
chunks happen; the gpu-marked tests capture real graphs and compare with eager CUDA.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run interpreted on CPU tensors; read when triton first decorates a kernel,
    # so before anything imports it (as in test_attention_triton.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aiinfra.infer import LLM, EngineConfig, LLMEngine, SamplingParams
from aiinfra.infer.cuda_graphs import DecodeGraphRunner, capture_sizes, padded_size
from aiinfra.models import generate_greedy, load_model
from tests.infer.builders import make_scheduler, make_sequence, random_prompts

# tiny: 4 layers x 2 KV heads x 32 dims x fp32 x K and V = 2 KiB per token, 8 KiB per block of 4
BLOCK_BYTES = 8 * 1024


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_capture_sizes_and_padding():
    assert capture_sizes(1) == [1]
    assert capture_sizes(8) == [1, 2, 4, 8]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(256) == [2**i for i in range(9)]
    sizes = capture_sizes(6)
    assert [padded_size(sizes, n) for n in range(1, 8)] == [1, 2, 4, 4, 6, 6, None]
    with pytest.raises(ValueError, match="max_num_seqs"):
        capture_sizes(0)


def _graph_eager(llm: LLM, max_num_seqs: int) -> list[tuple[int, int, bool]]:
    """Switch llm's engine to the graph-compatible eager path; returns a log of (batch size,
    padded size, all rows sampling) per decode-only step run on it."""
    engine = llm.engine
    runner = engine.model_runner
    runner.init_decode_graphs(
        max_num_seqs=max_num_seqs,
        max_model_len=engine.max_model_len,
        scratch_block=engine.block_manager.num_blocks,
        capture=False,
    )
    graphs = runner.graph_runner
    assert graphs is not None and not graphs.is_captured
    log: list[tuple[int, int, bool]] = []
    compute = graphs.compute_logits

    def spy(batch):
        log.append(
            (len(batch.seqs), padded_size(graphs.sizes, len(batch.seqs)), all(batch.is_sampling))
        )
        return compute(batch)

    graphs.compute_logits = spy  # type: ignore[method-assign]
    return log


def test_graph_eager_matches_plain_path_and_greedy_loop(tiny_dir, reference):
    prompts = random_prompts(0, 7, 1, 40)
    kw = dict(block_size=4, kv_cache_memory=40 * BLOCK_BYTES, max_num_seqs=6)
    plain = LLM(tiny_dir, **kw).generate(prompts, _greedy(14), use_tqdm=False)
    llm = LLM(tiny_dir, **kw)
    log = _graph_eager(llm, max_num_seqs=6)
    outs = llm.generate(prompts, _greedy(14), use_tqdm=False)
    for prompt, a, b in zip(prompts, plain, outs, strict=True):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids
        assert b.outputs[0].token_ids == generate_greedy(reference, prompt, 14)
    # decode-only steps ran on the static buffers, some padded (3 or 5 sequences)
    assert len(log) > 10 and any(n < size for n, size, _ in log)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0  # 40 blocks of 4 for 7 sequences of up to 54 tokens
    assert stats.num_free_blocks == stats.num_blocks


def test_graph_eager_with_one_token_prefill_chunks(tiny_dir, reference):
    # a budget of 3 tokens for up to 3 sequences: prompts advance 1-2 tokens per step beside
    # decodes, so some decode-only-shaped batches hold a prefill row that does not sample
    prompts = random_prompts(1, 5, 2, 12)
    llm = LLM(
        tiny_dir, block_size=4, kv_cache_memory="1MiB", max_num_seqs=3, max_num_batched_tokens=3
    )
    log = _graph_eager(llm, max_num_seqs=3)
    outs = llm.generate(prompts, _greedy(6), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == generate_greedy(reference, prompt, 6)
    assert any(not all_sampling for _, _, all_sampling in log)


def test_static_buffers_hold_the_padded_batch(tiny_dir):
    model, _ = load_model(tiny_dir)
    engine = LLMEngine(EngineConfig(model=tiny_dir, block_size=4, kv_cache_memory=16 * BLOCK_BYTES))
    kv = engine.model_runner.kv_cache
    scratch = kv.num_blocks - 1
    runner = DecodeGraphRunner(
        model, kv, scale=1.0, max_num_seqs=4, max_model_len=32, scratch_block=scratch, capture=False
    )
    sched = make_scheduler(num_blocks=16, block_size=4, max_num_seqs=4, max_num_batched_tokens=64)
    seqs = [make_sequence(list(range(n))) for n in (5, 9, 2)]
    for s in seqs:
        sched.add(s)
    sched.update(sched.schedule(), [7, 8, 9])  # prefills, one token each
    batch = sched.schedule()  # three decodes
    assert batch.num_tokens == 3
    assert runner.prepare(batch) == 4
    host = runner._np64
    pos = np.array([5, 9, 2])
    assert host[0, :3].tolist() == [7, 8, 9] and host[1, :3].tolist() == pos.tolist()
    tables = [s.block_table for s in seqs]
    slots = [t[p // 4] * 4 + p % 4 for t, p in zip(tables, pos.tolist(), strict=True)]
    assert host[2, :3].tolist() == slots
    assert runner._np32[:4].tolist() == [6, 10, 3, 1]  # context lens; the pad row sees 1 key
    for i, t in enumerate(tables):
        row = runner._np_tables[i]
        assert row[: len(t)].tolist() == t and not row[len(t) :].any()
    # the pad row decodes token 0 at position 0 into the scratch block only
    assert host[:, 3].tolist() == [0, 0, scratch * 4]
    assert runner._np_tables[3, 0] == scratch and not runner._np_tables[3, 1:].any()
    assert scratch not in {b for t in tables for b in t}
    with pytest.raises(ValueError, match="scratch_block"):
        DecodeGraphRunner(
            model,
            kv,
            scale=1.0,
            max_num_seqs=4,
            max_model_len=32,
            scratch_block=kv.num_blocks,
            capture=False,
        )


def test_cpu_engine_stays_eager(tiny_dir):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="1MiB"))
    assert engine.device.type == "cpu" and engine.dtype == torch.float32
    assert engine.model_runner.graph_runner is None
    # one scratch block beyond what the block manager hands out
    assert engine.model_runner.kv_cache.num_blocks == engine.block_manager.num_blocks + 1


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("device", "tpu", r"device \('tpu'\)"),
        ("device", "cuda:x", r"device \('cuda:x'\)"),
        ("dtype", "int8", r"dtype \('int8'\)"),
        ("gpu_memory_utilization", 0.0, r"gpu_memory_utilization \(0.0\) must be in \(0, 1\]"),
        ("gpu_memory_utilization", 1.5, r"gpu_memory_utilization \(1.5\)"),
        ("gpu_memory_utilization", True, r"gpu_memory_utilization \(True\)"),
    ],
)
def test_engine_config_rejects_bad_device_fields(tiny_dir, field, value, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model=tiny_dir, **{field: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_an_error(tiny_dir):
    with pytest.raises(ValueError, match=r"device \('cuda'\) needs CUDA"):
        EngineConfig(model=tiny_dir, device="cuda")


def test_auto_resolves_to_cpu_fp32_here(tiny_dir):
    config = EngineConfig(model=tiny_dir)
    if not torch.cuda.is_available():
        assert (config.torch_device.type, config.torch_dtype) == ("cpu", torch.float32)
    else:
        assert (config.torch_device.type, config.torch_dtype) == ("cuda", torch.bfloat16)
    assert (
        EngineConfig(model=tiny_dir, device="cpu", dtype="bfloat16").torch_dtype == torch.bfloat16
    )


# --- on a GPU (scripts/gpu_check.sh) --------------------------------------------------------------


@pytest.mark.gpu
def test_cuda_graphs_match_eager_cuda_and_greedy_loop(tiny_dir, reference):
    prompts = random_prompts(5, 7, 1, 40)
    kw = dict(
        device="cuda",
        dtype="float32",
        block_size=4,
        kv_cache_memory=40 * BLOCK_BYTES,
        max_num_seqs=6,
    )
    graphs = LLM(tiny_dir, **kw)
    runner = graphs.engine.model_runner.graph_runner
    assert runner is not None and runner.is_captured and sorted(runner.graphs) == [1, 2, 4, 6]
    eager = LLM(tiny_dir, enforce_eager=True, **kw)
    assert eager.engine.model_runner.graph_runner is None
    a = graphs.generate(prompts, _greedy(14), use_tqdm=False)
    b = eager.generate(prompts, _greedy(14), use_tqdm=False)
    for prompt, x, y in zip(prompts, a, b, strict=True):
        # fp32 without TF32, IEEE dots in the Triton kernel: only summation order differs from
        # the CPU loop, which does not flip a greedy choice of this model on these prompts
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        assert x.outputs[0].token_ids == generate_greedy(reference, prompt, 14)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_graph_replay_logits_equal_eager_logits(tiny_dir, dtype):
    engine = LLMEngine(
        EngineConfig(
            model=tiny_dir,
            device="cuda",
            dtype=dtype,
            block_size=4,
            kv_cache_memory="1MiB",
            max_num_seqs=8,
        )
    )
    for i, prompt in enumerate(random_prompts(6, 5, 3, 30)):
        engine.add_request(f"r{i}", prompt, _greedy(8))
    engine.step()  # prefills
    runner = engine.model_runner
    for _ in range(4):
        batch = engine.scheduler.schedule()
        assert batch.num_tokens == len(batch.seqs) == 5  # decode-only, padded to 8
        replayed = runner.compute_logits(batch).float().clone()
        graphs, runner.graph_runner = runner.graph_runner, None
        eager = runner.compute_logits(batch).float()  # rewrites the same K/V slots
        runner.graph_runner = graphs
        # padded GEMMs (8 rows, not 5) may pick other cuBLAS kernels: summation order only;
        # bf16 rounds activations between layers, so a last-bit difference grows to ~1e-2
        tol = 1e-4 if dtype == "float32" else 3e-2
        torch.testing.assert_close(replayed, eager, atol=tol, rtol=tol)
        engine.scheduler.update(batch, replayed.argmax(-1).tolist())


@pytest.mark.gpu
def test_kv_cache_sized_from_gpu_memory_utilization(tiny_dir):
    util = 0.3
    engine = LLMEngine(EngineConfig(model=tiny_dir, device="cuda", gpu_memory_utilization=util))
    free, total = torch.cuda.mem_get_info()
    used = total - free
    # the cache fills the budget up to graph pools and allocator rounding (well under 1 GiB)
    assert total * util - 2**30 < used <= total * util + 2**28
    assert engine.block_manager.num_blocks > 1000
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLMEngine(EngineConfig(model=tiny_dir, device="cuda", gpu_memory_utilization=1e-4))


def test_graph_eager_with_triton_kernels(tiny_dir, reference, monkeypatch):
    """The Triton kernels (interpreted on CPU) on the static buffers: block tables as rows of a
    flat buffer, padded rows in the scratch block, one query per row: what the graphs replay."""
    pytest.importorskip("triton")
    from aiinfra.infer import attention
    from aiinfra.infer.triton_attention import paged_attention_triton, write_kv_triton

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton_attention was imported without TRITON_INTERPRET=1")
    prompts = random_prompts(7, 3, 2, 9)
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory="1MiB", max_num_seqs=4)
    log = _graph_eager(llm, max_num_seqs=4)
    monkeypatch.setattr(attention, "write_kv", write_kv_triton)
    monkeypatch.setattr(attention, "paged_attention", paged_attention_triton)
    outs = llm.generate(prompts, _greedy(5), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == generate_greedy(reference, prompt, 5)
    assert any(n < size for n, size, _ in log)  # 3 sequences padded to 4


def test_profile_step_runs_a_full_budget_batch(tiny_dir):
    """The CUDA memory profile's dummy step, on CPU: sequences of at most max_model_len tokens
    fill the token budget; the paged metadata it builds must be consistent (the kernels check
    block tables and query starts against the cache)."""
    from aiinfra.infer.attention import KVCache
    from aiinfra.infer.model_runner import _profile_step

    model, config = load_model(tiny_dir)
    nbytes = _profile_step(model, num_tokens=21, num_seqs=4, max_model_len=8, block_size=4)
    # 8 + 8 + 5 tokens: 2 + 2 + 2 blocks
    per_block = KVCache.bytes_per_block(
        config.num_layers, 4, config.num_kv_heads, config.dim_per_head, torch.float32
    )
    assert nbytes == 6 * per_block
