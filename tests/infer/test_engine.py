"""The engine against the no-cache greedy loop and HF `generate`, token for token, while preemption,
chunked prefill and prefix-cache hits happen; outputs, stops, abort, n, logprobs and bad input."""

import random

import pytest
import torch
import transformers

from aiinfra.infer import LLM, EngineConfig, LLMEngine, SamplingParams
from aiinfra.infer.engine import parse_bytes
from aiinfra.models import generate_greedy
from tests.infer.builders import random_prompts

# tiny: 4 layers x 2 KV heads x 32 dims x fp32 x K and V = 2 KiB per token, 8 KiB per block of 4
BLOCK_BYTES = 8 * 1024


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def hf_model(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


def _hf_greedy(hf_model, prompt: list[int], max_tokens: int) -> list[int]:
    out = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_tokens,
        min_new_tokens=max_tokens,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


def _check_against_references(llm: LLM, model, hf_model, prompts, max_tokens: int) -> None:
    """Engine == the no-cache greedy loop == HF generate, token for token."""
    outs = llm.generate(prompts, _greedy(max_tokens), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.finished and out.outputs[0].finish_reason == "length"
        ids = out.outputs[0].token_ids
        assert ids == generate_greedy(model, prompt, max_tokens)
        assert ids == _hf_greedy(hf_model, prompt, max_tokens)


def test_mixed_lengths_match_greedy_loop_and_hf(tiny_dir, reference, hf_model):
    prompts = random_prompts(0, 6, 1, 70)
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory="4MiB")
    _check_against_references(llm, reference, hf_model, prompts, 12)


def test_preemption_keeps_greedy_outputs(tiny_dir, reference, hf_model):
    prompts = random_prompts(1, 8, 20, 60)
    # 24 blocks = 96 token slots for 8 sequences of up to 80 tokens: most get preempted
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory=24 * BLOCK_BYTES)
    _check_against_references(llm, reference, hf_model, prompts, 20)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_blocks and stats.kv_cache_usage == 0.0


def test_chunked_prefill_keeps_greedy_outputs(tiny_dir, reference, hf_model, monkeypatch):
    prompts = random_prompts(2, 5, 30, 90)
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory="4MiB", max_num_batched_tokens=7)
    chunks = []
    step = llm.engine.step

    def spy():
        batch_sizes = [s.num_tokens - s.num_computed_tokens for s in llm.engine.scheduler.running]
        chunks.append(batch_sizes)
        return step()

    monkeypatch.setattr(llm.engine, "step", spy)
    _check_against_references(llm, reference, hf_model, prompts, 10)
    # a prompt of 30+ tokens under a budget of 7 is computed in several steps
    assert any(n > 7 for sizes in chunks for n in sizes)


def test_prefix_cache_hits_keep_greedy_outputs(tiny_dir, reference, hf_model):
    rng = random.Random(3)
    shared = [rng.randrange(256) for _ in range(37)]
    prompts = [shared + [rng.randrange(256) for _ in range(rng.randint(1, 20))] for _ in range(6)]
    prompts.append(shared[:21])  # a prefix of the shared part
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory="4MiB", max_num_seqs=2)
    _check_against_references(llm, reference, hf_model, prompts, 8)
    stats = llm.engine.get_stats()
    assert stats.prefix_cache_hit_rate > 0
    # a second round of the same prompts is served mostly from the cache
    outs = llm.generate(prompts, _greedy(8), use_tqdm=False)
    assert all(o.num_cached_tokens >= 20 for o in outs)


def test_everything_at_once(tiny_dir, reference, hf_model):
    """Preemption, chunking and prefix hits in one run, with prompts of every length."""
    prompts = random_prompts(4, 10, 1, 50)
    prompts += [prompts[0] + prompts[1], prompts[2][:9]]
    llm = LLM(tiny_dir, block_size=4, kv_cache_memory=30 * BLOCK_BYTES, max_num_batched_tokens=16)
    _check_against_references(llm, reference, hf_model, prompts, 16)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hit_rate > 0
    assert stats.num_free_blocks == stats.num_blocks


def test_step_outputs_stream_and_finish_once(tiny_dir):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="4MiB"))
    engine.add_request("a", [1, 2, 3], _greedy(5))
    engine.add_request("b", [4, 5], _greedy(3, n=2))
    seen: dict[str, list] = {"a": [], "b": []}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen[out.request_id].append(out)
    for rid, n in (("a", 5), ("b", 3)):
        outs = seen[rid]
        assert [o.finished for o in outs] == [False] * (n - 1) + [True]
        assert [len(o.outputs[0].token_ids) for o in outs] == list(range(1, n + 1))
    assert len(seen["b"][-1].outputs) == 2
    assert seen["b"][-1].outputs[0].token_ids == seen["b"][-1].outputs[1].token_ids
    stats = engine.get_stats()
    assert stats.generation_tokens_total == 5 + 2 * 3 and stats.prompt_tokens_total == 5


def test_stops_and_text(tiny_dir, reference):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="4MiB"))
    prompt = [10, 20, 30]
    free_run = generate_greedy(reference, prompt, 12)
    # stop token id: generation ends at its first occurrence, which is kept in token_ids
    stop_id = free_run[5]
    first = free_run.index(stop_id)
    out = _run(engine, prompt, _greedy(12, stop_token_ids=[stop_id]))
    assert out.token_ids == free_run[: first + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", stop_id)
    # min_tokens keeps the stop token out for the first tokens
    out = _run(engine, prompt, _greedy(12, stop_token_ids=[free_run[0]], min_tokens=3))
    assert free_run[0] not in out.token_ids[:3]
    # text is the tokenizer's decoding; a stop string truncates it
    full = _run(engine, prompt, _greedy(12))
    assert full.text == engine.tokenizer.decode(full.token_ids)
    text = full.text
    assert len(text) >= 4, text  # the seeded tiny model emits mostly byte tokens
    stop = text[2:4]
    out = _run(engine, prompt, _greedy(12, stop=[stop]))
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.find(stop)]
    assert len(out.token_ids) < len(full.token_ids)


def _run(engine: LLMEngine, prompt, params):
    rid = f"r{random.random()}"
    engine.add_request(rid, prompt, params)
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = out
    assert last is not None and last.finished
    return last.outputs[0]


def test_eos_stops_unless_ignored(tiny_dir, reference):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="4MiB"))
    prompt = [7, 8, 9]
    free_run = generate_greedy(reference, prompt, 10)
    # pretend the model's first generated token is the eos: the engine must stop right there
    engine.eos_token_id = free_run[2]
    out = _run(engine, prompt, SamplingParams(temperature=0.0, max_tokens=10))
    assert out.token_ids == free_run[: free_run.index(free_run[2]) + 1]
    assert out.finish_reason == "stop" and out.stop_reason is None
    out = _run(engine, prompt, _greedy(10))
    assert out.token_ids == free_run


def test_abort_frees_blocks(tiny_dir):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="4MiB"))
    engine.add_request("x", list(range(40)), _greedy(50))
    engine.add_request("y", list(range(30)), _greedy(5))
    engine.step()
    assert engine.get_stats().kv_cache_usage > 0
    engine.abort_request("x")
    engine.abort_request("unknown")  # a no-op
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert all(o.request_id == "y" for o in outs)
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_running == 0


def test_logprobs_are_the_models(tiny_dir, reference):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="4MiB"))
    prompt = [1, 2, 3, 4]
    out = _run(engine, prompt, _greedy(3, logprobs=2))
    assert out.logprobs is not None and len(out.logprobs) == 3
    ids = prompt + out.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([ids]))[0], dim=-1)
    for i, lp in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + i]
        top = row.topk(2).indices.tolist()
        assert set(lp) == {out.token_ids[i], *top}
        for t, v in lp.items():
            # paged attention sums in another order than the dense reference: fp32 rounding
            assert v == pytest.approx(row[t].item(), abs=1e-4)


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], _greedy(1), "prompt_token_ids"),
        ([1, 600], _greedy(1), "token id 600"),
        ([1, -1], _greedy(1), "token id -1"),
        ([1] * 2040, _greedy(10), "max_model_len"),
    ],
)
def test_add_request_rejects_bad_input(tiny_dir, prompt, params, match):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory="4MiB"))
    with pytest.raises(ValueError, match=match):
        engine.add_request("r", prompt, params)


def test_add_request_rejects_duplicates_and_oversized(tiny_dir):
    engine = LLMEngine(EngineConfig(model=tiny_dir, kv_cache_memory=4 * BLOCK_BYTES, block_size=4))
    engine.add_request("r", [1, 2], _greedy(2))
    with pytest.raises(ValueError, match="request_id"):
        engine.add_request("r", [1, 2], _greedy(2))
    with pytest.raises(ValueError, match="KV blocks"):
        engine.add_request("big", [1] * 10, _greedy(10))


def test_engine_config_validation(tiny_dir):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        EngineConfig(model=tiny_dir, kv_cache_memory="lots")
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(model=tiny_dir, max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model=tiny_dir, dtype="int8")
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model=tiny_dir, max_model_len=10**6))


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_dir):
    llm = LLM(tiny_dir, kv_cache_memory="4MiB")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True)
    alone = llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    mixed = (
        llm.generate([[9, 9], [1, 2, 3], [4] * 30], [others, params, others], use_tqdm=False)[1]
        .outputs[0]
        .token_ids
    )
    assert alone == mixed
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=8, max_tokens=16, ignore_eos=True)
    assert llm.generate([[1, 2, 3]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_llm_generate_text_prompts_and_params_list(tiny_dir, reference):
    llm = LLM(tiny_dir, kv_cache_memory="4MiB")
    outs = llm.generate(["hello", "hi"], [_greedy(4), _greedy(2)], use_tqdm=False)
    assert outs[0].prompt_token_ids == list(b"hello")
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 2]
    assert outs[1].outputs[0].token_ids == generate_greedy(reference, list(b"hi"), 2)
    with pytest.raises(ValueError, match="params"):
        llm.generate(["a", "b"], [_greedy(1)], use_tqdm=False)


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096
    for bad in ("2 parsecs", "", "-1GiB", 0):
        with pytest.raises(ValueError, match="kv_cache_memory"):
            parse_bytes(bad)
