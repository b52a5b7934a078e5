"""BlockManager: reference counts, LRU reuse of cached free blocks, eviction order, hash checks."""

import pytest

from aiinfra.infer.block_manager import BlockManager
from tests.infer.builders import make_sequence


def _admit(bm: BlockManager, tokens: list[int]):
    seq = make_sequence(tokens)
    cached = bm.find_cached_blocks(seq)
    assert bm.allocate(seq, cached, len(tokens) - len(cached) * bm.block_size)
    seq.num_computed_tokens = len(tokens)
    bm.cache_blocks(seq)
    return seq, len(cached)


def test_freed_cached_blocks_are_hit_until_evicted():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, _ = _admit(bm, [1, 2, 3, 4, 5])  # 3 blocks, 2 full ones registered
    table = list(a.block_table)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    b, hits = _admit(bm, [1, 2, 3, 4, 9])
    assert hits == 2 and b.block_table[:2] == table[:2]
    bm.free(b)
    # fill the pool with unrelated tokens: the cached blocks are evicted, LRU order
    c, hits = _admit(bm, [7, 7, 7, 7, 7, 7, 7, 7])
    assert hits == 0 and bm.num_free_blocks == 0
    bm.free(c)
    d, hits = _admit(bm, [1, 2, 3, 4, 5])
    assert hits == 0


def test_unhashed_blocks_are_evicted_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, _ = _admit(bm, [1, 2])  # one full block, registered
    a_table = list(a.block_table)
    bm.free(a)
    b, _ = _admit(bm, [5])  # a partial block: never registered
    bm.free(b)  # freed last, but worthless: it goes to the front of the eviction order
    _admit(bm, [7, 7, 7])  # takes two of the three free blocks
    assert bm.find_cached_blocks(make_sequence([1, 2, 3])) == a_table


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=2)
    seq = make_sequence([1, 2, 3, 4, 5])
    assert not bm.allocate(seq, [], 5)
    assert seq.block_table == [] and bm.num_free_blocks == 2
    assert bm.allocate(seq, [], 4)
    seq.num_computed_tokens = 4
    assert not bm.append_slots(seq, 1)
    assert len(seq.block_table) == 2


def test_hash_hit_is_verified_against_the_tokens():
    bm = BlockManager(num_blocks=8, block_size=2)
    a, _ = _admit(bm, [1, 2, 3, 4, 5])
    # simulate a hash collision: the registered block claims other tokens
    bm.blocks[a.block_table[0]].token_ids = (9, 9)
    b = make_sequence([1, 2, 3, 4, 5])
    assert bm.find_cached_blocks(b) == []


def test_double_free_is_caught():
    bm = BlockManager(num_blocks=2, block_size=2)
    seq, _ = _admit(bm, [1, 2])
    table = list(seq.block_table)
    bm.free(seq)
    seq.block_table = table
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(seq)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a, _ = _admit(bm, [1, 2, 3, 4, 5])
    bm.free(a)
    _, hits = _admit(bm, [1, 2, 3, 4, 5])
    assert hits == 0 and bm.hit_rate == 0.0


def test_bad_sizes():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)
