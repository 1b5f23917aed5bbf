"""Tests of runtime/block_pool.py: exact allocation and eviction order, ref counts, the hash chain, and a
property-based run of random allocate / append / free / fork / lookup sequences against a plain model."""
import collections
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.block_pool import BlockPool, hash_block_tokens, hash_full_blocks
from runtime.block_pool import NoFreeBlocksError


def cache_chain(pool, block_ids, token_ids):
    """Register block_ids[i] as the i-th full block of token_ids; return the hashes."""
    bs, parent, hashes = pool.block_size, None, []
    for i, block in enumerate(block_ids):
        parent = pool.cache_full_block(block, parent, token_ids[i * bs : (i + 1) * bs])
        hashes.append(parent)
    return hashes


# ---------------------------------------------------------------------------------------------
# Hashes


def test_hash_is_chained_stable_and_canonical():
    h0 = hash_block_tokens(None, [1, 2])
    assert len(h0) == 32 and h0 == hash_block_tokens(None, (1, 2))
    # pinned: sha256(32 zero bytes + int64 LE count + int64 LE tokens), the same in every process
    assert h0.hex()[:16] == __import__("hashlib").sha256(
        bytes(32) + (2).to_bytes(8, "little") + (1).to_bytes(8, "little") + (2).to_bytes(8, "little")
    ).hexdigest()[:16]
    assert hash_block_tokens(None, [2, 1]) != h0
    assert hash_block_tokens(h0, [3, 4]) != hash_block_tokens(None, [3, 4])  # the parent is part of the key
    assert hash_block_tokens(None, [1, 23]) != hash_block_tokens(None, [12, 3])
    assert hash_full_blocks([1, 2, 3, 4, 5], 2) == [h0, hash_block_tokens(h0, [3, 4])]  # the partial block is left out
    assert hash_full_blocks([1, 2, 3, 4, 5], 2, num_blocks=1) == [h0]
    assert hash_full_blocks([1, 2, 3, 4], 2, known=[b"x" * 32]) == [b"x" * 32, hash_block_tokens(b"x" * 32, [3, 4])]


# ---------------------------------------------------------------------------------------------
# Allocation, freeing and eviction order, exactly


def test_allocate_and_free_give_exact_ids_in_fifo_order():
    pool = BlockPool(5, 2)
    assert pool.allocate(3) == [0, 1, 2]
    assert (pool.num_used_blocks, pool.num_free_blocks) == (3, 2)
    pool.free([2])
    pool.free([0, 1])
    assert pool.allocate(5) == [3, 4, 2, 0, 1]  # oldest free first, then in the order freed
    assert pool.num_free_blocks == 0 and pool.can_allocate(0) and not pool.can_allocate(1)
    with pytest.raises(NoFreeBlocksError, match="asked for 1 KV blocks, 0 of 5 are free"):
        pool.allocate(1)
    assert isinstance(NoFreeBlocksError("x"), RuntimeError)


def test_cached_blocks_are_evicted_after_never_cached_ones_least_recently_freed_first():
    pool = BlockPool(6, 2)
    a = pool.allocate(2)  # [0, 1]: request A, tokens 10 11 | 12 13
    b = pool.allocate(2)  # [2, 3]: request B, tokens 20 21 | 22 23
    c = pool.allocate(1)  # [4]: a partial block, never cached
    assert (a, b, c) == ([0, 1], [2, 3], [4])
    cache_chain(pool, a, [10, 11, 12, 13])
    cache_chain(pool, b, [20, 21, 22, 23])
    assert pool.num_cached_blocks == 4
    pool.free(b)  # B first: its blocks are the least recently freed
    pool.free(c)
    pool.free(a)
    assert pool.num_free_blocks == 6 and pool.num_evictable_blocks == 4 and pool.num_cached_blocks == 4
    # never-cached 5 and 4 first; then B's blocks tail first (3 before 2), then A's (1 before 0)
    assert pool.allocate(1) == [5]
    assert pool.allocate(1) == [4]
    assert pool.num_evictions == 0
    assert pool.allocate(1) == [3]
    assert pool.num_evictions == 1 and pool.block_hash(3) is None and pool.num_cached_blocks == 3
    assert pool.lookup_prefix([20, 21, 22, 23]) == [2]  # B's head survived its tail's eviction
    assert pool.allocate(1) == [1]  # A's tail; B's head (2) is in use again
    assert pool.lookup_prefix([10, 11, 12, 13]) == [0]
    assert pool.num_free_blocks == 0


def test_a_revived_block_leaves_the_lru_list_and_rejoins_at_the_end():
    pool = BlockPool(3, 1)
    blocks = pool.allocate(3)
    for block, token in zip(blocks, (7, 8, 9)):
        pool.cache_full_block(block, None, [token])  # three one-block prefixes
    pool.free([0])
    pool.free([1])
    pool.free([2])  # LRU order 0, 1, 2
    assert pool.lookup_prefix([7]) == [0] and pool.ref_count(0) == 1 and pool.num_free_blocks == 2
    pool.free([0])  # now 1, 2, 0
    assert pool.allocate(3) == [1, 2, 0]
    assert pool.num_cached_blocks == 0 and pool.lookup_prefix([7]) == []


# ---------------------------------------------------------------------------------------------
# Reference counts, fork, errors


def test_fork_and_shared_blocks_are_freed_when_the_last_holder_frees():
    pool = BlockPool(4, 2)
    blocks = pool.allocate(2)
    pool.fork(blocks)
    pool.fork(blocks[:1])
    assert [pool.ref_count(b) for b in range(4)] == [3, 2, 0, 0]
    pool.free(blocks)
    assert pool.num_used_blocks == 2
    pool.free([0, 0])  # an id may appear as often as it is held
    assert [pool.ref_count(b) for b in range(4)] == [0, 1, 0, 0] and pool.num_used_blocks == 1
    pool.free([1])
    assert pool.num_free_blocks == 4


def test_errors_are_clear_and_change_nothing():
    pool = BlockPool(3, 2)
    blocks = pool.allocate(2)
    pool.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free([1, 1])
    with pytest.raises(ValueError, match="outside the pool of 3 blocks"):
        pool.free([3])
    with pytest.raises(ValueError, match="outside the pool"):
        pool.free([-1])
    with pytest.raises(ValueError, match="cannot fork block 0: it is free"):
        pool.fork([0])
    with pytest.raises(ValueError, match="cannot allocate"):
        pool.allocate(-1)
    with pytest.raises(ValueError, match="only full blocks"):
        pool.cache_full_block(1, None, [5])
    with pytest.raises(ValueError, match="it is free"):
        pool.cache_full_block(0, None, [5, 6])
    with pytest.raises(ValueError, match="not cached"):
        pool.touch([1])
    assert pool.num_free_blocks == 2 and pool.ref_count(1) == 1
    pool.cache_full_block(1, None, [5, 6])
    assert pool.cache_full_block(1, None, [5, 6]) == hash_block_tokens(None, [5, 6])  # again: a no-op
    with pytest.raises(ValueError, match="already cached under another hash"):
        pool.cache_full_block(1, None, [6, 5])
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError):
            BlockPool(bad, 2) if bad != 2.0 else BlockPool(2, bad)


# ---------------------------------------------------------------------------------------------
# Prefix lookup


def test_lookup_finds_the_longest_cached_run_of_leading_full_blocks_and_counts_blocks():
    pool = BlockPool(8, 2)
    blocks = pool.allocate(3)
    cache_chain(pool, blocks, [1, 2, 3, 4, 5, 6])
    assert pool.lookup_prefix([1, 2, 3, 4, 9, 9, 7]) == [0, 1]  # 3 full blocks asked, 2 hit
    assert pool.lookup_prefix([1, 2, 3, 4, 5, 6]) == [0, 1, 2]
    assert pool.lookup_prefix([3, 4, 5, 6]) == []  # same tokens at another position: another hash
    assert pool.lookup_prefix([1]) == []  # no full block
    assert (pool.num_prefix_queries, pool.num_prefix_hits) == (3 + 3 + 2 + 0, 5)
    assert pool.prefix_hit_rate == pytest.approx(5 / 8)
    assert [pool.ref_count(b) for b in blocks] == [3, 3, 2]
    assert pool.find_cached_prefix(hash_full_blocks([1, 2, 3, 4], 2)) == [0, 1]  # a peek takes no reference
    assert [pool.ref_count(b) for b in blocks] == [3, 3, 2]
    with pytest.raises(ValueError, match="exactly one"):
        pool.lookup_prefix()


def test_a_chain_whose_head_was_evicted_is_not_found_past_the_gap():
    pool = BlockPool(3, 2)
    blocks = pool.allocate(2)
    cache_chain(pool, blocks, [1, 2, 3, 4])
    pool.free(blocks[:1])  # the head alone becomes evictable, and is evicted
    assert pool.allocate(2) == [2, 0]
    assert pool.block_hash(1) is not None and pool.lookup_prefix([1, 2, 3, 4]) == []


def test_a_hash_cached_twice_keeps_the_first_block():
    pool = BlockPool(4, 2)
    first, second = pool.allocate(1), pool.allocate(1)
    h1 = pool.cache_full_block(first[0], None, [1, 2])
    h2 = pool.cache_full_block(second[0], None, [1, 2])
    assert h1 == h2 and pool.block_hash(first[0]) == h1 and pool.block_hash(second[0]) is None
    pool.free(second)  # a private duplicate: a plain free block again
    pool.free(first)
    assert pool.num_evictable_blocks == 1 and pool.allocate(3) == [2, 3, 1]


def test_disabled_caching_and_reset():
    pool = BlockPool(3, 2, enable_caching=False)
    blocks = pool.allocate(1)
    assert pool.cache_full_block(blocks[0], None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert pool.num_cached_blocks == 0 and pool.lookup_prefix([1, 2, 3]) == []
    pool = BlockPool(3, 2)
    blocks = pool.allocate(2)
    cache_chain(pool, blocks, [1, 2, 3, 4])
    pool.free(blocks[1:])
    pool.reset_prefix_cache()
    assert pool.num_cached_blocks == 0 and pool.num_evictable_blocks == 0 and pool.num_free_blocks == 2
    assert pool.lookup_prefix([1, 2, 3, 4]) == []


# ---------------------------------------------------------------------------------------------
# Property-based: random op sequences against a plain model


@dataclasses.dataclass
class Holder:
    """A sequence holding blocks: full blocks are registered as soon as they are full."""

    tokens: list
    blocks: list
    num_registered: int = 0


BS, N = 2, 8
OPS = ("new", "append", "free", "fork", "lookup", "bad_free")


class Model:
    """Plain mirror of what the pool must do: a dict prefix -> block, and the 'K/V' each block holds."""

    def __init__(self, pool):
        self.pool = pool
        self.holders: list[Holder] = []
        self.cache: dict[tuple, int] = {}  # prefix tokens (whole blocks) -> block registered for it
        self.content: dict[int, tuple] = {}  # block -> the prefix whose last block it holds

    def allocate(self, n):
        blocks = self.pool.allocate(n)
        for b in blocks:  # a reused block loses its contents and any cache entry
            self.content.pop(b, None)
            self.cache = {k: v for k, v in self.cache.items() if v != b}
        return blocks

    def register(self, h: Holder):
        """Write (in the model) and register h's newly full blocks."""
        while (h.num_registered + 1) * BS <= len(h.tokens):
            i = h.num_registered
            prefix = tuple(h.tokens[: (i + 1) * BS])
            block = h.blocks[i]
            self.content[block] = prefix
            parent = hash_full_blocks(h.tokens, BS, num_blocks=i)[-1] if i else None
            self.pool.cache_full_block(block, parent, list(prefix[-BS:]))
            self.cache.setdefault(prefix, block)
            h.num_registered += 1

    def check_hits(self, tokens, hits):
        for j, block in enumerate(hits):
            prefix = tuple(tokens[: (j + 1) * BS])
            assert self.cache.get(prefix) == block, "a hit on a block not registered for this exact prefix"
            assert self.content[block] == prefix, "a hit on a block holding other K/V"
        nxt = tuple(tokens[: (len(hits) + 1) * BS])
        if len(nxt) == (len(hits) + 1) * BS:
            assert nxt not in self.cache, "the lookup stopped before the longest cached prefix"

    def check_invariants(self):
        pool = self.pool
        holds = collections.Counter(b for h in self.holders for b in h.blocks)
        assert [pool.ref_count(b) for b in range(N)] == [holds[b] for b in range(N)]
        assert pool.num_used_blocks == len(holds)
        assert pool.num_used_blocks + pool.num_free_blocks == N
        assert pool.num_cached_blocks == len(self.cache)
        for prefix, block in self.cache.items():
            assert pool.block_hash(block) == hash_full_blocks(list(prefix), BS)[-1]


token_lists = st.lists(st.integers(0, 1), min_size=1, max_size=7)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 1000), token_lists), max_size=40))
def test_random_op_sequences_keep_the_pool_consistent_with_a_plain_model(ops):
    pool = BlockPool(N, BS)
    m = Model(pool)
    for op, pick, tokens in ops:
        holder = m.holders[pick % len(m.holders)] if m.holders else None
        if op == "new":  # a request: prefix lookup, then blocks for the rest, then its full blocks registered
            hits = pool.lookup_prefix(tokens)
            m.check_hits(tokens, hits)
            need = -(-len(tokens) // BS) - len(hits)
            if need > pool.num_free_blocks:
                with pytest.raises(NoFreeBlocksError):
                    m.allocate(need)
                pool.free(hits)
            else:
                h = Holder(list(tokens), hits + m.allocate(need), num_registered=len(hits))
                m.holders.append(h)
                m.register(h)
        elif op == "append" and holder is not None:
            if len(holder.tokens) == len(holder.blocks) * BS:
                if not pool.can_allocate(1):
                    continue
                holder.blocks += m.allocate(1)
            holder.tokens.append(tokens[0])
            m.register(holder)
        elif op == "free" and holder is not None:
            pool.free(holder.blocks)
            m.holders.remove(holder)
        elif op == "fork" and holder is not None:  # full blocks shared, the partial tail copied
            num_full = len(holder.tokens) // BS
            tail = len(holder.blocks) - num_full
            if tail > pool.num_free_blocks:
                continue
            pool.fork(holder.blocks[:num_full])
            h = Holder(list(holder.tokens), holder.blocks[:num_full] + m.allocate(tail), num_registered=num_full)
            m.holders.append(h)
        elif op == "lookup":
            hits = pool.lookup_prefix(tokens)
            m.check_hits(tokens, hits)
            pool.free(hits)
        elif op == "bad_free":
            free_ids = [b for b in range(N) if pool.ref_count(b) == 0]
            with pytest.raises(ValueError):
                pool.free([free_ids[pick % len(free_ids)]] if free_ids else [N + pick])
        m.check_invariants()
    for h in m.holders:
        pool.free(h.blocks)
    assert pool.num_free_blocks == N and pool.num_used_blocks == 0


@pytest.mark.parametrize(
    "num_tokens, block_size, expected", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (7, 1, 7), (16, 16, 1)]
)
def test_blocks_needed(num_tokens, block_size, expected):
    from runtime.block_pool import blocks_needed

    assert blocks_needed(num_tokens, block_size) == expected
