"""Scheduler + BlockManager: property tests with a fake model (no leaked or double-freed blocks,
ref counts equal to the block tables, K/V slots that read back the right tokens), and the policy:
decodes first, chunked prefill, FCFS admission, preemption of the newest sequence."""

from collections import Counter

from hypothesis import given, settings, target
from hypothesis import strategies as st

from aiinfra.infer.scheduler import Scheduler
from aiinfra.infer.sequence import SequenceStatus
from tests.infer.builders import FakeKV, fake_next_token, make_scheduler, make_sequence


def check_invariants(sched: Scheduler) -> None:
    bm = sched.block_manager
    refs = Counter(b for s in sched.running for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id], f"block {block.block_id} ref count"
    assert set(bm.free_queue) == {b.block_id for b in bm.blocks if b.ref_count == 0}
    for h, b in bm.hash_to_block.items():
        assert bm.blocks[b].block_hash == h
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        # between steps a table holds exactly the computed tokens
        assert len(s.block_table) == bm.num_blocks_for(s.num_computed_tokens)
        assert len(set(s.block_table)) == len(s.block_table)
    for s in sched.waiting:
        assert s.status is SequenceStatus.WAITING and not s.block_table
        assert s.num_computed_tokens == 0
    assert len(sched.running) <= sched.config.max_num_seqs


def step(sched: Scheduler, kv: FakeKV) -> list:
    batch = sched.schedule()
    assert batch.num_tokens <= sched.config.max_num_batched_tokens
    if sched.running:
        assert batch.seqs, "running sequences but nothing scheduled: a stall"
    tokens = kv.run(batch)
    sched.update(batch, tokens)
    return batch.seqs


# rounds of (requests to add, steps to run, request to abort): several requests arrive together
_request = st.tuples(
    st.lists(st.integers(0, 1), min_size=1, max_size=12),  # small alphabet: shared prefixes
    st.integers(1, 8),
)
rounds = st.lists(
    st.tuples(
        st.lists(_request, max_size=5),
        st.integers(0, 4),
        st.one_of(st.none(), st.integers(0, 50)),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    rounds=rounds,
    num_blocks=st.integers(4, 12),
    block_size=st.sampled_from([2, 4]),
    budget=st.integers(1, 24),
    max_num_seqs=st.integers(1, 6),
    prefix_caching=st.booleans(),
)
def test_any_add_step_abort_sequence_keeps_the_invariants(
    rounds, num_blocks, block_size, budget, max_num_seqs, prefix_caching
):
    sched = make_scheduler(num_blocks, block_size, max_num_seqs, budget, prefix_caching)
    kv = FakeKV(block_size)
    seqs = []
    for requests, num_steps, abort in rounds:
        for prompt, max_tokens in requests:
            # the engine rejects what could never fit: a lone sequence always fits
            if sched.block_manager.num_blocks_for(len(prompt) + max_tokens) > num_blocks:
                continue
            seqs.append(make_sequence(prompt, max_tokens))
            sched.add(seqs[-1])
        check_invariants(sched)
        for _ in range(num_steps):
            step(sched, kv)
            check_invariants(sched)
        if abort is not None and seqs:
            sched.finish(seqs[abort % len(seqs)], "abort")
            check_invariants(sched)
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        step(sched, kv)
        check_invariants(sched)
    assert not sched.has_unfinished(), "requests never finished"
    target(float(sched.num_preemptions), label="preemptions")  # steer towards memory pressure
    bm = sched.block_manager
    assert bm.usage == 0.0 and bm.num_free_blocks == num_blocks
    for s in seqs:
        assert s.is_finished
        if s.finish_reason == "length":
            assert s.num_output_tokens == s.max_tokens
            # outputs equal the fake model run without any cache
            ref = make_sequence(s.prompt_token_ids, s.max_tokens)
            while ref.num_output_tokens < ref.max_tokens:
                ref.token_ids.append(fake_next_token(ref))
            assert s.token_ids == ref.token_ids


def test_decodes_go_first_and_prefills_are_chunked():
    sched = make_scheduler(num_blocks=32, block_size=4, max_num_batched_tokens=5)
    kv = FakeKV(4)
    a = make_sequence([1] * 3, max_tokens=10)
    sched.add(a)
    step(sched, kv)  # a's whole prompt
    b = make_sequence([2] * 12, max_tokens=2)
    sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_scheduled_tokens == [1, 4]
    assert batch.is_sampling == [True, False]
    sched.update(batch, kv.run(batch))
    batch = sched.schedule()
    assert batch.num_scheduled_tokens == [1, 4]  # a's decode never waits for b's prompt


def test_fcfs_admission_and_max_num_seqs():
    sched = make_scheduler(num_blocks=32, max_num_seqs=2)
    seqs = [make_sequence([i] * 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    batch = sched.schedule()
    assert batch.seqs == seqs[:2]
    assert list(sched.waiting) == seqs[2:]


def test_preemption_picks_the_newest_and_requeues_it_first():
    sched = make_scheduler(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    kv = FakeKV(2)
    old, new = make_sequence([1, 1, 1], max_tokens=5), make_sequence([2, 2, 2], max_tokens=5)
    sched.add(old)
    sched.add(new)
    step(sched, kv)  # 2 blocks each: the cache is full
    step(sched, kv)  # position 3 still fits in each second block
    assert sched.num_preemptions == 0
    step(sched, kv)  # position 4 needs a third block: the newer sequence gives its blocks up
    assert sched.num_preemptions == 1
    assert sched.running == [old] and list(sched.waiting) == [new]
    assert new.num_computed_tokens == 0 and new.num_output_tokens == 2  # recomputed later
    assert old.num_computed_tokens == 5


def test_prefix_cache_hit_skips_computed_blocks_but_not_the_last_token():
    sched = make_scheduler(num_blocks=16, block_size=4)
    kv = FakeKV(4)
    first = make_sequence(list(range(8)), max_tokens=1)
    sched.add(first)
    step(sched, kv)
    assert first.is_finished
    same = make_sequence(list(range(8)), max_tokens=1)
    longer = make_sequence(list(range(10)), max_tokens=1)
    sched.add(same)
    sched.add(longer)
    batch = sched.schedule()
    # same: block 0 hit, block 1 recomputed (its last token must be computed to sample)
    assert same.num_cached_tokens == 4 and batch.num_scheduled_tokens[0] == 4
    assert longer.num_cached_tokens == 8 and batch.num_scheduled_tokens[1] == 2
    assert sched.block_manager.blocks[longer.block_table[0]].ref_count == 2
    sched.update(batch, kv.run(batch))
    assert sched.block_manager.hit_rate == (4 + 8) / (8 + 8 + 10)
