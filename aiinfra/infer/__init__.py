"""The LLM engine: paged KV cache, continuous batching, chunked prefill, prefix caching."""

from aiinfra.infer.engine import (
    LLM,
    CompletionOutput,
    EngineConfig,
    EngineStats,
    LLMEngine,
    RequestOutput,
)
from aiinfra.infer.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "EngineStats",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
]
