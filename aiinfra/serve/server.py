"""The FastAPI app: the OpenAI API, /tokenize, /detokenize, /health, /metrics, /stats, web page /.

Every error leaves as an OpenAI error body: bad input 400, missing or wrong key 401, unknown route
or model 404, oversized body 413 (checked while reading, before parsing), too many waiting requests
429, an engine failure 503 for the requests it hit (logged; the engine core keeps running).
The engine runs in its own process (aiinfra.serve.engine_core); this process does HTTP,
tokenization and SSE.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiinfra.infer.engine import EngineConfig, LLMEngine
from aiinfra.serve import protocol
from aiinfra.serve.async_engine import (
    AsyncLLMEngine,
    EngineStepError,
    RequestAbortedError,
    RequestStream,
    ServerOverloadedError,
)
from aiinfra.serve.metrics import ServerMetrics
from aiinfra.serve.protocol import APIError
from aiinfra.serve.serving import OpenAIServing, guard_stream, sampling_error

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_waiting: int = 1024
    max_body_bytes: int = 4 * 2**20  # 4 MiB: ~1M token ids as JSON, far past any context we serve

    def __post_init__(self) -> None:
        if not self.served_model_name:
            raise ValueError(f"served_model_name ({self.served_model_name!r}) must be non-empty")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting ({self.max_waiting}) must be >= 0")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes ({self.max_body_bytes}) must be positive")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key ('') must be non-empty when given")


def build_app(engine: LLMEngine | AsyncLLMEngine, config: ServerConfig) -> FastAPI:
    """An app serving `engine`: an AsyncLLMEngine (its core is shut down with the app), or an
    LLMEngine built in this process, then stepped by a core thread."""
    if isinstance(engine, AsyncLLMEngine):
        async_engine = engine
    else:
        async_engine = AsyncLLMEngine.from_engine(engine, max_waiting=config.max_waiting)
    metrics = ServerMetrics(lambda: async_engine.stats, engine_core_pid=async_engine.core.pid)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        yield
        async_engine.shutdown()

    app = FastAPI(title="aiinfra", lifespan=lifespan, docs_url=None, redoc_url=None)
    serving = OpenAIServing(async_engine, metrics, served_model_name=config.served_model_name)
    app.state.async_engine, app.state.serving, app.state.metrics = async_engine, serving, metrics
    _install_error_handlers(app)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {config.api_key}"
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise APIError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def parse(request: Request, model: type[M]) -> M:
        authorize(request)
        body = await _read_body(request, config.max_body_bytes)
        try:
            return model.model_validate_json(body)
        except ValidationError as e:
            raise _validation_error(e) from None

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req = await parse(request, protocol.CompletionRequest)
        serving.check_model(req.model)
        try:
            params = req.to_sampling_params()
        except (ValueError, TypeError) as e:
            raise sampling_error(e) from None
        streams = await _start(serving, serving.completion_prompts(req.prompt), params)
        if req.stream:
            chunks = serving.completion_stream(req, streams, t0)
            return _sse_response(request, chunks, streams, async_engine)
        work = serving.collect(streams, t0)
        outputs = await _with_disconnect(request, streams, async_engine, work)
        return JSONResponse(serving.completion_response(req, outputs))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        t0 = time.perf_counter()
        req = await parse(request, protocol.ChatCompletionRequest)
        serving.check_model(req.model)
        try:
            params = req.to_sampling_params()
        except (ValueError, TypeError) as e:
            raise sampling_error(e, {"logprobs": "top_logprobs"}) from None
        streams = await _start(serving, [serving.chat_prompt(req)], params)
        if req.stream:
            chunks = serving.chat_stream(req, streams[0], t0)
            return _sse_response(request, chunks, streams, async_engine)
        work = serving.collect(streams, t0)
        outputs = await _with_disconnect(request, streams, async_engine, work)
        return JSONResponse(serving.chat_response(req, outputs[0]))

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        card = {
            "id": config.served_model_name,
            "object": "model",
            "created": int(async_engine.counters.start_time),
            "owned_by": "aiinfra",
            "max_model_len": serving.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await parse(request, protocol.TokenizeRequest)
        serving.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            ids = serving.tokenizer.encode(req.prompt)
        else:
            ids = serving.chat_prompt(req)
        return {"tokens": ids, "count": len(ids), "max_model_len": serving.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await parse(request, protocol.DetokenizeRequest)
        serving.check_model(req.model)
        vocab = async_engine.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens ({bad[:5]}) must be in [0, {vocab})", param="tokens")
        return {"prompt": serving.tokenizer.decode(req.tokens)}

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            body = protocol.error_body("the engine core is not running", type="server_error")
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return {
            **asdict(async_engine.stats),
            **asdict(async_engine.counters),
            "num_in_flight": async_engine.num_in_flight,
            "model": config.served_model_name,
            "max_model_len": serving.max_model_len,
            "max_waiting": config.max_waiting,
            "time": time.time(),
        }

    @app.get("/")
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    return app


async def _start(serving: OpenAIServing, prompts: list[list[int]], params: Any) -> list:
    try:
        return await serving.start(prompts, params)
    except ServerOverloadedError as e:
        raise APIError(
            429, str(e), type="rate_limit_error", code="too_many_waiting_requests"
        ) from None
    except (ValueError, TypeError) as e:
        err = sampling_error(e)
        raise APIError(400, err.message, param=err.param or "prompt") from None
    except EngineStepError as e:
        raise APIError(503, str(e), type="server_error", code="engine_error") from None


class _EngineStreamingResponse(StreamingResponse):
    """Aborts its requests however the response ends, also when the client left before the body
    generator ever started (then the generator's own `finally` never runs)."""

    def __init__(self, body: AsyncIterator[str], streams: list, engine: AsyncLLMEngine) -> None:
        super().__init__(body, media_type="text/event-stream")
        self._streams, self._engine = streams, engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for s in self._streams:
                self._engine.abort(s)  # a no-op for finished requests


def _sse_response(
    request: Request, chunks: AsyncIterator[str], streams: list[RequestStream], engine: Any
) -> StreamingResponse:
    body = _watch_stream(request, guard_stream(chunks, streams, engine.abort), streams, engine)
    return _EngineStreamingResponse(body, streams, engine)


async def _watch_stream(
    request: Request, body: AsyncIterator[str], streams: list, engine: AsyncLLMEngine
) -> AsyncIterator[str]:
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, streams, engine))
    try:
        async for chunk in body:
            yield chunk
    finally:
        watcher.cancel()


async def _with_disconnect(
    request: Request, streams: list, engine: AsyncLLMEngine, work: Any
) -> Any:
    watcher = asyncio.ensure_future(_abort_on_disconnect(request, streams, engine))
    try:
        return await work
    except EngineStepError as e:
        raise APIError(503, str(e), type="server_error", code="engine_error") from None
    finally:
        watcher.cancel()


async def _abort_on_disconnect(request: Request, streams: list, engine: AsyncLLMEngine) -> None:
    """Wait for the client to go away (the body is read, so receive() only reports that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for s in streams:
        engine.abort(s)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds {limit} bytes", code="request_too_large")


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err["loc"] if not isinstance(x, int) or x == 0)
    param = ".".join(str(x) for x in err["loc"]) or None
    message = f"{loc or 'body'}: {err['msg']}" if err["type"] != "json_invalid" else err["msg"]
    if err["type"] == "extra_forbidden":
        message = f"unknown field {loc!r}"
    return APIError(400, message, param=param)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestAbortedError)
    async def aborted(request: Request, e: RequestAbortedError) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        body = protocol.error_body(str(e.detail), type=kind, code=str(e.status_code))
        return JSONResponse(body, status_code=e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        msg = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errors[:3])
        return JSONResponse(protocol.error_body(msg, type="invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error in %s %s", request.method, request.url.path)
        body = protocol.error_body(f"internal error: {type(e).__name__}", type="server_error")
        return JSONResponse(body, status_code=500)


@dataclass
class BackgroundServer:
    """A uvicorn server on a daemon thread of this process (tests, `aiinfra demo`)."""

    url: str
    app: FastAPI
    server: Any  # uvicorn.Server
    thread: threading.Thread

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise TimeoutError(f"server at {self.url} did not stop within {timeout_s}s")


def start_background_server(
    engine: LLMEngine | EngineConfig,
    config: ServerConfig,
    *,
    engine_cls: type[LLMEngine] = LLMEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout_s: float = 30.0,
) -> BackgroundServer:
    """Serve from a thread: an EngineConfig gets an engine core process (building
    `engine_cls`), an LLMEngine a core thread. Port 0 takes a free port (bound here: no race)."""
    import uvicorn

    if isinstance(engine, EngineConfig):
        served: LLMEngine | AsyncLLMEngine = AsyncLLMEngine.from_config(
            engine, max_waiting=config.max_waiting, engine_cls=engine_cls
        )
    else:
        served = engine
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, port))
    app = build_app(served, config)
    uv_config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(uv_config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise TimeoutError(f"uvicorn did not start within {timeout_s}s")
        time.sleep(0.02)
    url = f"http://{host}:{sock.getsockname()[1]}"
    return BackgroundServer(url, app, server, thread)


def run_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_waiting: int = 1024,
    kv_cache_memory: int | str | None = "2GiB",
    max_num_seqs: int = 256,
    tp: int = 1,
    engine_process: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    gpu_memory_utilization: float = 0.9,
    enforce_eager: bool = False,
) -> None:
    """`aiinfra serve`: build the engine on `model` (a local HF-format folder) and serve it.

    The engine core runs in its own process (`engine_process=False`: a thread of this one); its
    startup errors are raised before the server listens."""
    import torch
    import uvicorn

    if tp != 1:
        raise ValueError(f"tp ({tp}) > 1 is not supported by the engine yet")
    if model.startswith("models:/"):
        raise ValueError(f"model ({model!r}): registry URIs need aiinfra.mlops's registry")
    if not (Path(model) / "config.json").exists():
        raise FileNotFoundError(f"model ({model!r}) is not a folder with a config.json")
    config = ServerConfig(
        served_model_name=served_model_name or model, api_key=api_key, max_waiting=max_waiting
    )
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    engine_config = EngineConfig(
        model=model,
        kv_cache_memory=kv_cache_memory,
        max_num_seqs=max_num_seqs,
        device=device,
        dtype=dtype,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
    )
    engine: LLMEngine | AsyncLLMEngine
    if engine_process:
        engine = AsyncLLMEngine.from_config(engine_config, max_waiting=max_waiting)
        torch.set_num_threads(1)  # no model ops here: the core's OpenMP team has the cores
    else:
        engine = LLMEngine(engine_config)
    logger.info("serving %s on http://%s:%d", config.served_model_name, host, port)
    uvicorn.run(build_app(engine, config), host=host, port=port, log_level="warning")
