"""Workload generation equals the shared generator script; workload files are checked; the FLOP
count equals a hand count; the batch-1 decode bytes equal the model's parameters and K/V."""

import subprocess
import sys
from pathlib import Path

import pytest

from aiinfra.infer import EngineConfig, LLMEngine
from aiinfra.infer.bench import (
    decode_bytes_per_step,
    hbm_bandwidth,
    load_workload,
    make_workload,
    measure_batch1_decode,
    workload_flops,
)
from aiinfra.models import get_preset

SHARED_SCRIPT = Path("/work/shared/bench/make_workload.py")


@pytest.mark.skipif(not SHARED_SCRIPT.exists(), reason="the shared workload script is not here")
def test_make_workload_equals_the_shared_script(tmp_path):
    out = tmp_path / "w.jsonl"
    args = ["20", "7", "3", "30", "2", "9", "500"]
    subprocess.run([sys.executable, str(SHARED_SCRIPT), str(out), *args], check=True)
    assert make_workload(20, 7, (3, 30), (2, 9), 500) == load_workload(out)


def test_make_workload_ranges():
    reqs = make_workload(50, 0, (64, 512), (32, 256), 8192)
    assert all(64 <= len(r["prompt_token_ids"]) <= 512 for r in reqs)
    assert all(32 <= r["max_tokens"] <= 256 for r in reqs)
    assert all(0 <= t < 8192 for r in reqs for t in r["prompt_token_ids"])


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ('{"prompt_token_ids": [], "max_tokens": 3}', "prompt_token_ids"),
        ('{"prompt_token_ids": [1, "a"], "max_tokens": 3}', "prompt_token_ids"),
        ('{"prompt_token_ids": [1], "max_tokens": 0}', "max_tokens"),
    ],
)
def test_load_workload_rejects_bad_lines(tmp_path, line, match):
    path = tmp_path / "w.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        load_workload(path)


def test_workload_flops_hand_count():
    c = get_preset("tiny")
    h, f, L, V = c.hidden_size, c.intermediate_size, c.num_layers, c.vocab_size
    per_token = 2 * L * (h * c.q_size * 2 + 2 * h * c.kv_size + 3 * h * f)
    # 3 prompt tokens + 2 outputs: 4 tokens computed (positions 0..3 see 1..4 keys), 2 logits
    expected = 4 * per_token + L * 4 * c.q_size * (1 + 2 + 3 + 4) + 2 * 2 * h * V
    flops = workload_flops(c, [{"prompt_token_ids": [1, 2, 3], "max_tokens": 2}])
    assert flops == pytest.approx(expected)


@pytest.mark.parametrize("tied", [False, True])
def test_decode_bytes_per_step_counts_weights_and_kv(tied):
    import torch

    from aiinfra.infer.attention import KVCache
    from aiinfra.models import LlamaForCausalLM

    c = get_preset("tiny").replace(tie_word_embeddings=tied)
    with torch.device("meta"):
        model = LlamaForCausalLM(c)
    # every parameter once, but of the embedding table only one row; a tied lm_head is read whole
    read = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    read += c.hidden_size + (c.vocab_size * c.hidden_size if tied else 0)
    kv_per_token = KVCache.bytes_per_block(
        c.num_layers, 1, c.num_kv_heads, c.dim_per_head, torch.bfloat16
    )
    assert decode_bytes_per_step(c, 2, 100) == 2 * read + 100 * kv_per_token
    assert decode_bytes_per_step(c, 4, 0.5) == 4 * read + kv_per_token  # fp32: twice bf16's


def test_hbm_bandwidth_by_name():
    assert hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert hbm_bandwidth("NVIDIA A100-SXM4-80GB") == 2.039e12
    assert hbm_bandwidth("NVIDIA GeForce RTX 4090") is None


def test_batch1_decode_context_and_rate(tiny_dir, monkeypatch):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="1MiB", block_size=4))
    contexts = []  # K/V tokens the single sequence reads in each step
    step = engine.step

    def spy():
        seqs = engine.scheduler.running + list(engine.scheduler.waiting)
        contexts.append(seqs[0].num_tokens)
        return step()

    monkeypatch.setattr(engine, "step", spy)
    r = measure_batch1_decode(engine, prompt_len=10, num_steps=6, warmup_steps=3)
    timed = contexts[1 + 3 : 1 + 3 + 6]  # after the prefill and the warm-up decodes
    assert len(contexts) == 10 and r["mean_context_len"] == sum(timed) / len(timed)
    expected = decode_bytes_per_step(engine.model_config, 4, r["mean_context_len"])
    assert r["bytes_per_step"] == expected
    assert r["achieved_gb_per_s"] == pytest.approx(expected / r["step_ms"] * 1e3 / 1e9)
    assert r["bandwidth_utilization"] is None and r["forward_ms"] is None  # CPU
    assert r["cuda_kernels_per_step"] is None
    assert not engine.has_unfinished_requests()
