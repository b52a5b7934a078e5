"""AsyncLLMEngine: the API process's side of the engine core; each request reads its own stream.

The engine runs in the core (aiinfra.serve.engine_core: its own process by default, a thread for
tests). Handlers on the event loop add and abort requests through a pipe, written by one thread so
that a full pipe never blocks the loop. The core's per-step reports arrive on the loop itself (a
reader on the pipe's fd): one read fans a step's deltas out to every stream, which extends its
request's cumulative output in place. A stream keeps only that latest state, so a slow reader
skips intermediate states instead of queueing them.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiinfra.infer.engine import (
    CompletionOutput,
    EngineConfig,
    EngineStats,
    LLMEngine,
    RequestOutput,
)
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.models import load_tokenizer
from aiinfra.serve.engine_core import (
    AbortRequest,
    AddRequest,
    Completion,
    CoreHandle,
    StepReport,
    start_core_process,
    start_core_thread,
)

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine raised while this request was in flight; the request was aborted."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (its client went away) before it finished."""


class ServerOverloadedError(RuntimeError):
    """More requests are waiting than the server accepts (back-pressure)."""


class RequestStream:
    """The cumulative output of one engine request, read by one handler on the event loop."""

    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = False  # set when the final output (or an error) has been delivered
        completions = [
            CompletionOutput(i, "", [], None, None if params.logprobs is None else [])
            for i in range(params.n)
        ]
        self.output = RequestOutput(request_id, prompt_token_ids, completions, False)
        self._is_new = False
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def extend(self, finished: bool, num_cached_tokens: int, deltas: list[Completion]) -> None:
        out = self.output
        out.finished, out.num_cached_tokens = finished, num_cached_tokens
        for index, token_ids, keep, text, finish_reason, stop_reason, logprobs in deltas:
            c = out.outputs[index]
            c.token_ids += token_ids
            if keep < len(c.text):  # a stop string cut the text
                c.text = c.text[:keep]
            c.text += text
            c.finish_reason, c.stop_reason = finish_reason, stop_reason
            if logprobs:
                assert c.logprobs is not None
                c.logprobs += logprobs
        self.finished = finished
        self._is_new = True
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # mark retrieved: the handler may be gone already
        self._error = error
        self.finished = True
        self._ready.set()

    async def next(self) -> RequestOutput | None:
        """The output if it changed since the last call; None once the finished one was read."""
        while True:
            if self._is_new:
                self._is_new = False
                return self.output
            if self._error is not None:
                raise self._error
            if self.finished:
                return None
            self._ready.clear()
            await self._ready.wait()


@dataclass(slots=True)
class _Counters:
    num_requests: int = 0
    num_rejected: int = 0
    num_aborted: int = 0
    num_failed: int = 0
    num_step_errors: int = 0
    start_time: float = field(default_factory=time.time)


_ADD_ERRORS: dict[str, type[Exception]] = {"ValueError": ValueError, "TypeError": TypeError}


class AsyncLLMEngine:
    """Wraps an engine core for asyncio handlers: `generate()` -> RequestStream, `abort()`.

    `from_config` starts the core in its own process (the server's default); `from_engine` runs an
    engine built here on a thread of this process.
    """

    def __init__(self, core: CoreHandle, tokenizer: Any, *, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting ({max_waiting}) must be >= 0")
        self.core = core
        self.tokenizer = tokenizer
        self.max_model_len = core.ready.max_model_len
        self.vocab_size = core.ready.vocab_size
        self.max_waiting = max_waiting
        self.stats: EngineStats = core.ready.stats  # replaced by each report
        self.counters = _Counters()
        self._streams: dict[str, RequestStream] = {}
        self._num_pending = 0  # added but not yet acknowledged by the core
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._outbox: queue.SimpleQueue[AddRequest | AbortRequest | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._is_core_alive = True

    @classmethod
    def from_config(
        cls, config: EngineConfig, *, max_waiting: int, engine_cls: type[LLMEngine] = LLMEngine
    ) -> AsyncLLMEngine:
        """Spawn the engine core process; its startup errors are raised here."""
        core = start_core_process(config, engine_cls)
        return cls(core, load_tokenizer(config.model), max_waiting=max_waiting)

    @classmethod
    def from_engine(cls, engine: LLMEngine, *, max_waiting: int) -> AsyncLLMEngine:
        return cls(start_core_thread(engine), engine.tokenizer, max_waiting=max_waiting)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Attach to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.core.outputs.fileno(), self._on_readable)
        self._writer = threading.Thread(target=self._write, name="engine-core-writer", daemon=True)
        self._writer.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        if self._loop is not None and self._is_core_alive:
            self._loop.remove_reader(self.core.outputs.fileno())
        self._is_core_alive = False
        self._outbox.put(None)
        if self._writer is not None:
            self._writer.join(timeout_s)
        self.core.close(timeout_s)

    @property
    def is_running(self) -> bool:
        return self._is_core_alive and self._writer is not None and self._writer.is_alive()

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting + self._num_pending

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    # --- requests -----------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Add a request; raises ValueError (bad input) or ServerOverloadedError (back-pressure)."""
        if not self._is_core_alive:
            raise EngineStepError("the engine core is not running")
        if self.num_waiting >= self.max_waiting:
            self.counters.num_rejected += 1
            raise ServerOverloadedError(
                f"{self.num_waiting} requests are waiting (max_waiting={self.max_waiting})"
            )
        request_id = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        stream = RequestStream(request_id, prompt_token_ids, params)
        self._streams[request_id] = stream
        self._num_pending += 1
        self.counters.num_requests += 1
        self._outbox.put(AddRequest(request_id, prompt_token_ids, params))
        try:
            await stream.accepted
        except BaseException:
            self._streams.pop(request_id, None)
            if stream._error is None:
                self._outbox.put(AbortRequest(request_id))  # cancelled while the add was in flight
            raise
        return stream

    def abort(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        self.counters.num_aborted += 1
        self._streams.pop(stream.request_id, None)
        stream.fail(RequestAbortedError(stream.request_id))
        self._outbox.put(AbortRequest(stream.request_id))

    # --- the pipes ----------------------------------------------------------------------------

    def _write(self) -> None:
        while (cmd := self._outbox.get()) is not None:
            try:
                self.core.commands.send(cmd)
            except OSError:
                return  # the core is gone; the reader reports it

    def _on_readable(self) -> None:
        outputs = self.core.outputs
        try:
            while outputs.poll():
                self._on_report(outputs.recv())
        except (EOFError, OSError):
            self._on_core_exit()

    def _on_core_exit(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.core.outputs.fileno())
        if not self._is_core_alive:
            return  # shutting down
        self._is_core_alive = False
        logger.error("the engine core exited; failing %d requests", len(self._streams))
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            self.counters.num_failed += 1
            stream.fail(EngineStepError("the engine core exited"))

    def _on_report(self, report: StepReport) -> None:
        streams = self._streams
        for request_id, error in report.acks:
            self._num_pending -= 1
            stream = streams.get(request_id)
            if stream is None or stream.accepted.done():
                continue
            if error is None:
                stream.accepted.set_result(None)
            else:
                del streams[request_id]
                kind, message = error
                stream.fail(_ADD_ERRORS.get(kind, EngineStepError)(message))
        for request_id, finished, num_cached, deltas in report.deltas:
            stream = streams.get(request_id)
            if stream is None:
                continue
            stream.extend(finished, num_cached, deltas)
            if finished:
                del streams[request_id]
        for request_id, message in report.failed:
            stream = streams.pop(request_id, None)
            if stream is not None:
                self.counters.num_failed += 1
                stream.fail(EngineStepError(message))
        self.counters.num_step_errors = report.num_step_errors
        self.stats = EngineStats(*report.stats)
