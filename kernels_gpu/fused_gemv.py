"""Decode GEMV with its input's producer fused in: y[M, N] = a[M, K] @ W[N, K]^T (+ bias) for M <= FUSED_MAX_M, where
the activation row a is computed inside the kernel instead of being read from a tensor another launch wrote.

Prologues (what `a` is):
  "none"      a = x[rows[m]]                                              (gemv)
  "rms_norm"  h = x (+ residual, rounded to its dtype; program 0 stores h)  (norm_gemv)
              a = h * rsqrt(mean(h^2) + eps) * w_norm, or * (weight_offset + w_norm) (Gemma): add_rms_norm's
              normalization, without its roundings (below)
  "silu" / "gelu_tanh"  a = cast(act(gate) * up), gate | up the halves of one [M, 2K] row  (act_gemv):
              kernels_gpu.activations' rules

The norm runs in one pass: the dot is taken over h * w_norm (f32) while the same loop sums h^2, and 1 / rms scales the
result, so the activation is not rounded to x's dtype between the norm and the dot as the unfused kernels store it
(the outputs differ from the unfused path by that rounding, ~1e-3 relative in bf16; equal to f32 rounding in f32).
A SwiGLU / GeGLU activation is rounded where silu_and_mul stores it. The dot accumulates in f32 on the CUDA cores
(batch-1 decode is weight-read bound, and a tensor-core tile would be 15/16 padding). Each program owns BLOCK_N
weight rows and streams them once over all of K; the prologue's reads of x / residual / the norm weight are a few KB
per program, served from L2.

Why: a batch-1 decode step of a Llama-shaped model was ~10 launches per layer (norm, qkv, rope, kv_write, attention,
o, add+norm, gate_up, silu-mul, down), and the launches, not the weight reads, set its time (BENCHMARKS.md). Fusing
each norm and each SwiGLU into the GEMV that reads it removes three launches per layer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels_gpu.activations import act_and_mul
from kernels_gpu.inbox import Exchange, int_view_dtype, poll_sum, push, sendable, sentinel, spin_limit
from kernels_gpu.triton_env import gdc_launch_dependents, gdc_wait
from kernels_gpu.triton_env import tile_target as _target

FUSED_MAX_M = 16  # activation rows one launch takes (MULTI_ROW "dot"; the CUDA-core paths take at most 8)
# NOTE: on the H100 the fused GEMV beats the unfused norm / SwiGLU kernel + cuBLAS by 1.02-1.18x at M = 1 but loses
# at M = 2 and 4 (0.52-0.97x with each shape's best tiles: every weight tile is multiplied by each row on the CUDA
# cores; the tensor-core tiles of MULTI_ROW "dot" lose too, see there), so the CUDA backend fuses only single-row steps
# (lowering/backends/cuda.py, FUSED_GEMV_ROWS); BENCHMARKS.md has the sweeps.
PROLOGUES = {"none": 0, "rms_norm": 1, "silu": 2, "gelu_tanh": 3}
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Tile table: (target, BLOCK_M) -> list of (max N, BLOCK_N, BLOCK_K, num_warps, num_stages); the first entry whose
# max N >= N.
# NOTE: chosen by benchmarks/gpu_fused_gemv.py --sweep on the H100 (2026-11-28, Llama-3.2-1B and Llama-3-8B shapes:
# within 5% of each shape's best at M = 1); the interpreter's tiles are small so that the tests run several N tiles
# and K steps on small shapes.
TILE_SIZES = {
    ("cuda", 1): [(2048, 4, 1024, 8, 3), (32768, 4, 1024, 4, 3), (1 << 62, 8, 1024, 4, 3)],
    ("cuda", 2): [(2048, 4, 512, 4, 3), (1 << 62, 8, 512, 4, 3)],
    ("cuda", 4): [(2048, 4, 256, 8, 3), (1 << 62, 8, 256, 4, 3)],
    ("cuda", 8): [(2048, 4, 128, 8, 3), (1 << 62, 8, 128, 4, 3)],  # (scaled from M = 4, not swept)
}
# BLOCK_M = 16: MULTI_ROW "dot", all rows in one tensor-core tile (rows past M are zeros).
# NOTE: .device sweep on an H200 (2026-11-29, SmolLM2-135M shapes, M = 5, 20 tiles): within 0.4 us of each shape's best
# except the down projection (8.9 us against 6.0 us with a split-K variant, which lost elsewhere and was dropped).
TILE_SIZES[("cuda", 16)] = [(4096, 16, 128, 4, 3), (1 << 62, 64, 128, 4, 3)]
# (target, BLOCK_M, prologue) tables are keyed by K instead of N: (max K, BLOCK_N, BLOCK_K, warps, stages).
# NOTE: "none" at BLOCK_M = 16 (the GEMVs of verification steps after an unfused norm / SwiGLU kernel): .device sweep
# on an H200 (2026-11-29, M = 5, 12 tiles, SmolLM2-135M and Llama-3.2-1B shapes): K <= 1024 in one step of 32 x 1024
# (SmolLM2 qkv / o_proj 2.3 us, gate_up 3.6 us; cuBLAS 4.1 / 3.5 / 4.2), longer K in 32 x 256 steps (SmolLM2 down
# 4.7 us, cuBLAS 5.1; Llama-3.2-1B's K = 2048 / 8192 projections 7.0-21.7 us, cuBLAS 6.3-19.0: the CUDA backend keeps
# cuBLAS there, lowering/backends/cuda.py DOT_GEMV_MAX_K)
TILE_SIZES[("cuda", 16, "none")] = [(1024, 32, 1024, 8, 1), (1 << 62, 32, 256, 4, 3)]
for _bm in (1, 2, 4, 8):
    TILE_SIZES[("interpret", _bm)] = [(1 << 62, 8, 32, 4, 1)]
TILE_SIZES[("interpret", 16)] = [(1 << 62, 16, 32, 4, 1)]
# (the CUDA program's small steps under the interpreter: few programs, each a few numpy dots)
TILE_SIZES[("interpret", 16, "none")] = [(1 << 62, 64, 128, 4, 1)]

# How a launch runs M > 1 rows:
#   "dot"        one program per BLOCK_N weight rows takes all rows as one [16, BLOCK_K] x [BLOCK_K, BLOCK_N]
#                tensor-core product per K step (M <= 16; the activation tile is rounded to the weight dtype first)
#   "row_split"  one program per (N tile, row), each running the one-row loop, the M programs of a tile side by side
#                so that its weights are read from memory once and from the caches after (M <= 8)
#   "rows"       one program per N tile taking all rows in [BLOCK_M, BLOCK_N, BLOCK_K] CUDA-core products (M <= 8)
# NOTE: the all-rows programs ran a q = 5 verification step of SmolLM2 in 1.56 ms against 1.04 ms with the unfused
# kernels and cuBLAS, and Llama-3.2-1B's in 3.87 ms against 1.19 ms (H200, 2026-11-29): BENCHMARKS.md. The tensor-core
# tiles (same day, H200) run SmolLM2's M = 5 projections at 0.7-1.2x the unfused kernels + cuBLAS (down 9.5 us vs
# 6.5, o_proj 2.9 vs 3.4) and at 2-3x their own one-row time for the same weight bytes: each program computes the
# prologue for all 16 rows of every K step, so the kernel is bound by that work, not by the weight reads; a q = 5
# step with them took 1,033 us against 936 us unfused, hence the CUDA backend's FUSED_GEMV_ROWS = 1.
# Later the same day (H200): the CUDA-core modes with the one-row tiles (a row's K in one 1,024-wide step, so "rows"
# gave each row its one-row result bit for bit) cost 2.3-3.1x their one-row time at M = 5 (SmolLM2 gate_up 9.1 vs
# 2.5 us, Llama-3.2-1B logits 363 vs 119 us: multiply-add issue, not weight reads, bounds them; a q = 5 SmolLM2 step
# 1,064-1,121 us against 938 us unfused); "dot" tiles of BLOCK_K >= 512 with a norm / SwiGLU prologue spill (13-2,400
# us). What pays at 2-16 rows is "dot" without a prologue after the unfused producer (TILE_SIZES' "none" table), which
# the CUDA backend runs for small-K linears of such steps (its DOT_GEMV_ROWS).
MULTI_ROW = "dot"
MULTI_ROW_MODES = ("dot", "row_split", "rows")
CUDA_CORE_MAX_M = 8

# Programmatic dependent launch on sm_90+: each launch may start while the kernel before it in the stream (or CUDA
# graph) finishes; its programs load their first weight tile, which no earlier kernel writes, then wait
# (griddepcontrol.wait) for that kernel's results before reading activations or writing anything. Off: plain launches
# (benchmarks' ablation).
USE_PDL = True
# peel the first K step off the one-row loop and load its weight tile first: None = when launched with PDL (where it
# pays); True = always (tests run the peeled path in the interpreter, which has no griddepcontrol)
PREFETCH_FIRST_TILE: bool | None = None


def pdl_enabled(device) -> bool:
    """Whether launches on device use programmatic dependent launch (USE_PDL, a CUDA device of compute capability >=
    9.0, and a Triton with griddepcontrol and launch_pdl)."""
    if not USE_PDL or gdc_wait is None or device.type != "cuda":
        return False
    if device not in _PDL_DEVICES:
        try:
            from triton.backends.nvidia.compiler import CUDAOptions

            has_option = "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})
        except ImportError:  # pragma: no cover
            has_option = False
        _PDL_DEVICES[device] = has_option and torch.cuda.get_device_capability(device)[0] >= 9
    return _PDL_DEVICES[device]


_PDL_DEVICES: dict = {}


def pdl_launch(device) -> dict:
    """A launch's keyword arguments for programmatic dependent launch where it is on (pdl_enabled): the kernel's PDL
    flag and launch_pdl; {} elsewhere."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {}


@triton.jit
def _act_load(x_ptr, r_ptr, x_off, r_off, mask, up_offset, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """The activation's raw inputs at these offsets: (x or the gate, the residual or the up half; else x again)."""
    a = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    b = a
    if PROLOGUE == 1:
        if HAS_RESIDUAL:
            b = tl.load(r_ptr + r_off, mask=mask, other=0.0)
    elif PROLOGUE >= 2:
        b = tl.load(x_ptr + x_off + up_offset, mask=mask, other=0.0)
    return a, b


@triton.jit
def _act_compute(a, b, nw_ptr, rout_ptr, act_ty: tl.constexpr, o_off, offs_k, k_mask, store_mask, weight_offset,
                 PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr,
                 STORE_SUM: tl.constexpr):
    """_activation from _act_load's raw inputs."""
    a = a.to(tl.float32)
    hsq = a
    if PROLOGUE == 1:
        h = a
        if HAS_RESIDUAL:
            # rounded to the stream's dtype before it is normalized, as HF's `residual + h` is
            h = (h + b.to(tl.float32)).to(rout_ptr.dtype.element_ty)
            if STORE_SUM:
                tl.store(rout_ptr + o_off, h, mask=store_mask)
            h = h.to(tl.float32)
        hsq = h * h
        nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            nw = nw + weight_offset
        a = h * nw
    elif PROLOGUE >= 2:
        a = act_and_mul(a, b.to(tl.float32), PROLOGUE == 3).to(act_ty).to(tl.float32)  # rounded as silu_and_mul's
    return a, hsq


@triton.jit
def _activation(x_ptr, r_ptr, nw_ptr, rout_ptr, x_off, r_off, o_off, offs_k, k_mask, mask, store_mask, up_offset,
                weight_offset, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr,
                STORE_SUM: tl.constexpr):
    """The activation tile a (f32, the shape of the offsets: [BLOCK_K] or [BLOCK_M, BLOCK_K]) and, for rms_norm, h^2
    of its elements. rms_norm returns a = h * w_norm: the caller scales the dot by 1 / rms after the loop."""
    a, b = _act_load(x_ptr, r_ptr, x_off, r_off, mask, up_offset, PROLOGUE, HAS_RESIDUAL)
    return _act_compute(a, b, nw_ptr, rout_ptr, x_ptr.dtype.element_ty, o_off, offs_k, k_mask, store_mask,
                        weight_offset, PROLOGUE, HAS_RESIDUAL, HAS_OFFSET, STORE_SUM)


@triton.jit
def _gather_row(x_ptr, in_ptr, flags_ptr, err_ptr, pid, K, max_spins, slot, prev, WORLD: tl.constexpr,
                SENT: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[0:K] = the all-reduce read from this rank's inbox (inbox.poll_sum, emptied), written by program 0; every
    program returns once it is there. Only program 0 polls the peers (the others would each read the whole inbox
    from L2); it lowers the previous folded all-reduce's flag (whose readers all finished before this launch) and
    raises this one's after a barrier, with release / acquire at GPU scope around it."""
    if pid == 0:
        tl.store(flags_ptr + prev, 0)
        limit = spin_limit(err_ptr, max_spins)
        kk = tl.arange(0, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            offs = k0 + kk
            m = offs < K
            acc = poll_sum(in_ptr, offs, m, K, 0, 0, err_ptr, limit, WORLD, SENT, x_ptr.dtype.element_ty, False, True)
            tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=m)
        tl.debug_barrier()
        tl.atomic_xchg(flags_ptr + slot, 1, sem="release", scope="gpu")
    else:  # spin with plain L2 reads (thousands of programs on one word), then one acquire
        ready = tl.load(flags_ptr + slot, volatile=True)
        while ready == 0:
            ready = tl.load(flags_ptr + slot, volatile=True)
        tl.atomic_add(flags_ptr + slot, 0, sem="acquire", scope="gpu")


@triton.jit
def _row_offsets(rows_ptr, offs_m, m_mask, stride_xm, stride_rm, stride_rom, HAS_ROWS: tl.constexpr):
    """[BM, 1] offsets of the multi-row paths' rows: into x and the residual (through rows_ptr with HAS_ROWS), and
    into the new residual (row m)."""
    if HAS_ROWS:
        xrow = tl.load(rows_ptr + offs_m, mask=m_mask, other=0).to(tl.int64)
    else:
        xrow = offs_m.to(tl.int64)
    return (xrow * stride_xm)[:, None], (xrow * stride_rm)[:, None], offs_m.to(tl.int64)[:, None] * stride_rom


@triton.jit
def _dot_rows(acc, a, w, DOT_F32: tl.constexpr):
    """acc [BM, BN] += a [BM, BK] (f32) @ w [BN, BK]^T on the tensor cores: a rounded to w's dtype (bf16 / f16), or
    both in f32 (DOT_F32)."""
    if DOT_F32:
        return tl.dot(a, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    return tl.dot(a.to(w.dtype), tl.trans(w), acc)


@triton.jit
def fused_gemv_kernel(
    y_ptr,  # [M, N] out (y dtype)
    x_ptr,  # [*, K] activations (rms_norm / none), or [*, 2K] gate | up rows (silu / gelu_tanh)
    r_ptr,  # [*, K] residual (rms_norm with HAS_RESIDUAL)
    nw_ptr,  # [K] norm weight (rms_norm)
    rout_ptr,  # [M, K] out: x + residual (STORE_SUM), written by program 0; else any tensor of the residual's dtype
    w_ptr,  # [N, K] weight, K contiguous
    b_ptr,  # [N] bias (HAS_BIAS)
    rows_ptr,  # i32[M] the x row of each output row (HAS_ROWS), else row m
    M, N, K, up_offset,  # up_offset: elements from a gate column to its up column
    eps, weight_offset,
    stride_xm, stride_rm, stride_rom, stride_wn, stride_ym,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    STORE_SUM: tl.constexpr = False,
    ROUND_TO_ACT: tl.constexpr = False,  # round y to the activation dtype before storing it in y's (the IR's logits)
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (see USE_PDL)
    PREFETCH: tl.constexpr = False,  # one row: the first weight tile is loaded before anything else (with PDL: waited)
    ROW_SPLIT: tl.constexpr = False,  # BLOCK_M == 1 over M rows: program pid takes row pid % M of N tile pid // M
    DOT: tl.constexpr = False,  # BLOCK_M >= 16: all rows in tensor-core products (MULTI_ROW "dot")
    DOT_F32: tl.constexpr = False,  # DOT in f32 (f32 weights; the interpreter, whose bf16 dot is wrong)
    # an all-reduce folded in (inbox.Exchange; one row). EX_PUSH: the output tile also goes to region ex_rank (N
    # elements) of every rank's inbox e0... EX_GATHER: x (x_ptr, K elements) is first written by program 0 as the sum
    # of the inbox ex_in, which it empties; program 0 then raises ex_flags[ex_slot] (after lowering
    # ex_flags[ex_prev]) and the other programs wait for it
    ex_in_ptr=None, ex_flags_ptr=None, e0=None, e1=None, e2=None, e3=None, e4=None, e5=None, e6=None, e7=None,
    ex_err_ptr=None, ex_rank=0, ex_spins=0, ex_slot=0, ex_prev=0,
    EX_GATHER: tl.constexpr = False, EX_PUSH: tl.constexpr = False, EX_WORLD: tl.constexpr = 1,
    EX_SENT: tl.constexpr = 0,
):
    """One program per BLOCK_N weight rows, all M (<= BLOCK_M) activation rows, the whole of K (ROW_SPLIT: one
    program per BLOCK_N weight rows and activation row; the M programs of a tile run side by side and share its
    weights through the caches)."""
    if PDL:
        gdc_launch_dependents()  # the next kernel may be scheduled once every program of this one has started
    pid = tl.program_id(0)
    if ROW_SPLIT:
        m0 = pid % M
        pid = pid // M
    else:
        m0 = 0
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # i32[BN]
    n_mask = offs_n < N
    offs_m = m0 + tl.arange(0, BLOCK_M)  # i32[BM]
    m_mask = offs_m < M
    act_ty = x_ptr.dtype.element_ty
    kk = tl.arange(0, BLOCK_K)  # i32[BK]
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    stores = tl.where(pid == 0, M, 0)  # program 0 stores the new residual (rows below `stores`, columns below store_k)
    store_k = tl.where(pid == 0, K, 0)
    # NOTE: products are accumulated per lane and reduced once after the loop: a reduction inside it puts a barrier
    # between one tile's loads and the next (20-40% slower on the H100)
    if BLOCK_M == 1:  # one row: 1-D activations, no 3-D layouts (the batch-1 decode path)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        sumsq1 = tl.zeros([BLOCK_K], dtype=tl.float32)
        k_start = 0
        if PREFETCH:  # the first weight tile is read while the kernel before finishes (PDL)
            w_first = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)
        if PDL:
            gdc_wait()
        if EX_GATHER:
            _gather_row(x_ptr, ex_in_ptr, ex_flags_ptr, ex_err_ptr, pid, K, ex_spins, ex_slot, ex_prev, EX_WORLD,
                        EX_SENT, BLOCK_K)
        row0 = 0
        o0 = 0  # the new residual's row (STORE_SUM)
        if ROW_SPLIT:
            row0 = m0.to(tl.int64)
            o0 = m0.to(tl.int64) * stride_rom
        if HAS_ROWS:
            row0 = tl.load(rows_ptr + m0).to(tl.int64)
        x0 = row0 * stride_xm  # the one row's offsets (scalars)
        r0 = row0 * stride_rm
        if PREFETCH:
            k_mask = kk < K
            a, hsq = _activation(x_ptr, r_ptr, nw_ptr, rout_ptr, x0 + kk, r0 + kk, o0 + kk, kk, k_mask, k_mask,
                                 kk < store_k,
                                 up_offset, weight_offset, PROLOGUE, HAS_RESIDUAL, HAS_OFFSET, STORE_SUM)
            acc1 += w_first.to(tl.float32) * a[None, :]
            sumsq1 += hsq
            k_start = BLOCK_K
        for k0 in range(k_start, K, BLOCK_K):
            offs_k = k0 + kk
            k_mask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            a, hsq = _activation(x_ptr, r_ptr, nw_ptr, rout_ptr, x0 + offs_k, r0 + offs_k, o0 + offs_k, offs_k, k_mask,
                                 k_mask, offs_k < store_k, up_offset, weight_offset, PROLOGUE, HAS_RESIDUAL,
                                 HAS_OFFSET, STORE_SUM)
            acc1 += w * a[None, :]
            sumsq1 += hsq
        acc = tl.sum(acc1, 1)[None, :]  # [1, BN]
        sumsq = tl.sum(sumsq1, 0)[None]  # [1]
    elif DOT:
        # The activation tile of the next K step is loaded before this step's is used (its L2 latency then overlaps
        # the step), the weight tiles are pipelined by the compiler (num_stages).
        if PREFETCH:  # as the one-row path's
            w_first = tl.load(w_rows + kk[None, :], mask=n_mask[:, None] & (kk < K)[None, :], other=0.0)
        if PDL:
            gdc_wait()
        x_row, r_row, o_row = _row_offsets(rows_ptr, offs_m, m_mask, stride_xm, stride_rm, stride_rom, HAS_ROWS)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        sumsq2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        row_stores = (offs_m < stores)[:, None]
        f_mask = (kk < K)[None, :]
        xa, xb = _act_load(x_ptr, r_ptr, x_row + kk[None, :], r_row + kk[None, :], m_mask[:, None] & f_mask,
                           up_offset, PROLOGUE, HAS_RESIDUAL)
        k_start = 0
        if PREFETCH:
            nk = BLOCK_K + kk
            na, nb = _act_load(x_ptr, r_ptr, x_row + nk[None, :], r_row + nk[None, :],
                               m_mask[:, None] & (nk < K)[None, :], up_offset, PROLOGUE, HAS_RESIDUAL)
            a, hsq = _act_compute(xa, xb, nw_ptr, rout_ptr, act_ty, o_row + kk[None, :], kk[None, :], f_mask,
                                  m_mask[:, None] & f_mask & row_stores, weight_offset, PROLOGUE, HAS_RESIDUAL,
                                  HAS_OFFSET, STORE_SUM)
            acc = _dot_rows(acc, a, w_first, DOT_F32)
            sumsq2 += hsq
            xa, xb = na, nb
            k_start = BLOCK_K
        for k0 in range(k_start, K, BLOCK_K):
            offs_k = k0 + kk
            k_mask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            nk = offs_k + BLOCK_K
            na, nb = _act_load(x_ptr, r_ptr, x_row + nk[None, :], r_row + nk[None, :],
                               m_mask[:, None] & (nk < K)[None, :], up_offset, PROLOGUE, HAS_RESIDUAL)
            mask = m_mask[:, None] & k_mask[None, :]
            a, hsq = _act_compute(xa, xb, nw_ptr, rout_ptr, act_ty, o_row + offs_k[None, :], offs_k[None, :],
                                  k_mask[None, :], mask & row_stores, weight_offset, PROLOGUE, HAS_RESIDUAL,
                                  HAS_OFFSET, STORE_SUM)
            acc = _dot_rows(acc, a, w, DOT_F32)
            sumsq2 += hsq
            xa, xb = na, nb
        sumsq = tl.sum(sumsq2, 1)  # [BM]
    else:
        if PDL:
            gdc_wait()
        x_row, r_row, o_row = _row_offsets(rows_ptr, offs_m, m_mask, stride_xm, stride_rm, stride_rom, HAS_ROWS)
        acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
        sumsq2 = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + kk
            k_mask = offs_k < K
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            mask = m_mask[:, None] & k_mask[None, :]
            a, hsq = _activation(x_ptr, r_ptr, nw_ptr, rout_ptr, x_row + offs_k[None, :], r_row + offs_k[None, :],
                                 o_row + offs_k[None, :], offs_k[None, :], k_mask[None, :], mask,
                                 mask & (offs_m < stores)[:, None],
                                 up_offset, weight_offset, PROLOGUE, HAS_RESIDUAL, HAS_OFFSET, STORE_SUM)
            acc3 += w[None, :, :] * a[:, None, :]
            sumsq2 += hsq
        acc = tl.sum(acc3, 2)  # [BM, BN]
        sumsq = tl.sum(sumsq2, 1)  # [BM]
    if PROLOGUE == 1:
        acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))[:, None]

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ROUND_TO_ACT:
        acc = acc.to(act_ty).to(tl.float32)
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y, out, mask=m_mask[:, None] & n_mask[None, :])
    if EX_PUSH:  # one row: the tile into region ex_rank of every rank's inbox
        bits = sendable(out.to(e0.dtype.element_ty, bitcast=True), EX_SENT)
        push(bits, offs_n[None, :], n_mask[None, :], N, ex_rank, e0, e1, e2, e3, e4, e5, e6, e7, EX_WORLD, True)


# ------------------------------------------------------------------------------------------------ launchers

def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"fused_gemv: {msg}")


def _block_m(m: int) -> int:
    return 1 if m <= 1 else (2 if m == 2 else (4 if m <= 4 else 8))


def _tiles(device, block_m: int, n: int, k: int, prologue: str | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages): the (target, BLOCK_M, prologue) table by K where there is one, else the
    (target, BLOCK_M) table by N."""
    key = (_target(device), block_m)
    table, size = TILE_SIZES.get((*key, prologue)), k
    if table is None:
        table, size = TILE_SIZES[key], n
    return next(tiles[1:] for tiles in table if size <= tiles[0])


def _check_weight(weight, bias, k: int, device):
    _check(isinstance(weight, torch.Tensor) and weight.dim() == 2, "weight must be a 2-D [N, K] tensor")
    _check(weight.shape[1] == k, f"weight is {tuple(weight.shape)} but the activation rows have K={k}")
    _check(weight.dtype in _DTYPES, f"unsupported weight dtype {weight.dtype} (bf16, fp16, fp32)")
    _check(weight.shape[1] <= 1 or weight.stride(1) == 1, "weight's last dim must be contiguous")
    _check(weight.device == device, f"weight is on {weight.device}, the activations on {device}")
    if bias is not None:
        _check(bias.shape == (weight.shape[0],), f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        _check(bias.device == device, f"bias is on {bias.device}, the activations on {device}")


def activation_rows(x, rows, name: str, check) -> int:
    """The number of output rows (M), checking the activations x [T, K] and the optional row index rows (i32[M]);
    check(cond, msg) raises."""
    check(isinstance(x, torch.Tensor) and x.dim() == 2, f"{name} must be a 2-D tensor")
    check(x.dtype in _DTYPES, f"unsupported {name} dtype {x.dtype} (bf16, fp16, fp32)")
    check(x.shape[1] <= 1 or x.stride(1) == 1, f"{name}'s last dim must be contiguous")
    if rows is not None:
        check(rows.dim() == 1 and rows.dtype in (torch.int32, torch.int64), "rows must be a 1-D int32/int64 index")
        check(rows.device == x.device, f"rows is on {rows.device}, {name} on {x.device}")
    return x.shape[0] if rows is None else rows.shape[0]


def _multi_row(m: int) -> str:
    """How a launch of m rows runs: "one" (m <= 1) or the MULTI_ROW mode (checked)."""
    if m <= 1:
        return "one"
    _check(MULTI_ROW in MULTI_ROW_MODES, f"MULTI_ROW must be one of {MULTI_ROW_MODES}, got {MULTI_ROW!r}")
    return MULTI_ROW


def _tile_block_m(m: int) -> int:
    """The tile table's BLOCK_M for a launch of m rows (with the current MULTI_ROW mode)."""
    mode = _multi_row(m)
    return 16 if mode == "dot" else (1 if mode in ("one", "row_split") else _block_m(m))


def max_rows() -> int:
    """The most activation rows one launch takes with the current MULTI_ROW mode."""
    return FUSED_MAX_M if MULTI_ROW == "dot" else CUDA_CORE_MAX_M


def _check_rows(x, rows, name: str) -> int:
    m = activation_rows(x, rows, name, _check)
    _check(m <= max_rows(), f"{m} activation rows; the fused GEMV takes at most {max_rows()} (FUSED_MAX_M="
           f"{FUSED_MAX_M} with MULTI_ROW 'dot', {CUDA_CORE_MAX_M} otherwise)")
    return m


def _exchange_args(ex: Exchange | None, x, y, prologue: str) -> dict:
    """The kernel arguments of an all-reduce folded into this launch (inbox.Exchange), checked."""
    if ex is None:
        return {}
    m, n = y.shape
    _check(m == 1 and x.shape[0] == 1, f"an exchange (folded all-reduce) takes one-row steps, got {x.shape[0]} rows")
    _check(1 <= ex.world <= 8 and 0 <= ex.rank < ex.world, f"exchange: {ex.world} ranks, rank {ex.rank}")
    args = {"ex_err_ptr": ex.err, "ex_rank": ex.rank, "ex_spins": ex.max_spins, "EX_WORLD": ex.world}
    if ex.gather is not None:
        _check(prologue == "rms_norm", "exchange: only a norm prologue gathers its activation from an inbox")
        idt = int_view_dtype(x.dtype)
        _check(ex.gather.dtype == idt and ex.gather.numel() >= ex.world * x.shape[1],
               f"exchange: the gather inbox must be {idt} of at least {ex.world * x.shape[1]} elements")
        _check(ex.flags is not None and ex.flags.dtype == torch.int32 and 0 <= ex.prev < ex.flags.numel()
               and 0 <= ex.slot < ex.flags.numel(), "exchange: gather needs int32 flags covering slot and prev")
        _check(x.is_contiguous(), "exchange: gather writes x, which must be contiguous")
        args.update(ex_in_ptr=ex.gather, ex_flags_ptr=ex.flags, ex_slot=ex.slot, ex_prev=ex.prev, EX_GATHER=True,
                    EX_SENT=sentinel(idt))
    if ex.push:
        idt = int_view_dtype(y.dtype)
        _check(len(ex.push) == ex.world, "exchange: push names every rank's inbox")
        for box in ex.push:
            _check(box.dtype == idt and box.numel() >= ex.world * n,
                   f"exchange: push inboxes must be {idt} of at least {ex.world * n} elements")
        peers = list(ex.push) + [ex.push[ex.rank]] * (8 - ex.world)
        args.update({f"e{i}": p for i, p in enumerate(peers)}, EX_PUSH=True, EX_SENT=sentinel(idt))
    return args


def _launch(y, x, weight, bias, rows, *, prologue: str, k: int, up_offset: int = 0, residual=None, norm_weight=None,
            residual_out=None, eps: float = 0.0, weight_offset: float | None = None, round_to_act: bool = False,
            exchange: Exchange | None = None):
    m, n = y.shape
    ex_args = _exchange_args(exchange, x, y, prologue)
    if m == 0 or n == 0:
        return
    mode = _multi_row(m)
    row_split = mode == "row_split"
    dot = mode == "dot"
    block_m = _tile_block_m(m)
    block_n, block_k, warps, stages = _tiles(x.device, block_m, n, k, prologue)
    has_res, store_sum = residual is not None, residual_out is not None
    pdl = pdl_enabled(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    prefetch = pdl if PREFETCH_FIRST_TILE is None else PREFETCH_FIRST_TILE
    fused_gemv_kernel[(triton.cdiv(n, block_n) * (m if row_split else 1),)](
        y, x, residual if has_res else x, norm_weight if norm_weight is not None else x,
        residual_out if store_sum else (residual if has_res else x), weight, bias if bias is not None else weight,
        rows if rows is not None else y,
        m, n, k, up_offset, float(eps), float(weight_offset or 0.0),
        x.stride(0), residual.stride(0) if has_res else 0, residual_out.stride(0) if store_sum else 0,
        weight.stride(0), y.stride(0),
        PROLOGUE=PROLOGUES[prologue], HAS_RESIDUAL=has_res, HAS_OFFSET=weight_offset is not None,
        HAS_BIAS=bias is not None, HAS_ROWS=rows is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        STORE_SUM=store_sum, ROUND_TO_ACT=round_to_act, PDL=pdl, PREFETCH=prefetch and (block_m == 1 or dot),
        ROW_SPLIT=row_split, DOT=dot,
        DOT_F32=dot and (_target(x.device) == "interpret" or weight.dtype == torch.float32),
        num_warps=warps, num_stages=stages, **ex_args, **extra,
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, rows: torch.Tensor | None = None,
         out_dtype: torch.dtype | None = None, exchange: Exchange | None = None) -> torch.Tensor:
    """x: [T, K]; weight: [N, K]; rows: i32[M] (which x rows, default all) -> [M, N] = x[rows] @ weight^T (+ bias),
    in out_dtype (default x's). exchange (one row): also pushed to the inboxes of the all-reduce it feeds."""
    m = _check_rows(x, rows, "x")
    _check_weight(weight, bias, x.shape[1], x.device)
    y = torch.empty((m, weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)  # [M, N]
    _launch(y, x, weight, bias, rows, prologue="none", k=x.shape[1], exchange=exchange)
    return y


def norm_prologue_outputs(x, residual, norm_weight, rows, keep_residual: bool, check) -> torch.Tensor | None:
    """Check an RMSNorm prologue's norm weight and residual against x [T, K] (check(cond, msg) raises) -> the new
    residual's buffer [T, K] (residual's dtype), or None without a residual or with keep_residual=False."""
    k = x.shape[1]
    check(isinstance(norm_weight, torch.Tensor) and tuple(norm_weight.shape) == (k,),
          f"norm weight must be [{k}], got {tuple(getattr(norm_weight, 'shape', ()))}")
    check(norm_weight.dtype in _DTYPES, f"unsupported norm weight dtype {norm_weight.dtype}")
    check(norm_weight.device == x.device, f"norm weight is on {norm_weight.device}, x on {x.device}")
    if residual is None:
        return None
    check(rows is None or not keep_residual,
          "rows needs keep_residual=False with a residual (a kept new residual covers every row)")
    check(residual.shape == x.shape, f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    check(residual.dtype in _DTYPES, f"unsupported residual dtype {residual.dtype}")
    check(residual.device == x.device, f"residual is on {residual.device}, x on {x.device}")
    check(k <= 1 or residual.stride(1) == 1, "residual's last dim must be contiguous")
    return torch.empty(x.shape, dtype=residual.dtype, device=x.device) if keep_residual else None


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
              weight: torch.Tensor, bias: torch.Tensor | None = None, *, weight_offset: float | None = None,
              rows: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, keep_residual: bool = True,
              round_to_act: bool = False, exchange: Exchange | None = None):
    """add_rms_norm then gemv in one launch. x, residual: [T, K]; norm_weight: [K]; weight: [N, K] ->
    (y [M, N] in out_dtype (default x's), new residual [T, K] in residual's dtype, or None without a residual or
    with keep_residual=False).

    rows (i32[M]) picks the x (and residual) rows that are normalized and multiplied; a kept new residual covers
    every row, so rows needs keep_residual=False. round_to_act: y is rounded to x's dtype first (the IR's logits
    are computed in the activation dtype, then widened to float32). exchange (one row): x is an all-reduce's output,
    written here from the sum of its inbox before it is read (x's values on entry are not read)."""
    m = _check_rows(x, rows, "x")
    k = x.shape[1]
    residual_out = norm_prologue_outputs(x, residual, norm_weight, rows, keep_residual, _check)
    _check_weight(weight, bias, k, x.device)
    y = torch.empty((m, weight.shape[0]), dtype=out_dtype or x.dtype, device=x.device)  # [M, N]
    _launch(y, x, weight, bias, rows, prologue="rms_norm", k=k, residual=residual, norm_weight=norm_weight,
            residual_out=residual_out, eps=eps, weight_offset=weight_offset, round_to_act=round_to_act,
            exchange=exchange)
    return y, residual_out


def act_gemv(gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
             act: str = "silu", exchange: Exchange | None = None) -> torch.Tensor:
    """silu_and_mul (act="silu") or gelu_tanh_and_mul (act="gelu_tanh") then gemv in one launch.
    gate_up: [M, 2F] (gate | up); weight: [N, F] -> [M, N] in gate_up's dtype. exchange: as gemv's."""
    _check(act in ("silu", "gelu_tanh"), f"act must be 'silu' or 'gelu_tanh', got {act!r}")
    m = _check_rows(gate_up, None, "gate_up")
    _check(gate_up.shape[1] % 2 == 0, f"gate_up's last dim must be even (gate then up), got {gate_up.shape[1]}")
    f = gate_up.shape[1] // 2
    _check_weight(weight, bias, f, gate_up.device)
    y = torch.empty((m, weight.shape[0]), dtype=gate_up.dtype, device=gate_up.device)  # [M, N]
    _launch(y, gate_up, weight, bias, None, prologue=act, k=f, up_offset=f, exchange=exchange)
    return y


# ------------------------------------------------------------------------------------------------ references

def ref_norm_gemv(x, residual, norm_weight, eps, weight, bias=None, *, weight_offset=None, rows=None):
    """float64 reference of norm_gemv -> (f64[M, N], new residual in residual's dtype or None); nothing after the
    residual sum is rounded."""
    from kernels_gpu.norms import ref_add_rms_norm

    normed, new_residual = ref_add_rms_norm(x, residual, norm_weight, eps, weight_offset)
    if rows is not None:
        normed = normed[rows.long()]
    y = normed @ weight.double().t()
    return (y if bias is None else y + bias.double()), new_residual


def ref_act_gemv(gate_up, weight, bias=None, *, act="silu"):
    """float64 reference of act_gemv -> f64[M, N] (the activation unrounded)."""
    from kernels_gpu.activations import ref_gelu_tanh_and_mul, ref_silu_and_mul

    a = ref_silu_and_mul(gate_up) if act == "silu" else ref_gelu_tanh_and_mul(gate_up)
    y = a @ weight.double().t()
    return y if bias is None else y + bias.double()


def ref_gemv(x, weight, bias=None, *, rows=None):
    """float64 reference of gemv -> f64[M, N]."""
    xs = x.double() if rows is None else x.double()[rows.long()]
    y = xs @ weight.double().t()
    return y if bias is None else y + bias.double()
