"""The OpenAI API through the official `openai` client, against the no-cache greedy loop."""

from __future__ import annotations

import json

import openai
import pytest
import torch

from aiinfra.infer import LLM, SamplingParams
from aiinfra.models import generate_greedy, load_tokenizer
from tests.serve.conftest import MAX_MODEL_LEN, MODEL_NAME

PROMPT_IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)


def greedy(ref_model, prompt: list[int], n: int) -> list[int]:
    return generate_greedy(ref_model, prompt, n, eos_token_id=None)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_completion_token_ids_match_reference(client, ref_model, model_dir):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT_IDS,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    expected = greedy(ref_model, PROMPT_IDS, 12)
    choice = r.choices[0]
    assert choice.model_extra["token_ids"] == expected
    assert choice.text == load_tokenizer(model_dir).decode(expected)
    assert choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT_IDS), 12)
    assert r.usage.total_tokens == len(PROMPT_IDS) + 12


def test_text_and_batched_prompts_with_n(client, ref_model, model_dir):
    tok = load_tokenizer(model_dir)
    prompts = ["The quick brown fox", "jumps over"]
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=prompts,
        max_tokens=6,
        n=2,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]  # prompt i, choice j -> i * n + j
    for c in r.choices:
        expected = greedy(ref_model, tok.encode(prompts[c.index // 2]), 6)
        assert c.model_extra["token_ids"] == expected
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 4 * 6


def test_seeded_sampling_n_matches_offline_engine(client, model_dir):
    """n > 1 with a seed: the server's choices are the offline engine's (per-sequence seeds)."""
    kw = dict(n=3, temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT_IDS,
        max_tokens=10,
        n=3,
        temperature=1.0,
        top_p=0.9,
        seed=1234,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    offline = LLM(str(model_dir), kv_cache_memory="16MiB", num_threads=1)
    [out] = offline.generate([PROMPT_IDS], SamplingParams(**kw), use_tqdm=False)
    got = {c.index: c.model_extra["token_ids"] for c in r.choices}
    assert got == {c.index: c.token_ids for c in out.outputs}
    assert len({tuple(v) for v in got.values()}) > 1, "3 sampled choices should not all agree"


def test_logprobs_match_reference_log_softmax(client, ref_model):
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT_IDS,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    c = r.choices[0]
    ids = c.model_extra["token_ids"]
    with torch.no_grad():
        logits = ref_model(torch.tensor([PROMPT_IDS + ids]))[0]
    ref = torch.log_softmax(logits.float(), dim=-1)[len(PROMPT_IDS) - 1 : -1]
    expected = ref[torch.arange(len(ids)), torch.tensor(ids)]
    # paged attention vs the dense reference: fp32 reductions in another order (~1e-6 measured)
    torch.testing.assert_close(torch.tensor(c.logprobs.token_logprobs), expected, atol=1e-4, rtol=0)
    for step, top in enumerate(c.logprobs.top_logprobs):
        assert len(top) >= 3 or len(set(top)) < 3  # distinct ids may decode to one string
        best = ref[step].topk(3).values
        assert max(top.values()) == pytest.approx(float(best[0]), abs=1e-4)
    assert c.logprobs.text_offset[0] == 0


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2
        # greedy: the chosen token is the most likely one
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)


def test_stop_string_truncates_and_streams_the_same_text(client):
    base = (
        client.completions.create(
            model=MODEL_NAME,
            prompt="abc",
            max_tokens=40,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    printable = [i for i in range(len(base) - 2) if base[i : i + 2].isprintable()]
    assert printable, f"no printable 2-character substring in {base!r}"
    stop = base[printable[len(printable) // 2] : printable[len(printable) // 2] + 2]
    expected = base[: base.find(stop)]
    r = client.completions.create(
        model=MODEL_NAME, prompt="abc", max_tokens=40, temperature=0, stop=[stop]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert r.choices[0].model_extra["stop_reason"] == stop
    chunks = list(
        client.completions.create(
            model=MODEL_NAME, prompt="abc", max_tokens=40, temperature=0, stop=stop, stream=True
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client, ref_model):
    expected = greedy(ref_model, PROMPT_IDS, 8)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT_IDS,
        max_tokens=8,
        temperature=0,
        extra_body={"stop_token_ids": [expected[3]], "return_token_ids": True},
    )
    got = r.choices[0].model_extra["token_ids"]
    assert got == expected[: expected.index(expected[3]) + 1]
    assert r.choices[0].finish_reason == "stop"


def test_streaming_completion_with_usage(client, ref_model, model_dir):
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT_IDS,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    chunks = list(stream)
    *token_chunks, last = chunks
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert last.usage.prompt_tokens == len(PROMPT_IDS)
    assert all(ch.usage is None for ch in token_chunks)
    ids = [t for ch in token_chunks for t in ch.choices[0].model_extra["token_ids"]]
    assert ids == greedy(ref_model, PROMPT_IDS, 20)
    text = "".join(ch.choices[0].text for ch in token_chunks)
    assert text == load_tokenizer(model_dir).decode(ids)
    assert [ch.choices[0].finish_reason for ch in token_chunks][-1] == "length"


def test_chat_uses_the_folder_template(client, server, ref_model):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hello"}]},
    ]
    # the byte tokenizer's template (tokenizer_config.json), written out by hand
    rendered = "<|system|>\nbe brief\n<|user|>\nhello\n<|assistant|>\n"
    ids = list(rendered.encode())
    assert server.post("/tokenize", json={"messages": messages}).json()["tokens"] == ids
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=7,
        temperature=0,
        n=2,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    expected = greedy(ref_model, ids, 7)
    assert [c.model_extra["token_ids"] for c in r.choices] == [expected, expected]
    assert r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 14)

    chunks = list(
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            max_tokens=7,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 7
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"


def test_chat_default_max_tokens_fills_the_context(client):
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "x" * (MAX_MODEL_LEN - 30)}],
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.total_tokens == MAX_MODEL_LEN and r.choices[0].finish_reason == "length"


def test_tokenize_detokenize_roundtrip(server, model_dir):
    tok = load_tokenizer(model_dir)
    text = "héllo, wörld"
    r = server.post("/tokenize", json={"prompt": text}).json()
    assert r["tokens"] == tok.encode(text) and r["count"] == len(tok.encode(text))
    assert server.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == text


def test_health_stats_page_and_metrics(server, client):
    assert server.get("/health").json() == {"status": "ok"}
    before = server.metric("aiinfra_prompt_tokens_total")
    gen_before = server.metric("aiinfra_generation_tokens_total")
    count_before = server.metric("aiinfra_time_to_first_token_seconds_count")
    prompt = [7, 8, 9, 10, 11, 12, 13]  # a prompt no other test sends: no prefix-cache effects
    client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=5, extra_body={"ignore_eos": True}
    )
    assert server.metric("aiinfra_prompt_tokens_total") == before + len(prompt)
    assert server.metric("aiinfra_generation_tokens_total") == gen_before + 5
    assert server.metric("aiinfra_time_to_first_token_seconds_count") == count_before + 1
    assert server.metric("aiinfra_num_requests_running") == 0
    assert 0 <= server.metric("aiinfra_prefix_cache_hit_rate") <= 1
    stats = server.get("/stats").json()
    assert stats["model"] == MODEL_NAME and stats["num_blocks"] > 0
    page = server.get("/")
    assert page.status_code == 200 and "/stats" in page.text and "/v1/completions" in page.text


def test_sse_wire_format(server):
    """Raw SSE: `data: {json}` events, `data: [DONE]` last (what non-openai clients parse)."""
    body = {"prompt": [1, 2], "max_tokens": 3, "stream": True, "ignore_eos": True}
    r = server.post("/v1/completions", json=body)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_aiinfra_serve_command(model_dir):
    """The CLI path: `aiinfra serve` in its own process, with --api-key and --served-model-name."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "aiinfra.cli", "serve", str(model_dir), "--port", str(port)]
    cmd += ["--api-key", "k1", "--served-model-name", "cli-model", "--kv-cache-memory", "16MiB"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "aiinfra serve did not come up in 60 s"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key="k1", timeout=30, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["cli-model"]
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_run_server_rejects_bad_arguments(model_dir, tmp_path):
    from aiinfra.serve.server import run_server

    with pytest.raises(ValueError, match="tp"):
        run_server(str(model_dir), tp=2)
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_server(str(tmp_path))
    with pytest.raises(ValueError, match="max_waiting"):
        run_server(str(model_dir), max_waiting=-1)
