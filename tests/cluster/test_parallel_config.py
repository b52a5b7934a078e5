"""ParallelConfig (aiinfra/parallel/config.py): validation and derived values."""

import pytest

from aiinfra.parallel.config import ParallelConfig


def test_derived_values():
    p = ParallelConfig(dp=4, tp=2, pp=2, micro_batch_size=2, global_batch_size=64, seq_len=128)
    assert p.world_size == 16 and p.num_micro_batches == 8 and p.tokens_per_step == 64 * 128
    assert ParallelConfig(dp=3, micro_batch_size=2).batch_size == 6


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dp": 0}, "dp"),
        ({"tp": 1.5}, "tp"),
        ({"zero_stage": 4}, "zero_stage"),
        ({"recompute": "some"}, "recompute"),
        ({"dp": 4, "global_batch_size": 6}, "global_batch_size"),
        ({"interleave": 2}, "interleave"),
        ({"pp": 4, "interleave": 2, "global_batch_size": 6}, "interleave"),
        ({"seq_len": -1}, "seq_len"),
    ],
)
def test_invalid(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ParallelConfig(**kwargs)


def test_sequence_parallel_must_be_bool():
    with pytest.raises(TypeError, match="sequence_parallel"):
        ParallelConfig(sequence_parallel="yes")  # type: ignore[arg-type]
