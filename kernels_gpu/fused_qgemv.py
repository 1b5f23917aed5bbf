"""Batch-1 decode GEMV over a weight-only quantized weight (kernels_gpu.quant_linear's int8 per channel, int4
group-wise with or without zero points, nvfp4), with its input's producer fused in as kernels_gpu.fused_gemv does for
dense weights: y[1, N] = a[1, K] @ dequant(W)[N, K]^T (+ bias), where a is

  "none"      x[rows[0]]                                                       (qgemv)
  "rms_norm"  the RMSNorm of x (+ residual; N tile 0's programs store the sum)   (norm_qgemv)
  "silu" / "gelu_tanh"  act(gate) * up of one [1, 2K] gate | up row          (act_qgemv)

with fused_gemv's numerics for the prologue (the normalized activation is not rounded before the dot; the SwiGLU /
GeGLU product is rounded where silu_and_mul stores it) and quant_linear's for the weight (the nibbles decoded exactly,
each scale group's sum multiplied by its scale, per-channel / global scales after the loop).

Split-K without a memset: when the N tiles alone give fewer than SPLIT_K_PROGRAMS programs, K is split. Each split
stores its partial sums (and, for rms_norm, its partial sum of squares) in a workspace and bumps its N tile's arrival
counter; the split that arrives last adds the partials in split order, finishes the tile (norm scale, bias) and sets
the counter back to zero for the next launch. quant_linear's GEMV instead zeroes an f32 buffer, adds into it with
atomics and copies it into the output: two more launches per projection, which at batch 1 cost more than the weight
reads of a small layer. Sums here are also deterministic (fixed order).

Why: a batch-1 decode step over int4 / nvfp4 weights ran as many launches as the bf16 step had before its fusions
(norm, GEMV, memset, copy, SwiGLU, ...), so the 3.6x smaller weights bought nothing (BENCHMARKS.md, 2026-11-28).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels_gpu.fused_gemv import (PROLOGUES, _activation, activation_rows, gdc_launch_dependents, gdc_wait,
                                    norm_prologue_outputs, pdl_enabled)
from kernels_gpu.quant_linear import (SCHEMES, QuantizedWeight, _decode_nibbles, _epilogue_scale, _load_dense_tile,
                                      _load_group_zero, _load_packed_tile, _split_k, _validate_qweight, _weight_args)
from kernels_gpu.triton_env import interpreting as _interpreting
from kernels_gpu.triton_env import tile_target as _target

QGEMV_SCHEMES = ("int8", "int4", "nvfp4")  # fp8 is W8A8 (the activation row is quantized first): quant_linear
_ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# (target, scheme) -> [(max N, max K, tiles)], the first entry with N <= max N and K <= max K. Tiles: BLOCK_N weight
# rows x BLOCK_K columns per loop step; K split (at most MAX_SPLIT_K ways, each split >= 2 K tiles) while the N tiles
# give fewer than SPLIT_K_PROGRAMS programs. PDL: launched with programmatic dependent launch where the device has it
# (fused_gemv.pdl_enabled), the first weight tile loaded before waiting for the previous kernel when PREFETCH.
# NOTE: chosen from benchmarks/gpu_fused_qgemv.py --sweep on an H200 (2026-11-28, Llama-3.2-1B projections: 11 tiles,
# then split-K targets 0-1056 and PDL / prefetch on / off for the best tile). BLOCK_K 1024 won almost everywhere;
# small layers (N, K <= 4096) want 4 rows a program (768 programs for qkv), long-K / wide ones 16 (int4) or 8 (nvfp4);
# the split target and PDL moved the best tile by <= 5% except o_proj (int4 3.9 us without PDL, 4.6 us with).
# DECODE 1 (int4 as 1 + c / 16, nvfp4 without the f16 multiply: see _qtile_dot) took 0-10% off every shape
# (geometric mean 1.05x int4, 1.03x nvfp4 over the Llama-3.2-1B / 3-8B projections, H200, 2026-11-28).
# PDL off: end to end (gpu_decode.py --ablate-pdl, Llama-3.2-1B, batch 1, same run) int4 1209 tok/s with it, 1259
# without; nvfp4 1124 / 1186 (the microbenchmark, one kernel after another, favoured it for the norm GEMVs only).
_CUDA = {"BLOCK_N": 16, "BLOCK_K": 1024, "num_warps": 4, "SPLIT_K_PROGRAMS": 528, "MAX_SPLIT_K": 8, "PDL": False,
         "PREFETCH": True, "DECODE": 1}
_BIG = 1 << 62
TILE_SIZES = {
    ("cuda", "int8"): [(_BIG, _BIG, dict(_CUDA, BLOCK_K=256))],  # NOTE: not swept (quant_linear's GEMV tiles)
    ("cuda", "int4"): [(4096, 4096, dict(_CUDA, BLOCK_N=4)), (_BIG, _BIG, _CUDA)],
    ("cuda", "nvfp4"): [(4096, 4096, dict(_CUDA, BLOCK_N=4)), (4096, _BIG, _CUDA),
                        (32768, _BIG, dict(_CUDA, BLOCK_N=8)), (_BIG, _BIG, dict(_CUDA, BLOCK_N=8, BLOCK_K=256))],
}
for _s in QGEMV_SCHEMES:  # small tiles: the interpreter's tests run several N tiles, K steps and splits
    TILE_SIZES[("interpret", _s)] = [(_BIG, _BIG, {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4,
                                                   "SPLIT_K_PROGRAMS": 6, "MAX_SPLIT_K": 4, "PDL": False,
                                                   "PREFETCH": True, "DECODE": 1})]


# E2M1 nibbles -> f16 in registers, 4 packed bytes per call (CUDA only): quant_linear's _NIBBLES_TO_F16 without its
# multiply. $4 = bytes b0..b3; $0 / $1 = the low nibbles of (b0, b1) / (b2, b3), $2 / $3 = the high nibbles, each the
# f16 whose bits are the nibble's sign at 15 and magnitude at 9..11: the E2M1 value times 2**-14 (exact; code 1 is
# the subnormal 2**-15). The kernel multiplies its sums by 2**6 to meet quant_linear's epilogue (value * 2**-8).
_NIBBLES_TO_F16_LEAN = tl.constexpr("""
{
.reg .b32 lanes, m, s, z;
mov.b32 z, 0;
prmt.b32 lanes, $4, z, 0x4140;
shl.b32 m, lanes, 9;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 12;
and.b32 s, s, 0x80008000;
or.b32 $0, m, s;
shl.b32 m, lanes, 5;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 8;
and.b32 s, s, 0x80008000;
or.b32 $2, m, s;
prmt.b32 lanes, $4, z, 0x4342;
shl.b32 m, lanes, 9;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 12;
and.b32 s, s, 0x80008000;
or.b32 $1, m, s;
shl.b32 m, lanes, 5;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 8;
and.b32 s, s, 0x80008000;
or.b32 $3, m, s;
}
""")


@triton.jit
def _qtile_load(w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, k_hi, stride_wn, stride_wk, stride_sn, stride_sk,
                stride_zn, stride_zk, SCHEME: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                HAS_ZERO: tl.constexpr):
    """The weight tile of columns k0 .. k0 + BLOCK_K: int8 as exact f32 [BN, BK] (scale, zero: placeholders); int4 /
    nvfp4 as packed bytes [BN, NG, GE // 2] with the group scales [BN, NG] and (int4) zero points."""
    if SCHEME == 1:
        w = _load_dense_tile(w_ptr, offs_n, n_mask, k0, k_hi, stride_wn, stride_wk, SCHEME, BLOCK_K)
        return w, w, w
    else:
        packed, scale = _load_packed_tile(w_ptr, s_ptr, offs_n, n_mask, k0, k_hi, stride_wn, stride_wk, stride_sn,
                                          stride_sk, GROUP, BLOCK_K)
        zero = scale
        if HAS_ZERO:
            zero = _load_group_zero(z_ptr, offs_n, n_mask, k0, k_hi, stride_zn, stride_zk, GROUP, BLOCK_K)
        return packed, scale, zero


@triton.jit
def _qtile_dot(w, scale, zero, a, SCHEME: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, NVFP4_ASM: tl.constexpr, HAS_ZERO: tl.constexpr, DECODE: tl.constexpr):
    """f32[BN]: the tile's rows times a (f32[BK]), each scale group's sum times its scale (int8's per-channel and
    nvfp4's global scale come after the loop). DECODE 1: int4 as 1 + c / 16 (below); nvfp4 (CUDA) without the f16
    multiply (_NIBBLES_TO_F16_LEAN: the sums carry 2**-6 more, which the kernel takes out after the loop)."""
    if SCHEME == 1:
        return tl.sum(w * a[None, :], 1)
    else:
        GE: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
        NG: tl.constexpr = BLOCK_K // GE
        a2 = tl.reshape(a, [NG, GE])
        if SCHEME == 2 and DECODE == 1:
            # a nibble c in the top mantissa bits of 1.0: the f32 1 + c / 16 from one shift and one and-or, no
            # subtraction; sum_k (c_k - zero) a_k = 16 * sum_k (1 + c_k / 16) a_k - (16 + zero) * sum_k a_k
            code = w.to(tl.int32)
            lo = (((code << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            hi = (((code << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            wv = tl.reshape(tl.join(lo, hi), [BLOCK_N, NG, GE])
            dots = tl.sum(wv * a2[None, :, :], 2)  # [BN, NG]
            asum = tl.sum(a2, 1)[None, :]  # [1, NG]
            if HAS_ZERO:
                dots = 16.0 * dots - (zero + 16.0) * asum
            else:
                dots = 16.0 * dots - 24.0 * asum
            return tl.sum(dots * scale.to(tl.float32), 1)
        else:
            if SCHEME == 3 and NVFP4_ASM and DECODE == 1:
                lo, hi = tl.inline_asm_elementwise(_NIBBLES_TO_F16_LEAN, "=r,=r,=r,=r,r", [w],
                                                   dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
            else:
                lo, hi = _decode_nibbles(w, scale, zero, SCHEME, NVFP4_ASM, False, HAS_ZERO)
            # byte j holds columns 2j (low nibble) and 2j + 1: join puts them side by side, in column order
            wv = tl.reshape(tl.join(lo.to(tl.float32), hi.to(tl.float32)), [BLOCK_N, NG, GE])
            return tl.sum(tl.sum(wv * a2[None, :, :], 2) * scale.to(tl.float32), 1)


@triton.jit
def _finish(acc, sumsq, y_ptr, x_ptr, b_ptr, offs_n, n_mask, K, eps, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
            ROUND_TO_ACT: tl.constexpr):
    """acc f32[1, BN] (all of K, scales applied) -> y: the norm's 1 / rms, the bias, the optional rounding."""
    if PROLOGUE == 1:
        acc = acc * (1.0 / tl.sqrt(sumsq / K + eps))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ROUND_TO_ACT:
        acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)  # the activation dtype
    tl.store(y_ptr + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def fused_qgemv_kernel(
    y_ptr,  # [1, N] out (contiguous)
    x_ptr,  # [*, K] activations (rms_norm / none), or [*, 2K] gate | up rows (silu / gelu_tanh)
    r_ptr,  # [*, K] residual (rms_norm with HAS_RESIDUAL)
    nw_ptr,  # [K] norm weight (rms_norm)
    rout_ptr,  # [1, K] out: x + residual (STORE_SUM), written by the programs of N tile 0
    w_ptr, s_ptr, gs_ptr, z_ptr,  # the quantized weight, as quant_linear's kernels take it
    b_ptr,  # [N] bias (HAS_BIAS)
    rows_ptr,  # i32[1]: the x row (HAS_ROWS), else row 0
    part_ptr,  # f32[SPLIT, stride_part]: each split's partial sums (SPLIT > 1)
    ss_ptr,  # f32[SPLIT, N tiles]: each split's partial sum of squares (SPLIT > 1, rms_norm)
    cnt_ptr,  # i32[N tiles]: arrivals per N tile, zero before and after every launch (SPLIT > 1)
    N, K, k_chunk, up_offset,  # k_chunk: K columns per split (a multiple of BLOCK_K)
    eps, weight_offset,
    stride_xm, stride_rm, stride_wn, stride_wk, stride_sn, stride_sk, stride_zn, stride_zk, stride_part,
    PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ROWS: tl.constexpr, STORE_SUM: tl.constexpr, ROUND_TO_ACT: tl.constexpr,
    SCHEME: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr, SPLIT_P2: tl.constexpr, NVFP4_ASM: tl.constexpr, HAS_ZERO: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr, DECODE: tl.constexpr = 0,
):
    """Program (n, s): BLOCK_N weight rows over split s of K; the last split of an N tile to arrive finishes it."""
    if PDL:
        gdc_launch_dependents()  # the next kernel may be scheduled once every program of this one has started
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    kk = tl.arange(0, BLOCK_K)
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    store_k = tl.where(pid_n == 0, k_hi, 0)  # N tile 0 stores the new residual, each split its own columns
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_K], dtype=tl.float32)
    k_start = k_lo
    if PREFETCH:  # the first weight tile is read before waiting for the kernel before (PDL): weights are constant
        w0, s0, z0 = _qtile_load(w_ptr, s_ptr, z_ptr, offs_n, n_mask, k_lo, k_hi, stride_wn, stride_wk, stride_sn,
                                 stride_sk, stride_zn, stride_zk, SCHEME, GROUP, BLOCK_K, HAS_ZERO)
    if PDL:
        gdc_wait()
    row0 = 0
    if HAS_ROWS:
        row0 = tl.load(rows_ptr).to(tl.int64)
    x0 = row0 * stride_xm
    r0 = row0 * stride_rm
    if PREFETCH:
        offs_k = k_lo + kk
        k_mask = offs_k < k_hi
        a, hsq = _activation(x_ptr, r_ptr, nw_ptr, rout_ptr, x0 + offs_k, r0 + offs_k, offs_k, offs_k, k_mask, k_mask,
                             offs_k < store_k, up_offset, weight_offset, PROLOGUE, HAS_RESIDUAL, HAS_OFFSET, STORE_SUM)
        acc += _qtile_dot(w0, s0, z0, a, SCHEME, GROUP, BLOCK_N, BLOCK_K, NVFP4_ASM, HAS_ZERO, DECODE)
        sumsq += hsq
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        offs_k = k0 + kk
        k_mask = offs_k < k_hi
        w, s, z = _qtile_load(w_ptr, s_ptr, z_ptr, offs_n, n_mask, k0, k_hi, stride_wn, stride_wk, stride_sn,
                              stride_sk, stride_zn, stride_zk, SCHEME, GROUP, BLOCK_K, HAS_ZERO)
        a, hsq = _activation(x_ptr, r_ptr, nw_ptr, rout_ptr, x0 + offs_k, r0 + offs_k, offs_k, offs_k, k_mask, k_mask,
                             offs_k < store_k, up_offset, weight_offset, PROLOGUE, HAS_RESIDUAL, HAS_OFFSET, STORE_SUM)
        acc += _qtile_dot(w, s, z, a, SCHEME, GROUP, BLOCK_N, BLOCK_K, NVFP4_ASM, HAS_ZERO, DECODE)
        sumsq += hsq
    if SCHEME == 3 and NVFP4_ASM and DECODE == 1:
        acc = acc * 64.0  # the lean decode's value * 2**-14 -> quant_linear's asm scale (value * 2**-8)
    offs_m = tl.arange(0, 1)
    out = _epilogue_scale(acc[None, :], offs_m, offs_m < 1, offs_n, n_mask, s_ptr, s_ptr, gs_ptr, SCHEME,
                          NVFP4_ASM)  # [1, BN]
    ss = tl.sum(sumsq, 0)
    if SPLIT == 1:
        _finish(out, ss, y_ptr, x_ptr, b_ptr, offs_n, n_mask, K, eps, PROLOGUE, HAS_BIAS, ROUND_TO_ACT)
    else:
        tl.store(part_ptr + pid_k * stride_part + offs_n[None, :], out, mask=n_mask[None, :])
        if PROLOGUE == 1:
            tl.store(ss_ptr + pid_k * tl.num_programs(0) + pid_n, ss)
        tl.debug_barrier()  # every thread's partials are written before the arrival is published (release)
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:  # the last split of this N tile: the others' partials are visible (acquire)
            sp = tl.arange(0, SPLIT_P2)
            parts = tl.load(part_ptr + sp[:, None] * stride_part + offs_n[None, :],
                            mask=(sp < SPLIT)[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
            total = tl.sum(parts, 0)[None, :]
            ss_all = ss
            if PROLOGUE == 1:
                ss_all = tl.sum(tl.load(ss_ptr + sp * tl.num_programs(0) + pid_n, mask=sp < SPLIT, other=0.0,
                                        cache_modifier=".cg"), 0)
            _finish(total, ss_all, y_ptr, x_ptr, b_ptr, offs_n, n_mask, K, eps, PROLOGUE, HAS_BIAS, ROUND_TO_ACT)
            tl.atomic_xchg(cnt_ptr + pid_n, 0, sem="relaxed")  # ready for the next launch


# ------------------------------------------------------------------------------------------------ launchers

def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"fused_qgemv: {msg}")


@dataclass
class Workspace:
    """Split-K scratch of one call site: partial sums, partial sums of squares and the arrival counters (zero
    between launches: the kernel resets them). One call site's launches run one after another (one stream); two
    call sites that may run at once (two streams) need two workspaces. A CUDA graph keeps the pointers it captured,
    so a workspace lives as long as its call site: grow() keeps the buffers it replaces."""
    device: torch.device
    part: torch.Tensor | None = None
    ss: torch.Tensor | None = None
    counters: torch.Tensor | None = None

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._retired: list = []

    def grow(self, parts: int, tiles: int) -> "Workspace":
        if self.part is None or self.part.numel() < parts or self.counters.numel() < tiles:
            if self.part is not None:
                self._retired.append((self.part, self.ss, self.counters))
            self.part = torch.empty(parts, dtype=torch.float32, device=self.device)
            self.ss = torch.empty(parts, dtype=torch.float32, device=self.device)  # >= SPLIT * tiles
            self.counters = torch.zeros(tiles, dtype=torch.int32, device=self.device)
        return self


def tile_config(device: torch.device, scheme: str, n: int, k: int) -> dict:
    return dict(next(cfg for max_n, max_k, cfg in TILE_SIZES[(_target(device), scheme)] if n <= max_n and k <= max_k))


def supports(qw) -> bool:
    """Whether qw is a weight the fused kernel takes (a weight-only scheme)."""
    return isinstance(qw, QuantizedWeight) and qw.scheme in QGEMV_SCHEMES


def _check_qweight(qw, k: int, bias, device):
    _check(isinstance(qw, QuantizedWeight), f"expected a QuantizedWeight, got {type(qw).__name__}")
    _check(qw.scheme in QGEMV_SCHEMES, f"scheme {qw.scheme!r} is not weight-only; the fused GEMV takes "
           f"{QGEMV_SCHEMES} (fp8 is W8A8: quant_linear)")
    _validate_qweight(qw)
    _check(qw.in_features == k, f"the activation row has K={k} but the weight has in_features={qw.in_features}")
    _check(qw.device == device, f"the weight is on {qw.device}, the activations on {device}")
    if bias is not None:
        _check(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (qw.out_features,),
               f"bias must be [{qw.out_features}], got "
               f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        _check(bias.dtype in _ACT_DTYPES, f"unsupported bias dtype {bias.dtype}")
        _check(bias.device == device, f"bias is on {bias.device}, the activations on {device}")


def _check_row(x, rows, name: str):
    m = activation_rows(x, rows, name, _check)
    _check(m == 1, f"{m} activation rows; the fused quantized GEMV takes one (batch-1 decode)")


def _launch(y, x, qw, bias, rows, *, prologue: str, k: int, up_offset: int = 0, residual=None, norm_weight=None,
            residual_out=None, eps: float = 0.0, weight_offset: float | None = None, round_to_act: bool = False,
            workspace: Workspace | None = None, config: dict | None = None):
    n = qw.out_features
    cfg = tile_config(x.device, qw.scheme, n, k)
    if config:
        cfg.update(config)
    block_n, block_k = cfg["BLOCK_N"], cfg["BLOCK_K"]
    g = qw.group_size or 1
    _check(g == 1 or block_k % g == 0 or g % block_k == 0, f"BLOCK_K={block_k} incompatible with group size {g}")
    tiles = triton.cdiv(n, block_n)
    split, k_chunk = _split_k(tiles, k, block_k, cfg["SPLIT_K_PROGRAMS"], cfg["MAX_SPLIT_K"])
    w, s, gs, s_strides, z, z_strides, has_zero = _weight_args(qw)
    stride_part = tiles * block_n
    if split > 1:
        ws = (workspace or Workspace(x.device)).grow(split * stride_part, tiles)
        part, ss, counters = ws.part, ws.ss, ws.counters
    else:
        part = ss = counters = y
    has_res, store_sum = residual is not None, residual_out is not None
    pdl = cfg["PDL"] and pdl_enabled(x.device)
    extra = {"launch_pdl": True} if pdl else {}
    on_gpu = x.device.type == "cuda" and not _interpreting()
    fused_qgemv_kernel[(tiles, split)](
        y, x, residual if has_res else x, norm_weight if norm_weight is not None else x,
        residual_out if store_sum else (residual if has_res else x),
        w, s, gs, z, bias if bias is not None else y, rows if rows is not None else y, part, ss, counters,
        n, k, k_chunk, up_offset, float(eps), float(weight_offset or 0.0),
        x.stride(0), residual.stride(0) if has_res else 0, *w.stride(), *s_strides, *z_strides, stride_part,
        PROLOGUE=PROLOGUES[prologue], HAS_RESIDUAL=has_res, HAS_OFFSET=weight_offset is not None,
        HAS_BIAS=bias is not None, HAS_ROWS=rows is not None, STORE_SUM=store_sum, ROUND_TO_ACT=round_to_act,
        SCHEME=SCHEMES[qw.scheme], GROUP=g, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT=split,
        SPLIT_P2=triton.next_power_of_2(split), NVFP4_ASM=on_gpu, HAS_ZERO=has_zero, PDL=pdl,
        PREFETCH=bool(cfg["PREFETCH"]), DECODE=cfg.get("DECODE", 0), num_warps=cfg["num_warps"], num_stages=1,
        **extra,
    )


def qgemv(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *,
          rows: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
          workspace: Workspace | None = None, config: dict | None = None) -> torch.Tensor:
    """x: [T, K] (one row, or rows: i32[1] picking it); qw: weight-only [N, K] -> [1, N] = x[rows] @ dequant(W)^T
    (+ bias) in out_dtype (default x's). workspace: the call site's split-K scratch (default: a fresh one, whose
    counters cost a memset)."""
    _check_row(x, rows, "x")
    _check_qweight(qw, x.shape[1], bias, x.device)
    y = torch.empty((1, qw.out_features), dtype=out_dtype or x.dtype, device=x.device)
    _launch(y, x, qw, bias, rows, prologue="none", k=x.shape[1], workspace=workspace, config=config)
    return y


def norm_qgemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
               qw: QuantizedWeight, bias: torch.Tensor | None = None, *, weight_offset: float | None = None,
               rows: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, keep_residual: bool = True,
               round_to_act: bool = False, workspace: Workspace | None = None, config: dict | None = None):
    """add_rms_norm then the quantized GEMV in one launch (fused_gemv.norm_gemv's contract, one activation row).
    -> (y [1, N], new residual [1, K] or None)."""
    _check_row(x, rows, "x")
    k = x.shape[1]
    residual_out = norm_prologue_outputs(x, residual, norm_weight, rows, keep_residual, _check)
    _check_qweight(qw, k, bias, x.device)
    y = torch.empty((1, qw.out_features), dtype=out_dtype or x.dtype, device=x.device)
    _launch(y, x, qw, bias, rows, prologue="rms_norm", k=k, residual=residual, norm_weight=norm_weight,
            residual_out=residual_out, eps=eps, weight_offset=weight_offset, round_to_act=round_to_act,
            workspace=workspace, config=config)
    return y, residual_out


def act_qgemv(gate_up: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None = None, *, act: str = "silu",
              workspace: Workspace | None = None, config: dict | None = None) -> torch.Tensor:
    """silu_and_mul / gelu_tanh_and_mul then the quantized GEMV in one launch. gate_up: [1, 2F] -> [1, N]."""
    _check(act in ("silu", "gelu_tanh"), f"act must be 'silu' or 'gelu_tanh', got {act!r}")
    _check_row(gate_up, None, "gate_up")
    _check(gate_up.shape[1] % 2 == 0, f"gate_up's last dim must be even (gate then up), got {gate_up.shape[1]}")
    f = gate_up.shape[1] // 2
    _check_qweight(qw, f, bias, gate_up.device)
    y = torch.empty((1, qw.out_features), dtype=gate_up.dtype, device=gate_up.device)
    _launch(y, gate_up, qw, bias, None, prologue=act, k=f, up_offset=f, workspace=workspace, config=config)
    return y
