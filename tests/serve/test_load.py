"""Concurrency and disconnects: 200 streams at once; a client that leaves frees its KV blocks."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import openai

from aiinfra.infer import LLM, SamplingParams
from tests.serve.conftest import MODEL_NAME
from tests.serve.test_errors import wait_for_idle


def test_200_concurrent_streams_complete_with_correct_usage(server, model_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(4, 40))] for _ in range(200)]
    max_tokens = [rng.randint(1, 12) for _ in range(200)]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, object]:
        stream = await client.completions.create(
            model=MODEL_NAME,
            prompt=prompts[i],
            max_tokens=max_tokens[i],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        ids, usage = [], None
        async for chunk in stream:
            if chunk.choices:
                ids += chunk.choices[0].model_extra["token_ids"]
            if chunk.usage is not None:
                usage = chunk.usage
        return ids, usage

    async def main():
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0
        )
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(asyncio.wait_for(main(), 180))
    # reference: the same requests through the offline engine (batched differently)
    offline = LLM(str(model_dir), kv_cache_memory="16MiB", num_threads=1)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    expected = offline.generate(prompts, params, use_tqdm=False)
    for i, (ids, usage) in enumerate(results):
        assert usage.prompt_tokens == len(prompts[i])
        assert usage.completion_tokens == max_tokens[i] == len(ids)
        assert usage.total_tokens == len(prompts[i]) + max_tokens[i]
        assert ids == expected[i].outputs[0].token_ids
    wait_for_idle(server)


def test_disconnect_mid_stream_frees_kv_blocks(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=30, max_retries=0)
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=list(range(1, 60)),
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert server.metric("aiinfra_kv_cache_usage_perc") > 0  # the request holds blocks now
    aborted = server.get("/stats").json()["num_aborted"]
    stream.close()
    wait_for_idle(server)  # KV usage back to 0, read from /metrics
    assert server.get("/stats").json()["num_aborted"] == aborted + 1


def test_disconnect_of_a_non_streaming_request_frees_kv_blocks(server):
    aborted = server.get("/stats").json()["num_aborted"]
    body = {"prompt": list(range(1, 60)), "max_tokens": 440, "ignore_eos": True}

    async def main() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            task = asyncio.ensure_future(client.post(server.url + "/v1/completions", json=body))
            deadline = time.monotonic() + 10
            while (await client.get(server.url + "/stats")).json()["kv_cache_usage"] == 0:
                assert time.monotonic() < deadline and not task.done()
                await asyncio.sleep(0.01)
            task.cancel()  # closes the connection while the server is generating

    asyncio.run(main())
    wait_for_idle(server)
    assert server.get("/stats").json()["num_aborted"] == aborted + 1
