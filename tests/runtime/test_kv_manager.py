"""Tests of runtime/kv_manager.py: block tables, admission from the prefix cache, registration, stats."""
import dataclasses

import pytest

from runtime.kv_manager import KVCacheManager


@dataclasses.dataclass(eq=False)
class Req:
    """What the manager needs of a request."""

    request_id: str
    token_ids: list
    num_computed_tokens: int = 0
    block_ids: list = dataclasses.field(default_factory=list)
    block_ids_w: list = dataclasses.field(default_factory=list)  # a second KV group's table (sliding windows)
    block_hashes: list = dataclasses.field(default_factory=list)
    num_preemptions: int = 0


def run(kv, req, num_new, lookahead=0):
    """Play scheduler + step for a running request: grow, compute num_new tokens, register full blocks."""
    assert kv.allocate_for(req, num_new, lookahead)
    req.num_computed_tokens += num_new
    kv.cache_full_blocks(req)


def admit(kv, req, budget=1000):
    blocks = kv.get_computed_blocks(req)
    num_new = min(len(req.token_ids) - len(blocks) * kv.block_size, budget)
    if not kv.allocate_for(req, num_new, computed_blocks=blocks):
        return None
    start = req.num_computed_tokens
    req.num_computed_tokens += num_new
    kv.cache_full_blocks(req)
    return start, num_new


PROMPT = list(range(100, 110))  # 10 tokens: blocks of 4 -> 2 full blocks + 2 tokens


def test_admission_starts_after_the_cached_full_blocks_and_never_takes_the_last_token():
    kv = KVCacheManager(16, 4)
    a = Req("a", list(PROMPT))
    assert kv.get_computed_prefix(a) == 0
    assert admit(kv, a) == (0, 10) and a.block_ids == [0, 1, 2]
    assert kv.pool.num_cached_blocks == 2  # the partial third block is not cached

    b = Req("b", PROMPT[:8] + [7, 7, 7])  # shares both full blocks
    assert kv.get_computed_prefix(b) == 8
    assert admit(kv, b) == (8, 3) and b.block_ids == [0, 1, 3]
    assert [kv.pool.ref_count(i) for i in range(4)] == [2, 2, 1, 1]

    c = Req("c", PROMPT[:8])  # the whole prompt is cached: its last block is recomputed for the logits
    assert kv.get_computed_prefix(c) == 4
    assert admit(kv, c) == (4, 4) and c.block_ids == [0, 4]
    assert kv.pool.block_hash(4) is None  # a duplicate of block 1: stays private

    d = Req("d", [1] + PROMPT[1:])  # differs in the first token: nothing shared
    assert kv.get_computed_prefix(d) == 0

    assert (kv.stats.queries, kv.stats.queried_tokens, kv.stats.hit_tokens) == (3, 10 + 11 + 8, 8 + 4)
    assert kv.stats.hit_rate == pytest.approx(12 / 29)
    assert (kv.pool.num_prefix_queries, kv.pool.num_prefix_hits) == (2 + 1, 2 + 1)  # blocks, at admissions with hits


def test_growing_with_lookahead_and_registering_blocks_as_they_fill():
    kv = KVCacheManager(8, 4)
    a = Req("a", list(range(5)))
    assert admit(kv, a) == (0, 5) and a.block_ids == [0, 1] and kv.pool.num_cached_blocks == 1
    for t in (5, 6, 7):  # decode: the token sampled last step is computed this step
        a.token_ids.append(t)
        run(kv, a, 1)
    assert a.num_computed_tokens == 8 and kv.pool.num_cached_blocks == 2 and a.block_ids == [0, 1]
    a.token_ids.append(8)
    run(kv, a, 1, lookahead=4)  # 9 tokens + 4 speculative slots: 4 blocks
    assert a.block_ids == [0, 1, 2, 3] and kv.pool.num_cached_blocks == 2
    assert kv.num_used_blocks == 4 and kv.num_free_blocks == 4
    assert not kv.allocate_for(a, 100)  # does not fit: nothing changes
    assert a.block_ids == [0, 1, 2, 3] and kv.num_free_blocks == 4
    with pytest.raises(ValueError, match=">= 0"):
        kv.allocate_for(a, -1)
    with pytest.raises(ValueError, match="already holds blocks"):
        kv.allocate_for(a, 1, computed_blocks=[])


def test_free_keeps_cached_blocks_for_the_next_request_or_the_recompute():
    kv = KVCacheManager(4, 4)
    a = Req("a", list(range(9)))
    admit(kv, a)
    assert a.block_ids == [0, 1, 2] and kv.pool.num_cached_blocks == 2
    kv.free(a)  # preempted
    a.num_computed_tokens, a.num_preemptions = 0, 1
    assert a.block_ids == [] and kv.num_free_blocks == 4 and kv.pool.num_evictable_blocks == 2
    assert admit(kv, a) == (8, 1) and a.block_ids == [0, 1, 3]  # recomputes only the last token (3: the oldest free)
    assert (kv.stats.recompute_queries, kv.stats.recompute_queried_tokens, kv.stats.recompute_hit_tokens) == (1, 9, 8)
    assert (kv.stats.queries, kv.stats.hit_tokens) == (1, 0)
    kv.free(a)
    b = Req("b", [50] * 16)  # needs all 4 blocks: the never-cached ones first, then evicts a's, tail first
    assert admit(kv, b) == (0, 16) and b.block_ids == [2, 3, 1, 0]
    assert kv.get_computed_prefix(Req("a2", list(range(9)))) == 0


def test_admission_counts_revived_blocks_against_the_free_space():
    kv = KVCacheManager(3, 4)
    a = Req("a", list(range(8)) + [9])
    admit(kv, a)
    kv.free(a)  # blocks 0, 1 cached and evictable, 2 free: 3 free in all
    b = Req("b", list(range(8)) + list(range(20, 29)))  # hits 2 blocks, needs 3 more: 2 revived + 3 > 3 free
    blocks = kv.get_computed_blocks(b)
    assert blocks.tables == ((0, 1),) and len(blocks) == 2
    assert not kv.allocate_for(b, 9, computed_blocks=blocks)
    assert b.block_ids == [] and kv.num_free_blocks == 3 and kv.stats.queries == 1  # nothing changed
    assert kv.allocate_for(b, 4, computed_blocks=blocks)  # a smaller chunk fits
    assert b.block_ids == [0, 1, 2] and b.num_computed_tokens == 8 and kv.num_free_blocks == 0


def test_stale_computed_blocks_are_refused_and_disabled_caching_finds_nothing():
    kv = KVCacheManager(8, 4)
    a = Req("a", list(range(9)))
    admit(kv, a)
    b = Req("b", list(range(9)))
    with pytest.raises(ValueError, match="not request b's cached prefix"):
        kv.allocate_for(b, 1, computed_blocks=[1, 0])
    assert [kv.pool.ref_count(i) for i in range(3)] == [1, 1, 1]

    off = KVCacheManager(8, 4, enable_prefix_caching=False)
    a = Req("a", list(range(9)))
    admit(off, a)
    assert off.pool.num_cached_blocks == 0 and off.get_computed_prefix(Req("b", list(range(9)))) == 0
