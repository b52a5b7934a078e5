"""Every error the server gives, in OpenAI's format; a fuzz of malformed bodies never gets a 5xx."""

from __future__ import annotations

import json
import string

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, POISON_TOKEN


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),  # OpenAI's bound: one request cannot ask for unbounded sequences
        ({"seed": 2**63}, "seed"),  # beyond int64: torch.Generator would reject seed + i
        ({"stop": [""]}, "stop"),
        ({"max_tokens": MAX_MODEL_LEN}, "prompt"),  # prompt + max_tokens beyond the context
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 100000]}, "prompt"),  # token id outside the vocabulary
        ({"max_tokens": "many"}, "max_tokens"),
        ({"not_a_field": 1}, "not_a_field"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_invalid_completion_parameters_are_400(server, body, param):
    full = {"model": MODEL_NAME, "prompt": [1, 2, 3], "max_tokens": 4, **body}
    err = assert_openai_error(server.post("/v1/completions", json=full), 400, param)
    assert err["type"] == "invalid_request_error"


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "x"}], top_p=2
        )
    assert e.value.body["param"] == "top_p"


def test_unknown_model_and_route_are_404(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=1)
    assert e.value.body["param"] == "model"
    assert_openai_error(server.post("/v1/nowhere", json={}), 404)
    assert_openai_error(server.get("/v2/models"), 404)
    assert_openai_error(server.get("/v1/completions"), 405)


def test_bad_json_is_400(server):
    r = server.post("/v1/completions", content=b"{not json", headers={"content-type": "x"})
    assert_openai_error(r, 400)
    assert_openai_error(server.post("/v1/chat/completions", content=b"[1, 2]"), 400)


def test_oversized_body_is_413(server):
    big = {"model": MODEL_NAME, "prompt": "a" * (5 * 2**20), "max_tokens": 1}
    assert_openai_error(server.post("/v1/completions", json=big), 413)

    def chunked():  # no content-length: the limit is enforced while reading
        for _ in range(5):
            yield b" " * 2**20
        yield json.dumps({"prompt": "a", "max_tokens": 1}).encode()

    assert_openai_error(server.post("/v1/completions", content=chunked()), 413)
    assert server.get("/health").status_code == 200


def test_api_key_is_401_without_or_with_a_wrong_key(strict_server):
    url = strict_server.url + "/v1"
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=url, api_key=key or "x", timeout=30, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    r = strict_server.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert assert_openai_error(r, 401)["type"] == "authentication_error"
    good = openai.OpenAI(base_url=url, api_key=API_KEY, timeout=30, max_retries=0)
    assert good.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2).usage
    assert strict_server.get("/health").status_code == 200  # health and metrics stay open


def test_waiting_over_max_waiting_is_429(strict_server):
    """max_num_seqs=1 and max_waiting=1: one running, one waiting, the third is turned away."""
    client = openai.OpenAI(
        base_url=strict_server.url + "/v1", api_key=API_KEY, timeout=30, max_retries=0
    )
    long = dict(model=MODEL_NAME, max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    running = client.completions.create(prompt=[1, 2, 3], **long)
    next(iter(running))  # its first token: it is in the running batch
    waiting = client.completions.create(prompt=[4, 5, 6], **long)  # headers: accepted, waiting
    with pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[7], max_tokens=2)
    assert e.value.status_code == 429 and e.value.body["type"] == "rate_limit_error"
    running.close()
    waiting.close()
    wait_for_idle(strict_server)
    assert client.completions.create(model=MODEL_NAME, prompt=[7], max_tokens=2).usage


def test_engine_failure_fails_only_its_requests(strict_server, ref_model):
    client = openai.OpenAI(
        base_url=strict_server.url + "/v1", api_key=API_KEY, timeout=30, max_retries=0
    )
    num_step_errors = strict_server.get("/stats").json()["num_step_errors"]
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=MODEL_NAME, prompt=[POISON_TOKEN, 1], max_tokens=3)
    assert e.value.status_code == 503 and e.value.body["code"] == "engine_error"
    with pytest.raises(openai.APIError):
        list(
            client.completions.create(
                model=MODEL_NAME, prompt=[POISON_TOKEN, 2], max_tokens=3, stream=True
            )
        )
    wait_for_idle(strict_server)
    r = client.completions.create(
        model=MODEL_NAME,
        prompt=[9, 8, 7],
        max_tokens=5,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    from aiinfra.models import generate_greedy

    assert r.choices[0].model_extra["token_ids"] == generate_greedy(ref_model, [9, 8, 7], 5)
    stats = strict_server.get("/stats").json()
    assert stats["num_step_errors"] == num_step_errors + 2  # one step for each: it runs alone
    assert stats["num_free_blocks"] == stats["num_blocks"]


def wait_for_idle(server, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        running = server.metric("aiinfra_num_requests_running")
        if running == 0 and server.metric("aiinfra_kv_cache_usage_perc") == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"server still busy after {timeout_s}s: {server.get('/stats').json()}")


# --- fuzz -----------------------------------------------------------------------------------------

_FIELDS = [
    "model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "min_p", "n",
    "stream", "stream_options", "stop", "logprobs", "top_logprobs", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "ignore_eos", "stop_token_ids", "min_tokens",
    "echo", "best_of", "logit_bias", "max_completion_tokens", "user", "bogus",
]  # fmt: skip
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(string.printable, max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=8,
)
_small_int = st.integers(-5, 600)
_values = st.one_of(
    _json,
    _small_int,
    st.lists(st.integers(-3, 600), max_size=6),
    st.lists(st.fixed_dictionaries({"role": st.text(max_size=5), "content": _json}), max_size=3),
)
_bodies = st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=8).map(
    lambda d: {"max_tokens": 3, **d}  # keep the valid ones short
)
# a valid request with up to three fields set to plausible values, in range or just outside: these
# reach the engine (sampling, stops, logprobs, n, streaming) far more often than the bodies above
_VALID = {
    "/v1/completions": {"prompt": [1, 2, 3], "max_tokens": 3},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "/tokenize": {"prompt": "hi"},
}
_text = st.text(string.printable, max_size=6)
_PLAUSIBLE = {
    "prompt": _text | st.lists(st.integers(-2, 520), max_size=8) | st.lists(_text, max_size=3),
    "max_tokens": st.integers(-2, 40) | st.just(600) | st.none(),
    "temperature": st.floats(-1, 3),
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 1000),
    "min_p": st.floats(-0.5, 1.5),
    "n": st.integers(-1, 4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": _text | st.lists(_text, max_size=3),
    "logprobs": st.integers(-1, 25) | st.booleans(),
    "top_logprobs": st.integers(-1, 25),
    "seed": st.integers(-(2**64), 2**64),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "ignore_eos": st.booleans(),
    "stop_token_ids": st.lists(st.integers(-2, 600), max_size=3),
    "min_tokens": st.integers(-1, 10),
}
_near_valid = (
    st.dictionaries(st.sampled_from(sorted(_PLAUSIBLE)), st.none(), min_size=1, max_size=3)
    .flatmap(lambda keys: st.fixed_dictionaries({k: _PLAUSIBLE[k] for k in keys}))
    .map(lambda d: {"near_valid": d})
)


def _raw(b: bytes) -> dict:
    return {"raw": b}


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]),
    body=st.one_of(_near_valid, _near_valid, _bodies, st.binary(max_size=40).map(_raw)),
)
def test_fuzz_malformed_bodies_never_5xx(server, path, body):
    if "raw" in body:
        r = server.post(path, content=body["raw"])
    elif "near_valid" in body:
        r = server.post(path, content=json.dumps({**_VALID[path], **body["near_valid"]}))
    else:
        r = server.post(path, content=json.dumps(body))
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_server_still_serves_after_the_fuzz(server, client):
    r = client.completions.create(model=MODEL_NAME, prompt="ok", max_tokens=3)
    assert r.usage.completion_tokens >= 1
    wait_for_idle(server)
    assert server.get("/stats").json()["num_step_errors"] == 0
