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
from typing import Any, Sequence

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


class KVCacheManager:
    """Block tables of requests over one BlockPool of num_blocks blocks of block_size tokens."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, block_size, enable_caching=enable_prefix_caching)
        self.stats = PrefixCacheStats()
        self._num_cached: dict[Any, int] = {}  # request -> its leading blocks already cached (hit or registered)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used_blocks

    # -- admission ---------------------------------------------------------------------------------

    def get_computed_blocks(self, req) -> list[int]:
        """The cached blocks a request that holds no blocks can start from; changes nothing.

        Only full blocks, and never all of the request's tokens: the blocks lie within its first
        num_tokens - 1 tokens, so at least its last token is computed and the step produces logits.
        """
        if not self.enable_prefix_caching or req.block_ids:
            return []
        return self.pool.find_cached_prefix(self._hashes(req, self._max_hit_blocks(req)))

    def get_computed_prefix(self, req) -> int:
        """How many of a waiting request's tokens are already in cached blocks (a multiple of block_size)."""
        return len(self.get_computed_blocks(req)) * self.block_size

    # -- growing and freeing -----------------------------------------------------------------------

    def allocate_for(
        self, req, num_new_tokens: int, num_lookahead: int = 0, *, computed_blocks: Sequence[int] | None = None
    ) -> bool:
        """Give req room for num_new_tokens more tokens plus num_lookahead speculative slots.

        Admitting a waiting request: pass computed_blocks (get_computed_blocks(req), possibly empty);
        they become the head of its table and req.num_computed_tokens starts after them. Returns
        False, changing nothing, when the pool cannot hold the blocks (the scheduler then preempts or
        waits).
        """
        if num_new_tokens < 0 or num_lookahead < 0:
            raise ValueError(f"num_new_tokens and num_lookahead must be >= 0, got {num_new_tokens}, {num_lookahead}")
        if computed_blocks is None:
            total = req.num_computed_tokens + num_new_tokens + num_lookahead
            num_new_blocks = blocks_needed(total, self.block_size) - len(req.block_ids)
            if num_new_blocks > self.pool.num_free_blocks:
                return False
            if num_new_blocks > 0:
                req.block_ids += self.pool.allocate(num_new_blocks)
            return True

        if req.block_ids:
            raise ValueError(f"request {req.request_id} already holds blocks; computed_blocks is for admission")
        computed_blocks = list(computed_blocks)
        num_computed = len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens + num_lookahead
        num_new_blocks = blocks_needed(total, self.block_size) - len(computed_blocks)
        num_revived = sum(self.pool.ref_count(b) == 0 for b in computed_blocks)  # evictable now, in use after
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        if computed_blocks:
            hashes = self._hashes(req, self._max_hit_blocks(req))
            hit = self.pool.lookup_prefix(block_hashes=hashes)  # takes the references, counts blocks
            if hit[: len(computed_blocks)] != computed_blocks:
                self.pool.free(hit)
                raise ValueError(f"computed_blocks {computed_blocks} are not request {req.request_id}'s cached prefix")
            self.pool.free(hit[len(computed_blocks) :])  # the caller chose to use fewer
        req.block_ids = computed_blocks + self.pool.allocate(max(num_new_blocks, 0))
        req.num_computed_tokens = num_computed
        self._num_cached[req] = len(computed_blocks)

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
        blocks, req.block_ids = req.block_ids, []
        self._num_cached.pop(req, None)
        self.pool.free(blocks)

    # -- registering full blocks -------------------------------------------------------------------

    def cache_full_blocks(self, req) -> None:
        """Register the request's blocks that are full of computed tokens (call after the step ran)."""
        if not self.enable_prefix_caching:
            return
        num_full = min(req.num_computed_tokens, len(req.token_ids)) // self.block_size
        num_full = min(num_full, len(req.block_ids))
        start = self._num_cached.get(req, 0)
        if num_full <= start:
            return
        hashes = self._hashes(req, num_full)
        bs = self.block_size
        for i in range(start, num_full):
            parent = hashes[i - 1] if i > 0 else None
            self.pool.cache_full_block(req.block_ids[i], parent, req.token_ids[i * bs : (i + 1) * bs])
        self._num_cached[req] = num_full

    # -- helpers -----------------------------------------------------------------------------------

    def _max_hit_blocks(self, req) -> int:
        return max(len(req.token_ids) - 1, 0) // self.block_size

    def _hashes(self, req, num_blocks: int) -> list[bytes]:
        """The chained hashes of req's first num_blocks full blocks, memoized on req.block_hashes."""
        if len(req.block_hashes) < num_blocks:
            req.block_hashes = hash_full_blocks(req.token_ids, self.block_size, num_blocks=num_blocks,
                                                known=req.block_hashes)
        return req.block_hashes[:num_blocks]
