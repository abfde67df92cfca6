"""The block manager and the scheduler over integers only: admission, chunked prefill, prefix reuse,
preemption, cancellation, and the integrity of every block after every step."""

import random

import pytest

from ds4.engine.blocks import BlockManager, block_hash
from ds4.engine.scheduler import Scheduler, Sequence


def make(num_blocks=8, block_size=4, max_seqs=4, budget=16, caching=True):
    blocks = BlockManager(num_blocks, block_size, b"model", enable_prefix_caching=caching)
    return blocks, Scheduler(blocks, max_seqs, budget)


def run_step(sched: Scheduler, finished_after: dict[int, int] | None = None):
    """One engine step with a fake model: every sequence that completed its tokens gets token 7."""
    batch = sched.schedule()
    sched.advance(batch)
    for seq, _ in batch.entries:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(7)
            if finished_after and seq.num_tokens - seq.num_prompt_tokens >= finished_after[seq.seq_id]:
                sched.finish(seq)
    sched.check_integrity()
    return batch


def test_chunked_prefill_respects_the_token_budget():
    _, sched = make(budget=5)
    sched.add(Sequence(0, list(range(12)), 12))
    sizes = [run_step(sched).entries[0][1] for _ in range(4)]
    assert sizes == [5, 5, 2, 1]  # two chunks, the rest, then decodes


def test_decodes_and_a_prefill_share_a_step():
    _, sched = make(budget=6)
    sched.add(Sequence(0, [1, 2, 3], 3))
    run_step(sched)
    sched.add(Sequence(1, list(range(10, 20)), 10))
    batch = run_step(sched)
    assert [(s.seq_id, n) for s, n in batch.entries] == [(0, 1), (1, 5)]


def test_prefix_hit_reuses_whole_blocks_and_leaves_one_token_to_compute():
    blocks, sched = make()
    prompt = list(range(10))  # blocks [0..3] [4..7] + 2 tokens
    sched.add(Sequence(0, list(prompt), 10))
    run_step(sched, {0: 1})  # prefill, one token, finished: its 2 full blocks stay cached
    assert blocks.num_free_blocks == 8 and len(blocks.cached) == 2
    again = Sequence(1, prompt + [99], 11)
    sched.add(again)
    batch = run_step(sched)
    assert again.num_cached_tokens == 8 and batch.entries[0][1] == 3
    exact = Sequence(2, list(range(8)), 8)  # all 8 tokens cached: the last block is recomputed
    sched.add(exact)
    run_step(sched)
    assert exact.num_cached_tokens == 4


def test_hits_are_verified_against_token_ids_not_just_hashes():
    blocks, sched = make()
    sched.add(Sequence(0, list(range(9)), 9))
    run_step(sched, {0: 1})
    # forge: a different block under the first block's hash must not be served
    first = blocks.blocks[blocks.hash_to_block[block_hash(b"", (0, 1, 2, 3), b"model")]]
    first.token_ids = (9, 9, 9, 9)
    assert blocks.match_prefix(list(range(9)), 8) == []


def test_lru_evicts_unreferenced_blocks_when_space_is_needed():
    blocks, sched = make(num_blocks=4)
    sched.add(Sequence(0, list(range(8)), 8))
    run_step(sched, {0: 1})  # 2 named blocks cached, 1 more freed
    assert len(blocks.cached) == 2
    sched.add(Sequence(1, list(range(100, 115)), 15))  # needs all 4 blocks
    run_step(sched)
    assert len(blocks.cached) == 0 and blocks.num_free_blocks == 0


def test_preemption_recomputes_and_everything_finishes():
    blocks, sched = make(num_blocks=6, block_size=4, max_seqs=3, budget=64)
    for i in range(3):
        sched.add(Sequence(i, [i] * 6, 6))  # 2 blocks each at first, growing as they decode
    preempted = 0
    for _ in range(200):
        if not sched.has_unfinished:
            break
        batch = run_step(sched, {0: 8, 1: 8, 2: 8})
        preempted += len(batch.preempted)
    assert not sched.has_unfinished and preempted > 0
    assert len(blocks.free_ids) + len(blocks.cached) == 6


def test_more_requests_than_blocks_all_complete():
    rng = random.Random(0)
    blocks, sched = make(num_blocks=10, block_size=4, max_seqs=5, budget=12)
    seqs = [Sequence(i, [rng.randrange(50) for _ in range(rng.randrange(1, 14))], 0) for i in range(25)]
    for s in seqs:
        s.num_prompt_tokens = s.num_tokens
        sched.add(s)
    limits = {s.seq_id: rng.randrange(1, 9) for s in seqs}
    for _ in range(2000):
        if not sched.has_unfinished:
            break
        run_step(sched, limits)
    assert all(s.status == "finished" for s in seqs)
    assert all(s.num_tokens - s.num_prompt_tokens == limits[s.seq_id] for s in seqs)
    assert len(blocks.free_ids) + len(blocks.cached) == 10


def test_cancellation_frees_blocks():
    blocks, sched = make()
    seq = Sequence(0, list(range(10)), 10)
    sched.add(seq)
    run_step(sched)
    sched.finish(seq)
    sched.check_integrity()
    assert blocks.num_free_blocks == 8 and not sched.has_unfinished


def test_without_prefix_caching_nothing_is_named():
    blocks, sched = make(caching=False)
    sched.add(Sequence(0, list(range(9)), 9))
    run_step(sched, {0: 1})
    assert not blocks.cached and not blocks.hash_to_block and len(blocks.free_ids) == 8


def test_integrity_check_catches_a_leak():
    blocks, sched = make()
    sched.add(Sequence(0, list(range(5)), 5))
    run_step(sched)
    blocks.free_ids.append(blocks.free_ids[0])
    with pytest.raises(AssertionError):
        sched.check_integrity()
