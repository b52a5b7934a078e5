"""The engine core: its per-step deltas rebuild exactly the offline engine's outputs; a step that
raises fails only the request that makes it raise; startup errors and a dead parent or core."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from aiinfra.infer import LLM, LLMEngine, SamplingParams
from aiinfra.serve.engine_core import (
    AddRequest,
    CoreHandle,
    StepReport,
    start_core_process,
    start_core_thread,
)
from aiinfra.serve.server import ServerConfig, run_server
from tests.serve.conftest import MODEL_NAME, engine_config, start_server

POISON = 500  # prompt[0]: every step with this request in the engine raises
LATE = 501  # prompt[0]: steps raise once this request has streamed 3 tokens


class PoisonEngine(LLMEngine):
    def step(self):
        for req in self.requests.values():
            if req.prompt_token_ids[0] == POISON:
                raise RuntimeError("poisoned request")
            if req.prompt_token_ids[0] == LATE and req.seqs[0].num_output_tokens >= 3:
                raise RuntimeError("late fault")
        return super().step()


@dataclass
class Result:
    token_ids: list[list[int]]
    text: list[str]
    logprobs: list[list]
    finish_reason: list[str | None]
    error: str | None = None
    num_cuts: int = 0  # deltas that cut text sent before


@dataclass
class Driver:
    """Adds requests to a core and rebuilds each one's cumulative output from the deltas, as the
    API process does."""

    core: CoreHandle
    results: dict[str, Result] = field(default_factory=dict)
    num_step_errors: int = 0
    last: StepReport | None = None

    def add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        n = params.n
        self.results[request_id] = Result([[] for _ in range(n)], [""] * n, [[]] * n, [None] * n)
        self.core.commands.send(AddRequest(request_id, prompt, params))

    def pump(self, until, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not until():
            assert time.monotonic() < deadline, "the core did not get there in time"
            if not self.core.outputs.poll(1.0):
                continue
            report: StepReport = self.core.outputs.recv()
            self.last = report
            self.num_step_errors = report.num_step_errors
            for request_id, error in report.acks:
                assert error is None, (request_id, error)
            for request_id, _, _, completions in report.deltas:
                r = self.results[request_id]
                for i, ids, keep, text, finish, _, logprobs in completions:
                    r.num_cuts += keep < len(r.text[i])
                    r.token_ids[i] = r.token_ids[i] + ids
                    r.text[i] = r.text[i][:keep] + text
                    r.logprobs[i] = r.logprobs[i] + (logprobs or [])
                    r.finish_reason[i] = finish
            for request_id, message in report.failed:
                self.results[request_id].error = message

    def done(self, request_id: str) -> bool:
        r = self.results[request_id]
        return r.error is not None or all(f is not None for f in r.finish_reason)

    def all_done(self) -> bool:
        return all(self.done(r) for r in self.results)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture
def driver(model_dir: Path):
    core = start_core_thread(PoisonEngine(engine_config(model_dir)))
    yield Driver(core)
    core.close()


def offline(model_dir: Path, prompts: list[list[int]], params: list[SamplingParams]):
    llm = LLM(str(model_dir), kv_cache_memory="16MiB", num_threads=1)
    return llm.generate(prompts, params, use_tqdm=False)


def assert_matches_offline(driver: Driver, model_dir: Path, requests: dict) -> None:
    """requests: request_id -> (prompt, params), all finished without error."""
    ids = list(requests)
    expected = offline(model_dir, [requests[r][0] for r in ids], [requests[r][1] for r in ids])
    for request_id, exp in zip(ids, expected, strict=True):
        got = driver.results[request_id]
        assert got.error is None, (request_id, got.error)
        for c in exp.outputs:
            assert got.token_ids[c.index] == c.token_ids, request_id
            assert got.text[c.index] == c.text
            assert got.finish_reason[c.index] == c.finish_reason
            if c.logprobs is not None:
                assert got.logprobs[c.index] == c.logprobs  # the same engine: bit-exact


def test_deltas_rebuild_the_offline_outputs(driver, model_dir):
    """n > 1 with seeds, logprobs, and a stop string that straddles two steps, so that the engine
    cuts text the core already sent (the `keep` field)."""
    prompt = [5, 6, 7, 8]
    free = offline(model_dir, [prompt], [greedy(24)])[0].outputs[0].text
    # the first two characters (none a replacement character) not seen earlier in the text
    candidates = range(3, len(free) - 1)
    at = next(i for i in candidates if free.find(s := free[i : i + 2]) == i and "\ufffd" not in s)
    stop = free[at : at + 2]
    requests = {
        "stop": (prompt, greedy(24, stop=[stop])),
        "n3": ([9, 10, 11], SamplingParams(temperature=1.0, max_tokens=9, n=3, seed=7)),
        "lp": ([12, 13], greedy(6, logprobs=3)),
    }
    for request_id, (p, params) in requests.items():
        driver.add(request_id, p, params)
    driver.pump(driver.all_done)
    assert driver.results["stop"].finish_reason == ["stop"]
    assert driver.results["stop"].text == [free[:at]]
    assert driver.results["stop"].num_cuts == 1  # its first character was sent, then cut
    assert_matches_offline(driver, model_dir, requests)
    assert driver.last is not None and driver.last.stats[1] == 0  # num_waiting


def test_a_poisoned_request_fails_alone_while_others_stream(driver, model_dir):
    streaming = {f"s{i}": ([20 + i, 21, 22], greedy(30)) for i in range(3)}
    for request_id, (p, params) in streaming.items():
        driver.add(request_id, p, params)
    driver.pump(lambda: all(driver.results[r].token_ids[0] for r in streaming))
    fresh = {f"f{i}": ([40 + i, 41], greedy(8)) for i in range(2)}
    driver.add("poison", [POISON, 1], greedy(8))
    for request_id, (p, params) in fresh.items():
        driver.add(request_id, p, params)
    driver.pump(driver.all_done)
    assert driver.results["poison"].error == "RuntimeError: poisoned request"
    assert_matches_offline(driver, model_dir, {**streaming, **fresh})
    # one failure with everything in; one with the fresh group put back; then halves down to it
    assert 2 <= driver.num_step_errors <= 4
    stats = driver.last.stats
    assert stats[0] == 0 and stats[-3] == stats[-2]  # nothing running, every block free


def test_bisection_finds_the_poisoned_one_among_fresh_requests(driver, model_dir):
    requests = {f"r{i}": ([60 + i, 61, 62], greedy(5)) for i in range(8)}
    for i, (request_id, (p, params)) in enumerate(requests.items()):
        driver.add(request_id, p, params)
        if i == 5:
            driver.add("poison", [POISON, 2], greedy(5))
    driver.pump(driver.all_done)
    assert driver.results["poison"].error is not None
    assert_matches_offline(driver, model_dir, requests)
    assert driver.num_step_errors <= 1 + 2 * 4  # log2(9) rounds of halving at most


def test_a_request_failing_mid_stream_fails_alone(driver, model_dir):
    others = {f"o{i}": ([70 + i, 71], greedy(12)) for i in range(3)}
    for request_id, (p, params) in others.items():
        driver.add(request_id, p, params)
    driver.add("late", [LATE, 3], greedy(12))
    driver.pump(driver.all_done)
    late = driver.results["late"]
    assert late.error == "RuntimeError: late fault" and len(late.token_ids[0]) == 3
    assert_matches_offline(driver, model_dir, others)


# --- the core process ---------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_startup_errors_are_raised_before_the_server_listens(model_dir, tmp_path):
    # run_server raising at all means it never reached uvicorn.run, which would serve forever
    with pytest.raises(ValueError, match=r"engine core failed to start: kv_cache_memory"):
        run_server(str(model_dir), kv_cache_memory="1KiB")
    (tmp_path / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="engine core failed to start"):
        start_core_process(engine_config(tmp_path))  # a config.json but no weights


@pytest.mark.timeout(180)
def test_the_core_exits_when_its_parent_dies(model_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import os, sys
        from aiinfra.infer import EngineConfig
        from aiinfra.serve.engine_core import start_core_process

        if __name__ == "__main__":
            cfg = EngineConfig(model={str(model_dir)!r}, kv_cache_memory="16MiB", num_threads=1)
            core = start_core_process(cfg)
            print(core.pid, flush=True)
            os.kill(os.getpid(), 9)  # no cleanup at all: only the pipe's EOF tells the core
        """
    )
    path = tmp_path / "parent.py"
    path.write_text(script)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env=env)
    assert proc.returncode == -9, proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 30
    while _is_alive(pid):
        assert time.monotonic() < deadline, f"engine core {pid} outlived its parent by 30 s"
        time.sleep(0.1)


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_a_dead_core_fails_in_flight_requests_and_health(model_dir):
    server = start_server(engine_config(model_dir), ServerConfig(served_model_name=MODEL_NAME))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=30, max_retries=0)
        stream = client.completions.create(
            model=MODEL_NAME, prompt=[1, 2, 3], max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        next(chunks)
        pid = server.background.app.state.async_engine.core.pid
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(openai.APIError, match="engine core exited"):
            list(chunks)
        assert httpx.get(server.url + "/health", timeout=10).status_code == 503
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL_NAME, prompt=[1], max_tokens=2)
        assert e.value.status_code == 503
    finally:
        server.stop()


@pytest.mark.timeout(120)
def test_close_stops_a_busy_core_whose_reports_nobody_reads(model_dir):
    core = start_core_process(engine_config(model_dir))
    for i in range(4):
        core.commands.send(AddRequest(f"r{i}", [1 + i, 2], greedy(400)))
    time.sleep(2)  # it steps on, its unread reports fill the pipe and block it
    t0 = time.monotonic()
    core.close(timeout_s=20)
    assert time.monotonic() - t0 < 20  # it read the shutdown, it was not killed
    assert core.pid is not None and not _is_alive(core.pid)
