"""The inbox protocol of the push all-reduces (kernels_gpu/all_reduce.py), as Triton helpers other kernels inline:
every rank's inbox of an all-reduce holds one region per source rank in memory all ranks map (torch symmetric
memory); an element is the sentinel (the bits of -0.0) until its value arrives, and a value is never the sentinel
(-0.0 is sent as +0.0). Values are handled as their integer bits (int16 for 2-byte floats, int32 for float32)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# polls of one region before a rank gives up: minutes (a peer may lag by a kernel compilation); a dead peer ends the
# process first (cuda_tp's watchdog)
MAX_SPINS = 1 << 30
_INT_VIEW = {2: torch.int16, 4: torch.int32}
_SENTINEL = {torch.int16: -(1 << 15), torch.int32: -(1 << 31)}  # the bits of -0.0


def int_view_dtype(dtype: torch.dtype) -> torch.dtype:
    """The integer type an inbox of `dtype` activations is held and polled in."""
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"push all-reduce: activations must be bfloat16, float16 or float32, got {dtype}")
    return _INT_VIEW[dtype.itemsize]


def sentinel(int_dtype: torch.dtype) -> int:
    """The integer value of an empty inbox element (-0.0's bits)."""
    return _SENTINEL[int_dtype]


@dataclass(frozen=True)
class Exchange:
    """An all-reduce folded into the fused GEMVs on either side of it (kernels_gpu.fused_gemv, one-row steps): the
    producer's programs push their output tiles into every rank's inbox (`push`, in rank order, this rank's own
    included); the consumer's program 0 sums this rank's inbox (`gather`) into the activation row, empties the
    inbox and raises flags[slot] (lowering flags[prev], the folded all-reduce before it, first), and the consumer's
    other programs wait for that flag. The caller keeps the push all-reduces' reuse rule (an inbox is used once a
    step; a step runs at least two) and gives each folded all-reduce of a step its own slot of the flags."""
    rank: int
    world: int
    err: torch.Tensor
    push: tuple = ()
    gather: torch.Tensor | None = None
    flags: torch.Tensor | None = None
    slot: int = 0
    prev: int = 0
    max_spins: int = MAX_SPINS


@triton.jit
def peer(r: tl.constexpr, p0, p1, p2, p3, p4, p5, p6, p7):
    """Rank r's pointer of eight (a constexpr choice)."""
    if r == 0:
        return p0
    elif r == 1:
        return p1
    elif r == 2:
        return p2
    elif r == 3:
        return p3
    elif r == 4:
        return p4
    elif r == 5:
        return p5
    elif r == 6:
        return p6
    else:
        return p7


@triton.jit
def sendable(bits, SENT: tl.constexpr):
    """Value bits as they are sent: -0.0 as +0.0, so that no value is the sentinel."""
    return tl.where(bits == SENT, 0, bits)


@triton.jit
def push(bits, offs, mask, n, rank, p0, p1, p2, p3, p4, p5, p6, p7, WORLD: tl.constexpr, SELF: tl.constexpr):
    """Store sendable bits at `offs` of region `rank` (regions of n elements) in every rank's inbox p_r (SELF: this
    rank's own inbox too)."""
    for r in tl.static_range(WORLD):
        if SELF or r != rank:
            tl.store(peer(r, p0, p1, p2, p3, p4, p5, p6, p7) + rank * n + offs, bits, mask=mask)


@triton.jit
def poll_sum(inbox_ptr, offs, mask, n, rank, own_bits, err_ptr, limit, WORLD: tl.constexpr, SENT: tl.constexpr,
             fdt: tl.constexpr, USE_OWN: tl.constexpr, CLEAR: tl.constexpr):
    """Wait until every region of this rank's inbox holds its values at `offs` (USE_OWN: this rank's region is not
    read; own_bits take its place), -> their f32 sum in rank order (the values as fdt). CLEAR: write the sentinel
    back (the only reader of these elements). A region polled `limit` times gives up and sets err_ptr[0] = 1."""
    acc = tl.zeros(offs.shape, dtype=tl.float32)
    for r in tl.static_range(WORLD):
        wait = mask
        if USE_OWN:
            wait = mask & (tl.full(offs.shape, r, tl.int32) != rank)
        src = inbox_ptr + r * n + offs
        v = tl.load(src, mask=wait, other=0, volatile=True)
        spins = 0
        while (tl.max(tl.where(v == SENT, 1, 0), axis=0) > 0) & (spins < limit):
            v = tl.load(src, mask=wait, other=0, volatile=True)
            spins += 1
        if spins >= limit:
            tl.store(err_ptr, 1)
        if USE_OWN:
            v = tl.where(wait, v, own_bits)  # this rank's partial in its place in the rank order
        acc += v.to(fdt, bitcast=True).to(tl.float32)
        if CLEAR:
            tl.store(src, tl.full(offs.shape, SENT, v.dtype), mask=wait)
    return acc


@triton.jit
def spin_limit(err_ptr, max_spins):
    """max_spins, or 0 once this rank gave up on a peer (it waits on no later all-reduce)."""
    return tl.where(tl.load(err_ptr) != 0, 0, max_spins)
