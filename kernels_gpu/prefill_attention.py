"""Causal prefill attention over contiguous q/k/v (no cached context): a FlashAttention-style fast path.

For steps where every sequence starts at position 0, the new tokens attend only to themselves, so K/V
come straight from the projections ([T, Hkv, D] views, e.g. slices of the fused qkv output) instead of
the paged pool. Varlen batch: sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]; causal within each.

One program computes one (sequence, q head, BLOCK_M query rows) tile with an online softmax in base 2.
The KV loop runs in two parts: the key tiles wholly below the tile's first row need no mask at all, then
the few tiles on the diagonal get the causal (and sequence-end) mask. Query tiles are launched longest
(most key tiles) first. On Hopper the tiles can come through TMA tensor descriptors (USE_TMA): 1 builds
per-(sequence, head) descriptors on the device, whose bounds also clip the ragged ends; 2 passes four
host-built descriptors over the whole [T, H*D] tensors (no per-program descriptor setup; the last tile of a
sequence stores through a masked pointer store instead). On an H100 the d=128 default runs two programs
per SM (128x64 tiles, 2 stages, 96 KB shared memory, maxnreg=128), so one program's softmax overlaps the
other's tensor-core work.
"""
import numbers

import torch
import triton
import triton.language as tl

from kernels_gpu.triton_env import interpreting as _interpreting
from kernels_gpu.triton_env import tile_target

# Tile configs keyed by (target, head_dim bucket). BLOCK_M query rows x BLOCK_N keys per step.
# ORDER is the launch order, fastest-varying grid axis first: 0 = (query tile, head, sequence): longest tile
# first within each head; 1 = (head, query tile, sequence): longest first across the heads of a sequence;
# 2 = (head, sequence, query tile): longest first across the whole batch. USE_TMA loads through tensor
# descriptors where Triton and the strides allow; WARP_SPEC asks Triton to warp-specialize the KV loop;
# LAZY_RESCALE skips the accumulator rescale while the running max grows by < 2^8; PIPELINE_QK issues the
# next q k^T before this tile's softmax. "interpret" is the CPU interpreter (tests).
# USE_TMA: 0 pointer loads, 1 device-side descriptors, 2 host-side descriptors (falls back to 1 when the heads
# of a tensor are not packed, to 0 without TMA). ONE_LOOP runs the unmasked and diagonal key tiles in one
# loop (mask by a branch); DIAG_STAGES pipelines the diagonal loop separately; maxnreg caps registers/thread.
# cuda d=128: .device sweeps on an H100 80GB HBM3, Triton 3.6, torch 2.11, 2026-11-27 (4 x 4096 causal, bf16,
# interleaved rounds, device time of back-to-back calls): 128x64 tiles, 8 warps, 2 stages, maxnreg=128 and
# host descriptors: 1.172 ms / 469 TFLOP/s (h32/32) and 1.080 ms / 509 TFLOP/s (h32/8) vs SDPA flash 1.959 /
# 1.788 ms (1.67x / 1.66x) and vs the old default (128x128, 3 stages, device descriptors: 375 / 383 TFLOP/s).
# With a host sync after every call: 1.389 / 1.325 ms (396 / 415 TFLOP/s), 1.345x / 1.343x SDPA flash.
# maxnreg=128 is what lets 2 programs share an SM (no spills; without it 138 registers: 331 TFLOP/s; 120
# spills: 189). Within noise of the default: WARP_SPEC, ONE_LOOP, DIAG_STAGES=1; slower: device descriptors
# (-10%), ORDER 0 (-6%), LAZY_RESCALE (-5%), BLOCK_N=32 (-15%), 64x64/4 warps (-3 to -20%).
# The 2026-11-26 sweep (older rows): 128x128/8 warps/3 stages beat 128x64, 64x64 and 2 stages there (without
# the register cap); ORDER 1 beat ORDER 0. d=256 is scaled from d=128, not tuned.
# cuda d=64 (Llama-3.2-1B / SmolLM2 heads): sweep of 23 variants on an H200, 2026-11-29 (.scratch script; 32 q / 8
# kv heads, device time): host descriptors (USE_TMA 2) 1.10x at 1 x 4096 (0.171 ms, 402 TFLOP/s; SDPA cuDNN 0.181,
# flash 0.296) and 1.14x at 4 x 4096; 128-key tiles / 8 warps / maxnreg 1.04-1.06x; the rest within noise or slower
# (WARP_SPEC fails to compile). Building four host descriptors costs ~30 us of host time a launch, more than the
# kernel saves on short steps (64 x 128: 0.80x, launch-bound), hence HOST_TMA_MIN_TOKENS: fewer token rows take the
# device-side descriptors (USE_TMA 1).
_BASE = {"ORDER": 1, "USE_TMA": True, "WARP_SPEC": False, "LAZY_RESCALE": False, "PIPELINE_QK": False}
TILE_SIZES = {
    ("cuda", 64): {**_BASE, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    ("cuda", 128): {**_BASE, "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128,
                    "USE_TMA": 2},
    ("cuda", 256): {**_BASE, "BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
    ("interpret", 64): {**_BASE, "BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1,
                        "ORDER": 0, "USE_TMA": False},
    ("interpret", 128): {**_BASE, "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "USE_TMA": False},
    ("interpret", 256): {**_BASE, "BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1, "USE_TMA": False,
                         "ORDER": 2},
}
# f32 inputs (tests only) need smaller tiles to fit shared memory; keyed like TILE_SIZES.
F32_OVERRIDES = {
    ("cuda", 64): {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    ("cuda", 128): {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "maxnreg": None},
    ("cuda", 256): {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
}


@triton.jit
def _load_tile(ptr, desc, start, seq_len, stride_t, row_off, col, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows start..start+BLOCK_N of one head's K or V -> [BLOCK_N, BLOCK_D]; rows past seq_len read as zero
    when MASKED (device descriptors clip them always; host descriptors (USE_TMA == 2) read the next
    sequence's rows there, which the causal mask hides). row_off / col: the descriptor coordinates of the
    head's row 0 (0 / 0 for per-head device descriptors)."""
    if USE_TMA:
        tile = desc.load([row_off + start, col])
    else:
        offs_n = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        ptrs = ptr + offs_n[:, None].to(tl.int64) * stride_t + offs_d[None, :]
        if MASKED:
            tile = tl.load(ptrs, mask=(offs_n[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif HEAD_DIM != BLOCK_D:
            tile = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _scores(q, k, DOT_F32: tl.constexpr):
    """q [BLOCK_M, BLOCK_D] x k [BLOCK_N, BLOCK_D] -> f32 [BLOCK_M, BLOCK_N] raw scores."""
    if DOT_F32:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    return s


@triton.jit
def _causal_mask(s, offs_m, start, window, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr):
    # keys past the sequence end sit above every valid row's diagonal, so this masks them too; with a sliding
    # window, row m also drops the keys at or before m - window
    offs_n = start + tl.arange(0, BLOCK_N)
    keep = offs_m[:, None] >= offs_n[None, :]
    if WINDOW:
        keep = keep & (offs_n[None, :] > offs_m[:, None] - window)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _softmax_pv(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax update with one tile of raw scores s and its values v; returns (acc, l_i, m_i).

    m_i is a running max of log2-scaled scores. Every row has seen at least one key by the time it gets
    here (its own diagonal or an earlier tile), so m_new is finite and exp2(-inf - m_new) == 0 needs no
    guard (with a sliding window a row may see no key of a tile: there m_i starts at a finite -1e30 instead).
    LAZY_RESCALE keeps a stale max (and skips rescaling acc) until some row's max grows by more than 2^8:
    p stays <= 256, harmless in f32 sums and in the bf16 P of the PV product.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if LAZY_RESCALE:
        if tl.max(m_new - m_i, 0) > 8.0:
            alpha = tl.math.exp2(m_i - m_new)
            acc = acc * alpha[:, None]
            l_i = l_i * alpha
            m_i = m_new
        p = tl.math.exp2(s * qk_scale - m_i[:, None])
        l_i = l_i + tl.sum(p, 1)
    else:
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        m_i = m_new
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_i


@triton.jit
def _kv_step(acc, l_i, m_i, q, k_ptr, v_ptr, k_desc, v_desc, start, offs_m, seq_len, window, qk_scale,
             stride_kt, stride_vt, row_off, k_col, v_col,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
             MASKED: tl.constexpr, USE_TMA: tl.constexpr, LAZY_RESCALE: tl.constexpr, DOT_F32: tl.constexpr,
             WINDOW: tl.constexpr):
    """One BLOCK_N key tile of the online softmax; returns the updated (acc, l_i, m_i)."""
    k = _load_tile(k_ptr, k_desc, start, seq_len, stride_kt, row_off, k_col, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED,
                   USE_TMA)
    s = _scores(q, k, DOT_F32)
    if MASKED:
        s = _causal_mask(s, offs_m, start, window, BLOCK_N, WINDOW)
    v = _load_tile(v_ptr, v_desc, start, seq_len, stride_vt, row_off, v_col, BLOCK_N, BLOCK_D, HEAD_DIM, MASKED,
                   USE_TMA)
    return _softmax_pv(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE, DOT_F32)


@triton.jit
def prefill_attention_kernel(
    out_ptr,  # [T, Hq, D], last dim contiguous
    q_ptr,  # [T, Hq, D], last dim contiguous
    k_ptr, v_ptr,  # [T, Hkv, D], last dim contiguous
    q_hdesc, k_hdesc, v_hdesc, o_hdesc,  # host tensor descriptors over [T, H*D] (USE_TMA == 2), else unused
    cu_seqlens_ptr,  # i32[S+1]
    sm_scale, num_m_tiles,
    window,  # sliding window (WINDOW): row m sees keys m - window + 1 .. m
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, ORDER: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    LAZY_RESCALE: tl.constexpr, PIPELINE_QK: tl.constexpr, DOT_F32: tl.constexpr,
    ONE_LOOP: tl.constexpr = False, DIAG_STAGES: tl.constexpr = 0, WINDOW: tl.constexpr = False,
):
    if ORDER == 0:
        tile_rank = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
    elif ORDER == 1:
        head = tl.program_id(0)
        tile_rank = tl.program_id(1)
        seq = tl.program_id(2)
    else:
        head = tl.program_id(0)
        seq = tl.program_id(1)
        tile_rank = tl.program_id(2)
    m_tile = num_m_tiles - 1 - tile_rank  # the last query tiles see the most keys: launch them first
    seq_start = tl.load(cu_seqlens_ptr + seq)
    seq_len = tl.load(cu_seqlens_ptr + seq + 1) - seq_start
    m0 = m_tile * BLOCK_M
    if m0 >= seq_len:
        return
    kv_head = head // GROUP
    row0 = seq_start.to(tl.int64)
    q_base = q_ptr + row0 * stride_qt + head * stride_qh
    k_base = k_ptr + row0 * stride_kt + kv_head * stride_kh
    v_base = v_ptr + row0 * stride_vt + kv_head * stride_vh
    o_base = out_ptr + row0 * stride_ot + head * stride_oh

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_off = 0
    q_col = 0
    k_col = 0
    v_col = 0
    if USE_TMA == 2:
        # host descriptors over the whole [T, H*D] tensors: this head's rows start at (seq_start, head*D)
        row_off = seq_start
        q_col = head * HEAD_DIM
        k_col = kv_head * HEAD_DIM
        v_col = kv_head * HEAD_DIM
        q_desc = q_hdesc
        k_desc = k_hdesc
        v_desc = v_hdesc
        o_desc = o_hdesc
        q = q_desc.load([row_off + m0, q_col])
    elif USE_TMA == 1:
        q_desc = tl.make_tensor_descriptor(q_base, shape=[seq_len, HEAD_DIM], strides=[stride_qt, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        k_desc = tl.make_tensor_descriptor(k_base, shape=[seq_len, HEAD_DIM], strides=[stride_kt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[seq_len, HEAD_DIM], strides=[stride_vt, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        o_desc = tl.make_tensor_descriptor(o_base, shape=[seq_len, HEAD_DIM], strides=[stride_ot, 1],
                                           block_shape=[BLOCK_M, BLOCK_D])
        q = q_desc.load([m0, 0])
    else:
        k_desc = k_base  # unused placeholders
        v_desc = v_base
        q_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    qk_scale = sm_scale * 1.4426950408889634  # log2(e): softmax via exp2
    if WINDOW:
        # a row may see no key of a whole tile (before its window): a finite start keeps exp2(m_i - m_new) NaN-free
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Part 1: key tiles entirely below the first row of the tile (no mask, no bounds: all < m0 <= seq_len).
    # Part 2: the diagonal tiles, causal mask; they stop at the tile's last row or the sequence end.
    # Sliding window: part 1 starts at kv_lo, the tile holding the first row's first key (earlier tiles are
    # skipped); its tiles before win_end (where the last row's window begins) take the window mask first.
    diag_lo = (m0 // BLOCK_N) * BLOCK_N
    diag_hi = tl.minimum(m0 + BLOCK_M, seq_len)
    kv_lo = 0
    win_end = 0
    if WINDOW:
        kv_lo = tl.maximum(m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        win_end = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(diag_hi - window, 0), BLOCK_N) * BLOCK_N, kv_lo), diag_lo)
        if not ONE_LOOP:
            for start in range(kv_lo, win_end, BLOCK_N):
                start = tl.multiple_of(start, BLOCK_N)
                acc, l_i, m_i = _kv_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, offs_m, seq_len,
                                         window, qk_scale, stride_kt, stride_vt, row_off, k_col, v_col, BLOCK_N,
                                         BLOCK_D, HEAD_DIM, True, USE_TMA, LAZY_RESCALE, DOT_F32, True)
            kv_lo = win_end
    if ONE_LOOP:
        # One software-pipelined loop over every key tile (TMA loads need no bounds masks; pointer loads keep
        # them); only the diagonal tiles take the causal mask, through a branch, so the load pipeline does not
        # drain before them.
        LOAD_MASK: tl.constexpr = USE_TMA == 0
        for start in range(kv_lo, diag_hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            k = _load_tile(k_base, k_desc, start, seq_len, stride_kt, row_off, k_col, BLOCK_N, BLOCK_D, HEAD_DIM,
                           LOAD_MASK, USE_TMA)
            s = _scores(q, k, DOT_F32)
            masked = start >= diag_lo
            if WINDOW:
                masked = masked | (start < win_end)
            if masked:
                s = _causal_mask(s, offs_m, start, window, BLOCK_N, WINDOW)
            v = _load_tile(v_base, v_desc, start, seq_len, stride_vt, row_off, v_col, BLOCK_N, BLOCK_D, HEAD_DIM,
                           LOAD_MASK, USE_TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE, DOT_F32)
        diag_lo = diag_hi  # nothing left for part 2
    elif PIPELINE_QK:
        # q k^T of the next tile is issued before the softmax of this one, so the tensor cores can work on
        # it while the exp2s run; the last prefetch is the first diagonal tile (rows past seq_len masked).
        s = _scores(q, _load_tile(k_base, k_desc, kv_lo, seq_len, stride_kt, row_off, k_col, BLOCK_N, BLOCK_D,
                                  HEAD_DIM, True, USE_TMA), DOT_F32)
        for start in range(kv_lo, diag_lo, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            k_next = _load_tile(k_base, k_desc, start + BLOCK_N, seq_len, stride_kt, row_off, k_col, BLOCK_N, BLOCK_D,
                                HEAD_DIM, True, USE_TMA)
            s_next = _scores(q, k_next, DOT_F32)
            v = _load_tile(v_base, v_desc, start, seq_len, stride_vt, row_off, v_col, BLOCK_N, BLOCK_D, HEAD_DIM,
                           False, USE_TMA)
            acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE, DOT_F32)
            s = s_next
        s = _causal_mask(s, offs_m, diag_lo, window, BLOCK_N, WINDOW)
        v = _load_tile(v_base, v_desc, diag_lo, seq_len, stride_vt, row_off, v_col, BLOCK_N, BLOCK_D, HEAD_DIM,
                       True, USE_TMA)
        acc, l_i, m_i = _softmax_pv(acc, l_i, m_i, s, v, qk_scale, LAZY_RESCALE, DOT_F32)
        diag_lo += BLOCK_N
    elif WARP_SPEC:
        for start in tl.range(kv_lo, diag_lo, BLOCK_N, warp_specialize=True):
            start = tl.multiple_of(start, BLOCK_N)
            acc, l_i, m_i = _kv_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, offs_m, seq_len,
                                     window, qk_scale, stride_kt, stride_vt, row_off, k_col, v_col, BLOCK_N, BLOCK_D,
                                     HEAD_DIM, False, USE_TMA, LAZY_RESCALE, DOT_F32, WINDOW)
    else:
        for start in range(kv_lo, diag_lo, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            acc, l_i, m_i = _kv_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, offs_m, seq_len,
                                     window, qk_scale, stride_kt, stride_vt, row_off, k_col, v_col, BLOCK_N, BLOCK_D,
                                     HEAD_DIM, False, USE_TMA, LAZY_RESCALE, DOT_F32, WINDOW)
    if DIAG_STAGES > 0:
        for start in tl.range(diag_lo, diag_hi, BLOCK_N, num_stages=DIAG_STAGES):
            start = tl.multiple_of(start, BLOCK_N)
            acc, l_i, m_i = _kv_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, offs_m, seq_len,
                                     window, qk_scale, stride_kt, stride_vt, row_off, k_col, v_col, BLOCK_N, BLOCK_D,
                                     HEAD_DIM, True, USE_TMA, LAZY_RESCALE, DOT_F32, WINDOW)
    else:
        for start in range(diag_lo, diag_hi, BLOCK_N):
            start = tl.multiple_of(start, BLOCK_N)
            acc, l_i, m_i = _kv_step(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, start, offs_m, seq_len,
                                     window, qk_scale, stride_kt, stride_vt, row_off, k_col, v_col, BLOCK_N, BLOCK_D,
                                     HEAD_DIM, True, USE_TMA, LAZY_RESCALE, DOT_F32, WINDOW)

    if WINDOW:
        l_i = tl.where(l_i == 0.0, 1.0, l_i)  # rows past the sequence end may see no key in their window
    out = (acc / l_i[:, None]).to(out_ptr.dtype.element_ty)
    if USE_TMA == 2:
        if m0 + BLOCK_M <= seq_len:
            o_desc.store([row_off + m0, q_col], out)
        else:  # the last tile of a sequence: the next sequence's rows follow, so a masked store
            o_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
            tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out, mask=o_mask)
    elif USE_TMA == 1:
        o_desc.store([m0, 0], out)  # rows past the sequence end are clipped by the descriptor
    else:
        o_mask = (offs_m[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM)
        tl.store(o_base + offs_m[:, None].to(tl.int64) * stride_ot + offs_d[None, :], out, mask=o_mask)


def _tile_sizes(device: torch.device, head_dim: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    target = tile_target(device)
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    f32 = F32_OVERRIDES.get((target, bucket), {}) if dtype == torch.float32 else {}
    return {**TILE_SIZES[(target, bucket)], **f32}


_ALLOCATOR_SET = False


def _tma_ok(tensors) -> bool:
    """TMA needs Triton's device-side descriptors, 16-byte aligned bases and row/head strides."""
    if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return False
    if torch.cuda.get_device_capability(tensors[0].device)[0] < 9:
        return False
    for t in tensors:
        per16 = 16 // t.element_size()
        if t.data_ptr() % 16 or t.stride(0) % per16 or t.stride(1) % per16:
            return False
    return True


def _host_tma_ok(tensors, head_dim: int, block_d: int) -> bool:
    """Host-side descriptors view each [T, H, D] tensor as [T, H*D]: heads must be packed (stride(1) == D)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return head_dim == block_d and all(t.stride(1) == head_dim and t.stride(2) == 1 for t in tensors)


def _host_desc(t, block_rows: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    num_tokens, num_heads, head_dim = t.shape
    return TensorDescriptor(t, [num_tokens, num_heads * head_dim], [t.stride(0), 1], [block_rows, head_dim])


def _ensure_allocator():
    # device-side tensor descriptors need a little global scratch per launch (128 B a descriptor)
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"prefill_attention: {msg}")


def _validate(q, k, v, cu_seqlens, out):
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check(t.dim() == 3, f"{name} must be [T, H, D], got shape {tuple(t.shape)}")
    _check(q.dtype in (torch.bfloat16, torch.float16, torch.float32), f"q dtype {q.dtype} unsupported")
    _check(k.dtype == q.dtype and v.dtype == q.dtype, f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    num_tokens, num_q_heads, head_dim = q.shape
    _check(head_dim % 16 == 0 and 16 <= head_dim <= 256,
           f"head_dim must be a multiple of 16 in [16, 256], got {head_dim}")
    _check(k.shape == v.shape, f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    _check(k.shape[0] == num_tokens and k.shape[2] == head_dim,
           f"k/v must be [T={num_tokens}, Hkv, D={head_dim}], got {tuple(k.shape)}")
    num_kv_heads = k.shape[1]
    _check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
           f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    _check(cu_seqlens.dim() == 1 and cu_seqlens.dtype == torch.int32 and cu_seqlens.numel() >= 2,
           "cu_seqlens must be i32[S+1] with S >= 1")
    for name, t in (("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    if out is not None:
        _check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device,
               f"out must match q: {tuple(q.shape)} {q.dtype}")
        _check(out.stride(2) == 1, "out must have a contiguous last dim")


def prefill_attention(
    q,  # [T, Hq, D] bf16/fp16/f32; any strides (last dim contiguous avoids a copy)
    k, v,  # [T, Hkv, D] same dtype, Hq a multiple of Hkv
    cu_seqlens,  # i32[S+1] sequence s owns rows cu_seqlens[s]:cu_seqlens[s+1]
    *,
    scale: float,
    max_seqlen: int | None = None,
    out=None,  # [T, Hq, D] q dtype, last dim contiguous
    tiles: dict | None = None,  # overrides of the TILE_SIZES entry (tuning, tests)
    window: int | None = None,
):
    """Causal self-attention of each sequence's new tokens (all starting at position 0); returns out.

    Pass max_seqlen (a host int >= the longest sequence) to avoid a device sync (and when capturing CUDA
    graphs). Rows past cu_seqlens[S] are left unwritten. window (sliding-window attention): token m sees only
    tokens > m - window; key tiles wholly before a query tile's window are skipped.
    """
    _validate(q, k, v, cu_seqlens, out)
    _check(scale > 0, f"scale must be > 0, got {scale}")
    _check(window is None or (isinstance(window, numbers.Integral) and not isinstance(window, bool) and window >= 1),
           f"window must be a positive int or None, got {window!r}")
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    num_seqs = cu_seqlens.numel() - 1
    q, k, v = (t if t.stride(2) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    max_seqlen = int(max_seqlen)
    _check(max_seqlen >= 0, f"max_seqlen must be >= 0, got {max_seqlen}")
    if window is not None and window >= max_seqlen:
        window = None  # every key is inside every window
    if max_seqlen == 0:
        return out

    cfg = {**_tile_sizes(q.device, head_dim, q.dtype), **(tiles or {})}
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    block_d = triton.next_power_of_2(head_dim)
    use_tma = int(cfg["USE_TMA"]) if q.device.type == "cuda" and not _interpreting() else 0
    if use_tma and not _tma_ok((q, k, v, out)):
        use_tma = 0
    if use_tma == 2 and (num_tokens < cfg.get("HOST_TMA_MIN_TOKENS", 0)
                         or not _host_tma_ok((q, k, v, out), head_dim, block_d)):
        use_tma = 1
    if use_tma:
        _ensure_allocator()
    descs = (q, k, v, out)  # unused placeholders unless USE_TMA == 2
    if use_tma == 2:
        descs = tuple(_host_desc(t, rows) for t, rows in ((q, block_m), (k, block_n), (v, block_n), (out, block_m)))
    num_m_tiles = triton.cdiv(max_seqlen, block_m)
    order = int(cfg["ORDER"])
    _check(order in (0, 1, 2), f"ORDER must be 0, 1 or 2, got {order}")
    grid = [(num_m_tiles, num_q_heads, num_seqs), (num_q_heads, num_m_tiles, num_seqs),
            (num_q_heads, num_seqs, num_m_tiles)][order]
    dot_f32 = _interpreting() or q.dtype == torch.float32
    launch_opts = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and not _interpreting() else {}
    prefill_attention_kernel[grid](
        out, q, k, v, *descs, cu_seqlens,
        float(scale), num_m_tiles, 0 if window is None else int(window),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        HEAD_DIM=head_dim, ORDER=order, USE_TMA=use_tma,
        WARP_SPEC=bool(cfg["WARP_SPEC"]) and not _interpreting(), LAZY_RESCALE=bool(cfg["LAZY_RESCALE"]),
        PIPELINE_QK=bool(cfg["PIPELINE_QK"]), DOT_F32=dot_f32,
        ONE_LOOP=bool(cfg.get("ONE_LOOP", False)) and not cfg["PIPELINE_QK"],
        DIAG_STAGES=int(cfg.get("DIAG_STAGES", 0)) if not _interpreting() else 0, WINDOW=window is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch_opts,
    )
    return out


def ref_prefill_attention(q, k, v, cu_seqlens, *, scale: float, window: int | None = None, **unused):
    """Float64 reference: per sequence, causal softmax(q k^T * scale) v with K/V heads repeated for GQA; with a
    sliding window token m sees tokens m - window + 1 .. m only."""
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)  # f64[T, Hq, D]
    bounds = cu_seqlens.tolist()
    for t0, t1 in zip(bounds[:-1], bounds[1:]):
        if t1 == t0:
            continue
        qq = q[t0:t1].double()  # f64[L, Hq, D]
        kk = k[t0:t1].double().repeat_interleave(group, dim=1)
        vv = v[t0:t1].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,chd->htc", qq, kk) * scale  # f64[Hq, L, L]
        causal = torch.ones(t1 - t0, t1 - t0, dtype=torch.bool, device=q.device).triu(1)
        if window is not None:
            causal = causal | torch.ones_like(causal).tril(-window)
        scores = scores.masked_fill(causal, float("-inf"))
        out[t0:t1] = torch.einsum("htc,chd->thd", torch.softmax(scores, dim=-1), vv)
    return out
