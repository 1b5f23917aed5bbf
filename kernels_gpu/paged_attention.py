"""Unified paged attention over the ragged step (prefill chunks, decodes, verify rows) for bf16/fp8/nvfp4 KV."""
import numbers

import torch
import triton
import triton.language as tl

from kernels_gpu.fused_gemv import gdc_launch_dependents, gdc_wait, pdl_launch
from kernels_gpu.triton_env import interpreting as _interpreting
from kernels_gpu.triton_env import tile_target

# Tile sizes keyed by (target, head_dim bucket, phase): BLOCK_M is rows of a query tile (tokens x GQA heads),
# BLOCK_N is context positions per step. Phase "decode" is used when every sequence has at most
# DECODE_MAX_Q_LEN new tokens. "interpret" is the CPU Triton interpreter (tests only). Optional keys:
# grid_order (0: grid (tile, kv head, split); 1: flat grid with the kv heads of a sequence adjacent), maxnreg
# (register cap per thread, so that 4 programs of 4 warps fit an SM), target_programs (the split-KV target of
# this phase, replacing SPLIT_KV's).
# Decode, D=128: benchmarks/tune_paged_attention.py on an H100 80GB HBM3 (Triton 3.6), 2026-11-26, batch 64 x
# context 4096, Hq=32 Hkv=8, block_size 16, 72 configs per format. bf16: BLOCK_N=128, 4 warps, 4 stages, no
# split: 0.439 ms (2447 GB/s); the same with BLOCK_N=64 / 2-3 stages / 8 warps / grid_order 1 is within 2%;
# 2 splits are 5-15% slower (the 512 programs of this case already fill the 132 SMs at 4 programs each).
# fp8 is fastest with the same tile: 0.298 ms (1801 GB/s of fp8 bytes; maxnreg=128 spills: 0.330 ms).
# NOTE: fresh processes on the same machine gave 0.45-0.52 ms (bf16), 0.31-0.39 ms (fp8) for these tiles,
# while torch SDPA stayed at 0.370 ms: compare within one process, alternating, before trusting a 10% change.
# (Superseded for one-token decode steps of bf16/fp8 pools by GROUPED_DECODE below; these rows still serve
# verify rows (q_len 2-4), nvfp4 and non-power-of-two pages.)
# The older prefill / D=64 / D=256 rows are from earlier sweeps (prefill: 128x128, 8 warps, 3 stages, 2.52 ms).
TILE_SIZES = {
    ("cuda", 64, "decode"): {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    ("cuda", 128, "decode"): {"BLOCK_M": 16, "BLOCK_N": 128, "num_warps": 4, "num_stages": 4,
                              "target_programs": 512},
    ("cuda", 256, "decode"): {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    ("cuda", 64, "prefill"): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ("cuda", 128, "prefill"): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    ("cuda", 256, "prefill"): {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    ("interpret", 64, "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 128, "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 256, "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 64, "prefill"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 128, "prefill"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 256, "prefill"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
}
DECODE_MAX_Q_LEN = 4
# Per-KV-format changes to the tiles above, keyed by (target, phase, kv_format) for every head_dim or
# (target, head_dim bucket, phase, kv_format) for one (this one wins).
# nvfp4 decode, D=128 (same sweep as above): BLOCK_N=64, 2 stages, maxnreg=128: 0.338-0.344 ms (894 GB/s of
# packed bytes + scales; grid_order 1 / 0); without the register cap (166 registers: 3 programs per SM, so two
# waves) 0.409 ms; BLOCK_N=128 0.391 ms. A later short sweep gave grid_order 0: 0.375 ms, 1: 0.462 ms, hence 0.
# The E2M1 decode is ALU-bound: ~900 SASS instructions per warp per 64 positions vs ~350 for bf16.
FORMAT_OVERRIDES: dict = {
    ("cuda", 128, "decode", "nvfp4"): {"BLOCK_N": 64, "num_stages": 2, "maxnreg": 128},
}
# Split-KV (flash-decoding) heuristic: split while the grid has fewer than target_programs programs
# (about 4 per H100 SM), keeping at least min_tokens_per_split context positions per split.
SPLIT_KV = {"target_programs": 528, "min_tokens_per_split": 256, "max_splits": 32}

# Decode steps with one new token per sequence and a bf16/fp8 pool of power-of-two pages go to
# paged_decode_grouped_kernel: one program reads HG kv heads of each context position (contiguous in the
# pool) for one split of one sequence. Keyed by (target, head_dim bucket, kv_format); missing keys keep
# paged_attention_kernel. target_programs: the split-KV target (programs = sequences x Hkv / HG x splits).
# D=128: .device sweeps on an H100 80GB HBM3, Triton 3.6, torch 2.11, 2026-11-27, batch 64 x context 4096,
# Hq=32 Hkv=8, block 16, interleaved rounds, device time of back-to-back calls (as in a CUDA-graph replay):
# bf16 HG=4, BLOCK_N=32, 4 warps, 2 stages, no split: 0.3654 ms (2939 GB/s) vs SDPA 0.3543 ms (0.970x),
# compiled FlexAttention 0.3594 ms, paged_attention_kernel 0.3868 ms; HG=2/BLOCK_N=64, HG=8/BLOCK_N=32/8 warps/
# 2 splits and HG=4 with 3 stages were within 1%; evict_first / .cg loads changed nothing. fp8: HG=2,
# BLOCK_N=64, 3 stages: 0.2348 ms (1.56x the bf16 time; paged_attention_kernel 0.2809 ms). 4 warps with
# HG >= 2 use 255 registers and spill a little (the [HG, 16, D] accumulator holds 4 real rows of 16).
# D=64 bf16 (Llama-3.2-1B, SmolLM2; .scratch sweep on an H200, Triton 3.6, torch 2.11, 2026-11-28, Hq=32 Hkv=8, block
# 16, context 256, 100 calls in a CUDA graph): HG=1, BLOCK_N=32, 4 warps, 2 stages: batch 1 5.05 us with 4 splits
# (paged_attention_kernel 6.54 us with the 1 split it got, 5.81 us with 4), batch 64 13.18 us with none (15.90 us).
# min_tokens_per_split: 64 lets a lone short context split (SPLIT_KV's 256 would not below 512 tokens).
# hg_min_programs: HG is halved while fewer (sequence, head group) programs than this would run: a small batch
# gets its parallelism from more head groups and splits instead of a few long programs. D=128 batch 1 (.scratch
# sweep on an H200, 2026-11-28, explicit splits 1-32 x HG 1/2/4 x BLOCK_N 32/64, 50 calls in a CUDA graph):
# the rule above gave 2 programs of 256 positions at context 512, 15.1 us (bf16; fp8 15.5) against 5.6 us (fp8
# 6.0) for HG 1 with 16 splits of 32 positions, which hg_min_programs 8 and min_tokens_per_split 32 now choose;
# context 4096: 17.5 -> 12.9 us; Hkv 4 (tensor-parallel rank of 2): 15.2 -> 5.5 us; batch 8 x 1024: 18.3 -> 13.6
# us; batch 64 keeps its tiles (40.4 us at 512, 268.4 us at 4096).
GROUPED_DECODE = {
    ("cuda", 128, "bf16"): {"HG": 4, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "target_programs": 128,
                            "min_tokens_per_split": 32, "hg_min_programs": 8},
    ("cuda", 64, "bf16"): {"HG": 1, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2, "target_programs": 256,
                           "min_tokens_per_split": 64},
    ("cuda", 128, "fp8"): {"HG": 2, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3, "target_programs": 256,
                           "min_tokens_per_split": 64, "hg_min_programs": 8},
    **{("interpret", b, f): {"HG": 2, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "target_programs": 4}
       for b in (64, 128, 256) for f in ("bf16", "fp8")},
}

# Verification steps (up to GROUPED_MAX_Q new tokens per sequence, no sliding window) take the grouped kernel with
# rows = new tokens x q heads per kv head (<= GROUPED_MAX_ROWS, HG lowered to keep HG x rows within it); off
# (GROUPED_VERIFY = False): paged_attention_kernel, which tiles new tokens as the prefill does.
# NOTE: H200, 2026-11-29, CUDA-graph replay of a batch-1 step at context 256: SmolLM2-135M-shaped q = 5 1,019-1,040 ->
# 929-936 us, q = 9 1,024 -> 984 us; Llama-3.2-1B q = 5 1,166 -> 1,128 us, batch 4 x q 5 1,260 -> 1,227 us (q = 9 at
# batch 4 lost: 1,246 -> 1,321 us, one program per sequence reading 36 rows padded to 64), hence rows <= 32.
GROUPED_VERIFY = True
GROUPED_MAX_Q = 16
GROUPED_MAX_ROWS = 32

KV_FORMATS = {"bf16": 0, "fp8": 1, "nvfp4": 2}


# Programmatic dependent launch (fused_gemv.USE_PDL) for the attention kernels of steps of at most this many
# sequences: they start while the kernel before them finishes. NOTE: one TP=2 rank of Llama-3-8B (H200, 2026-11-29,
# CUDA graphs, context 512): batch 1 2.450 -> 2.424 ms a step with it, batch 64 3.767 -> 3.841 ms (early-launched
# programs are placed on whichever SMs have room while the kernel before runs); RoPE's launch gains at both.
PDL_MAX_SEQS = 8


def _pdl(device, num_seqs: int = 1) -> dict:
    """Launch options and the PDL flag where programmatic dependent launch is on for a step of num_seqs."""
    return pdl_launch(device) if num_seqs <= PDL_MAX_SEQS else {}
NVFP4_BLOCK = 16


# E2M1 -> f16 in registers (4 packed bytes per asm call). For each nibble the f16 bit pattern is built
# directly: the 3 magnitude bits go to bits 9..11 (the two low exponent bits and the top mantissa bit) and the
# sign to bit 15, which is the E2M1 value times 2**-14 (code 1 lands on the f16 subnormal 2**-15 = 0.5 * 2**-14,
# so no fixup is needed). One packed f16x2 multiply then applies the block scale, passed as the f16x2 pair
# (bs * 2**6, bs * 2**6) in an i32 per element (computed once per 16 values), so each
# element comes out as e2m1 * bs * 2**-8 -- exact in f16 for every e2m1 code and e4m3 scale; the kernel folds
# 2**8 * global scale into the score scale (K) or the output (V). prmt spreads bytes (0, 1) and (2, 3) into
# the two 16-bit halves so every output element comes from its own input byte.
_E2M1_F16_ASM = tl.constexpr("""
{
.reg .b32 z, t, a, b, s;
mov.b32 z, 0;
prmt.b32 t, $4, z, 0x4140;
prmt.b32 s, $5, $6, 0x5410;
shl.b32 a, t, 9;
shl.b32 b, t, 12;
and.b32 a, a, 0x0E000E00;
lop3.b32 a, b, 0x80008000, a, 0xEA;
mul.rn.f16x2 $0, a, s;
shl.b32 a, t, 5;
shl.b32 b, t, 8;
and.b32 a, a, 0x0E000E00;
lop3.b32 a, b, 0x80008000, a, 0xEA;
mul.rn.f16x2 $2, a, s;
prmt.b32 t, $4, z, 0x4342;
prmt.b32 s, $7, $8, 0x5410;
shl.b32 a, t, 9;
shl.b32 b, t, 12;
and.b32 a, a, 0x0E000E00;
lop3.b32 a, b, 0x80008000, a, 0xEA;
mul.rn.f16x2 $1, a, s;
shl.b32 a, t, 5;
shl.b32 b, t, 8;
and.b32 a, a, 0x0E000E00;
lop3.b32 a, b, 0x80008000, a, 0xEA;
mul.rn.f16x2 $3, a, s;
}
""")
NVFP4_ASM_FACTOR = 256.0  # the asm path's tiles hold value * 2**-8 / global scale (see above)


@triton.jit
def _e2m1_to_f32(code):
    """i32 nibble codes (0..15) -> f32 E2M1 values."""
    exp = (code >> 1) & 3
    mant = code & 1
    mag4 = tl.where(exp == 0, mant * 2, (2 + mant) << exp)  # 4 * |value| as an integer
    val = mag4.to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _load_nvfp4_tile(cache_ptr, block_scale_ptr, row, srow, n_valid, head_dim, stride_d, stride_sd,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, USE_ASM: tl.constexpr,
                     MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Load and dequantize one NVFP4 tile -> (even, odd) elements, each [BLOCK_N, BLOCK_D // 2], without the
    per-layer global scale.

    row / srow: i64[BLOCK_N] element offsets of each context position's packed row / block-scale row.
    USE_ASM: f16 tile holding value * 2**-8 (NVFP4_ASM_FACTOR); else f32 tile holding the value.
    """
    NG: tl.constexpr = BLOCK_D // 16
    offs_byte = tl.arange(0, BLOCK_D // 2)
    offs_grp = tl.arange(0, NG)
    ptrs = cache_ptr + row[:, None] + offs_byte[None, :] * stride_d
    sptrs = block_scale_ptr + srow[:, None] + offs_grp[None, :] * stride_sd
    if MASKED or not EVEN_D:
        mask = n_valid[:, None] & (offs_byte[None, :] < head_dim // 2)
        packed = tl.load(ptrs, mask=mask, other=0)
        smask = n_valid[:, None] & (offs_grp[None, :] < head_dim // 16)
        bscale = tl.load(sptrs, mask=smask, other=0.0)
    else:
        packed = tl.load(ptrs)
        bscale = tl.load(sptrs)
    packed = tl.reshape(packed, (BLOCK_N, NG, 8))  # [position, scale group, byte in group]
    if USE_ASM:
        sc_bits = (bscale.to(tl.float16) * 64.0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        sc = tl.broadcast_to((sc_bits | (sc_bits << 16))[:, :, None], (BLOCK_N, NG, 8))
        lo, hi = tl.inline_asm_elementwise(_E2M1_F16_ASM, "=r,=r,=r,=r,r,r,r,r,r", [packed, sc],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        sc = bscale.to(tl.float32)[:, :, None]
        code = packed.to(tl.int32)
        lo = _e2m1_to_f32(code & 15) * sc
        hi = _e2m1_to_f32(code >> 4) * sc
    # lo holds the even elements 2i (low nibble of byte i), hi the odd ones; the kernel keeps the two halves
    # apart (q and the output are split the same way) instead of interleaving them in registers.
    return tl.reshape(lo, (BLOCK_N, BLOCK_D // 2)), tl.reshape(hi, (BLOCK_N, BLOCK_D // 2))


@triton.jit
def _attend_block(acc, acc_odd, m_i, l_i, q, q_odd, q_pos, start, kv_hi, kv_from, window, qk_scale, bt_row, k_head,
                  v_head, kv_head,
                  k_cache_ptr, v_cache_ptr, k_block_scale_ptr, v_block_scale_ptr, block_size, head_dim,
                  stride_kn, stride_kb, stride_kd, stride_vn, stride_vb, stride_vd,
                  stride_ksn, stride_ksb, stride_ksh, stride_ksd, stride_vsn, stride_vsb, stride_vsh, stride_vsd,
                  stride_btb,
                  BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KV_FORMAT: tl.constexpr, DOT_F32: tl.constexpr,
                  PAGE: tl.constexpr, NVFP4_ASM: tl.constexpr, SCALE_ALIGN: tl.constexpr,
                  EVEN_D: tl.constexpr, MASKED: tl.constexpr, WINDOW: tl.constexpr):
    """One step of the online softmax over context positions start .. start + BLOCK_N - 1.

    MASKED=False: every position is < kv_hi and visible to every row (no load masks, no causal mask).
    WINDOW (sliding window, MASKED steps): positions before kv_from (the first one the tile's earliest row
    sees) are never loaded, as their pages may be freed; a row at q_pos sees only positions > q_pos - window.
    """
    if WINDOW:
        start = tl.multiple_of(start, BLOCK_N)  # the window's min/max bounds hide what every step start is
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if MASKED:
        n_valid = offs_n < kv_hi
        if WINDOW:
            n_valid = n_valid & (offs_n >= kv_from)
    else:
        n_valid = offs_n < 2147483647  # all true (only the column masks of an odd head_dim use it)
    d_valid = offs_d < head_dim
    if PAGE > 0:
        page = offs_n // PAGE
        off = offs_n % PAGE
    else:
        page = offs_n // block_size
        off = offs_n % block_size
    if MASKED:
        blk = tl.load(bt_row + page * stride_btb, mask=n_valid, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + page * stride_btb).to(tl.int64)
    k_row = blk * stride_kn + off * stride_kb + k_head  # i64[BLOCK_N]
    v_row = blk * stride_vn + off * stride_vb + v_head

    if KV_FORMAT == 2:
        k_srow = tl.multiple_of(blk * stride_ksn + off * stride_ksb + kv_head * stride_ksh, SCALE_ALIGN)
        k, k_odd = _load_nvfp4_tile(k_cache_ptr, k_block_scale_ptr, k_row, k_srow, n_valid, head_dim,
                                    stride_kd, stride_ksd, BLOCK_N, BLOCK_D, NVFP4_ASM, MASKED, EVEN_D)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = tl.dot(q_odd, tl.trans(k_odd.to(tl.float32)), s, input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
            s = tl.dot(q_odd, tl.trans(k_odd.to(q.dtype)), s)
    else:
        k_ptrs = k_cache_ptr + k_row[None, :] + offs_d[:, None] * stride_kd
        if MASKED:
            k = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_valid[:, None], other=0.0)
        if DOT_F32:
            s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k.to(q.dtype))
    s = s * qk_scale
    if MASKED:
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW:
            visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows stay NaN-free
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)

    if KV_FORMAT == 2:
        v_srow = tl.multiple_of(blk * stride_vsn + off * stride_vsb + kv_head * stride_vsh, SCALE_ALIGN)
        v, v_odd = _load_nvfp4_tile(v_cache_ptr, v_block_scale_ptr, v_row, v_srow, n_valid, head_dim,
                                    stride_vd, stride_vsd, BLOCK_N, BLOCK_D, NVFP4_ASM, MASKED, EVEN_D)
        if DOT_F32:
            acc_odd = tl.dot(p, v_odd.to(tl.float32), acc_odd * alpha[:, None], input_precision="ieee")
        else:
            acc_odd = tl.dot(p.to(q.dtype), v_odd.to(q.dtype), acc_odd * alpha[:, None])
    else:
        v_ptrs = v_cache_ptr + v_row[:, None] + offs_d[None, :] * stride_vd
        if MASKED:
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        elif EVEN_D:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None])
    return acc, acc_odd, m_new, l_i


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [T, Hq, D] q dtype (written when not SPLIT_KV)
    part_out_ptr,  # f32[num_splits, T, Hq, D] unnormalized partial outputs (SPLIT_KV)
    part_m_ptr,  # f32[num_splits, T, Hq] running max of log2-scaled scores (SPLIT_KV)
    part_l_ptr,  # f32[num_splits, T, Hq] running sum of exp2 (SPLIT_KV)
    q_ptr,  # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [N, block_size, Hkv, D] bf16/f32 | fp8 | u8[..., D//2] nvfp4
    k_block_scale_ptr, v_block_scale_ptr,  # fp8[N, block_size, Hkv, D//16] (nvfp4 only)
    k_scale_ptr, v_scale_ptr,  # f32[Hkv] (fp8) | f32[] (nvfp4)
    query_start_ptr,  # i32[S+1]
    seq_lens_ptr,  # i32[S]
    block_tables_ptr,  # i32[S, B]
    sm_scale, num_seqs, block_size, head_dim, num_tiles, num_kv_heads, num_splits,
    window,  # sliding window (WINDOW): a row at context index p sees positions > p - window
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_ksn, stride_ksb, stride_ksh, stride_ksd,
    stride_vsn, stride_vsb, stride_vsh, stride_vsd,
    stride_bts, stride_btb,
    stride_ps, stride_pt, stride_ph,  # part_out strides (last dim contiguous)
    stride_ms, stride_mt,  # part_m / part_l strides (last dim contiguous)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KV_FORMAT: tl.constexpr, SPLIT_KV: tl.constexpr,
    DOT_F32: tl.constexpr,
    PAGE: tl.constexpr,  # block_size when it is a power of two (shifts instead of divisions), else 0
    GRID_ORDER: tl.constexpr,  # 0: grid (tile, kv head, split); 1: flat, kv head fastest, then split, then tile
    NVFP4_ASM: tl.constexpr,  # E2M1 decode through inline PTX into f16 (GPU); else portable f32 code
    SCALE_ALIGN: tl.constexpr,  # every nvfp4 block-scale row starts at a multiple of this many elements
    EVEN_D: tl.constexpr = False,  # head_dim == BLOCK_D: no column masks
    WINDOW: tl.constexpr = False,  # sliding-window attention (`window` is read only then)
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels_gpu.fused_gemv.pdl_enabled)
):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # q and the pools are earlier kernels' output
    if GRID_ORDER == 0:
        pid_tile = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
    else:
        # NOTE: the kv heads of one sequence run side by side, so each page (all heads of a block are one
        # contiguous run of the pool) is read by neighbouring programs at about the same time.
        pid = tl.program_id(0)
        kv_head = pid % num_kv_heads
        rest = pid // num_kv_heads
        split = rest % num_splits
        pid_tile = rest // num_splits

    # Find the sequence of this tile: the largest s with query_start[s] // BLOCK_Q + s <= pid_tile.
    lo = pid_tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go = tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= pid_tile
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first_tok = (pid_tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_tok >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_offset = seq_len - q_len  # context index of this sequence's first new token

    # Rows of the tile: token-major, the GQA heads of this kv head packed inside each token.
    offs_m = tl.arange(0, BLOCK_M)
    tok_local = first_tok + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    row_valid = (offs_m // GROUP_PAD < BLOCK_Q) & (tok_local < q_len) & (head_in_group < GROUP)
    q_pos = ctx_offset + tok_local  # i32[BLOCK_M] last context index each row may see
    tok = (q_start + tok_local).to(tl.int64)
    head = kv_head * GROUP + head_in_group
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    q_mask = row_valid[:, None] & d_valid[None, :]
    q_row = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    if KV_FORMAT == 2:
        # nvfp4 tiles come as even / odd halves of D (see _load_nvfp4_tile): split q the same way
        offs_h = tl.arange(0, BLOCK_D // 2)
        h_mask = row_valid[:, None] & (offs_h < head_dim // 2)[None, :]
        q = tl.load(q_row + (2 * offs_h)[None, :] * stride_qd, mask=h_mask, other=0.0)
        q_odd = tl.load(q_row + (2 * offs_h + 1)[None, :] * stride_qd, mask=h_mask, other=0.0)
    else:
        q = tl.load(q_row + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
        q_odd = q

    k_scale = 1.0
    v_scale = 1.0
    if KV_FORMAT == 1:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    elif KV_FORMAT == 2:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
        if NVFP4_ASM:
            k_scale = k_scale * 256.0  # NVFP4_ASM_FACTOR
            v_scale = v_scale * 256.0

    # NOTE: the fp8 per-head scale and the nvfp4 per-layer scale are constant in a program, so K's folds
    # into the score scale and V's into the final accumulator instead of multiplying every element.
    qk_scale = sm_scale * k_scale * 1.4426950408889634  # log2(e): softmax via exp2
    if DOT_F32:
        q = q.to(tl.float32)
        q_odd = q_odd.to(tl.float32)
    elif KV_FORMAT != 0:
        # fp8 / nvfp4 tiles become f16 (exact: e4m3 and the scaled E2M1 values fit f16), so the dots run in
        # f16; q is pre-multiplied by sm_scale to keep large activations inside f16's range.
        q = (q.to(tl.float32) * sm_scale).to(tl.float16)
        q_odd = (q_odd.to(tl.float32) * sm_scale).to(tl.float16)
        qk_scale = k_scale * 1.4426950408889634

    # Context range: causal bound of the tile's last row, cut to this split's slice. With a sliding window it
    # starts at the BLOCK_N step holding kv_from, the first position the tile's first row sees: the pages
    # wholly before it may be freed, so nothing before kv_from is ever loaded.
    last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1
    kv_hi = ctx_offset + last_tok + 1
    kv_lo = kv_hi * 0
    kv_from = kv_lo
    if WINDOW:
        kv_from = tl.maximum(ctx_offset + first_tok - window + 1, 0)
        kv_lo = kv_from // BLOCK_N * BLOCK_N
    if SPLIT_KV:
        if WINDOW:
            chunk = tl.cdiv(tl.cdiv(kv_hi - kv_lo, num_splits), BLOCK_N) * BLOCK_N
        else:
            chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = kv_lo + split * chunk
        kv_hi = tl.minimum(kv_hi, kv_lo + chunk)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if KV_FORMAT == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_D // 2], dtype=tl.float32)  # even output elements
        acc_odd = tl.zeros([BLOCK_M, BLOCK_D // 2], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        acc_odd = tl.zeros([BLOCK_M, 2], dtype=tl.float32)  # unused
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    k_head = kv_head.to(tl.int64) * stride_kh
    v_head = kv_head.to(tl.int64) * stride_vh

    # Blocks wholly inside every row's causal window and the context need no masks: run them in one loop,
    # then the (at most a few) blocks at the end of the context with the masks. With a sliding window the
    # steps before the first BLOCK_N boundary that the tile's last row's window covers take the masks too.
    head_end = kv_lo
    if WINDOW:
        win_last = tl.maximum(ctx_offset + last_tok - window + 1, 0)  # first position the last row sees
        head_end = tl.minimum(tl.maximum(tl.cdiv(win_last, BLOCK_N) * BLOCK_N, kv_lo), kv_hi)
        for start in range(kv_lo, head_end, BLOCK_N):
            acc, acc_odd, m_i, l_i = _attend_block(
                acc, acc_odd, m_i, l_i, q, q_odd, q_pos, start, kv_hi, kv_from, window, qk_scale, bt_row, k_head,
                v_head, kv_head, k_cache_ptr, v_cache_ptr, k_block_scale_ptr, v_block_scale_ptr, block_size,
                head_dim, stride_kn, stride_kb, stride_kd, stride_vn, stride_vb, stride_vd, stride_ksn, stride_ksb,
                stride_ksh, stride_ksd, stride_vsn, stride_vsb, stride_vsh, stride_vsd, stride_btb,
                BLOCK_N, BLOCK_D, KV_FORMAT, DOT_F32, PAGE, NVFP4_ASM, SCALE_ALIGN, EVEN_D, True, True)
    main_hi = tl.minimum(kv_hi, ctx_offset + first_tok + 1)
    main_end = head_end + tl.maximum(main_hi - head_end, 0) // BLOCK_N * BLOCK_N
    for start in range(head_end, main_end, BLOCK_N):
        acc, acc_odd, m_i, l_i = _attend_block(
            acc, acc_odd, m_i, l_i, q, q_odd, q_pos, start, kv_hi, kv_from, window, qk_scale, bt_row, k_head,
            v_head, kv_head, k_cache_ptr, v_cache_ptr, k_block_scale_ptr, v_block_scale_ptr, block_size, head_dim,
            stride_kn, stride_kb, stride_kd, stride_vn, stride_vb, stride_vd, stride_ksn, stride_ksb, stride_ksh,
            stride_ksd, stride_vsn, stride_vsb, stride_vsh, stride_vsd, stride_btb,
            BLOCK_N, BLOCK_D, KV_FORMAT, DOT_F32, PAGE, NVFP4_ASM, SCALE_ALIGN, EVEN_D, False, WINDOW)
    for start in range(main_end, kv_hi, BLOCK_N):
        acc, acc_odd, m_i, l_i = _attend_block(
            acc, acc_odd, m_i, l_i, q, q_odd, q_pos, start, kv_hi, kv_from, window, qk_scale, bt_row, k_head,
            v_head, kv_head, k_cache_ptr, v_cache_ptr, k_block_scale_ptr, v_block_scale_ptr, block_size, head_dim,
            stride_kn, stride_kb, stride_kd, stride_vn, stride_vb, stride_vd, stride_ksn, stride_ksb, stride_ksh,
            stride_ksd, stride_vsn, stride_vsb, stride_vsh, stride_vsd, stride_btb,
            BLOCK_N, BLOCK_D, KV_FORMAT, DOT_F32, PAGE, NVFP4_ASM, SCALE_ALIGN, EVEN_D, True, WINDOW)

    acc = acc * v_scale
    acc_odd = acc_odd * v_scale
    if SPLIT_KV:
        prow = split.to(tl.int64) * stride_ps + tok * stride_pt + head * stride_ph
        if KV_FORMAT == 2:
            tl.store(part_out_ptr + prow[:, None] + 2 * offs_h[None, :], acc, mask=h_mask)
            tl.store(part_out_ptr + prow[:, None] + 2 * offs_h[None, :] + 1, acc_odd, mask=h_mask)
        else:
            tl.store(part_out_ptr + prow[:, None] + offs_d[None, :], acc, mask=q_mask)
        mrow = split.to(tl.int64) * stride_ms + tok * stride_mt + head
        tl.store(part_m_ptr + mrow, m_i, mask=row_valid)
        tl.store(part_l_ptr + mrow, l_i, mask=row_valid)
    else:
        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_row = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh
        if KV_FORMAT == 2:
            tl.store(o_row + (2 * offs_h)[None, :] * stride_od, (acc * inv_l).to(out_ptr.dtype.element_ty),
                     mask=h_mask)
            tl.store(o_row + (2 * offs_h + 1)[None, :] * stride_od, (acc_odd * inv_l).to(out_ptr.dtype.element_ty),
                     mask=h_mask)
        else:
            tl.store(o_row + offs_d[None, :] * stride_od, (acc * inv_l).to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def paged_attention_reduce_kernel(
    out_ptr,  # [T, Hq, D]
    part_out_ptr,  # f32[num_splits, T, Hq, D]
    part_m_ptr, part_l_ptr,  # f32[num_splits, T, Hq]
    num_splits, head_dim,
    stride_ot, stride_oh, stride_od,
    stride_ps, stride_pt, stride_ph,
    stride_ms, stride_mt,
    SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels_gpu.fused_gemv.pdl_enabled)
):
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_valid = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    mrow = offs_s * stride_ms + tok * stride_mt + head
    m = tl.load(part_m_ptr + mrow, mask=s_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + mrow, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # f32[SPLITS_PAD]
    denom = tl.sum(w * l, 0)
    prow = offs_s * stride_ps + tok * stride_pt + head * stride_ph
    part = tl.load(part_out_ptr + prow[:, None] + offs_d[None, :], mask=s_valid[:, None] & d_valid[None, :],
                   other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)


@triton.jit
def _grouped_step(acc, m_i, l_i, q, qk_scale, start, kv_hi, kv_from, bt_row, kvh, offs_d, d_valid,
                  k_cache_ptr, v_cache_ptr, stride_kn, stride_kb, stride_kh, stride_kd,
                  stride_vn, stride_vb, stride_vh, stride_vd, stride_btb,
                  BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DOT_F32: tl.constexpr, EVEN_D: tl.constexpr,
                  MASKED: tl.constexpr, KV_EVICT: tl.constexpr, KV_CACHE: tl.constexpr, WINDOW: tl.constexpr,
                  row_hi=None, MULTI_Q: tl.constexpr = False):
    """One BLOCK_N step of paged_decode_grouped_kernel for its HG kv heads at once (3-D dots).

    MASKED steps see positions kv_from (WINDOW; else 0) .. kv_hi - 1; nothing outside is loaded. MULTI_Q: the rows
    are several new tokens of the sequence, row r sees positions below row_hi[r] (causal) in MASKED steps, and a row
    may see no position of a step (or of a whole split).
    """
    if WINDOW:
        start = tl.multiple_of(start, BLOCK_N)  # the window's min/max bounds hide what every step start is
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_hi
    if WINDOW:
        n_valid = n_valid & (offs_n >= kv_from)
    if MASKED:
        blk = tl.load(bt_row + (offs_n // PAGE) * stride_btb, mask=n_valid, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + (offs_n // PAGE) * stride_btb).to(tl.int64)
    off = offs_n % PAGE
    k_row = blk * stride_kn + off * stride_kb  # i64[BLOCK_N]
    v_row = blk * stride_vn + off * stride_vb
    # K as [HG, D, N], V as [HG, N, D]: for each context position the HG heads' rows are one contiguous run
    k_ptrs = k_cache_ptr + k_row[None, None, :] + kvh[:, None, None] * stride_kh + offs_d[None, :, None] * stride_kd
    v_ptrs = v_cache_ptr + v_row[None, :, None] + kvh[:, None, None] * stride_vh + offs_d[None, None, :] * stride_vd
    if MASKED:
        k = tl.load(k_ptrs, mask=n_valid[None, None, :] & d_valid[None, :, None], other=0.0,
                    eviction_policy=KV_EVICT, cache_modifier=KV_CACHE)
    elif EVEN_D:
        k = tl.load(k_ptrs, eviction_policy=KV_EVICT, cache_modifier=KV_CACHE)
    else:
        k = tl.load(k_ptrs, mask=d_valid[None, :, None], other=0.0, eviction_policy=KV_EVICT, cache_modifier=KV_CACHE)
    if DOT_F32:
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
    else:
        s = tl.dot(q, k.to(q.dtype))
    s = s * qk_scale[:, None, None]  # [HG, ROWS, BLOCK_N]
    if MASKED:
        if MULTI_Q:
            s = tl.where(n_valid[None, None, :] & (offs_n[None, :] < row_hi[:, None])[None, :, :], s, float("-inf"))
        else:
            s = tl.where(n_valid[None, None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 2))
    if MULTI_Q:  # a row that has seen nothing yet keeps m = -inf, l = 0, acc = 0
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:  # every step has at least one visible position, so m_new is finite
        m_use = m_new
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, :, None])
    l_i = l_i * alpha + tl.sum(p, 2)
    if MASKED:
        v = tl.load(v_ptrs, mask=n_valid[None, :, None] & d_valid[None, None, :], other=0.0,
                    eviction_policy=KV_EVICT, cache_modifier=KV_CACHE)
    elif EVEN_D:
        v = tl.load(v_ptrs, eviction_policy=KV_EVICT, cache_modifier=KV_CACHE)
    else:
        v = tl.load(v_ptrs, mask=d_valid[None, None, :], other=0.0, eviction_policy=KV_EVICT, cache_modifier=KV_CACHE)
    if DOT_F32:
        acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, :, None], input_precision="ieee")
    else:
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, :, None])
    return acc, m_new, l_i


@triton.jit
def paged_decode_grouped_kernel(
    out_ptr,  # [T, Hq, D] q dtype (written when not SPLIT_KV)
    part_out_ptr, part_m_ptr, part_l_ptr,  # as paged_attention_kernel (SPLIT_KV)
    q_ptr,  # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [N, block_size, Hkv, D] bf16/f16 | fp8
    k_scale_ptr, v_scale_ptr,  # f32[Hkv] (fp8)
    query_start_ptr,  # i32[S+1], every sequence has at most one new token
    seq_lens_ptr,  # i32[S]
    block_tables_ptr,  # i32[S, B]
    sm_scale, head_dim, num_splits,
    window,  # sliding window (WINDOW)
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_bts, stride_btb,
    stride_ps, stride_pt, stride_ph,
    stride_ms, stride_mt,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, KV_FORMAT: tl.constexpr, SPLIT_KV: tl.constexpr, DOT_F32: tl.constexpr,
    EVEN_D: tl.constexpr, KV_EVICT: tl.constexpr = "", KV_CACHE: tl.constexpr = "",
    WINDOW: tl.constexpr = False,  # sliding window: the token sees positions > seq_len - 1 - window
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels_gpu.fused_gemv.pdl_enabled)
    MULTI_Q: tl.constexpr = False,  # the rows hold up to ROWS // GROUP new tokens per sequence (no WINDOW)
):
    """Decode: one program = one sequence's split of the context for HG kv heads.

    The pool is [N, block_size, Hkv, D], so the HG heads of a context position are one contiguous run of
    HG * D elements (a whole page when HG == Hkv): one program streams them together instead of HG programs
    each reading D-element pieces 1 / Hkv of a page apart. Rows: [HG, ROWS] = the GROUP q heads of each kv
    head, padded to ROWS (>= 16 for the tensor cores). MULTI_Q (a verification step: each sequence's q_len
    <= ROWS // GROUP new tokens are its last context positions): row r is q head r % GROUP of new token r // GROUP,
    causal among the new tokens, so one program reads the context once for all of them.
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # q and the pools are earlier kernels' output
    hg = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.program_id(2)
    tok = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - tok
    if q_len == 0:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    tok = tok.to(tl.int64)
    offs_g = tl.arange(0, HG)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim
    kvh = hg * HG + offs_g  # i32[HG]
    if not MULTI_Q:
        head = kvh[:, None] * GROUP + offs_r[None, :]  # [HG, ROWS]
        row_valid = (offs_r < GROUP)[None, :] & (offs_g >= 0)[:, None]  # [HG, ROWS]
        tok2 = tok  # the token of every row (scalar)
        tok3 = tok
        row_hi = seq_len
    else:
        qi = offs_r // GROUP  # the new token of each row
        head = kvh[:, None] * GROUP + (offs_r % GROUP)[None, :]
        row_valid = (qi < q_len)[None, :] & (offs_g >= 0)[:, None]
        tok2 = (tok + qi)[None, :]  # [1, ROWS]
        tok3 = tok2[:, :, None]  # [1, ROWS, 1]
        row_hi = seq_len - q_len + 1 + qi  # positions a row sees: below row_hi
    q_mask = row_valid[:, :, None] & d_valid[None, None, :]
    q = tl.load(q_ptr + tok3 * stride_qt + head[:, :, None] * stride_qh + offs_d[None, None, :] * stride_qd,
                mask=q_mask, other=0.0)  # [HG, ROWS, BLOCK_D]
    LOG2E: tl.constexpr = 1.4426950408889634
    if KV_FORMAT == 1:
        k_scale = tl.load(k_scale_ptr + kvh)  # f32[HG]
        v_scale = tl.load(v_scale_ptr + kvh)
        qk_scale = k_scale * LOG2E
        if DOT_F32:
            q = q.to(tl.float32) * sm_scale
        else:
            q = (q.to(tl.float32) * sm_scale).to(tl.float16)  # fp8 tiles become f16 (exact)
    else:
        v_scale = tl.full([HG], 1.0, dtype=tl.float32)
        qk_scale = tl.full([HG], sm_scale * LOG2E, dtype=tl.float32)
        if DOT_F32:
            q = q.to(tl.float32)

    # Context positions kv_lo .. kv_hi - 1 of this split; with a sliding window the walk starts at the BLOCK_N
    # step holding kv_from (pages wholly before it may be freed and are never read) and the splits share out
    # the window only.
    kv_lo = seq_len * 0
    kv_hi = seq_len
    kv_from = kv_lo
    if WINDOW:
        kv_from = tl.maximum(seq_len - window, 0)
        kv_lo = kv_from // BLOCK_N * BLOCK_N
    if SPLIT_KV:
        chunk = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = kv_lo + split * chunk
        kv_hi = tl.minimum(seq_len, kv_lo + chunk)
    m_i = tl.full([HG, ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([HG, ROWS], dtype=tl.float32)
    acc = tl.zeros([HG, ROWS, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    # unmasked steps end before the first position some row must not see (MULTI_Q: the second new token)
    all_see = tl.minimum(kv_hi, seq_len - q_len + 1) if MULTI_Q else kv_hi
    main_end = kv_lo + tl.maximum(all_see - kv_lo, 0) // BLOCK_N * BLOCK_N
    if WINDOW:
        # The step holding kv_from (the first split's) and the context's last partial step take the masks; both
        # run after the unmasked ones (the online softmax takes steps in any order) in one loop of <= 2 steps, so
        # the kernel holds one masked and one unmasked copy of the step, as without a window.
        head_end = tl.minimum(tl.maximum(tl.cdiv(kv_from, BLOCK_N) * BLOCK_N, kv_lo), kv_hi)
        main_end = head_end + tl.maximum(kv_hi - head_end, 0) // BLOCK_N * BLOCK_N
        num_head = (kv_lo < head_end).to(tl.int32)
        for start in range(head_end, main_end, BLOCK_N):
            acc, m_i, l_i = _grouped_step(acc, m_i, l_i, q, qk_scale, start, kv_hi, kv_from, bt_row, kvh, offs_d,
                                          d_valid, k_cache_ptr, v_cache_ptr, stride_kn, stride_kb, stride_kh,
                                          stride_kd, stride_vn, stride_vb, stride_vh, stride_vd, stride_btb,
                                          BLOCK_N, PAGE, DOT_F32, EVEN_D, False, KV_EVICT, KV_CACHE, True)
        for i in range(0, num_head + tl.cdiv(tl.maximum(kv_hi - main_end, 0), BLOCK_N)):
            start = tl.where(i < num_head, kv_lo, main_end)
            acc, m_i, l_i = _grouped_step(acc, m_i, l_i, q, qk_scale, start, kv_hi, kv_from, bt_row, kvh, offs_d,
                                          d_valid, k_cache_ptr, v_cache_ptr, stride_kn, stride_kb, stride_kh,
                                          stride_kd, stride_vn, stride_vb, stride_vh, stride_vd, stride_btb,
                                          BLOCK_N, PAGE, DOT_F32, EVEN_D, True, KV_EVICT, KV_CACHE, True)
    else:
        for start in range(kv_lo, main_end, BLOCK_N):
            acc, m_i, l_i = _grouped_step(acc, m_i, l_i, q, qk_scale, start, kv_hi, kv_from, bt_row, kvh, offs_d,
                                          d_valid, k_cache_ptr, v_cache_ptr, stride_kn, stride_kb, stride_kh,
                                          stride_kd, stride_vn, stride_vb, stride_vh, stride_vd, stride_btb,
                                          BLOCK_N, PAGE, DOT_F32, EVEN_D, False, KV_EVICT, KV_CACHE, False,
                                          row_hi, MULTI_Q)
        for start in range(main_end, kv_hi, BLOCK_N):
            acc, m_i, l_i = _grouped_step(acc, m_i, l_i, q, qk_scale, start, kv_hi, kv_from, bt_row, kvh, offs_d,
                                          d_valid, k_cache_ptr, v_cache_ptr, stride_kn, stride_kb, stride_kh,
                                          stride_kd, stride_vn, stride_vb, stride_vh, stride_vd, stride_btb,
                                          BLOCK_N, PAGE, DOT_F32, EVEN_D, True, KV_EVICT, KV_CACHE, False,
                                          row_hi, MULTI_Q)
    acc = acc * v_scale[:, None, None]
    if SPLIT_KV:
        prow = split.to(tl.int64) * stride_ps + tok2 * stride_pt + head * stride_ph  # [HG, ROWS]
        tl.store(part_out_ptr + prow[:, :, None] + offs_d[None, None, :], acc, mask=q_mask)
        mrow = split.to(tl.int64) * stride_ms + tok2 * stride_mt + head
        tl.store(part_m_ptr + mrow, m_i, mask=row_valid)
        tl.store(part_l_ptr + mrow, l_i, mask=row_valid)
    else:
        inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
        o_ptrs = out_ptr + tok3 * stride_ot + head[:, :, None] * stride_oh + offs_d[None, None, :] * stride_od
        tl.store(o_ptrs, (acc * inv_l[:, :, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


def _tile_sizes(device: torch.device, head_dim: int, max_q_len: int, kv_format: str = "bf16") -> dict:
    target = tile_target(device)
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    phase = "decode" if max_q_len <= DECODE_MAX_Q_LEN else "prefill"
    return {**TILE_SIZES[(target, bucket, phase)], **FORMAT_OVERRIDES.get((target, phase, kv_format), {}),
            **FORMAT_OVERRIDES.get((target, bucket, phase, kv_format), {})}


def choose_num_splits(num_tiles: int, num_kv_heads: int, max_seq_len: int, target_programs=None,
                      min_tokens_per_split=None) -> int:
    """Split-KV count: more splits when few (sequence, kv head, tile) programs face long contexts."""
    target = SPLIT_KV["target_programs"] if target_programs is None else target_programs
    programs = max(1, num_tiles * num_kv_heads)
    if programs >= target:
        return 1
    by_occupancy = triton.cdiv(target, programs)
    by_length = max_seq_len // (min_tokens_per_split or SPLIT_KV["min_tokens_per_split"])
    return max(1, min(by_occupancy, by_length, SPLIT_KV["max_splits"]))


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"paged_attention: {msg}")


def _check_window(window) -> int | None:
    """window as a Python int (or None); ValueError unless it is a positive integer or None."""
    _check(window is None or (isinstance(window, numbers.Integral) and not isinstance(window, bool) and window >= 1),
           f"window must be a positive int or None, got {window!r}")
    return None if window is None else int(window)


def _validate(q, k_cache, v_cache, query_start, seq_lens, block_tables, kv_format, k_scale, v_scale,
              k_block_scale, v_block_scale, out):
    _check(kv_format in KV_FORMATS, f"kv_format must be one of {sorted(KV_FORMATS)}, got {kv_format!r}")
    _check(q.dim() == 3, f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    _check(q.dtype in (torch.bfloat16, torch.float16, torch.float32), f"q dtype {q.dtype} unsupported")
    num_tokens, num_q_heads, head_dim = q.shape
    _check(head_dim % 16 == 0 and 16 <= head_dim <= 256, f"head_dim must be a multiple of 16 in [16, 256], got {head_dim}")
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           f"k_cache/v_cache must both be [N, block_size, Hkv, D*], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check(k_cache.dtype == v_cache.dtype, f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    num_blocks, block_size, num_kv_heads, stored_dim = k_cache.shape
    _check(block_size >= 1, "block_size must be >= 1")
    _check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
           f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    if kv_format == "bf16":
        _check(k_cache.dtype in (torch.bfloat16, torch.float16, torch.float32),
               f"bf16 KV format needs a bf16/fp16/fp32 cache, got {k_cache.dtype}")
        _check(stored_dim == head_dim, f"cache head_dim {stored_dim} != q head_dim {head_dim}")
    elif kv_format == "fp8":
        _check(k_cache.dtype == torch.float8_e4m3fn, f"fp8 KV format needs float8_e4m3fn, got {k_cache.dtype}")
        _check(stored_dim == head_dim, f"cache head_dim {stored_dim} != q head_dim {head_dim}")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check(s is not None and s.dtype == torch.float32 and s.shape == (num_kv_heads,),
                   f"fp8 KV format needs {name} f32[{num_kv_heads}]")
    else:
        _check(k_cache.dtype == torch.uint8, f"nvfp4 KV format needs a uint8 packed cache, got {k_cache.dtype}")
        _check(stored_dim * 2 == head_dim, f"nvfp4 cache last dim must be D//2={head_dim // 2}, got {stored_dim}")
        bs_shape = (num_blocks, block_size, num_kv_heads, head_dim // NVFP4_BLOCK)
        for name, s in (("k_block_scale", k_block_scale), ("v_block_scale", v_block_scale)):
            _check(s is not None and s.dtype == torch.float8_e4m3fn and tuple(s.shape) == bs_shape,
                   f"nvfp4 KV format needs {name} float8_e4m3fn{list(bs_shape)}")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check(s is not None and s.dtype == torch.float32 and s.numel() == 1,
                   f"nvfp4 KV format needs {name} as an f32 scalar tensor (the per-layer global scale)")
    _check(query_start.dim() == 1 and query_start.dtype == torch.int32 and query_start.numel() >= 2,
           "query_start must be i32[S+1] with S >= 1")
    num_seqs = query_start.numel() - 1
    _check(seq_lens.dtype == torch.int32 and tuple(seq_lens.shape) == (num_seqs,), f"seq_lens must be i32[{num_seqs}]")
    _check(block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == num_seqs,
           f"block_tables must be i32[{num_seqs}, B]")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("query_start", query_start),
                    ("seq_lens", seq_lens), ("block_tables", block_tables)):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    if out is not None:
        _check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device,
               f"out must match q: {tuple(q.shape)} {q.dtype}")


def paged_attention(
    q,  # [T, Hq, D] bf16/fp16/f32
    k_cache, v_cache,  # [N, block_size, Hkv, D] bf16/f32 | fp8 e4m3 | u8[N, block_size, Hkv, D//2] (nvfp4)
    query_start,  # i32[S+1]
    seq_lens,  # i32[S] context length after this step (includes the new tokens)
    block_tables,  # i32[S, B]
    *,
    scale: float,
    kv_format: str = "bf16",
    k_scale=None, v_scale=None,  # f32[Hkv] (fp8) | f32[] global scale (nvfp4)
    k_block_scale=None, v_block_scale=None,  # fp8[N, block_size, Hkv, D//16] (nvfp4)
    num_splits=None,
    max_q_len=None,
    max_seq_len=None,
    out=None,  # [T, Hq, D] q dtype
    window: int | None = None,
):
    """Causal attention of each new token over its own sequence's paged context; returns out [T, Hq, D].

    Pass max_q_len and max_seq_len (host ints) to avoid device syncs (and when capturing CUDA graphs);
    rows past query_start[S] are left unwritten. window (sliding-window attention): a token at context index
    p sees only positions > p - window; pages wholly before the window of a sequence's first new token are
    never read (their block-table entries may point anywhere). A max_seq_len passed must bound every seq_len.
    """
    _validate(q, k_cache, v_cache, query_start, seq_lens, block_tables, kv_format, k_scale, v_scale,
              k_block_scale, v_block_scale, out)
    window = _check_window(window)
    if window is not None and max_seq_len is not None and window >= int(max_seq_len):
        window = None  # NOTE: every position is inside every window: the unwindowed kernels are the same, faster
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if max_q_len is None:
        max_q_len = int((query_start[1:] - query_start[:-1]).max().item())
    max_q_len = max(1, int(max_q_len))

    grouped = None
    if GROUPED_VERIFY or max_q_len == 1:
        grouped = _grouped_tiles(q, k_cache, max_q_len, kv_format, window)
    if grouped is not None:
        return _grouped_decode(q, k_cache, v_cache, query_start, seq_lens, block_tables, grouped, scale=scale,
                               kv_format=kv_format, k_scale=k_scale, v_scale=v_scale, num_splits=num_splits,
                               max_seq_len=max_seq_len, out=out, window=window)
    tiles = _tile_sizes(q.device, head_dim, max_q_len, kv_format)
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, min(tiles["BLOCK_M"] // group_pad, triton.next_power_of_2(max_q_len)))
    block_m = max(16, block_q * group_pad)
    block_n = tiles["BLOCK_N"]
    block_d = triton.next_power_of_2(head_dim)
    num_tiles = num_tokens // block_q + num_seqs  # upper bound of sum_s cdiv(q_len_s, block_q)

    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        live_tiles = min(num_tiles, num_seqs * triton.cdiv(max_q_len, block_q))
        span = int(max_seq_len) if window is None else min(int(max_seq_len), window + block_q)  # a tile's positions
        num_splits = choose_num_splits(live_tiles, num_kv_heads, span, tiles.get("target_programs"))
    _check(int(num_splits) >= 1, f"num_splits must be >= 1, got {num_splits}")
    num_splits = int(num_splits)
    split_kv = num_splits > 1

    part_out, part_m, part_l, part_strides, ml_strides = _split_buffers(out, num_splits)
    dummy = seq_lens
    k_bs = k_block_scale if k_block_scale is not None else dummy
    v_bs = v_block_scale if v_block_scale is not None else dummy
    ks = k_scale if k_scale is not None else dummy
    vs = v_scale if v_scale is not None else dummy
    k_bs_strides = k_bs.stride() if k_block_scale is not None else (0, 0, 0, 0)
    v_bs_strides = v_bs.stride() if v_block_scale is not None else (0, 0, 0, 0)
    dot_f32 = _interpreting() or q.dtype == torch.float32

    grid_order = tiles.get("grid_order", 0)
    launch_opts = {"maxnreg": tiles["maxnreg"]} if tiles.get("maxnreg") and not _interpreting() else {}
    if grid_order == 0:
        grid = (num_tiles, num_kv_heads, num_splits)
    else:
        grid = (num_tiles * num_kv_heads * num_splits,)
    page = block_size if block_size & (block_size - 1) == 0 else 0
    scale_align = 1
    if kv_format == "nvfp4" and k_bs.stride(3) == 1 and v_bs.stride(3) == 1:
        scale_align = next(a for a in (16, 8, 4, 2, 1) if all(x % a == 0 for x in (*k_bs.stride(), *v_bs.stride())
                                                              if x != 1) and head_dim // 16 % a == 0)
    paged_attention_kernel[grid](
        out, part_out, part_m, part_l,
        q, k_cache, v_cache, k_bs, v_bs, ks, vs,
        query_start, seq_lens, block_tables,
        float(scale), num_seqs, block_size, head_dim, num_tiles, num_kv_heads, num_splits, window or 0,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        *k_bs_strides, *v_bs_strides, *block_tables.stride(),
        *part_strides, *ml_strides,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        KV_FORMAT=KV_FORMATS[kv_format], SPLIT_KV=split_kv, DOT_F32=dot_f32,
        PAGE=page, GRID_ORDER=grid_order, NVFP4_ASM=not _interpreting() and q.device.type == "cuda",
        SCALE_ALIGN=scale_align, EVEN_D=head_dim == block_d, WINDOW=window is not None,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], **launch_opts, **_pdl(q.device, num_seqs),
    )
    if split_kv:
        _reduce_splits(out, part_out, part_m, part_l, part_strides, ml_strides, num_splits, block_d, num_seqs)
    return out


def _split_buffers(out, num_splits: int):
    """(part_out, part_m, part_l, part strides, m/l strides) for a split-KV launch writing into `out` [T, Hq, D]:
    f32 partial outputs and running max / sum per split; with one split, placeholders (`out`, zero strides)."""
    if num_splits <= 1:
        return out, out, out, (0, 0, 0), (0, 0)
    num_tokens, num_q_heads, head_dim = out.shape
    part_out = torch.empty((num_splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32, device=out.device)
    part_m = torch.empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32, device=out.device)
    part_l = torch.empty_like(part_m)
    return part_out, part_m, part_l, part_out.stride()[:3], part_m.stride()[:2]


def _reduce_splits(out, part_out, part_m, part_l, part_strides, ml_strides, num_splits: int, block_d: int,
                   num_seqs: int):
    """Combine the split-KV partials into `out` (paged_attention_reduce_kernel, one program per (token, head))."""
    num_tokens, num_q_heads, head_dim = out.shape
    paged_attention_reduce_kernel[(num_tokens, num_q_heads)](
        out, part_out, part_m, part_l,
        num_splits, head_dim,
        *out.stride(), *part_strides, *ml_strides,
        SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_D=block_d, **_pdl(out.device, num_seqs),
    )


def _grouped_tiles(q, k_cache, max_q_len: int, kv_format: str, window=None):
    """The GROUPED_DECODE tiles for this call (with HG fitted to Hkv), or None for paged_attention_kernel.
    Steps of up to GROUPED_MAX_Q new tokens per sequence (verification) take the grouped kernel too, unwindowed,
    while their rows (new tokens x q heads per kv head) fit GROUPED_MAX_ROWS."""
    if kv_format not in ("bf16", "fp8"):
        return None
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    rows = max(16, triton.next_power_of_2(max_q_len * (q.shape[1] // num_kv_heads)))
    if max_q_len > 1 and (window is not None or max_q_len > GROUPED_MAX_Q or rows > GROUPED_MAX_ROWS):
        return None
    target = tile_target(q.device)
    if q.dtype == torch.float32 and target == "cuda":
        return None  # f32 queries (tests) keep the 2-D kernel
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    tiles = GROUPED_DECODE.get((target, bucket, kv_format))
    if tiles is None or block_size & (block_size - 1):
        return None
    hg = tiles["HG"]
    while num_kv_heads % hg or (hg > 1 and hg * rows > GROUPED_MAX_ROWS):
        hg //= 2
    return {**tiles, "HG": hg, "ROWS": rows, "MULTI_Q": max_q_len > 1}


def grouped_heads(tiles: dict, num_seqs: int, num_kv_heads: int) -> int:
    """HG, the kv heads one grouped-decode program reads: the tile's HG (already a divisor of num_kv_heads), halved
    while fewer than tiles["hg_min_programs"] (sequence, head group) programs would run."""
    hg = int(tiles["HG"])
    least = tiles.get("hg_min_programs") or 0
    while hg > 1 and num_seqs * (num_kv_heads // hg) < least:
        hg //= 2
    return hg


def _grouped_decode(q, k_cache, v_cache, query_start, seq_lens, block_tables, tiles, *, scale, kv_format,
                    k_scale, v_scale, num_splits, max_seq_len, out, window=None):
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    hg = grouped_heads(tiles, num_seqs, num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        span = int(max_seq_len) if window is None else min(int(max_seq_len), window)
        num_splits = choose_num_splits(num_seqs, num_kv_heads // hg, span, tiles.get("target_programs"),
                                       tiles.get("min_tokens_per_split"))
    _check(int(num_splits) >= 1, f"num_splits must be >= 1, got {num_splits}")
    num_splits = int(num_splits)
    split_kv = num_splits > 1
    part_out, part_m, part_l, part_strides, ml_strides = _split_buffers(out, num_splits)
    ks = k_scale if k_scale is not None else seq_lens
    vs = v_scale if v_scale is not None else seq_lens
    launch_opts = {"maxnreg": tiles["maxnreg"]} if tiles.get("maxnreg") and not _interpreting() else {}
    evict = tiles.get("kv_evict", "") if not _interpreting() else ""
    cache = tiles.get("kv_cache", "") if not _interpreting() else ""
    paged_decode_grouped_kernel[(num_kv_heads // hg, num_splits, num_seqs)](
        out, part_out, part_m, part_l, q, k_cache, v_cache, ks, vs, query_start, seq_lens, block_tables,
        float(scale), head_dim, num_splits, window or 0,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), *block_tables.stride(),
        *part_strides, *ml_strides,
        GROUP=group, ROWS=tiles["ROWS"], HG=hg, BLOCK_N=tiles["BLOCK_N"], BLOCK_D=block_d,
        PAGE=block_size, KV_FORMAT=KV_FORMATS[kv_format], SPLIT_KV=split_kv,
        DOT_F32=_interpreting() or q.dtype == torch.float32, EVEN_D=head_dim == block_d,
        KV_EVICT=evict, KV_CACHE=cache, WINDOW=window is not None, MULTI_Q=tiles["MULTI_Q"],
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"], **launch_opts, **_pdl(q.device, num_seqs),
    )
    if split_kv:
        _reduce_splits(out, part_out, part_m, part_l, part_strides, ml_strides, num_splits, block_d, num_seqs)
    return out


def _dequantize_cache(cache, scale, block_scale, kv_format):
    """[N, block_size, Hkv, D*] stored cache -> f64[N, block_size, Hkv, D]."""
    from kernels_gpu.kv_formats import dequantize_fp8, dequantize_nvfp4

    if kv_format == "fp8":
        return dequantize_fp8(cache, scale).double()
    if kv_format == "nvfp4":
        return dequantize_nvfp4(cache, block_scale, scale).double()
    return cache.double()


def ref_paged_attention(
    q,  # [T, Hq, D]
    k_cache, v_cache,  # as paged_attention
    query_start,  # i32[S+1]
    seq_lens,  # i32[S]
    block_tables,  # i32[S, B]
    *,
    scale: float,
    kv_format: str = "bf16",
    k_scale=None, v_scale=None,
    k_block_scale=None, v_block_scale=None,
    window: int | None = None,
    **unused,
):
    """Float64 reference: dequantize the whole pool, gather each sequence through its block table, causal softmax.

    With a sliding window only the positions some new token of the sequence sees are gathered (the pages before
    them may hold anything) and each token sees positions > its own - window.
    """
    k_all = _dequantize_cache(k_cache, k_scale, k_block_scale, kv_format)  # f64[N, bs, Hkv, D]
    v_all = _dequantize_cache(v_cache, v_scale, v_block_scale, kv_format)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)  # f64[T, Hq, D]
    qs = query_start.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        t0, t1 = qs[s], qs[s + 1]
        if t1 == t0:
            continue
        first = 0 if window is None else max(seq_len - (t1 - t0) - window + 1, 0)
        idx = torch.arange(first, seq_len, device=q.device)
        blocks = block_tables[s, idx // block_size].long()
        k = k_all[blocks, idx % block_size].repeat_interleave(group, dim=1)  # f64[ctx, Hq, D]
        v = v_all[blocks, idx % block_size].repeat_interleave(group, dim=1)
        qq = q[t0:t1].double()  # f64[q_len, Hq, D]
        scores = torch.einsum("thd,chd->htc", qq, k) * scale  # f64[Hq, q_len, ctx]
        pos = seq_len - (t1 - t0) + torch.arange(t1 - t0, device=q.device)
        hidden = idx[None, :] > pos[:, None]  # bool[q_len, ctx]
        if window is not None:
            hidden = hidden | (idx[None, :] <= pos[:, None] - window)
        scores = scores.masked_fill(hidden[None], float("-inf"))
        out[t0:t1] = torch.einsum("htc,chd->thd", torch.softmax(scores, dim=-1), v)
    return out
