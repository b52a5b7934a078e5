"""Scheduler: continuous batching at iteration level under a token budget, with chunked prefill,
prefix-cache admission and preemption by recompute (Orca; vLLM's V1 scheduler)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from aiinfra.infer.block_manager import BlockManager
from aiinfra.infer.sequence import Sequence, SequenceStatus


@dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs ({self.max_num_seqs}) must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= 1")


@dataclass(slots=True)
class Batch:
    """One step's work: seqs[i] computes its next num_scheduled_tokens[i] tokens; those with
    is_sampling[i] have then computed all their tokens and sample the next one."""

    seqs: list[Sequence]
    num_scheduled_tokens: list[int]
    is_sampling: list[bool]
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """Owns the waiting queue and the running list; the only caller of the block manager.

    There is no prefill or decode phase. Each step spends a token budget: first one token for each
    running sequence that is decoding, then the remaining prompt (or recompute) tokens of running
    sequences mid-prefill, then new sequences from the waiting queue in FCFS order, each as many
    tokens as the budget leaves (chunked prefill: a long prompt never stalls the decodes). A
    waiting sequence is admitted only when its blocks fit. When a running sequence needs a block
    and none is free, the most recently admitted running sequence is preempted: its blocks are
    freed and it goes back to the front of the waiting queue, to be recomputed later (its cached
    blocks are often still in the prefix cache then).
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[int, int] = {}  # seq_id -> tokens, in schedule order
        num_preempted = 0
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted by an earlier sequence of this loop
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.append_slots(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                num_preempted += 1
                if victim is seq:
                    break
                budget += scheduled.pop(victim.seq_id, 0)
            if seq.status is SequenceStatus.RUNNING:
                scheduled[seq.seq_id] = num_new
                budget -= num_new
        if not num_preempted:
            budget = self._admit(budget, scheduled)
        by_id = {s.seq_id: s for s in self.running}
        seqs = [by_id[i] for i in scheduled]
        nums = list(scheduled.values())
        sampling = [
            s.num_computed_tokens + n == s.num_tokens for s, n in zip(seqs, nums, strict=True)
        ]
        self.num_preemptions += num_preempted
        return Batch(seqs, nums, sampling, num_preempted)

    def _admit(self, budget: int, scheduled: dict[int, int]) -> int:
        bm = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached = bm.find_cached_blocks(seq)
            num_cached = len(cached) * bm.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.allocate(seq, cached, num_new):
                break
            self.waiting.popleft()
            if seq.num_output_tokens == 0:
                seq.num_cached_tokens = num_cached
            seq.num_computed_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled[seq.seq_id] = num_new
            budget -= num_new
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self.waiting.appendleft(seq)

    def update(self, batch: Batch, token_ids: list[int]) -> list[Sequence]:
        """Advance each scheduled sequence; append the sampled tokens (token_ids[j] for the j-th
        sampling sequence). Returns the sequences that got a token; finished ones are freed."""
        progressed: list[Sequence] = []
        it = iter(token_ids)
        bm = self.block_manager
        for seq, n, sampling in zip(
            batch.seqs, batch.num_scheduled_tokens, batch.is_sampling, strict=True
        ):
            seq.num_computed_tokens += n
            bm.cache_blocks(seq)
            if not sampling:
                continue
            seq.append_token(next(it))
            progressed.append(seq)
            if seq.finish_reason is not None:
                self.finish(seq, seq.finish_reason, seq.stop_reason)
        return progressed

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """End a sequence (stop, length or abort) wherever it is, freeing its blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
