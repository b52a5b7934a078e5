"""SamplingParams: how one request is decoded (OpenAI's ranges; temperature 0 means greedy)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Per-request decoding parameters.

    `top_k` 0 or -1 disables top-k; `max_tokens=None` generates up to the context limit; `seed`
    makes this request's sampling reproducible whatever else is in the batch; `logprobs=k` returns
    the chosen token's log-probability and the top k of the model's distribution per step.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True  # False skips text (benchmarks compare token throughput, as vLLM's)

    def __post_init__(self) -> None:
        _check_int("n", self.n, lo=1)
        _check_range("temperature", self.temperature, 0.0, 2.0)
        if not 0.0 < _as_float("top_p", self.top_p) <= 1.0:
            raise ValueError(f"top_p ({self.top_p}) must be in (0, 1]")
        _check_int("top_k", self.top_k, lo=-1)
        _check_range("min_p", self.min_p, 0.0, 1.0)
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if _as_float("repetition_penalty", self.repetition_penalty) <= 0.0:
            raise ValueError(f"repetition_penalty ({self.repetition_penalty}) must be positive")
        if self.seed is not None:
            _check_int("seed", self.seed, lo=None)
        if self.stop is not None and (
            isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop)
        ):
            raise TypeError(f"stop ({self.stop!r}) must be a list of non-empty strings")
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                _check_int("stop_token_ids", t, lo=0)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, lo=1)
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, lo=0)
            if self.logprobs > 20:
                raise ValueError(f"logprobs ({self.logprobs}) must be in [0, 20]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} ({value!r}) must be a number")
    return float(value)


def _check_range(name: str, value: object, lo: float, hi: float) -> None:
    if not lo <= _as_float(name, value) <= hi:
        raise ValueError(f"{name} ({value}) must be in [{lo:g}, {hi:g}]")


def _check_int(name: str, value: object, *, lo: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} ({value!r}) must be an integer")
    if lo is not None and value < lo:
        raise ValueError(f"{name} ({value}) must be >= {lo}")
