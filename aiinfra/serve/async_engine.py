"""AsyncLLMEngine: one background thread steps the LLMEngine; each request reads its own stream.

Only the engine thread touches the engine. Handlers on the event loop hand it new requests and
aborts through a thread-safe queue, and it hands back each step's outputs in one
`call_soon_threadsafe`, so a step costs one cross-thread wake-up however many requests it served.
Outputs are cumulative, so a stream keeps only the latest one: a slow reader skips intermediate
states instead of queueing them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiinfra.infer.engine import CompletionOutput, EngineStats, LLMEngine, RequestOutput
from aiinfra.infer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """The engine raised while this request was in flight; the request was aborted."""


class RequestAbortedError(RuntimeError):
    """The request was aborted (its client went away) before it finished."""


class ServerOverloadedError(RuntimeError):
    """More requests are waiting than the server accepts (back-pressure)."""


class RequestStream:
    """The latest cumulative output of one engine request, read by one handler on the event loop."""

    def __init__(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.accepted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finished = False  # set when the final output (or an error) has been delivered
        self._latest: RequestOutput | None = None
        self._error: BaseException | None = None
        self._ready = asyncio.Event()

    def put(self, output: RequestOutput) -> None:
        self._latest = output
        self.finished = output.finished
        self._ready.set()

    def fail(self, error: BaseException) -> None:
        if not self.accepted.done():
            self.accepted.set_exception(error)
            self.accepted.exception()  # mark retrieved: the handler may be gone already
        self._error = error
        self.finished = True
        self._ready.set()

    async def next(self) -> RequestOutput | None:
        """The newest output not yet read; None once the finished output has been read."""
        while True:
            if self._latest is not None:
                out, self._latest = self._latest, None
                return out
            if self._error is not None:
                raise self._error
            if self.finished:
                return None
            self._ready.clear()
            await self._ready.wait()


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Counters:
    num_requests: int = 0
    num_rejected: int = 0
    num_aborted: int = 0
    num_failed: int = 0
    num_step_errors: int = 0
    start_time: float = field(default_factory=time.time)


class AsyncLLMEngine:
    """Wraps an LLMEngine for asyncio handlers: `generate()` -> RequestStream, `abort()`."""

    def __init__(self, engine: LLMEngine, *, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting ({max_waiting}) must be >= 0")
        self.engine = engine
        self.max_waiting = max_waiting
        # replaced, never mutated, by the engine thread: readers on the loop see a consistent one
        self.stats: EngineStats = engine.get_stats()
        self.counters = _Counters()
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # event-loop side only
        self._num_pending = 0  # added but not yet acknowledged by the engine thread
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- event-loop side --------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_waiting(self) -> int:
        return self.stats.num_waiting + self._num_pending

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams) -> RequestStream:
        """Add a request; raises ValueError (bad input) or ServerOverloadedError (back-pressure)."""
        if self.num_waiting >= self.max_waiting:
            self.counters.num_rejected += 1
            raise ServerOverloadedError(
                f"{self.num_waiting} requests are waiting (max_waiting={self.max_waiting})"
            )
        request_id = f"{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        stream = RequestStream(request_id, prompt_token_ids)
        self._streams[request_id] = stream
        self._num_pending += 1
        self.counters.num_requests += 1
        self._commands.put(_Add(request_id, prompt_token_ids, params))
        try:
            await stream.accepted
        except BaseException:
            self._streams.pop(request_id, None)
            if stream._error is None:
                self._commands.put(_Abort(request_id))  # cancelled while the add was in flight
            raise
        return stream

    def abort(self, stream: RequestStream) -> None:
        if stream.finished:
            return
        self.counters.num_aborted += 1
        self._streams.pop(stream.request_id, None)
        stream.fail(RequestAbortedError(stream.request_id))
        self._commands.put(_Abort(stream.request_id))

    def _acknowledge(self, results: list[tuple[str, BaseException | None]]) -> None:
        for request_id, error in results:
            self._num_pending -= 1
            stream = self._streams.get(request_id)
            if stream is None or stream.accepted.done():
                continue
            if error is None:
                stream.accepted.set_result(None)
            else:
                self._streams.pop(request_id, None)
                stream.fail(error)

    def _deliver(self, outputs: list[RequestOutput], failed: list[str], error: str | None) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]
        for request_id in failed:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                self.counters.num_failed += 1
                stream.fail(EngineStepError(error or "engine step failed"))

    # --- engine thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        live: set[str] = set()  # requests inside the engine, seen from this thread
        while not self._stopping:
            try:
                if not self._drain(live, block=not self.engine.has_unfinished_requests()):
                    break
                if not self.engine.has_unfinished_requests():
                    continue
                outputs = self.engine.step()
                snapshot = [_snapshot(out) for out in outputs]
            except Exception as e:  # the loop outlives any engine error: only live requests fail
                self._fail_live(live, e)
                continue
            for out in outputs:
                if out.finished:
                    live.discard(out.request_id)
            self._refresh_stats()
            self._call(self._deliver, snapshot, [], None)

    def _drain(self, live: set[str], *, block: bool) -> bool:
        """Apply queued adds/aborts; False on shutdown."""
        results: list[tuple[str, BaseException | None]] = []
        try:
            cmd = self._commands.get(timeout=1.0) if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        try:
            while True:
                if cmd is None:
                    return False
                if isinstance(cmd, _Add):
                    results.append((cmd.request_id, self._add(cmd, live)))
                elif cmd.request_id in live:
                    live.discard(cmd.request_id)
                    self._abort(cmd.request_id)
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
        finally:
            self._refresh_stats()  # before the acks: num_waiting never undercounts
            if results:
                self._call(self._acknowledge, results)
        return True

    def _add(self, cmd: _Add, live: set[str]) -> BaseException | None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
        except (ValueError, TypeError) as e:
            return e
        except Exception as e:
            logger.exception("engine.add_request(%s) failed", cmd.request_id)
            return EngineStepError(f"{type(e).__name__}: {e}")
        live.add(cmd.request_id)
        return None

    def _fail_live(self, live: set[str], error: Exception) -> None:
        """A step raised: abort every request in the engine (frees their blocks) and fail them."""
        logger.exception("engine step failed; failing its %d requests", len(live))
        self.counters.num_step_errors += 1
        for request_id in live:
            self._abort(request_id)
        failed = list(live)
        live.clear()
        self._refresh_stats()
        self._call(self._deliver, [], failed, f"{type(error).__name__}: {error}")

    def _abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("engine.abort_request(%s) failed", request_id)

    def _refresh_stats(self) -> None:
        try:
            self.stats = self.engine.get_stats()
        except Exception:
            logger.exception("engine.get_stats() failed; /metrics keeps the previous figures")

    def _call(self, fn: Any, *args: Any) -> None:
        assert self._loop is not None
        # the loop closes during shutdown: then nobody is listening any more
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(fn, *args)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """A copy the event loop may read while the engine keeps appending to its own lists."""
    return RequestOutput(
        request_id=out.request_id,
        prompt_token_ids=out.prompt_token_ids,
        outputs=[
            CompletionOutput(
                index=c.index,
                text=c.text,
                token_ids=list(c.token_ids),
                finish_reason=c.finish_reason,
                logprobs=None if c.logprobs is None else list(c.logprobs),
                stop_reason=c.stop_reason,
            )
            for c in out.outputs
        ],
        finished=out.finished,
        num_cached_tokens=out.num_cached_tokens,
    )
