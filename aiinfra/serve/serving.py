"""The OpenAI endpoints' logic: prompts -> engine requests -> responses or SSE chunks.

Streaming sends one chunk per choice per step that produced tokens (even when the new tokens decode
to no text, so a client can count tokens and time each one). Text is held back while it could still
change: the last len(longest stop string) - 1 characters (a stop string may be completing, and the
engine then cuts it off) and a trailing U+FFFD (an incomplete UTF-8 sequence of a byte tokenizer).

Chat prompts are rendered (sandboxed jinja2, as HF) with the `chat_template` of the model folder's
tokenizer_config.json, else the default `models.tokenizer.DEFAULT_CHAT_TEMPLATE`: each message as
"<|role|>\\ncontent\\n", then "<|assistant|>\\n" to prompt the reply.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from aiinfra.infer.engine import CompletionOutput, RequestOutput
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.models.tokenizer import DEFAULT_CHAT_TEMPLATE
from aiinfra.serve import protocol
from aiinfra.serve.async_engine import (
    AsyncLLMEngine,
    EngineStepError,
    RequestAbortedError,
    RequestStream,
)
from aiinfra.serve.metrics import ServerMetrics
from aiinfra.serve.protocol import APIError, ChatCompletionRequest, ChatMessage, CompletionRequest

_FIELDS = tuple(SamplingParams.__dataclass_fields__)


def sampling_error(e: ValueError | TypeError, renames: dict[str, str] | None = None) -> APIError:
    """A 400 whose `param` is the field the message names (our errors start with the field name)."""
    message = str(e)
    head = message.split(" ", 1)[0]
    param = head if head in _FIELDS else None
    if param is not None and renames:
        param = renames.get(param, param)
    return APIError(400, message, param=param)


@dataclass(slots=True)
class _Choice:
    index: int
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    finished: bool = False


@dataclass(slots=True)
class _Delta:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None
    text_offset: int


def _take_delta(choice: _Choice, out: CompletionOutput, hold_back: int) -> _Delta | None:
    if choice.finished:
        return None
    text = out.text
    end = len(text)
    if out.finish_reason is None:
        end = min(len(text.rstrip("\ufffd")), len(text) - hold_back)
    start_tok = choice.num_sent_tokens
    new_ids = out.token_ids[start_tok:]
    delta_text = text[choice.num_sent_chars : end] if end > choice.num_sent_chars else ""
    if not new_ids and not delta_text and out.finish_reason is None:
        return None
    delta = _Delta(
        text=delta_text,
        token_ids=new_ids,
        logprobs=None if out.logprobs is None else out.logprobs[start_tok:],
        finish_reason=out.finish_reason,
        stop_reason=out.stop_reason,
        text_offset=choice.num_sent_chars,
    )
    choice.num_sent_tokens = len(out.token_ids)
    choice.num_sent_chars += len(delta_text)
    choice.finished = out.finish_reason is not None
    return delta


class OpenAIServing:
    """Turns parsed requests into engine requests and engine outputs into OpenAI bodies."""

    def __init__(
        self, engine: AsyncLLMEngine, metrics: ServerMetrics, *, served_model_name: str
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.model_name = served_model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len: int = engine.max_model_len
        template = getattr(self.tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self._chat_template = env.from_string(template)

    # --- prompts ----------------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"The model `{model}` does not exist (this server serves `{self.model_name}`).",
                param="model",
                code="model_not_found",
            )

    def completion_prompts(self, prompt: str | list[int] | list[str] | list[list[int]]) -> list:
        if isinstance(prompt, str):
            prompts: list = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [prompt]
        else:
            prompts = list(prompt)
        if not prompts:
            raise APIError(400, "prompt must not be empty", param="prompt")
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        if any(not p for p in ids):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return ids

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool) -> str:
        tok = self.tokenizer
        special = {
            "bos_token": "" if tok.bos_token_id is None else self._token_str(tok.bos_token_id),
            "eos_token": "" if tok.eos_token_id is None else self._token_str(tok.eos_token_id),
        }
        dicts = [{**m.model_dump(exclude_none=True), "content": m.text()} for m in messages]
        try:
            return self._chat_template.render(
                messages=dicts, add_generation_prompt=add_generation_prompt, **special
            )
        except jinja2.TemplateError as e:
            raise APIError(400, f"chat template: {e}", param="messages") from None

    def chat_prompt(self, req: ChatCompletionRequest | protocol.TokenizeRequest) -> list[int]:
        assert req.messages is not None
        ids = self.tokenizer.encode(self.render_chat(req.messages, req.add_generation_prompt))
        if not ids:
            raise APIError(400, "messages render to an empty prompt", param="messages")
        return ids

    async def start(self, prompts: list[list[int]], params: SamplingParams) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for ids in prompts:
                streams.append(await self.engine.generate(ids, params))
        except BaseException:
            for s in streams:
                self.engine.abort(s)
            raise
        return streams

    # --- collecting outputs -----------------------------------------------------------------------

    async def merged(
        self, streams: list[RequestStream], t0: float
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, output) of all streams as they come; records the latency histograms."""
        first_token: list[float | None] = [None] * len(streams)

        def record(i: int, out: RequestOutput) -> None:
            now = time.perf_counter()
            num_tokens = max((len(c.token_ids) for c in out.outputs), default=0)
            if first_token[i] is None and num_tokens:
                first_token[i] = now - t0
            if out.finished:
                self.metrics.observe(first_token[i], now - t0, num_tokens)

        if len(streams) == 1:
            while (out := await streams[0].next()) is not None:
                record(0, out)
                yield 0, out
            return
        pending = {asyncio.ensure_future(s.next()): i for i, s in enumerate(streams)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    i = pending.pop(task)
                    out = task.result()
                    if out is not None:
                        record(i, out)
                        yield i, out
                        pending[asyncio.ensure_future(streams[i].next())] = i
        finally:
            for task in pending:
                task.cancel()

    async def collect(self, streams: list[RequestStream], t0: float) -> list[RequestOutput]:
        final: list[RequestOutput | None] = [None] * len(streams)
        async for i, out in self.merged(streams, t0):
            final[i] = out
        assert all(f is not None for f in final)
        return final  # type: ignore[return-value]

    # --- completions ------------------------------------------------------------------------------

    def completion_response(
        self, req: CompletionRequest, outputs: list[RequestOutput]
    ) -> dict[str, Any]:
        choices, num_prompt, num_completion, num_cached = [], 0, 0, 0
        for i, ro in enumerate(outputs):
            num_prompt += len(ro.prompt_token_ids)
            num_cached += ro.num_cached_tokens
            for c in ro.outputs:
                num_completion += len(c.token_ids)
                choice = {
                    "index": i * req.n + c.index,
                    "text": c.text,
                    "logprobs": self._completion_logprobs(c.token_ids, c.logprobs, 0),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                if req.return_token_ids:
                    choice["prompt_token_ids"] = ro.prompt_token_ids
                    choice["token_ids"] = c.token_ids
                choices.append(choice)
        usage = protocol.usage(num_prompt, num_completion, num_cached)
        return protocol.completion_body(_id("cmpl"), self.model_name, choices, usage, chunk=False)

    async def completion_stream(
        self, req: CompletionRequest, streams: list[RequestStream], t0: float
    ) -> AsyncIterator[str]:
        request_id = _id("cmpl")
        hold_back = max((len(s) for s in _stops(req.stop)), default=1) - 1
        state = [[_Choice(i * req.n + j) for j in range(req.n)] for i in range(len(streams))]
        frame = _ChunkFrame(
            protocol.completion_body(request_id, self.model_name, [], None, chunk=True)
        )
        last: dict[int, RequestOutput] = {}
        async for i, out in self.merged(streams, t0):
            last[i] = out
            for c in out.outputs:
                d = _take_delta(state[i][c.index], c, hold_back)
                if d is None:
                    continue
                choice = {
                    "index": state[i][c.index].index,
                    "text": d.text,
                    "logprobs": self._completion_logprobs(d.token_ids, d.logprobs, d.text_offset),
                    "finish_reason": d.finish_reason,
                    "stop_reason": d.stop_reason,
                }
                if req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                yield frame.sse(choice)
        if req.include_usage:
            yield _sse(
                protocol.completion_body(
                    request_id, self.model_name, [], _usage_of(last.values()), chunk=True
                )
            )

    def _completion_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]] | None, offset: int
    ) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        tokens = [self._token_str(t) for t in token_ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [lp[t] for t, lp in zip(token_ids, logprobs, strict=True)],
            "top_logprobs": [self._top_dict(lp) for lp in logprobs],
            "text_offset": offsets,
        }

    # --- chat -------------------------------------------------------------------------------------

    def chat_response(self, req: ChatCompletionRequest, out: RequestOutput) -> dict[str, Any]:
        choices = []
        for c in out.outputs:
            choice = {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if req.return_token_ids:
                choice["prompt_token_ids"] = out.prompt_token_ids
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        usage = _usage_of([out])
        return protocol.chat_body(_id("chatcmpl"), self.model_name, choices, usage, chunk=False)

    async def chat_stream(
        self, req: ChatCompletionRequest, stream: RequestStream, t0: float
    ) -> AsyncIterator[str]:
        request_id = _id("chatcmpl")
        hold_back = max((len(s) for s in _stops(req.stop)), default=1) - 1
        state = [_Choice(j) for j in range(req.n)]
        frame = _ChunkFrame(protocol.chat_body(request_id, self.model_name, [], None, chunk=True))
        for j in range(req.n):
            role = {"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
            role["finish_reason"] = None
            yield _sse(protocol.chat_body(request_id, self.model_name, [role], None, chunk=True))
        last: RequestOutput | None = None
        async for _, out in self.merged([stream], t0):
            last = out
            for c in out.outputs:
                d = _take_delta(state[c.index], c, hold_back)
                if d is None:
                    continue
                choice = {
                    "index": c.index,
                    "delta": {"content": d.text} if d.text or d.finish_reason is None else {},
                    "logprobs": self._chat_logprobs(d.token_ids, d.logprobs, req.top_logprobs or 0),
                    "finish_reason": d.finish_reason,
                    "stop_reason": d.stop_reason,
                }
                if req.return_token_ids:
                    choice["token_ids"] = d.token_ids
                yield frame.sse(choice)
        if req.include_usage and last is not None:
            yield _sse(
                protocol.chat_body(request_id, self.model_name, [], _usage_of([last]), chunk=True)
            )

    def _chat_logprobs(
        self, token_ids: list[int], logprobs: list[dict[int, float]] | None, top: int
    ) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        content = []
        for t, lp in zip(token_ids, logprobs, strict=True):
            tok = self._token_str(t)
            content.append(
                {
                    "token": tok,
                    "logprob": lp[t],
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": s, "logprob": v, "bytes": list(s.encode())}
                        for s, v in ((self._token_str(i), v) for i, v in _ranked(lp)[:top])
                    ],
                }
            )
        return {"content": content}

    def _top_dict(self, lp: dict[int, float]) -> dict[str, float]:
        top: dict[str, float] = {}
        for t, v in _ranked(lp):
            # ids that decode to the same string share a key: keep the likelier one
            top.setdefault(self._token_str(t), v)
        return top

    def _token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


async def guard_stream(
    chunks: AsyncIterator[str], streams: list[RequestStream], abort: Callable[[RequestStream], None]
) -> AsyncIterator[str]:
    """SSE body: chunks, then [DONE]; an engine error becomes an error chunk; on exit (also a
    disconnect) requests still running are aborted."""
    try:
        async for chunk in chunks:
            yield chunk
    except EngineStepError as e:
        body = protocol.error_body(str(e), type="server_error", code="engine_error")
        yield _sse(body)
    except RequestAbortedError:
        return  # the client is gone: nothing to send, nothing to log
    finally:
        for s in streams:
            abort(s)  # a no-op for finished ones; frees the KV blocks of a disconnected client
    yield "data: [DONE]\n\n"


def _ranked(lp: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(lp.items(), key=lambda kv: -kv[1])


def _usage_of(outputs: Any) -> dict[str, Any]:
    outputs = list(outputs)
    return protocol.usage(
        sum(len(o.prompt_token_ids) for o in outputs),
        sum(len(c.token_ids) for o in outputs for c in o.outputs),
        sum(o.num_cached_tokens for o in outputs),
    )


def _stops(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=_COMPACT)}\n\n"


_COMPACT = (",", ":")


class _ChunkFrame:
    """The SSE event of a one-choice chunk, its fields other than the choice encoded once per
    request: at saturation the server writes an event per request per engine step."""

    def __init__(self, body: dict[str, Any]) -> None:
        assert body["choices"] == []
        text = json.dumps(body, separators=_COMPACT)
        at = text.index('"choices":[]') + len('"choices":[')
        self._head, self._tail = "data: " + text[:at], text[at:] + "\n\n"

    def sse(self, choice: dict[str, Any]) -> str:
        return self._head + json.dumps(choice, separators=_COMPACT) + self._tail


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)
