"""EngineCore: the loop that owns and steps one LLMEngine, in its own process (as vLLM V1's
EngineCore) so that the model's Python never waits on the HTTP server's GIL; a thread for tests.

The core reads adds and aborts from a pipe between steps (blocking only while it has no work) and
sends back ONE message per step: acknowledgements of the adds, each request's new token ids, text
and logprobs since the last message (deltas, not cumulative lists), the requests that failed, and
the engine stats /metrics shows. A core exits when its parent goes away (EOF on the pipe).

A step that raises fails only the request that makes it raise, found by retrying (vLLM aborts
everything instead). A request that has sent nothing yet can be aborted and re-added without the
client noticing, so after a failure the core takes those "fresh" requests out (quarantine), retries
the step with the others, and puts the fresh ones back half a group at a time: a group whose step
raises is split again, down to the one request that is failed. A group is cleared once each member
has produced a token. When only requests that already streamed tokens remain, the newest is failed
and the step retried, until a step succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import astuple, dataclass
from multiprocessing.connection import Connection
from typing import Any

from aiinfra.infer.engine import EngineConfig, EngineStats, LLMEngine, RequestOutput
from aiinfra.infer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# What one step reports for one request: (request_id, finished, num_cached_tokens, completions),
# each completion (index, new token ids, keep, text, finish_reason, stop_reason, new logprobs): the
# text so far is the previous text cut to `keep` characters (a stop string may cut it) + `text`.
Completion = tuple[int, list[int], int, str, str | None, int | str | None, list | None]
Delta = tuple[str, bool, int, list[Completion]]
# an add's acknowledgement: (request_id, None) or (request_id, (error kind, message))
Ack = tuple[str, tuple[str, str] | None]


@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(slots=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True)
class CoreReady:
    max_model_len: int
    vocab_size: int
    stats: EngineStats


@dataclass(slots=True)
class CoreStartupError:
    kind: str  # the exception's class name
    message: str


@dataclass(slots=True)
class StepReport:
    """One step (or one batch of adds while idle), as the API process sees it."""

    acks: list[Ack]
    deltas: list[Delta]
    failed: list[tuple[str, str]]  # (request_id, error message)
    stats: tuple  # astuple(EngineStats)
    num_step_errors: int


@dataclass(slots=True)
class _Tracked:
    add: AddRequest
    num_sent_tokens: list[int]  # per completion index
    num_sent_chars: list[int]
    num_sent_logprobs: list[int]
    in_engine: bool = True

    @property
    def is_fresh(self) -> bool:
        return not any(self.num_sent_tokens)


class EngineCore:
    """Owns the engine; `run(commands, send)` serves until shutdown or EOF."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.num_step_errors = 0
        self._requests: dict[str, _Tracked] = {}  # in the engine or quarantined, in add order
        self._quarantine: deque[list[str]] = deque()  # groups waiting to be re-added
        self._probe: list[str] | None = None  # the re-added group, until each member has a token
        self._suspect: list[str] | None = None  # taken out while the others retry the step alone
        self._suspect_error = ""
        self._arrivals: list[str] | None = None  # newcomers during isolation, the last group
        self._acks: list[Ack] = []
        self._failed: list[tuple[str, str]] = []

    @property
    def is_busy(self) -> bool:
        return self.engine.has_unfinished_requests() or self._is_isolating

    @property
    def _is_isolating(self) -> bool:
        return bool(self._quarantine) or self._probe is not None or self._suspect is not None

    def run(self, commands: Connection, send: Callable[[Any], None]) -> None:
        while True:
            num_applied = self._apply_commands(commands, block=not self.is_busy)
            if num_applied < 0:
                return
            if self.is_busy:
                send(self._report(self._step()))
            elif num_applied:
                send(self._report([]))  # acks, and stats after aborts

    # --- commands ------------------------------------------------------------------------------

    def _apply_commands(self, commands: Connection, *, block: bool) -> int:
        """Apply every queued command; how many, or -1 on shutdown or when the parent is gone."""
        try:
            cmds = [commands.recv()] if block else []
            while commands.poll():
                cmds.append(commands.recv())
        except (EOFError, OSError):
            return -1
        for cmd in cmds:
            if cmd is None:
                return -1
            if isinstance(cmd, AddRequest):
                self._add(cmd)
            else:
                self._abort(cmd.request_id)
        return len(cmds)

    def _add(self, cmd: AddRequest) -> None:
        error = self._engine_add(cmd)
        self._acks.append((cmd.request_id, error))
        if error is not None:
            return
        n = cmd.params.n
        self._requests[cmd.request_id] = _Tracked(cmd, [0] * n, [0] * n, [0] * n)
        if self._is_isolating:  # newcomers wait their turn, as a group of their own
            self._take_out([cmd.request_id])
            if not self._quarantine or self._quarantine[-1] is not self._arrivals:
                self._arrivals = []
                self._quarantine.append(self._arrivals)
            self._arrivals.append(cmd.request_id)

    def _engine_add(self, cmd: AddRequest) -> tuple[str, str] | None:
        try:
            self.engine.add_request(cmd.request_id, cmd.prompt_token_ids, cmd.params)
        except (ValueError, TypeError) as e:
            return (type(e).__name__, str(e))
        except Exception as e:
            logger.exception("engine.add_request(%s) failed", cmd.request_id)
            return ("EngineError", f"{type(e).__name__}: {e}")
        return None

    def _abort(self, request_id: str) -> None:
        tracked = self._requests.pop(request_id, None)
        if tracked is not None and tracked.in_engine:
            self._engine_abort(request_id)

    def _engine_abort(self, request_id: str) -> None:
        try:
            self.engine.abort_request(request_id)
        except Exception:
            logger.exception("engine.abort_request(%s) failed", request_id)

    # --- the step ------------------------------------------------------------------------------

    def _step(self) -> list[RequestOutput]:
        if self._suspect is None and self._probe is None and self._quarantine:
            self._put_back(self._quarantine.popleft())
        if not self.engine.has_unfinished_requests():
            if self._suspect is not None:  # the others left: nothing to retry without it
                self._isolate(self._take_suspect(), "engine step failed")
            return []
        try:
            outputs = self.engine.step()
        except Exception as e:
            self._on_step_error(e)
            return []
        if self._suspect is not None:  # the others stepped fine without the suspects
            self._isolate(self._take_suspect(), self._suspect_error)
        if self._probe is not None:
            left = [r for r in self._probe if (t := self._requests.get(r)) and t.is_fresh]
            self._probe = left or None
        return outputs

    def _put_back(self, group: list[str]) -> None:
        probe = []
        for request_id in group:
            tracked = self._requests.get(request_id)
            if tracked is None:
                continue  # aborted while quarantined
            error = self._engine_add(tracked.add)
            if error is not None:
                self._fail(request_id, error[1])
                continue
            tracked.in_engine = True
            probe.append(request_id)
        self._probe = probe or None

    def _on_step_error(self, error: Exception) -> None:
        self.num_step_errors += 1
        message = f"{type(error).__name__}: {error}"
        live = [r for r, t in self._requests.items() if t.in_engine]
        logger.exception("engine step failed (%d requests in the engine)", len(live))
        fresh = [r for r in live if self._requests[r].is_fresh]
        streamed = [r for r in live if not self._requests[r].is_fresh]
        self._probe = None
        if self._suspect is not None or not fresh:  # it raises without any fresh request
            if streamed:
                self._fail(streamed[-1], message)
        elif streamed:  # retry the others alone first
            self._take_out(fresh)
            self._suspect, self._suspect_error = fresh, message
        else:
            self._isolate(fresh, message)

    def _take_suspect(self) -> list[str]:
        assert self._suspect is not None
        group, self._suspect = self._suspect, None
        return [r for r in group if r in self._requests]

    def _isolate(self, group: list[str], message: str) -> None:
        """`group`'s step raised: fail it if it is one request, else retry its halves."""
        if len(group) == 1:
            self._fail(group[0], message)
        elif group:
            self._take_out(group)
            self._quarantine.extendleft(reversed(_halves(group)))

    def _take_out(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            tracked = self._requests[request_id]
            if tracked.in_engine:
                tracked.in_engine = False
                self._engine_abort(request_id)

    def _fail(self, request_id: str, message: str) -> None:
        logger.error("request %s failed: %s", request_id, message)
        self._abort(request_id)
        self._failed.append((request_id, message))

    # --- the report ----------------------------------------------------------------------------

    def _report(self, outputs: list[RequestOutput]) -> StepReport:
        deltas = [d for out in outputs if (d := self._delta(out)) is not None]
        try:
            stats = self.engine.get_stats()
        except Exception:
            logger.exception("engine.get_stats() failed")
            stats = EngineStats(0, 0, 0.0, 0.0, 0, 0, 0, 0, 0)
        num_quarantined = sum(not t.in_engine for t in self._requests.values())
        stats.num_waiting += num_quarantined
        report = StepReport(self._acks, deltas, self._failed, astuple(stats), self.num_step_errors)
        self._acks, self._failed = [], []
        return report

    def _delta(self, out: RequestOutput) -> Delta | None:
        tracked = self._requests.get(out.request_id)
        if tracked is None:
            return None  # aborted by its client in the meantime
        completions: list[Completion] = []
        for c in out.outputs:
            i = c.index
            keep = min(tracked.num_sent_chars[i], len(c.text))
            new_ids = c.token_ids[tracked.num_sent_tokens[i] :]
            logprobs = None
            if c.logprobs is not None:
                logprobs = c.logprobs[tracked.num_sent_logprobs[i] :]
                tracked.num_sent_logprobs[i] = len(c.logprobs)
            text = c.text[keep:]
            completions.append((i, new_ids, keep, text, c.finish_reason, c.stop_reason, logprobs))
            tracked.num_sent_tokens[i] = len(c.token_ids)
            tracked.num_sent_chars[i] = len(c.text)
        if out.finished:
            del self._requests[out.request_id]
        return (out.request_id, out.finished, out.num_cached_tokens, completions)


def _halves(group: list[str]) -> list[list[str]]:
    mid = (len(group) + 1) // 2
    return [g for g in (group[:mid], group[mid:]) if g]


# --- the core process ---------------------------------------------------------------------------


def run_engine_core(
    engine_cls: type[LLMEngine],
    config: EngineConfig,
    commands: Connection,
    outputs: Connection,
    log_level: int = logging.INFO,
) -> None:
    """The core process's main: build the engine, report ready (or the error), serve."""
    # Ctrl-C reaches the whole process group: the API process shuts the core down cleanly
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fmt = "%(asctime)s %(levelname)s %(name)s[core]: %(message)s"
    logging.basicConfig(level=log_level, format=fmt)
    try:
        engine = engine_cls(config)
    except Exception as e:
        logger.exception("engine core failed to start")
        with contextlib.suppress(OSError):
            outputs.send(CoreStartupError(type(e).__name__, str(e)))
        return
    with contextlib.suppress(OSError):  # the parent may be gone already
        outputs.send(
            CoreReady(engine.max_model_len, engine.model_config.vocab_size, engine.get_stats())
        )
        EngineCore(engine).run(commands, outputs.send)
    logger.info("engine core exits")


class EngineStartupError(RuntimeError):
    """The engine core could not build its engine (the message names the cause)."""


_STARTUP_ERRORS: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "FileNotFoundError": FileNotFoundError,
}


@dataclass
class CoreHandle:
    """The API side of a started core: its two pipe ends, what it reported, and how to stop it."""

    commands: Connection  # send AddRequest / AbortRequest / None
    outputs: Connection  # recv StepReport
    ready: CoreReady
    pid: int | None  # None: a thread of this process
    _wait: Callable[[float], bool]  # join for up to so many seconds; True once it exited
    _kill: Callable[[], None]

    def close(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(OSError):
            self.commands.send(None)
        deadline = time.monotonic() + timeout_s
        # drain: a core blocked writing a report to a full pipe would never read the None
        with contextlib.suppress(EOFError, OSError):
            while not self._wait(0.0) and time.monotonic() < deadline:
                if self.outputs.poll(0.05):
                    self.outputs.recv()
        if not self._wait(0.0):
            logger.warning("engine core did not exit within %.0f s: killed", timeout_s)
            self._kill()
        self.commands.close()
        self.outputs.close()


def start_core_process(
    config: EngineConfig,
    engine_cls: type[LLMEngine] = LLMEngine,
    *,
    startup_timeout_s: float = 600.0,
) -> CoreHandle:
    """Spawn the engine core and wait until its engine is built; its startup error is raised
    here (ValueError, FileNotFoundError, ... as in the core, else EngineStartupError)."""
    ctx = mp.get_context("spawn")
    cmd_recv, cmd_send = ctx.Pipe(duplex=False)
    out_recv, out_send = ctx.Pipe(duplex=False)
    log_level = logging.getLogger().getEffectiveLevel()
    args = (engine_cls, config, cmd_recv, out_send, log_level)
    proc = ctx.Process(target=run_engine_core, args=args, name="aiinfra-engine-core", daemon=True)
    proc.start()
    cmd_recv.close()  # the core holds these now: EOF then means the core is gone
    out_send.close()

    def wait(timeout_s: float) -> bool:
        proc.join(timeout_s)
        return not proc.is_alive()

    def kill() -> None:
        proc.kill()
        proc.join(5.0)

    try:
        ready = _wait_ready(out_recv, proc, startup_timeout_s)
    except BaseException:
        if not wait(5.0):
            kill()
        cmd_send.close()
        out_recv.close()
        raise
    return CoreHandle(cmd_send, out_recv, ready, proc.pid, wait, kill)


def _wait_ready(outputs: Connection, proc: Any, timeout_s: float) -> CoreReady:
    deadline = time.monotonic() + timeout_s
    while not outputs.poll(0.1):
        if time.monotonic() > deadline:
            raise EngineStartupError(f"engine core did not start within {timeout_s:.0f} s")
    try:
        msg = outputs.recv()
    except EOFError:
        proc.join(5.0)
        hint = " (killed: out of memory?)" if proc.exitcode == -9 else " (its log says why)"
        raise EngineStartupError(
            f"engine core exited with code {proc.exitcode} while starting{hint}"
        ) from None
    if isinstance(msg, CoreStartupError):
        cls = _STARTUP_ERRORS.get(msg.kind, EngineStartupError)
        text = msg.message if cls is not EngineStartupError else f"{msg.kind}: {msg.message}"
        raise cls(f"engine core failed to start: {text}")
    assert isinstance(msg, CoreReady), msg
    return msg


def start_core_thread(engine: LLMEngine) -> CoreHandle:
    """The same core on a thread of this process, over the same pipes (tests, debugging)."""
    cmd_recv, cmd_send = mp.Pipe(duplex=False)
    out_recv, out_send = mp.Pipe(duplex=False)

    def main() -> None:
        try:
            EngineCore(engine).run(cmd_recv, out_send.send)
        except OSError:
            pass  # the API side closed its ends first
        finally:
            out_send.close()
            cmd_recv.close()

    thread = threading.Thread(target=main, name="engine-core", daemon=True)
    ready = CoreReady(engine.max_model_len, engine.model_config.vocab_size, engine.get_stats())
    thread.start()

    def wait(timeout_s: float) -> bool:
        thread.join(timeout_s)
        return not thread.is_alive()

    def cannot_kill() -> None:
        pass  # a daemon thread: it dies with the process

    return CoreHandle(cmd_send, out_recv, ready, None, wait, cannot_kill)
