"""Fixtures: real uvicorn servers on free 127.0.0.1 ports serving the real engine, tiny model,
each with its engine core in its own process (as `aiinfra serve`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from aiinfra.infer import EngineConfig, LLMEngine
from aiinfra.infer.attention import cpu_extension
from aiinfra.models import create_random_model_dir, get_preset, load_model
from aiinfra.serve.server import BackgroundServer, ServerConfig, start_background_server

MODEL_NAME = "tiny-test"
API_KEY = "sk-test-key"
POISON_TOKEN = 500  # a prompt starting with this id makes FaultyEngine.step raise
MAX_MODEL_LEN = 512


@dataclass
class RunningServer:
    background: BackgroundServer

    @property
    def url(self) -> str:
        return self.background.url

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kw)

    def metric(self, name: str) -> float:
        """One sample of /metrics (no labels)."""
        for line in self.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.background.stop(timeout_s=30)


class FaultyEngine(LLMEngine):
    """The real engine, except that a step with a poisoned request in it raises."""

    def step(self):
        if any(r.prompt_token_ids[0] == POISON_TOKEN for r in self.requests.values()):
            raise RuntimeError("injected fault")
        return super().step()


def start_server(
    engine: LLMEngine | EngineConfig, config: ServerConfig, engine_cls: type[LLMEngine] = LLMEngine
) -> RunningServer:
    return RunningServer(start_background_server(engine, config, engine_cls=engine_cls))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the paged-attention kernel compiles on first use (tens of seconds when its source changed):
    # do that here, not inside a request with a client timeout
    cpu_extension()
    return create_random_model_dir(get_preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def ref_model(model_dir: Path):
    model, _ = load_model(model_dir)
    return model.eval()


def engine_config(model_dir: Path, **kw) -> EngineConfig:
    cfg = dict(kv_cache_memory="16MiB", max_model_len=MAX_MODEL_LEN, num_threads=1)
    return EngineConfig(model=str(model_dir), **{**cfg, **kw})


@pytest.fixture(scope="session")
def server(model_dir: Path) -> Iterator[RunningServer]:
    running = start_server(engine_config(model_dir), ServerConfig(served_model_name=MODEL_NAME))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def strict_server(model_dir: Path) -> Iterator[RunningServer]:
    """API key, one running sequence at most, one waiting at most, and fault injection."""
    engine = engine_config(model_dir, max_num_seqs=1)
    config = ServerConfig(served_model_name=MODEL_NAME, api_key=API_KEY, max_waiting=1)
    running = start_server(engine, config, FaultyEngine)
    yield running
    running.stop()
