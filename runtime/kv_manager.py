"""KV manager: each request's block table over a BlockPool, prefix-cache lookup and registration.

A request here is anything with `token_ids` (prompt + generated, append-only), `num_computed_tokens`
(tokens whose K/V are in its blocks), `block_ids` (its block table, which build_step_input reads) and
`block_hashes` (chained hashes of its leading full blocks, filled in here; valid for the request's
whole life because its tokens never change). Requests are hashable by identity.

Life of a request's blocks:
  admission     get_computed_blocks(req) finds the cached blocks of its leading full blocks; the
                scheduler sizes the step's chunk from there and calls allocate_for(req, n,
                computed_blocks=...), which takes those blocks, adds fresh ones and starts
                req.num_computed_tokens after the cached prefix.
  each step     allocate_for(req, n) grows the table for n new tokens (+ lookahead slots); after the
                step ran, cache_full_blocks(req) registers the blocks it filled.
  finish/abort/ free(req) drops its references; its cached blocks stay cached (evictable) for the
  preemption    next request, or for its own recompute.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from runtime.block_pool import BlockPool, hash_full_blocks
from runtime.block_pool import blocks_needed


@dataclasses.dataclass
class PrefixCacheStats:
    """Prefix-cache counters in TOKENS, counted once per admission.

    `queried_tokens` sums the admitted requests' token counts (prompt, plus generated tokens for a
    recompute); `hit_tokens` the tokens found in cached blocks. The last token is never a hit, so the
    rate stays below 1. Admissions of preempted requests are counted separately (`recompute_*`):
    they mostly hit their own blocks and would inflate the rate of real prompt sharing.
    """

    queries: int = 0  # admissions of new requests
    queried_tokens: int = 0
    hit_tokens: int = 0
    recompute_queries: int = 0  # re-admissions of preempted requests
    recompute_queried_tokens: int = 0
    recompute_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


FREED = -1  # a block-table entry whose block fell out of a sliding window and was freed


@dataclasses.dataclass(frozen=True)
class KVGroup:
    """Attention layers that share block tables: their own BlockPool, and a sliding window or None.

    `attr` names the request field holding the group's block table ("block_ids" for the first group)."""

    pool: BlockPool
    window: int | None
    attr: str


@dataclasses.dataclass(frozen=True)
class CachedPrefix:
    """Cached leading blocks a waiting request can start from: `num_blocks` full blocks, and for each KV group
    the block ids that hold them (FREED where a sliding-window group does not need the block)."""

    num_blocks: int = 0
    tables: tuple[tuple[int, ...], ...] = ()

    def __len__(self) -> int:
        return self.num_blocks


class KVCacheManager:
    """Block tables of requests over one BlockPool of num_blocks blocks of block_size tokens per KV group.

    Sliding-window models: `window` is the first group's window (every attention layer windowed, e.g.
    Mistral), and `window_group=(num_blocks_w, window_w)` adds a second group of windowed layers with a
    pool of its own (Gemma 3's local layers; the first group then holds the global layers). A windowed
    group frees each block once it lies wholly before the window of the next token a request computes,
    so it holds at most ceil((window - 1) / block_size) + 1 blocks per decoding request (plus the blocks
    of a prefill chunk while it runs). Freed entries stay in the table as FREED; attention never reads
    them. A freed block that was registered stays in the prefix cache (evictable) like any other.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 window: int | None = None, window_group: tuple[int, int] | None = None, eviction=None):
        """eviction: the program's lowering.kv_policy.EvictionPlan (KV eviction; see plan_compaction)."""
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.eviction = eviction
        if eviction is not None and (window is not None or window_group is not None):
            raise ValueError("KV eviction does not combine with sliding-window KV groups")
        for w in (window, None if window_group is None else window_group[1]):
            if w is not None and (not isinstance(w, int) or w < 1):
                raise ValueError(f"a sliding window must be a positive integer, got {w!r}")
        self.pool = BlockPool(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.groups = [KVGroup(self.pool, window, "block_ids")]
        if window_group is not None:
            pool_w = BlockPool(int(window_group[0]), block_size, enable_caching=enable_prefix_caching)
            self.groups.append(KVGroup(pool_w, int(window_group[1]), "block_ids_w"))
        self.stats = PrefixCacheStats()
        self._num_cached: dict[Any, int] = {}  # request -> its leading blocks already cached (hit or registered)

    @classmethod
    def for_program(cls, program, *, enable_prefix_caching: bool = True) -> "KVCacheManager":
        """The manager for a Program's KV groups (its `kv_window`, `num_blocks_w`, `kv_window_w`)."""
        window = getattr(program, "kv_window", None)
        nw = getattr(program, "num_blocks_w", None)
        group = (nw, program.kv_window_w) if nw is not None else None
        return cls(program.num_blocks, program.block_size, enable_prefix_caching=enable_prefix_caching,
                   window=window, window_group=group, eviction=getattr(program, "eviction", None))

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    # -- admission ---------------------------------------------------------------------------------

    def get_computed_blocks(self, req) -> CachedPrefix:
        """The cached blocks a request that holds no blocks can start from; changes nothing.

        Only full blocks, and never all of the request's tokens: the blocks lie within its first
        num_tokens - 1 tokens, so at least its last token is computed and the step produces logits.
        A windowed group needs only the cached blocks inside the window of the first token to compute.
        """
        if not self.enable_prefix_caching or req.block_ids:
            return CachedPrefix()
        max_hit = self._max_hit_blocks(req)
        if self.eviction is not None:  # the hit must leave room for the next chunk within the capacity
            max_hit = min(max_hit, (self.eviction.capacity - 1) // self.block_size)
        hashes = self._hashes(req, max_hit)
        n = len(hashes)
        for g in self.groups:
            if g.window is None:
                n = min(n, len(g.pool.find_cached_prefix(hashes[:n])))
        for g in self.groups:
            if g.window is not None:
                while n > 0 and any(g.pool.cached_block(h) is None for h in hashes[self._window_start(g, n * self.block_size):n]):
                    n -= 1
        if n == 0:
            return CachedPrefix()
        tables = []
        for g in self.groups:
            lo = self._window_start(g, n * self.block_size)
            tables.append(tuple([FREED] * lo + [g.pool.cached_block(h) for h in hashes[lo:n]]))
        return CachedPrefix(n, tuple(tables))

    def get_computed_prefix(self, req) -> int:
        """How many of a waiting request's tokens are already in cached blocks (a multiple of block_size)."""
        return len(self.get_computed_blocks(req)) * self.block_size

    # -- growing and freeing -----------------------------------------------------------------------

    def allocate_for(
        self, req, num_new_tokens: int, num_lookahead: int = 0, *, computed_blocks: CachedPrefix | None = None
    ) -> bool:
        """Give req room for num_new_tokens more tokens plus num_lookahead speculative slots.

        Admitting a waiting request: pass computed_blocks (get_computed_blocks(req), possibly empty);
        they become the head of its tables and req.num_computed_tokens starts after them. Returns
        False when a pool cannot hold the blocks (the scheduler then preempts or waits); only blocks
        that fell out of a sliding window may have been freed then.
        """
        if num_new_tokens < 0 or num_lookahead < 0:
            raise ValueError(f"num_new_tokens and num_lookahead must be >= 0, got {num_new_tokens}, {num_lookahead}")
        bs = self.block_size
        if computed_blocks is None:
            self._free_out_of_window(req, req.num_computed_tokens)
            total = self.cache_len(req) + num_new_tokens + num_lookahead
            wanted = [blocks_needed(total, bs) - len(getattr(req, g.attr)) for g in self.groups]
            if any(n > g.pool.num_free_blocks for n, g in zip(wanted, self.groups)):
                return False
            for n, g in zip(wanted, self.groups):
                if n > 0:
                    getattr(req, g.attr).extend(g.pool.allocate(n))
            return True

        if not isinstance(computed_blocks, CachedPrefix):
            if len(self.groups) > 1 or self.groups[0].window is not None:
                raise TypeError("computed_blocks must come from get_computed_blocks() on a model with sliding windows")
            computed_blocks = CachedPrefix(len(computed_blocks), (tuple(computed_blocks),))  # one plain table
        if any(getattr(req, g.attr) for g in self.groups):
            raise ValueError(f"request {req.request_id} already holds blocks; computed_blocks is for admission")
        n_cached = computed_blocks.num_blocks
        tables = computed_blocks.tables or tuple(() for _ in self.groups)
        num_computed = n_cached * bs
        total = num_computed + num_new_tokens + num_lookahead
        num_new_blocks = blocks_needed(total, bs) - n_cached
        for g, table in zip(self.groups, tables):
            held = [b for b in table if b != FREED]
            revived = sum(g.pool.ref_count(b) == 0 for b in held)  # evictable now, in use after
            if num_new_blocks + revived > g.pool.num_free_blocks:
                return False
        if n_cached:
            hashes = self._hashes(req, n_cached)
            for g, table in zip(self.groups, tables):
                if len(table) != n_cached or any(b != FREED and g.pool.block_hash(b) != hashes[i]
                                                 for i, b in enumerate(table)):
                    raise ValueError(f"computed_blocks are not request {req.request_id}'s cached prefix")
        for g, table in zip(self.groups, tables):
            held = [b for b in table if b != FREED]
            g.pool.touch(held)
            setattr(req, g.attr, list(table) + g.pool.allocate(max(num_new_blocks, 0)))
        if n_cached:  # the pool's block counters, as BlockPool.lookup_prefix counts them
            self.pool.num_prefix_queries += self._max_hit_blocks(req)
            self.pool.num_prefix_hits += n_cached
        req.num_computed_tokens = num_computed
        self._num_cached[req] = n_cached

        recompute = getattr(req, "num_preemptions", 0) > 0
        s = self.stats
        if recompute:
            s.recompute_queries += 1
            s.recompute_queried_tokens += len(req.token_ids)
            s.recompute_hit_tokens += num_computed
        else:
            s.queries += 1
            s.queried_tokens += len(req.token_ids)
            s.hit_tokens += num_computed
        return True

    def free(self, req) -> None:
        """Drop the request's blocks (finish, abort or preemption); cached ones stay cached."""
        for g in self.groups:
            blocks = getattr(req, g.attr)
            setattr(req, g.attr, [])
            g.pool.free([b for b in blocks if b != FREED])
        self._num_cached.pop(req, None)
        if getattr(req, "num_evicted", 0):
            req.num_evicted = 0  # a recompute starts from a whole cache again

    def num_held_blocks(self, req, group: int = 0) -> int:
        """Blocks the request holds in KV group `group` (freed sliding-window entries not counted)."""
        return sum(b != FREED for b in getattr(req, self.groups[group].attr))

    # -- registering full blocks -------------------------------------------------------------------

    def cache_full_blocks(self, req) -> None:
        """Register the request's blocks that are full of computed tokens (call after the step ran)."""
        if not self.enable_prefix_caching or getattr(req, "num_evicted", 0):
            return  # (after an eviction the blocks hold a selection of tokens, not a prefix)
        num_full = min(req.num_computed_tokens, len(req.token_ids)) // self.block_size
        num_full = min(num_full, len(req.block_ids))
        start = self._num_cached.get(req, 0)
        if num_full <= start:
            return
        hashes = self._hashes(req, num_full)
        bs = self.block_size
        for g in self.groups:
            table = getattr(req, g.attr)
            for i in range(start, num_full):
                if table[i] != FREED:
                    parent = hashes[i - 1] if i > 0 else None
                    g.pool.cache_full_block(table[i], parent, req.token_ids[i * bs : (i + 1) * bs])
        self._num_cached[req] = num_full

    # -- KV eviction (lowering/kv_policy.py) -------------------------------------------------------

    @staticmethod
    def cache_len(req) -> int:
        """Tokens of the request whose K/V its blocks hold: computed ones less those evicted."""
        return req.num_computed_tokens - getattr(req, "num_evicted", 0)

    def needs_compaction(self, req, num_new_tokens: int) -> bool:
        """Whether req must be compacted before num_new_tokens more fit within the eviction capacity."""
        e = self.eviction
        n = self.cache_len(req)
        return e is not None and n > e.budget and n + num_new_tokens > e.capacity

    def plan_compaction(self, req):
        """Shrink req's cache to the eviction budget: returns the runtime.step.KVCompaction for the Program (which
        moves the kept tokens to the front, in its own choice of tokens) or None when the pool cannot give the
        blocks it needs now (nothing changed then; the scheduler preempts someone and asks again).

        The first ceil(budget / block_size) blocks become the destination. A block the request alone holds is
        rewritten in place (dropped from the prefix cache first: its contents stop matching its hash); a block
        shared with another request (a prefix-cache hit) is replaced by a fresh one, so the other holder keeps
        its contents. The blocks past the budget are freed. The Program reads every kept token before writing.
        """
        from runtime.step import KVCompaction

        e = self.eviction
        if e is None:
            raise ValueError("plan_compaction: this manager has no eviction plan")
        pool, bs = self.pool, self.block_size
        old_len = self.cache_len(req)
        new_len = e.budget
        if old_len <= new_len:
            raise ValueError(f"plan_compaction: request {req.request_id} holds {old_len} tokens, within the budget "
                             f"{new_len}")
        table = list(req.block_ids)
        nb_old, nb_new = blocks_needed(old_len, bs), blocks_needed(new_len, bs)
        head, tail = table[:nb_new], table[nb_new:]
        shared = [i for i, b in enumerate(head) if pool.ref_count(b) > 1]
        freed_by_tail = sum(pool.ref_count(b) == 1 for b in tail)
        if len(shared) > pool.num_free_blocks + freed_by_tail:
            return None
        for b in head:
            if pool.ref_count(b) == 1 and pool.block_hash(b) is not None:
                pool.uncache(b)
        pool.free(tail)
        if shared:
            fresh = pool.allocate(len(shared))
            pool.free([head[i] for i in shared])
            for i, b in zip(shared, fresh):
                head[i] = b
        req.block_ids = head
        req.num_evicted = getattr(req, "num_evicted", 0) + old_len - new_len
        self._num_cached[req] = 0
        return KVCompaction(np.asarray(table[:nb_old], np.int32), np.asarray(head, np.int32), old_len, new_len)

    # -- helpers -----------------------------------------------------------------------------------

    def _window_start(self, g: KVGroup, position: int) -> int:
        """The first block a query at `position` reads in group g: 0 without a window."""
        if g.window is None:
            return 0
        return max(0, position - g.window + 1) // self.block_size

    def _free_out_of_window(self, req, position: int) -> None:
        """Free the blocks of windowed groups that lie wholly before the window of a query at `position`
        (the first token of the request's next step; later queries of any later step see no earlier key)."""
        for g in self.groups:
            if g.window is None:
                continue
            table = getattr(req, g.attr)
            lo = min(self._window_start(g, position), len(table))
            dropped = [b for b in table[:lo] if b != FREED]
            if dropped:
                table[:lo] = [FREED] * lo
                g.pool.free(dropped)

    def _max_hit_blocks(self, req) -> int:
        return max(len(req.token_ids) - 1, 0) // self.block_size

    def _hashes(self, req, num_blocks: int) -> list[bytes]:
        """The chained hashes of req's first num_blocks full blocks, memoized on req.block_hashes."""
        if len(req.block_hashes) < num_blocks:
            req.block_hashes = hash_full_blocks(req.token_ids, self.block_size, num_blocks=num_blocks,
                                                known=req.block_hashes)
        return req.block_hashes[:num_blocks]
