"""Block pool: the Program's KV blocks 0..N-1 with reference counts, an LRU free list and a prefix cache.

A block is in exactly one of three states:

    in use      ref > 0                     held by one or more requests (a cached block may be shared)
    free        ref == 0, no hash           never cached (or evicted): handed out first, oldest free first
    evictable   ref == 0, hash cached       keeps its K/V and its hash; a prefix lookup revives it, an
                                            allocation that runs out of never-cached blocks evicts it,
                                            least recently freed first

Every block id counts as free or evictable when nobody holds it, so used + free == num_blocks always.
No block is reserved: block tables are padded with id 0, which is safe because padding is never read
within seq_lens and never written (see build_step_input).

Prefix caching keys FULL blocks by a chained hash: hash(parent block's hash, the block's block_size
token ids), sha256 over a canonical byte encoding (`hash_block_tokens`), so a block's hash names the
whole prefix up to and including it. Two prompts share cached blocks exactly as far as their leading
full blocks are identical. A hash that is already cached under another block is not cached twice:
the second block stays private and is freed as a never-cached block.
"""
from __future__ import annotations

import collections
import hashlib
import struct
from typing import Iterable, Sequence


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens' K/V."""
    return -(-num_tokens // block_size)


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than the pool has free."""


BlockHash = bytes  # sha256 digest, 32 bytes

_ROOT_PARENT = bytes(32)  # the "parent hash" of a sequence's first block


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The chained hash of one full block: sha256(parent digest, token count, tokens as int64 LE).

    parent_hash is None for a sequence's first block. Stable across processes (not Python's hash()).
    """
    h = hashlib.sha256(_ROOT_PARENT if parent_hash is None else parent_hash)
    h.update(struct.pack(f"<q{len(token_ids)}q", len(token_ids), *token_ids))
    return h.digest()


def hash_full_blocks(
    token_ids: Sequence[int], block_size: int, *, num_blocks: int | None = None,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Chained hashes of the leading full blocks of token_ids (at most num_blocks of them).

    `known` are hashes already computed for the first blocks (e.g. a request's, from an earlier step);
    they are reused, and only the blocks after them are hashed.
    """
    num_full = len(token_ids) // block_size
    if num_blocks is not None:
        num_full = min(num_full, num_blocks)
    hashes = list(known[:num_full])
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_full):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class BlockPool:
    """Fixed pool of num_blocks KV blocks: allocation, ref counts, LRU eviction, prefix-cache lookup.

    Counters (in blocks, over `lookup_prefix` calls): `num_prefix_queries` leading full blocks asked
    for, `num_prefix_hits` of them found cached; `prefix_hit_rate` is their ratio.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = True):
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks  # hash of a cached block
        self._cached: dict[BlockHash, int] = {}  # hash -> block id
        self._free: collections.deque[int] = collections.deque(range(num_blocks))  # ref 0, not cached
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # ref 0, cached; LRU first
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0
        self.num_evictions = 0

    # -- sizes -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks nobody holds: never-cached free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    num_free = num_free_blocks  # short name the scheduler uses

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a cached hash, in use or evictable."""
        return len(self._cached)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def prefix_hit_rate(self) -> float:
        return self.num_prefix_hits / self.num_prefix_queries if self.num_prefix_queries else 0.0

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The hash a block is cached under, or None."""
        self._check_id(block_id)
        return self._hash[block_id]

    def can_allocate(self, num: int) -> bool:
        return 0 <= num <= self.num_free_blocks

    # -- allocation --------------------------------------------------------------------------------

    def allocate(self, num: int) -> list[int]:
        """num blocks with ref 1: never-cached free blocks first (oldest free first), then evicted ones
        (least recently freed first; eviction drops the block's hash)."""
        if not isinstance(num, int) or num < 0:
            raise ValueError(f"cannot allocate {num!r} blocks")
        if num > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"asked for {num} KV blocks, {self.num_free_blocks} of {self.num_blocks} are free"
            )
        out = []
        for _ in range(num):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._hash[block]]
                self._hash[block] = None
                self.num_evictions += 1
            self._ref[block] = 1
            out.append(block)
        return out

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference to each block (an id may appear as often as it is held).

        A block whose count reaches 0 becomes free: a never-cached one joins the end of the free list;
        a cached one keeps its hash and joins the evictable end of the LRU list. Pass a request's block
        table in order: its cached blocks are queued tail first, so a prefix's later blocks are evicted
        before its earlier ones (an evicted head would make the rest of the chain unreachable anyway).
        Raises ValueError (changing nothing) on an unknown id or on freeing more references than held.
        """
        block_ids = list(block_ids)
        counts = collections.Counter(block_ids)
        for block, n in counts.items():
            self._check_id(block)
            if n > self._ref[block]:
                raise ValueError(f"block {block} freed twice (held {self._ref[block]} times, freed {n} times)")
        newly_evictable = []
        for block in block_ids:
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if self._hash[block] is None:
                    self._free.append(block)
                else:
                    newly_evictable.append(block)
        for block in reversed(newly_evictable):
            self._evictable[block] = None

    def fork(self, block_ids: Iterable[int]) -> None:
        """One more reference to each block (a second holder shares them); each must be in use."""
        block_ids = list(block_ids)
        for block in block_ids:
            self._check_id(block)
            if self._ref[block] == 0:
                raise ValueError(f"cannot fork block {block}: it is free")
        for block in block_ids:
            self._ref[block] += 1

    # -- prefix cache ------------------------------------------------------------------------------

    def cached_block(self, block_hash: BlockHash) -> int | None:
        """The block cached under block_hash, or None; changes nothing."""
        return self._cached.get(block_hash) if self.enable_caching else None

    def find_cached_prefix(self, block_hashes: Sequence[BlockHash]) -> list[int]:
        """The blocks cached under the longest leading run of block_hashes; changes nothing."""
        out = []
        if self.enable_caching:
            for h in block_hashes:
                block = self._cached.get(h)
                if block is None:
                    break
                out.append(block)
        return out

    def lookup_prefix(
        self, token_ids: Sequence[int] | None = None, *, block_hashes: Sequence[BlockHash] | None = None
    ) -> list[int]:
        """Take a reference to the cached blocks of the longest cached run of leading full blocks.

        Give the tokens (their leading full blocks are hashed) or their block hashes. Hit blocks that
        were evictable are revived (leave the LRU list). Counts queries / hits in blocks.
        """
        if (token_ids is None) == (block_hashes is None):
            raise ValueError("pass exactly one of token_ids and block_hashes")
        if block_hashes is None:
            block_hashes = hash_full_blocks(token_ids, self.block_size) if self.enable_caching else []
        blocks = self.find_cached_prefix(block_hashes)
        self.num_prefix_queries += len(block_hashes)
        self.num_prefix_hits += len(blocks)
        self.touch(blocks)
        return blocks

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take a reference to cached blocks, reviving evictable ones."""
        block_ids = list(block_ids)
        for block in block_ids:
            self._check_id(block)
            if self._hash[block] is None:
                raise ValueError(f"block {block} is not cached")
        for block in block_ids:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1

    def cache_full_block(self, block_id: int, parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
        """Register a full, written, in-use block under hash(parent_hash, token_ids); return the hash.

        If another block is already cached under that hash, this one is left uncached (the cache keeps
        the first). Caching a block again under the same hash is a no-op; under another hash, an error.
        With caching disabled only the hash is computed.
        """
        self._check_id(block_id)
        if len(token_ids) != self.block_size:
            raise ValueError(f"only full blocks are cached: got {len(token_ids)} tokens, block_size {self.block_size}")
        if self._ref[block_id] == 0:
            raise ValueError(f"cannot cache block {block_id}: it is free")
        h = hash_block_tokens(parent_hash, token_ids)
        if not self.enable_caching:
            return h
        current = self._hash[block_id]
        if current is not None:
            if current != h:
                raise ValueError(f"block {block_id} is already cached under another hash")
            return h
        if h not in self._cached:
            self._cached[h] = block_id
            self._hash[block_id] = h
        return h

    def uncache(self, block_id: int) -> None:
        """Forget a held block's hash (its contents are about to change); a block with no hash is left alone."""
        self._check_id(block_id)
        if self._ref[block_id] == 0:
            raise ValueError(f"cannot uncache block {block_id}: it is free")
        h = self._hash[block_id]
        if h is not None:
            del self._cached[h]
            self._hash[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights): evictable blocks become plain free blocks."""
        for block in self._cached.values():
            self._hash[block] = None
        self._cached.clear()
        self._free.extend(self._evictable)
        self._evictable.clear()

    def _check_id(self, block_id: int) -> None:
        if not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is outside the pool of {self.num_blocks} blocks")
