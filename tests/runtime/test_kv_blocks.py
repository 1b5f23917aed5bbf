"""Tests of runtime/kv_blocks.py: block counts and the free-list allocator."""
import pytest

from runtime.kv_blocks import BlockAllocator, NoFreeBlocksError, blocks_needed


@pytest.mark.parametrize(
    "num_tokens, block_size, expected", [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (7, 1, 7), (16, 16, 1)]
)
def test_blocks_needed(num_tokens, block_size, expected):
    assert blocks_needed(num_tokens, block_size) == expected


def test_allocates_from_front_and_reuses_freed_blocks_last():
    alloc = BlockAllocator(5)
    assert alloc.allocate(2) == [0, 1]
    assert alloc.allocate(1) == [2]
    alloc.free([1, 0])
    assert alloc.num_free == 4
    assert alloc.allocate(4) == [3, 4, 1, 0]
    assert alloc.num_free == 0
    assert not alloc.can_allocate(1) and alloc.can_allocate(0)


def test_running_out_raises():
    alloc = BlockAllocator(2)
    alloc.allocate(2)
    with pytest.raises(NoFreeBlocksError, match="asked for 1 KV blocks, 0 of 2"):
        alloc.allocate(1)


def test_double_free_and_unknown_ids_raise_without_changing_state():
    alloc = BlockAllocator(3)
    blocks = alloc.allocate(2)
    alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(blocks[:1])
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free([1, 1])
    with pytest.raises(ValueError, match="outside the pool"):
        alloc.free([3])
    assert alloc.num_free == 2
    alloc.free([1])
    assert alloc.num_free == 3


def test_needs_at_least_one_block():
    with pytest.raises(ValueError):
        BlockAllocator(0)
