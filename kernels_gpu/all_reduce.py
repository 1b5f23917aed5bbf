"""One-shot "push" all-reduce for small activations across the GPUs of one host (tensor parallelism's decode steps).

Each rank holds an inbox in memory every peer can write (torch symmetric memory over NVLink): one region per source
rank, every element of which is a sentinel (the bit pattern of -0.0) while nothing has arrived. One kernel on each
rank stores its partial straight into every peer's inbox (with -0.0 written as +0.0, so that a value is never the
sentinel), then polls its own inbox until no element of a peer's region is the sentinel, sums the regions in rank
order in f32 (so every rank gets the same bits) and writes the region back to the sentinel for the next use. The data
is its own flag: no barrier and no signal round trip, one NVLink write latency (the "Lamport" one-shot all-reduce of
TensorRT-LLM's small-message path).

Reuse rule (the caller's): every all-reduce of a step has an inbox of its own, and a step runs at least two of them.
A peer can write an inbox again only in the next step, after this rank's next all-reduce pushed to it, which comes
after this rank finished reading (and clearing) the inbox. With one all-reduce per step a fast peer could overwrite
data not yet read, so callers must not use this kernel there.

A rank that polls a region more than `max_spins` times (minutes) gives up, sets its error flag, returns garbage and
waits on no later all-reduce, rather than hang on a peer that died; callers check the flag.

Launched with programmatic dependent launch on sm_90+ (kernels_gpu.fused_gemv.pdl_enabled): the next kernel (a
fused GEMV) is scheduled while this one polls and loads its first weight tile meanwhile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels_gpu.fused_gemv import gdc_launch_dependents, gdc_wait, pdl_enabled
from kernels_gpu.inbox import MAX_SPINS, int_view_dtype, poll_sum, push, sendable, sentinel, spin_limit
from kernels_gpu.norms import rms_normalize

MAX_RANKS = 8
BLOCK = 1024  # elements a program pushes and polls (16 bytes a thread at 4 warps, bf16)
NUM_WARPS = 4


@triton.jit
def _exchange(x_ptr, inbox_ptr, p0, p1, p2, p3, p4, p5, p6, p7, err_ptr, offs, mask, n, rank, max_spins,
              WORLD: tl.constexpr, SENT: tl.constexpr, fdt: tl.constexpr):
    """Push this rank's partial at `offs` (elements of the n-element message) into region `rank` of every peer's
    inbox, wait for the peers' regions in this rank's inbox, empty them again; -> f32 sum in rank order."""
    limit = spin_limit(err_ptr, max_spins)
    bits = sendable(tl.load(x_ptr + offs, mask=mask, other=0), SENT)
    push(bits, offs, mask, n, rank, p0, p1, p2, p3, p4, p5, p6, p7, WORLD, False)
    return poll_sum(inbox_ptr, offs, mask, n, rank, bits, err_ptr, limit, WORLD, SENT, fdt, True, True)


@triton.jit
def push_all_reduce_kernel(x_ptr, out_ptr, inbox_ptr, p0, p1, p2, p3, p4, p5, p6, p7, err_ptr, n, rank, max_spins,
                           WORLD: tl.constexpr, SENT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """x, inbox, p*: integer views (int16 / int32) of the activations; out: the activations' float dtype.
    inbox: this rank's inbox of this all-reduce, [WORLD, n] regions by source rank; p_r: rank r's inbox (p_rank is
    inbox). err: i32[1], set to 1 when a poll gave up."""
    if PDL:
        gdc_launch_dependents()  # the next kernel may be scheduled now: it waits for this one before reading `out`
        gdc_wait()  # the partial is the previous kernel's output
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    fdt: tl.constexpr = out_ptr.dtype.element_ty
    acc = _exchange(x_ptr, inbox_ptr, p0, p1, p2, p3, p4, p5, p6, p7, err_ptr, offs, mask, n, rank, max_spins,
                    WORLD, SENT, fdt)
    tl.store(out_ptr + offs, acc.to(fdt), mask=mask)


@triton.jit
def push_all_reduce_norm_kernel(x_ptr, res_ptr, nw_ptr, sum_ptr, out_ptr, inbox_ptr, p0, p1, p2, p3, p4, p5, p6, p7,
                                err_ptr, n, hidden, rank, max_spins, eps, weight_offset, WORLD: tl.constexpr,
                                SENT: tl.constexpr, BLOCK_H: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                                HAS_OFFSET: tl.constexpr, PDL: tl.constexpr):
    """One program per row of the [T, hidden] message: the all-reduce's row s (as push_all_reduce_kernel stores it),
    then add_rms_norm_kernel's rule: sum = s (+ residual, rounded to its dtype) -> sum_ptr, out = the row
    normalized (norms.rms_normalize)."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    offs = row * hidden + cols
    fdt: tl.constexpr = out_ptr.dtype.element_ty
    acc = _exchange(x_ptr, inbox_ptr, p0, p1, p2, p3, p4, p5, p6, p7, err_ptr, offs, mask, n, rank, max_spins,
                    WORLD, SENT, fdt)
    h = acc.to(fdt).to(tl.float32)  # the all-reduce's output, as it would be stored
    if HAS_RESIDUAL:
        h = h + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = h.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + offs, h, mask=mask)
    y = rms_normalize(h.to(tl.float32), nw_ptr, cols, mask, hidden, eps, weight_offset, fdt, HAS_OFFSET)
    tl.store(out_ptr + offs, y, mask=mask)


def push_all_reduce(x: torch.Tensor, out: torch.Tensor, inboxes: list[torch.Tensor], rank: int, err: torch.Tensor,
                    *, max_spins: int = MAX_SPINS) -> torch.Tensor:
    """out = the sum over ranks of x (contiguous, bfloat16 / float16 / float32), through the ranks' inboxes of this
    all-reduce: inboxes[r] is rank r's inbox (an integer view, at least len(inboxes) * x.numel() elements; for r !=
    rank a peer's memory mapped here), every element the sentinel before the call and again after it."""
    idt, peers = _check_call(x, inboxes, rank)
    if out.shape != x.shape or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("push all-reduce: out must be a contiguous tensor of x's shape and dtype")
    n = x.numel()
    if n == 0:
        return out
    pdl = pdl_enabled(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    push_all_reduce_kernel[(triton.cdiv(n, BLOCK),)](
        x.view(idt), out, inboxes[rank], *peers, err, n, rank, max_spins,
        WORLD=len(inboxes), SENT=sentinel(idt), BLOCK=BLOCK, PDL=pdl, num_warps=NUM_WARPS, **extra)
    return out


def _check_call(x, inboxes, rank) -> tuple[torch.dtype, list]:
    world = len(inboxes)
    if not 1 <= world <= MAX_RANKS or not 0 <= rank < world:
        raise ValueError(f"push all-reduce: {world} ranks (at most {MAX_RANKS}), rank {rank}")
    idt = int_view_dtype(x.dtype)
    if not x.is_contiguous():
        raise ValueError("push all-reduce: x must be contiguous")
    for box in inboxes:
        if box.dtype != idt or box.numel() < world * x.numel():
            raise ValueError(f"push all-reduce: an inbox must be {idt} of at least {world * x.numel()} elements, "
                             f"got {box.dtype} of {box.numel()}")
    return idt, list(inboxes) + [inboxes[rank]] * (MAX_RANKS - world)


def push_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                                 inboxes: list[torch.Tensor], rank: int, err: torch.Tensor, *,
                                 weight_offset: float | None = None, max_spins: int = MAX_SPINS):
    """The all-reduce of x [T, H] (as push_all_reduce) fused with norms.add_rms_norm of its result: -> (normed [T, H]
    in x's dtype, summed = reduced + residual in residual's dtype, or the reduced x without a residual). Bit for bit
    push_all_reduce then add_rms_norm (residual None: rms_norm of the reduced x, which is also returned)."""
    from kernels_gpu.norms import NORM_MAX_HIDDEN, NORM_NUM_WARPS

    if x.dim() != 2:
        raise ValueError(f"push all-reduce + norm: x must be [T, H], got {tuple(x.shape)}")
    t, hidden = x.shape
    idt, peers = _check_call(x, inboxes, rank)
    if weight.shape != (hidden,) or hidden > NORM_MAX_HIDDEN:
        raise ValueError(f"push all-reduce + norm: weight must be [{hidden}] (hidden <= {NORM_MAX_HIDDEN}), got "
                         f"{tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"push all-reduce + norm: residual must be a contiguous {tuple(x.shape)}, got "
                         f"{tuple(residual.shape)}")
    out = torch.empty_like(x)
    summed = torch.empty_like(x if residual is None else residual)
    if x.numel() == 0:
        return out, summed
    block_h = triton.next_power_of_2(hidden)
    warps = next(w for width, w in NORM_NUM_WARPS if block_h <= width)
    pdl = pdl_enabled(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    push_all_reduce_norm_kernel[(t,)](
        x.view(idt), residual if residual is not None else x, weight, summed, out, inboxes[rank], *peers, err,
        x.numel(), hidden, rank, max_spins, float(eps), float(weight_offset or 0.0),
        WORLD=len(inboxes), SENT=sentinel(idt), BLOCK_H=block_h, HAS_RESIDUAL=residual is not None,
        HAS_OFFSET=weight_offset is not None, PDL=pdl, num_warps=warps, **extra)
    return out, summed


def ref_all_reduce(parts: list[torch.Tensor]) -> torch.Tensor:
    """The reference (the kernel's rule, bit for bit): the partials summed in rank order in float32, rounded once to
    their dtype."""
    acc = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)
