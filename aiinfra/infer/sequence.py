"""Request and Sequence state: token ids, status, block table and how many tokens the cache holds.

A Request owns `params.n` Sequences (one per completion). The scheduler moves sequences between
states and counts computed tokens; only the block manager writes `block_table` and `block_hashes`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from aiinfra.infer.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    """One completion being generated; `num_computed_tokens` of its tokens have K/V in the cache.

    There is no prefill or decode phase: each step computes some of the tokens not yet computed;
    when all known tokens are computed the step samples the next one.
    """

    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_id: int | None  # None when params.ignore_eos
    max_tokens: int  # resolved: params.max_tokens or what the context limit leaves
    token_ids: list[int] = field(init=False)  # prompt + output
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks
    num_registered_blocks: int = 0  # leading blocks of block_table already offered to the cache
    generator: torch.Generator | None = None  # per-sequence RNG when params.seed is set
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, float]] | None = None
    # incremental detokenization state (the engine's): text so far and the offsets it came from
    text: str = ""
    prefix_offset: int = 0
    read_offset: int = 0
    stop_checked_len: int = 0

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and set finish_reason if it ends the sequence (token-level stops;
        stop strings are checked by the engine on the detokenized text)."""
        self.token_ids.append(token_id)
        n_out = len(self.token_ids) - len(self.prompt_token_ids)
        if n_out >= self.max_tokens:
            self.finish_reason = "length"
        if n_out < self.params.min_tokens:
            return
        if token_id == self.eos_token_id:
            self.finish_reason, self.stop_reason = "stop", None
        elif self.params.stop_token_ids and token_id in self.params.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token_id


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    arrival_index: int

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)
