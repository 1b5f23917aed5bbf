"""KV block allocation: a free list over the Program's paged KV pool (no sharing, no prefix cache yet)."""
from __future__ import annotations

import collections


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens tokens' K/V."""
    return -(-num_tokens // block_size)


class NoFreeBlocksError(RuntimeError):
    """More blocks were asked for than the pool has free."""


class BlockAllocator:
    """Hands out physical block ids 0..num_blocks-1.

    Allocation takes from the front of the free list and freeing appends to the back, so a block
    freed last is reused last (the order a prefix cache will want for LRU eviction).
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = collections.deque(range(num_blocks))
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        if num < 0:
            raise ValueError(f"cannot allocate {num} blocks")
        if num > len(self._free):
            raise NoFreeBlocksError(f"asked for {num} KV blocks, {len(self._free)} of {self.num_blocks} are free")
        out = [self._free.popleft() for _ in range(num)]
        for b in out:
            self._is_free[b] = False
        return out

    def free(self, block_ids: list[int]) -> None:
        """Return blocks to the pool; raises ValueError on a double free or an unknown id."""
        seen = set()
        for b in block_ids:
            if not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b} is outside the pool of {self.num_blocks} blocks")
            if self._is_free[b] or b in seen:
                raise ValueError(f"block {b} freed twice")
            seen.add(b)
        for b in block_ids:
            self._is_free[b] = True
            self._free.append(b)
