"""Builders for the engine tests: sequences of token ids and prompts, no model."""

import itertools
import random

from aiinfra.infer.block_manager import BlockManager
from aiinfra.infer.sampling_params import SamplingParams
from aiinfra.infer.scheduler import Batch, Scheduler, SchedulerConfig
from aiinfra.infer.sequence import Sequence

_ids = itertools.count()


def make_scheduler(
    num_blocks: int = 8,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 64,
    enable_prefix_caching: bool = True,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens
    )
    return Scheduler(config, bm)


def make_sequence(prompt: list[int], max_tokens: int = 4) -> Sequence:
    i = next(_ids)
    return Sequence(
        seq_id=i,
        request_id=f"r{i}",
        index=0,
        prompt_token_ids=list(prompt),
        params=SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        eos_token_id=None,
        max_tokens=max_tokens,
    )


def fake_next_token(seq: Sequence, vocab: int = 3) -> int:
    """A deterministic 'model': the next token depends only on the tokens so far (like greedy),
    so sequences with equal prefixes produce equal blocks and hit the cache."""
    return (sum(seq.token_ids[-3:]) * 31 + len(seq.token_ids)) % vocab


class FakeKV:
    """Slot -> the token id written there. `run` writes each scheduled token at its slot, then
    checks that every position 0..p of the sequence reads back its own token, as attention would:
    a wrong prefix-cache hit, a block shared and then overwritten, or a stale table all fail."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.slots: dict[int, int] = {}

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def run(self, batch: Batch) -> list[int]:
        for seq, n in zip(batch.seqs, batch.num_scheduled_tokens, strict=True):
            start = seq.num_computed_tokens
            assert n > 0 and start + n <= seq.num_tokens
            for pos in range(start, start + n):
                self.slots[self._slot(seq, pos)] = seq.token_ids[pos]
        for seq, n in zip(batch.seqs, batch.num_scheduled_tokens, strict=True):
            for pos in range(seq.num_computed_tokens + n):
                assert self.slots.get(self._slot(seq, pos)) == seq.token_ids[pos], (
                    f"seq {seq.seq_id} position {pos} reads another token's K/V"
                )
        return [
            fake_next_token(s)
            for s, sampling in zip(batch.seqs, batch.is_sampling, strict=True)
            if sampling
        ]


def random_prompts(seed: int, n: int, lo: int, hi: int) -> list[list[int]]:
    """n seeded prompts of byte ids, lengths in [lo, hi]."""
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
