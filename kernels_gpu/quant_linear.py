"""Quantized linear layers in Triton: y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N]) with W stored as FP8 (W8A8),
INT8 / INT4 (weight-only) or NVFP4 (weight-only, a storage format on H100).

Schemes and their stored tensors (QuantizedWeight.tensors):
  "fp8"   weight float8_e4m3fn[N, K], scale f32[N]           W ~ weight * scale[n]; the activations are quantized
          per row to float8_e4m3fn (quantize_activation_fp8) and the GEMM multiplies fp8 tiles on the tensor
          cores, applying row_scale[m] * scale[n] in the epilogue.
  "int8"  weight int8[N, K], scale f32[N]                     symmetric per output channel: W ~ q * scale[n],
          q = RNE(w / scale) in [-127, 127], scale = amax(|W[n]|) / 127. The kernel converts q to the activation
          dtype (exact) and applies scale[n] in the epilogue.
  "int4"  weight u8[N, K//2], scale f16/bf16/f32[N, K//G] [, zero u8[N, K//G]]   per group of G (default 128)
          along K: W ~ (nibble - zero) * scale. Without "zero" the weight is symmetric with the constant zero 8
          (quantize_weight: scale = amax(|group|) / 7 rounded to the scale dtype, q = RNE(w / scale) clamped to
          [-7, 7], stored offset-binary as the nibble q + 8); with it, the asymmetric int4 of
          lowering/quant/formats.py (zero in [0, 15] per group). Element 2i is the LOW nibble of byte i, element
          2i+1 the high one.
  "nvfp4" weight u8[N, K//2], block_scale float8_e4m3fn[N, K//16], global_scale f32[]  the encoding of
          kernels_gpu.kv_formats.quantize_nvfp4 (E2M1 codes, element 2i in the low nibble):
          W ~ e2m1(code) * block_scale * global_scale.

Weight-only schemes dequantize in registers; the dot runs in the activation dtype (f32 under the interpreter or
for f32 activations). Decode (M <= DECODE_MAX_M): M = 1 runs gemv_kernel on the CUDA cores (magic-number
int -> float decoding, f32 FMAs, split-K with f32 atomics when N is small; optionally the weight read as i32
words, see GEMV_WORDS); 2 <= M <= 16 runs the tensor-core kernel with BLOCK_M = 16 and the weight tile as the
dot's first operand (MODE 1). Batched decode (16 < M <= BATCH_MAX_M, weight-only schemes) runs the same tiled GEMM
with its own tiles and split-K; prefill uses the tiled GEMM with grouped tile order (fp8: fp8 x fp8 tl.dot, f32
accumulate). On a CUDA GPU with fp8 tensor cores, W8A8 products of at least SCALED_MM_MIN_M rows with bf16 output
run torch._scaled_mm (row-wise activation scales x per-channel weight scales) instead: 1.5-1.8x bf16 cuBLAS at
prefill sizes and 3-5x the Triton tiles at M = 2..256 on an H200 (2026-11-28). fp8_linear / Fp8Linear take
activations already quantized by the kernel that produced them (kernels_gpu.norms.add_rms_norm_fp8,
kernels_gpu.activations.silu_and_mul_fp8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from kernels_gpu import kv_formats
from kernels_gpu.triton_env import interpreting as _interpreting
from kernels_gpu.triton_env import tile_target as _target

SCHEMES = {"fp8": 0, "int8": 1, "int4": 2, "nvfp4": 3}
DECODE_MAX_M = 16
BATCH_MAX_M = 256  # batched decode (DECODE_MAX_M < M <= this): the "batch" tiles, where a scheme has them
FP8_MAX = 448.0
NVFP4_GROUP = kv_formats.NVFP4_BLOCK  # 16
NVFP4_ASM_FACTOR = 256.0  # the E2M1 asm decode yields value * 2**-8 (see _NIBBLES_TO_F16)

# Tile sizes keyed by (target, scheme, phase). Decode (M <= DECODE_MAX_M):
#   M <= GEMV_MAX_M runs gemv_kernel on the CUDA cores: GEMV_BLOCK_N weight rows x GEMV_BLOCK_K columns per step;
#     when the N tiles give fewer than SPLIT_K_PROGRAMS programs, K is split (up to MAX_SPLIT_K, each split at
#     least 2 K tiles) and the splits add into an f32 buffer with atomics.
#   larger M runs quant_linear_kernel with BLOCK_M = next_pow2(M) (>= 16); BLOCK_N is halved (down to
#     MIN_BLOCK_N) while the grid has fewer than target_programs programs.
# MODE: 0 = dot(x, W^T), 1 = dot(W, x^T) (the dequantized weight tile is the dot's first operand).
# Prefill: tiled GEMM, GROUP_M row tiles per weight column tile. "interpret" is the CPU Triton interpreter (tests
# only), sized so that every path (split-K included) runs on small shapes.
# Chosen from benchmarks/gpu_linear.py --sweep on H100 (Triton 3.6, 2026-11-26); see the sweep JSON.
# GEMV_PAIRS (int4 / nvfp4: a byte's two decoded nibbles joined into adjacent columns, x read as one contiguous
# vector instead of even / odd strided reads) and, for nvfp4, GEMV_BLOCK_N 8: geometric mean over eight Llama-3.2-1B
# / Llama-3-8B shapes 0.90x (int4) / 0.79x (nvfp4) of the time before (H200 sweep, 2026-11-28,
# .scratch/sweep_gemv.py); per-lane sums (the group scale applied to each weight, one reduction after the loop)
# measured no better (dropped), and neither did launching the GEMV with PDL (waiting at its start): Llama-3.2-1B
# int4 decode at batch 1 987 tok/s without, 974 with.
# GEMV_WORDS (read the weight as i32 words, decode with shifts / masks) is exact but measured 1.1-1.9x slower
# than the byte-wise path on H100 (sweep of 2026-11-26), so it is off on CUDA; the interpreter config keeps it
# on so that the tests cover it.
_DECODE = {"GEMV_MAX_M": 1, "GEMV_BLOCK_N": 16, "GEMV_BLOCK_K": 512, "GEMV_WARPS": 4, "SPLIT_K_PROGRAMS": 528,
           "GEMV_WORDS": False,
           "MAX_SPLIT_K": 8, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "MIN_BLOCK_N": 16,
           "target_programs": 264, "MODE": 1, "num_warps": 4, "num_stages": 4}
TILE_SIZES = {
    ("cuda", "fp8", "decode"): dict(_DECODE, BLOCK_K=256, SCALED_MM_MIN_M=2),
    ("cuda", "int8", "decode"): dict(_DECODE, BLOCK_K=256),
    ("cuda", "int4", "decode"): dict(_DECODE, BLOCK_K=256, GEMV_PAIRS=True, PAIRS=True, MODE=0),
    ("cuda", "nvfp4", "decode"): dict(_DECODE, GEMV_BLOCK_N=8, GEMV_PAIRS=True, PAIRS=True, MODE=0),
    ("cuda", "fp8", "prefill"): {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8, "MODE": 0,
                                 "num_warps": 8, "num_stages": 3, "SCALED_MM_MIN_M": 17},
    ("cuda", "int8", "prefill"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "MODE": 1,
                                  "num_warps": 8, "num_stages": 4},
    ("cuda", "int4", "prefill"): {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "MODE": 1,
                                  "num_warps": 8, "num_stages": 3},
    ("cuda", "nvfp4", "prefill"): {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "MODE": 1,
                                   "num_warps": 8, "num_stages": 3},
}
for _s in SCHEMES:
    TILE_SIZES[("interpret", _s, "decode")] = {
        "GEMV_MAX_M": 1, "GEMV_BLOCK_N": 16, "GEMV_BLOCK_K": 32, "GEMV_WARPS": 4, "SPLIT_K_PROGRAMS": 6,
        "GEMV_WORDS": True,
        "MAX_SPLIT_K": 4, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "MIN_BLOCK_N": 16, "target_programs": 1,
        "MODE": 1, "num_warps": 4, "num_stages": 1}
    TILE_SIZES[("interpret", _s, "prefill")] = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2,
                                                "MODE": 0, "num_warps": 4, "num_stages": 1}
# Batched decode (DECODE_MAX_M < M <= BATCH_MAX_M) of the weight-only schemes: the tiled GEMM, keyed by the
# smallest M bucket >= M. Before these tiles the CUDA backend dequantized row chunks of every weight with torch ops
# and called cuBLAS at every such step, 5-60x slower than these. Chosen from a sweep on an H200 (Triton 3.6,
# 2026-11-28; .scratch/sweep_batch_gemm.py: 108 configs x M 32/64/128/256 x Llama-3.2-1B qkv / gate_up / down and
# Llama-3-8B gate_up, weight copies rotated past the L2, the config with the best geometric mean over the shapes).
# Against cuBLAS bf16 on the same shapes they are 0.6-1.2x for int8 and 0.15-0.7x for int4 / nvfp4, whose
# nibble decoding (each weight decoded once per BLOCK_M rows) bounds them. GEMM_SPLIT_K_PROGRAMS / GEMM_MAX_SPLIT_K:
# K is split (f32 atomics) while fewer programs than that (the SMs of an H100 / H200) would run: down_proj's few N
# tiles and long K, 82 -> 22 us at M = 32 (int4, Llama-3.2-1B). Only up to M = 64: the atomics of a larger output
# cost more than the split gains (int8 qkv at M = 256: 16 us unsplit, 38 us split three ways).
# int4 / nvfp4 take PAIRS (one dot over the whole K tile, a byte's two nibbles joined into adjacent columns, x read
# contiguously; before: two dots over the even and the odd columns, each reading x with a stride of 2) with BLOCK_K
# 64, and the decode tiles (2 <= M <= 16) PAIRS with MODE 0. H200 sweep (.scratch/sweep_pairs_gemm.py, 2026-11-28,
# Llama-3.2-1B qkv / gate_up / down and Llama-3-8B gate_up): geometric-mean speed-up over the two-dot tiles 1.40x
# (int4) / 1.24x (nvfp4) at M = 32..256, 1.68x / 1.56x at M = 4 and 16.
_B32 = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "MODE": 1, "num_warps": 4, "num_stages": 3,
        "GEMM_SPLIT_K_PROGRAMS": 132, "GEMM_MAX_SPLIT_K": 8}
_B64 = dict(_B32, BLOCK_M=64)
_B64_WHOLE_K = dict(_B64, GEMM_SPLIT_K_PROGRAMS=0)
_B128_WHOLE_K = dict(_B64_WHOLE_K, BLOCK_M=128)
_NIBBLE_PAIRS = {"PAIRS": True, "BLOCK_K": 64}
TILE_SIZES[("cuda", "int4", "batch")] = {32: dict(_B32, **_NIBBLE_PAIRS), 64: dict(_B64, **_NIBBLE_PAIRS),
                                         256: dict(_B64_WHOLE_K, **_NIBBLE_PAIRS)}
TILE_SIZES[("cuda", "nvfp4", "batch")] = TILE_SIZES[("cuda", "int4", "batch")]
TILE_SIZES[("cuda", "int8", "batch")] = {32: _B32, 64: _B64, 256: _B128_WHOLE_K}
for _s in ("int8", "int4", "nvfp4"):
    TILE_SIZES[("interpret", _s, "batch")] = {
        256: {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2, "MODE": 1, "num_warps": 4,
              "num_stages": 1, "GEMM_SPLIT_K_PROGRAMS": 8, "GEMM_MAX_SPLIT_K": 4}}
# W8A8 GEMMs with at least SCALED_MM_MIN_M rows (a key of the fp8 tiles) run torch._scaled_mm where it can
# (_scaled_mm_ok); "enabled" turns off for the process if this torch's _scaled_mm refuses.
_SCALED_MM = {"enabled": True}
# torch._scaled_mm's use_fast_accum: Hopper fp8 MMAs accumulate in the tensor cores without periodic promotion
# to f32 (what vLLM's and FlashInfer's CUTLASS fp8 GEMMs on sm90 run). On, by default: measured on an H200
# (2026-11-29), SmolLM2-135M W8A8 perplexity moved by -0.14% (RTN) and +0.16% (GPTQ) of the base, within the
# window noise, and the GEMM's error against float64 stayed below the bf16 output rounding up to K = 2048 (1.6x it
# at K = 8192); prefill ran 1.08x faster. False: the accurate accumulation.
SCALED_MM_FAST_ACCUM = True
_FP8_TENSOR_CORES: dict[int, bool] = {}
# Activation quantizer: K elements per loop step.
ACT_QUANT_BLOCK = {"cuda": 8192, "interpret": 256}

_MAGIC = 0x4B400000  # f32 bits of 1.5 * 2**23: adding a small integer to these bits adds it to the float
_MAGIC_F = 12582912.0


@dataclass
class QuantizedWeight:
    """A [out_features, in_features] weight in one of SCHEMES; tensors as in the module docstring."""
    scheme: str
    out_features: int
    in_features: int
    tensors: dict = field(default_factory=dict)
    group_size: int | None = None  # K elements per scale: int4 G, nvfp4 16, None for per-channel schemes

    @property
    def device(self) -> torch.device:
        return self.tensors["weight"].device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device) -> "QuantizedWeight":
        return QuantizedWeight(self.scheme, self.out_features, self.in_features,
                               {k: v.to(device) for k, v in self.tensors.items()}, self.group_size)

    @classmethod
    def from_parts(cls, fmt: str, parts: dict, in_features: int, out_features: int, group_size: int | None = None,
                   *, device=None) -> "QuantizedWeight":
        """A weight stored in one of lowering/quant/formats.py's formats (parts named as its WEIGHT_PARTS: q,
        scale, zero, block_scale, global_scale; torch tensors or numpy / JAX arrays) -> QuantizedWeight.

        "fp8" maps to the W8A8 scheme "fp8" (the kernels quantize the activations per row); int4 takes its
        group size from the scale's shape when group_size is None. device: where the tensors go (default:
        where torch tensors already are, else the CPU). The tensors are shared, not copied, where they can be.
        """
        _check(fmt in _PART_NAMES, f"unknown weight format {fmt!r}; choose one of {sorted(_PART_NAMES)}")
        missing = [name for name in _PART_NAMES[fmt] if name not in parts]
        _check(not missing, f"{fmt} weight lacks part(s) {missing}")
        extra = sorted(set(parts) - set(_PART_NAMES[fmt]))
        _check(not extra, f"{fmt} weight has unknown part(s) {extra}")
        tensors = {_PART_NAMES[fmt][name]: _part_to_torch(parts[name], device) for name in _PART_NAMES[fmt]}
        n, k = int(out_features), int(in_features)
        if fmt == "int4":
            if group_size is None:
                groups = tensors["scale"].shape[-1] if tensors["scale"].dim() == 2 else 0
                _check(groups > 0 and k % groups == 0, f"int4 scale shape {tuple(tensors['scale'].shape)} does not "
                       f"split K={k} into groups")
                group_size = k // groups
        elif fmt == "nvfp4":
            group_size = NVFP4_GROUP if group_size is None else group_size
            tensors["global_scale"] = tensors["global_scale"].reshape(())
        else:
            group_size = None
        qw = cls(fmt, n, k, tensors, group_size)
        _validate_qweight(qw)
        return qw


# formats.py part name -> QuantizedWeight tensor name, per format
_PART_NAMES = {"int8": {"q": "weight", "scale": "scale"}, "fp8": {"q": "weight", "scale": "scale"},
               "int4": {"q": "weight", "scale": "scale", "zero": "zero"},
               "nvfp4": {"q": "weight", "block_scale": "block_scale", "global_scale": "global_scale"}}


def _part_to_torch(a, device) -> torch.Tensor:
    """A torch tensor (moved to `device` if given) or an array (numpy, JAX; ml_dtypes float8 / bfloat16 through
    their bit patterns) -> torch tensor."""
    import numpy as np

    if isinstance(a, torch.Tensor):
        return a if device is None else a.to(device)
    arr = np.asarray(a)
    if not arr.flags.c_contiguous or not arr.flags.writeable:
        arr = arr.copy(order="C")  # NOTE: copy(), not ascontiguousarray(): that turns 0-d arrays into 1-d
    name = arr.dtype.name
    if name == "float8_e4m3fn":
        t = torch.from_numpy(arr.view(np.uint8)).view(torch.float8_e4m3fn)
    elif name == "bfloat16":
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(arr)
    return t if device is None else t.to(device)


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"quant_linear: {msg}")


# ------------------------------------------------------------------------------------------------ torch side

def quantize_weight(w: torch.Tensor, scheme: str, *, group_size: int = 128,
                    scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """w: float [N, K] -> QuantizedWeight (plain torch, on w's device). group_size: int4 only (nvfp4 uses 16);
    scale_dtype: int4 group-scale dtype (f16, bf16 or f32)."""
    _check(scheme in SCHEMES, f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
    _check(isinstance(w, torch.Tensor) and w.dim() == 2, f"weight must be a 2-D [N, K] tensor, got "
           f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    _check(w.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
           f"weight dtype must be floating point, got {w.dtype}")
    n, k = w.shape
    _check(n >= 1 and k >= 1, f"empty weight {tuple(w.shape)}")
    wf = w.detach().float()
    if scheme in ("fp8", "int8"):
        amax = wf.abs().amax(dim=1)  # f32[N]
        qmax = FP8_MAX if scheme == "fp8" else 127.0
        scale = (amax / qmax).clamp_min(torch.finfo(torch.float32).tiny)
        if scheme == "fp8":
            q = kv_formats.quantize_fp8(wf, scale)  # RNE, saturating
        else:
            q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(scheme, n, k, {"weight": q.contiguous(), "scale": scale.contiguous()}, None)
    if scheme == "int4":
        _check(isinstance(group_size, int) and group_size >= 16 and group_size & (group_size - 1) == 0,
               f"int4 group_size must be a power of two >= 16, got {group_size}")
        _check(k % group_size == 0, f"in_features K={k} must be a multiple of the int4 group size {group_size}")
        _check(scale_dtype in (torch.float16, torch.bfloat16, torch.float32),
               f"int4 scale_dtype must be float16, bfloat16 or float32, got {scale_dtype}")
        wg = wf.reshape(n, k // group_size, group_size)
        scale = (wg.abs().amax(dim=2) / 7.0).to(scale_dtype)  # [N, K//G]
        sf = scale.float()[..., None]
        safe = torch.where(sf > 0, sf, torch.ones_like(sf))
        q = torch.where(sf > 0, torch.round(wg / safe).clamp(-7, 7), torch.zeros_like(wg))
        nib = (q.to(torch.int16) + 8).to(torch.uint8).reshape(n, k)
        packed = nib[:, 0::2] | (nib[:, 1::2] << 4)
        return QuantizedWeight(scheme, n, k, {"weight": packed.contiguous(), "scale": scale.contiguous()},
                               group_size)
    _check(k % NVFP4_GROUP == 0, f"in_features K={k} must be a multiple of the nvfp4 block {NVFP4_GROUP}")
    gs = kv_formats.nvfp4_global_scale(wf)
    packed, bscale = kv_formats.quantize_nvfp4(wf, gs)
    return QuantizedWeight(scheme, n, k, {"weight": packed, "block_scale": bscale,
                                          "global_scale": gs.reshape(()).contiguous()}, NVFP4_GROUP)


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """QuantizedWeight -> f32[N, K] (exactly the values the kernels multiply with)."""
    _validate_qweight(qw)
    t = qw.tensors
    if qw.scheme in ("fp8", "int8"):
        return t["weight"].float() * t["scale"][:, None]
    if qw.scheme == "int4":
        p = t["weight"]
        nib = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(qw.out_features, qw.in_features)
        g = qw.group_size
        codes = nib.float().reshape(qw.out_features, -1, g)
        zero = t["zero"].float()[..., None] if "zero" in t else 8.0
        vals = (codes - zero) * t["scale"].float()[..., None]
        return vals.reshape(qw.out_features, qw.in_features)
    return kv_formats.dequantize_nvfp4(t["weight"], t["block_scale"], t["global_scale"])


def ref_quantize_activation_fp8(x: torch.Tensor):
    """Torch model of quantize_activation_fp8: scale[m] = max(amax(|x[m]|) / 448, FLT_MIN),
    x_fp8 = RNE(clamp(x * (1 / scale), +-448)) (the reciprocal once per row, f32 multiplies: formats.
    quantize_fp8_tokens's rule)."""
    xf = x.float()
    scale = (xf.abs().amax(dim=1) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    inv = 1.0 / scale
    return (xf * inv[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def ref_quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias=None) -> torch.Tensor:
    """Float64 reference from the dequantized weight (fp8: also from the dequantized fp8 activations)."""
    w = dequantize_weight(qw).double()
    if qw.scheme == "fp8":
        xq, xs = ref_quantize_activation_fp8(x)
        xd = xq.double() * xs.double()[:, None]
    else:
        xd = x.double()
    y = xd @ w.t()
    if bias is not None:
        y = y + bias.double()[None, :]
    return y


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _round_to_e4m3_grid(y):
    """f32 (|y| <= 448) -> the nearest e4m3 value (ties to even), still as f32. The interpreter's f32 -> fp8 cast
    misrounds values whose rounding carries into the exponent, so it gets exact e4m3 values to cast."""
    e = ((y.to(tl.int32, bitcast=True) >> 23) & 255) - 127
    e = tl.maximum(e, -6)  # below 2**-6 the e4m3 grid is the subnormal step 2**-9
    step_x_magic = ((e - 3 + 127 + 23) << 23).to(tl.float32, bitcast=True) * 1.5  # step * 1.5 * 2**23
    return (y + step_x_magic) - step_x_magic


@triton.jit
def fp8_row_scale(amax):
    """A row's activation scale from its f32 amax: max(amax / 448, FLT_MIN) (shared by every fp8 quantizer)."""
    return tl.maximum(tl.math.div_rn(amax, 448.0), 1.1754943508222875e-38)


@triton.jit
def fp8_inv_scale(scale):
    """1 / scale, correctly rounded (once per row: the row's values are multiplied by it)."""
    return tl.math.div_rn(1.0, scale)


@triton.jit
def fp8_scaled(v, inv_scale, ROUND_F32: tl.constexpr):
    """f32 values -> clamp(v * inv_scale, +-448) ready for the RNE cast to e4m3 (already on the e4m3 grid when
    ROUND_F32, for the interpreter). NOTE: a multiply by the row's reciprocal, not a division per value (vLLM's
    per-token quantizer does the same): an IEEE division per value cost the SwiGLU quantizer 25% (H200)."""
    y = tl.minimum(tl.maximum(v * inv_scale, -448.0), 448.0)
    if ROUND_F32:
        y = _round_to_e4m3_grid(y)
    return y


@triton.jit
def quantize_fp8_kernel(q_ptr, scale_ptr, x_ptr, K, stride_xm, stride_xk, stride_qm,
                        BLOCK_K: tl.constexpr, ROUND_F32: tl.constexpr):
    """One row per program: scale = max(amax / 448, FLT_MIN), q = e4m3(RNE, sat)(x * (1 / scale)). A row that fits one
    block (K <= BLOCK_K) is read once and kept in registers; longer rows are read twice."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + row * stride_xm
    v = tl.load(x_row + offs * stride_xk, mask=offs < K, other=0.0).to(tl.float32)
    amax = tl.abs(v)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        k = k0 + offs
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)))
    scale = fp8_row_scale(tl.max(amax, 0))
    tl.store(scale_ptr + row, scale)
    inv = fp8_inv_scale(scale)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs
        if k0 > 0:
            v = tl.load(x_row + k * stride_xk, mask=k < K, other=0.0).to(tl.float32)
        y = fp8_scaled(v, inv, ROUND_F32)
        tl.store(q_ptr + row * stride_qm + k, y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=k < K)


@triton.jit
def _e2m1_to_f32(code):
    """i32 nibble codes (0..15) -> f32 E2M1 values (portable path)."""
    exp = (code >> 1) & 3
    mant = code & 1
    mag4 = tl.where(exp == 0, mant * 2, (2 + mant) << exp)  # 4 * |value|
    val = mag4.to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _small_int_to_f32(v):
    """i32 values with |v| < 2**22 -> f32 without an int->float conversion instruction (magic-number trick)."""
    return (v + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _to_compute(t, COMPUTE: tl.constexpr):
    # NOTE: one return per function: the code generator keeps visiting after a return inside a constexpr branch
    if COMPUTE == 0:
        r = t.to(tl.float32)
    elif COMPUTE == 1:
        r = t.to(tl.float16)
    else:
        r = t.to(tl.bfloat16)
    return r


# E2M1 nibbles -> f16 in registers, 4 packed bytes per call (CUDA only). Inputs: $4 = bytes b0..b3, $5 / $6 =
# f16x2 multipliers for bytes (b0, b1) / (b2, b3). Outputs: $0 / $1 = low nibbles of (b0, b1) / (b2, b3), $2 / $3
# = the high nibbles. Each byte is first moved into its own 16-bit lane (prmt); a nibble s|mmm then becomes the
# f16 bit pattern with s at bit 15 and mmm at bits 9..11, which is exactly the E2M1 value times 2**-14 (mmm = 001
# is the subnormal 2**-15 = 0.5 * 2**-14). The multiplier is (block scale * 64), so the results hold
# value * block scale * 2**-8 (exact in f16); NVFP4_ASM_FACTOR puts the 2**8 back in the epilogue.
_NIBBLES_TO_F16 = tl.constexpr("""
{
.reg .b32 lanes, m, s;
mov.b32 m, 0;
prmt.b32 lanes, $4, m, 0x4140;
shl.b32 m, lanes, 9;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 12;
and.b32 s, s, 0x80008000;
or.b32 m, m, s;
mul.rn.f16x2 $0, m, $5;
shl.b32 m, lanes, 5;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 8;
and.b32 s, s, 0x80008000;
or.b32 m, m, s;
mul.rn.f16x2 $2, m, $5;
mov.b32 m, 0;
prmt.b32 lanes, $4, m, 0x4342;
shl.b32 m, lanes, 9;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 12;
and.b32 s, s, 0x80008000;
or.b32 m, m, s;
mul.rn.f16x2 $1, m, $6;
shl.b32 m, lanes, 5;
and.b32 m, m, 0x0E000E00;
shl.b32 s, lanes, 8;
and.b32 s, s, 0x80008000;
or.b32 m, m, s;
mul.rn.f16x2 $3, m, $6;
}
""")


@triton.jit
def _load_dense_tile(w_ptr, offs_n, n_mask, k0, K, stride_wn, stride_wk, SCHEME: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """fp8 / int8: the stored [BLOCK_N, BLOCK_K] tile at columns k0.. (fp8 as stored, int8 as exact f32)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptr = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    wmask = n_mask[:, None] & (offs_k < K)[None, :]
    if SCHEME == 0:
        w = tl.load(ptr, mask=wmask, other=0.0)
    else:
        w = _small_int_to_f32(tl.load(ptr, mask=wmask, other=0).to(tl.int32))
    return w


@triton.jit
def _load_packed_tile(w_ptr, s_ptr, offs_n, n_mask, k0, K, stride_wn, stride_wk, stride_sn, stride_sk,
                      GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """int4 / nvfp4: packed bytes u8[BLOCK_N, NG, GE // 2] of columns k0 .. k0 + BLOCK_K (NG scale groups of GE
    elements inside the tile) and their scales [BLOCK_N, NG] (stored dtype)."""
    GE: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GE
    offs_g = tl.arange(0, NG)
    byte = k0 // 2 + (offs_g * (GE // 2))[:, None] + tl.arange(0, GE // 2)[None, :]  # [NG, GE // 2]
    row = offs_n.to(tl.int64) * stride_wn
    packed = tl.load(w_ptr + row[:, None, None] + byte[None, :, :] * stride_wk,
                     mask=n_mask[:, None, None] & (byte < K // 2)[None, :, :], other=0)
    grp = k0 // GROUP + offs_g
    scale = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + grp[None, :] * stride_sk,
                    mask=n_mask[:, None] & (grp * GROUP < K)[None, :], other=0.0)
    return packed, scale


@triton.jit
def _load_group_zero(z_ptr, offs_n, n_mask, k0, K, stride_zn, stride_zk, GROUP: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """int4 zero points of the NG scale groups in columns k0 .. k0 + BLOCK_K, as exact f32 [BLOCK_N, NG]."""
    GE: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
    NG: tl.constexpr = BLOCK_K // GE
    grp = k0 // GROUP + tl.arange(0, NG)
    z = tl.load(z_ptr + offs_n.to(tl.int64)[:, None] * stride_zn + grp[None, :] * stride_zk,
                mask=n_mask[:, None] & (grp * GROUP < K)[None, :], other=0)
    return _small_int_to_f32(z.to(tl.int32))


@triton.jit
def _decode_nibbles(packed, scale, zero, SCHEME: tl.constexpr, NVFP4_ASM: tl.constexpr, APPLY_SCALE: tl.constexpr,
                    HAS_ZERO: tl.constexpr = False):
    """Packed [BN, NG, GE // 2] -> (even, odd) element values, each [BN, NG, GE // 2]: f32, or f16 on the
    nvfp4 asm path (which carries the factor 2**-8). APPLY_SCALE multiplies by the group scale [BN, NG].
    int4: HAS_ZERO subtracts the group's zero point (f32 [BN, NG], see _load_group_zero) instead of 8."""
    if SCHEME == 2:
        # nibble c -> c - zero with the magic-number trick (no int -> float conversion instruction)
        code = packed.to(tl.int32)
        if HAS_ZERO:
            zoff = (zero + 12582912.0)[:, :, None]  # 1.5 * 2**23 + zero: exact
            lo = ((code & 15) + 0x4B400000).to(tl.float32, bitcast=True) - zoff
            hi = ((code >> 4) + 0x4B400000).to(tl.float32, bitcast=True) - zoff
        else:
            lo = ((code & 15) + 0x4B400000).to(tl.float32, bitcast=True) - 12582920.0
            hi = ((code >> 4) + 0x4B400000).to(tl.float32, bitcast=True) - 12582920.0
        if APPLY_SCALE:
            sc = scale.to(tl.float32)[:, :, None]
            lo = lo * sc
            hi = hi * sc
    elif NVFP4_ASM:
        if APPLY_SCALE:
            mult = tl.broadcast_to((scale.to(tl.float16) * 64.0)[:, :, None], packed.shape)
        else:
            mult = tl.full(packed.shape, 64.0, tl.float16)
        lo, hi = tl.inline_asm_elementwise(_NIBBLES_TO_F16, "=r,=r,=r,=r,r,r,r", [packed, mult],
                                           dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:
        code = packed.to(tl.int32)
        lo = _e2m1_to_f32(code & 15)
        hi = _e2m1_to_f32(code >> 4)
        if APPLY_SCALE:
            sc = scale.to(tl.float32)[:, :, None]
            lo = lo * sc
            hi = hi * sc
    return lo, hi


@triton.jit
def _epilogue_scale(acc, offs_m, m_mask, offs_n, n_mask, s_ptr, xs_ptr, gs_ptr, SCHEME: tl.constexpr,
                    NVFP4_ASM: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] f32 times the per-channel / global weight scale and the fp8 activation scale."""
    if SCHEME == 0:
        cs = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        rs = tl.load(xs_ptr + offs_m, mask=m_mask, other=0.0)
        acc = acc * rs[:, None] * cs[None, :]
    elif SCHEME == 1:
        cs = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        acc = acc * cs[None, :]
    elif SCHEME == 3:
        g = tl.load(gs_ptr)
        if NVFP4_ASM:
            g = g * 256.0  # NVFP4_ASM_FACTOR
        acc = acc * g
    return acc


@triton.jit
def gemv_kernel(
    y_ptr,  # [1, N] x dtype, or f32[N] accumulated with atomics when SPLIT_K > 1 (zeroed by the caller)
    x_ptr, xs_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, z_ptr,  # as quant_linear_kernel
    N, K, k_chunk,  # k_chunk: K columns per split (a multiple of BLOCK_K)
    stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_zn, stride_zk, stride_yn,
    SCHEME: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, NVFP4_ASM: tl.constexpr,
    WORDS: tl.constexpr = False,  # w_ptr is the weight viewed as i32 words (4 bytes of fp8 / int8, 8 nibbles)
    HAS_ZERO: tl.constexpr = False,  # int4 with zero points (z_ptr u8[N, K//G]); else the constant 8
    PAIRS: tl.constexpr = False,  # int4 / nvfp4 bytes: the two nibbles of a byte are joined into adjacent columns
    # of one [BN, NG, GE] tile, so x is read as one contiguous vector (else as even / odd columns, two strided reads)
):
    """One activation row (decode, M = 1) on the CUDA cores: each program reduces BLOCK_N weight rows over its K
    chunk; the weight streams through registers once, with no shared-memory round trip."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    if (SCHEME == 0 or SCHEME == 1) and not WORDS:
        for k0 in range(k_lo, k_hi, BLOCK_K):
            w = _load_dense_tile(w_ptr, offs_n, n_mask, k0, k_hi, stride_wn, stride_wk, SCHEME, BLOCK_K)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < k_hi, other=0.0).to(tl.float32)
            acc += tl.sum(w.to(tl.float32) * xv[None, :], 1)
    elif SCHEME == 0 or SCHEME == 1:
        # the weight read as i32 words: byte j of word i is element 4i + j, decoded with shifts / masks on the
        # whole word (no per-byte conversion instructions)
        kw = tl.arange(0, BLOCK_K // 4) * 4
        row = offs_n.to(tl.int64) * stride_wn
        for k0 in range(k_lo, k_hi, BLOCK_K):
            words = tl.load(w_ptr + row[:, None] + ((k0 + kw) // 4)[None, :] * stride_wk,
                            mask=n_mask[:, None] & (k0 + kw < k_hi)[None, :], other=0)  # i32[BN, BLOCK_K // 4]
            part = tl.zeros([BLOCK_N, BLOCK_K // 4], dtype=tl.float32)
            for j in tl.static_range(4):
                kj = k0 + kw + j
                xj = tl.load(x_ptr + kj * stride_xk, mask=kj < k_hi, other=0.0).to(tl.float32)
                if SCHEME == 1:
                    # int8 q -> offset-binary q + 128 in the low mantissa bits of 2**23 (magic number)
                    f = ((((words >> (8 * j)) & 255) ^ 128) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
                    part += f * xj[None, :]
                else:
                    # e4m3 s|eeee|mmm -> f32 bits with eeee mmm at bits 26..20 and s at bit 31: the f32 is the value
                    # times 2**-120 (e4m3 subnormals land on f32 subnormals); x is pre-scaled by 2**100 so every
                    # product is a normal number (value * x * 2**-20), exact in the FMA
                    if 20 - 8 * j >= 0:
                        mag = (words << (20 - 8 * j)) & 0x07F00000
                    else:
                        mag = (words >> (8 * j - 20)) & 0x07F00000
                    f = (mag | ((words << (24 - 8 * j)) & -2147483648)).to(tl.float32, bitcast=True)
                    part += f * (xj * 1.2676506002282294e30)[None, :]  # 2**100
            acc += tl.sum(part, 1)
        if SCHEME == 0:
            acc = acc * 1048576.0  # 2**20
    elif WORDS:
        # the packed weight read as i32 words: nibble j of word i is element 8i + j (little-endian bytes, low
        # nibble first), so each nibble is decoded with shifts / masks on full words (no byte conversions)
        GE: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
        NG: tl.constexpr = BLOCK_K // GE
        WPG: tl.constexpr = GE // 8  # words per scale group inside the tile
        col = (tl.arange(0, NG) * GE)[:, None] + 8 * tl.arange(0, WPG)[None, :]  # [NG, WPG] first element
        row = offs_n.to(tl.int64) * stride_wn
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kw = k0 + col
            words = tl.load(w_ptr + row[:, None, None] + (kw // 8)[None, :, :] * stride_wk,
                            mask=n_mask[:, None, None] & (kw < k_hi)[None, :, :], other=0)  # i32[BN, NG, WPG]
            grp = k0 // GROUP + tl.arange(0, NG)
            scale = tl.load(s_ptr + offs_n.to(tl.int64)[:, None] * stride_sn + grp[None, :] * stride_sk,
                            mask=n_mask[:, None] & (grp * GROUP < k_hi)[None, :], other=0.0).to(tl.float32)
            if HAS_ZERO:
                zoff = (_load_group_zero(z_ptr, offs_n, n_mask, k0, k_hi, stride_zn, stride_zk, GROUP, BLOCK_K)
                        + 8388608.0)[:, :, None]  # 2**23 + zero: exact
            part = tl.zeros([BLOCK_N, NG, WPG], dtype=tl.float32)
            for j in tl.static_range(8):
                xj = tl.load(x_ptr + (kw + j) * stride_xk, mask=kw + j < k_hi, other=0.0).to(tl.float32)
                if SCHEME == 2:
                    # nibble c -> the f32 2**23 + c (magic number), minus 2**23 + zero (zero: 8 when symmetric)
                    if HAS_ZERO:
                        f = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - zoff
                    else:
                        f = (((words >> (4 * j)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
                    part += f * xj[None, :, :]
                else:
                    # E2M1 s|e e|m -> f32 bits with e e m at bits 24..22 and s at bit 31: the f32 is the value times
                    # 2**-126 (code 1 is the subnormal 2**-127); x is pre-scaled by 2**100 so every product is a
                    # normal number (value * x * 2**-26), exact in the FMA
                    if 22 - 4 * j >= 0:
                        mag = (words << (22 - 4 * j)) & 0x01C00000
                    else:
                        mag = (words >> (4 * j - 22)) & 0x01C00000
                    f = (mag | ((words << (28 - 4 * j)) & -2147483648)).to(tl.float32, bitcast=True)
                    part += f * (xj * 1.2676506002282294e30)[None, :, :]  # 2**100
            part = tl.sum(part, 2) * scale  # [BN, NG]: the group scale after the group's sum
            if SCHEME == 3:
                part = part * 67108864.0  # 2**26
            acc += tl.sum(part, 1)
    else:
        GE: tl.constexpr = GROUP if GROUP < BLOCK_K else BLOCK_K
        NG: tl.constexpr = BLOCK_K // GE
        even = (tl.arange(0, NG) * GE)[:, None] + 2 * tl.arange(0, GE // 2)[None, :]  # [NG, GE // 2]
        cols = tl.arange(0, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            packed, scale = _load_packed_tile(w_ptr, s_ptr, offs_n, n_mask, k0, k_hi, stride_wn, stride_wk,
                                              stride_sn, stride_sk, GROUP, BLOCK_K)
            zero = scale
            if HAS_ZERO:
                zero = _load_group_zero(z_ptr, offs_n, n_mask, k0, k_hi, stride_zn, stride_zk, GROUP, BLOCK_K)
            lo, hi = _decode_nibbles(packed, scale, zero, SCHEME, NVFP4_ASM, False, HAS_ZERO)
            if PAIRS:
                # byte j holds columns 2j (low nibble) and 2j + 1: join puts them side by side, in column order
                wv = tl.reshape(tl.join(lo.to(tl.float32), hi.to(tl.float32)), [BLOCK_N, NG, GE])
                xk = k0 + cols
                xv = tl.reshape(tl.load(x_ptr + xk * stride_xk, mask=xk < k_hi, other=0.0).to(tl.float32), [NG, GE])
                prod = wv * xv[None, :, :]
            else:
                ke = k0 + even
                xe = tl.load(x_ptr + ke * stride_xk, mask=ke < k_hi, other=0.0).to(tl.float32)
                xo = tl.load(x_ptr + (ke + 1) * stride_xk, mask=ke < k_hi, other=0.0).to(tl.float32)
                prod = lo.to(tl.float32) * xe[None, :, :] + hi.to(tl.float32) * xo[None, :, :]
            acc += tl.sum(tl.sum(prod, 2) * scale.to(tl.float32), 1)  # the group scale after the group's sum
    offs_m = tl.arange(0, 1)
    out = _epilogue_scale(acc[None, :], offs_m, offs_m < 1, offs_n, n_mask, s_ptr, xs_ptr, gs_ptr, SCHEME,
                          NVFP4_ASM and not WORDS)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        out = out + tl.where(pid_k == 0, b, 0.0)[None, :]  # once, by the first K split
    y = y_ptr + offs_n[None, :] * stride_yn
    if SPLIT_K > 1:
        tl.atomic_add(y, out, mask=n_mask[None, :], sem="relaxed")
    else:
        tl.store(y, out.to(y_ptr.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def quant_linear_kernel(
    y_ptr,  # [M, N] x dtype
    x_ptr,  # [M, K] activations (fp8 scheme: the fp8-quantized activations)
    xs_ptr,  # f32[M] activation row scales (fp8 scheme)
    w_ptr,  # stored weight (see module docstring)
    s_ptr,  # fp8/int8: f32[N]; int4: [N, K//G]; nvfp4: e4m3[N, K//16]
    gs_ptr,  # nvfp4: f32[] global scale
    bias_ptr,  # [N]
    z_ptr,  # int4 with HAS_ZERO: u8[N, K//G] zero points
    M, N, K, k_chunk,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_zn, stride_zk, stride_ym, stride_yn,
    SCHEME: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COMPUTE: tl.constexpr,  # dtype of the dot operands: 0 f32, 1 f16, 2 bf16
    FP8_DOT: tl.constexpr,  # fp8 x fp8 tensor-core dot (fp8 scheme on a GPU)
    DOT_F32: tl.constexpr, HAS_BIAS: tl.constexpr, NVFP4_ASM: tl.constexpr,
    HAS_ZERO: tl.constexpr = False,
    SPLIT_K: tl.constexpr = False,  # program_id(1) takes K columns [pid_k * k_chunk, + k_chunk), adds into f32 y
    PAIRS: tl.constexpr = False,  # nibble schemes: one dot over the whole tile, a byte's two nibbles joined into
    # adjacent columns (x read contiguously); else two dots over the even and the odd columns
):
    """Tiled GEMM. MODE 0: acc[BM, BN] = dot(x, W^T); MODE 1: acc[BN, BM] = dot(W, x^T), the dequantized weight
    tile as the first operand. Nibble schemes either join a byte's two decoded nibbles into adjacent columns of one
    [BLOCK_N, BLOCK_K] tile (PAIRS: one dot, x read contiguously) or split K into even / odd halves (two dots).
    SPLIT_K: each K split adds its scaled partial into y (f32, zeroed by the caller) with atomics; the first split
    adds the bias. k_chunk is a multiple of BLOCK_K."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles share each weight column tile while it is in L2
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_row = x_ptr + offs_m.to(tl.int64) * stride_xm
    NIBBLES: tl.constexpr = SCHEME >= 2
    TWO_DOTS: tl.constexpr = NIBBLES and not PAIRS
    KT: tl.constexpr = BLOCK_K // 2 if TWO_DOTS else BLOCK_K  # K extent of one dot
    KSTEP: tl.constexpr = 2 if TWO_DOTS else 1  # x column step inside one dot

    if MODE == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_lo = 0
    k_hi = K
    if SPLIT_K:
        k_lo = pid_k * k_chunk
        k_hi = tl.minimum(K, k_lo + k_chunk)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if NIBBLES:
            packed, scale = _load_packed_tile(w_ptr, s_ptr, offs_n, n_mask, k0, K, stride_wn, stride_wk,
                                              stride_sn, stride_sk, GROUP, BLOCK_K)
            zero = scale
            if HAS_ZERO:
                zero = _load_group_zero(z_ptr, offs_n, n_mask, k0, K, stride_zn, stride_zk, GROUP, BLOCK_K)
            lo, hi = _decode_nibbles(packed, scale, zero, SCHEME, NVFP4_ASM, True, HAS_ZERO)
            if PAIRS:  # byte j holds columns 2j (low nibble) and 2j + 1
                w = _to_compute(tl.reshape(tl.join(lo, hi), (BLOCK_N, KT)), COMPUTE)
                w2 = w
            else:
                w = _to_compute(tl.reshape(lo, (BLOCK_N, KT)), COMPUTE)
                w2 = _to_compute(tl.reshape(hi, (BLOCK_N, KT)), COMPUTE)
        else:
            w = _load_dense_tile(w_ptr, offs_n, n_mask, k0, K, stride_wn, stride_wk, SCHEME, BLOCK_K)
            if not FP8_DOT:
                w = _to_compute(w, COMPUTE)
            w2 = w
        offs_k = k0 + KSTEP * tl.arange(0, KT)  # the even columns for two dots
        k_mask = offs_k < K
        if MODE == 1:
            xt = tl.load(x_row[None, :] + offs_k[:, None] * stride_xk, mask=k_mask[:, None] & m_mask[None, :],
                         other=0.0)  # [KT, BLOCK_M]
            if not FP8_DOT:
                xt = _to_compute(xt, COMPUTE)
            if DOT_F32:
                acc = tl.dot(w, xt, acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
            if TWO_DOTS:
                xt = tl.load(x_row[None, :] + (offs_k + 1)[:, None] * stride_xk,
                             mask=k_mask[:, None] & m_mask[None, :], other=0.0)
                xt = _to_compute(xt, COMPUTE)
                if DOT_F32:
                    acc = tl.dot(w2, xt, acc, input_precision="ieee")
                else:
                    acc = tl.dot(w2, xt, acc)
        else:
            xv = tl.load(x_row[:, None] + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :],
                         other=0.0)  # [BLOCK_M, KT]
            if not FP8_DOT:
                xv = _to_compute(xv, COMPUTE)
            if DOT_F32:
                acc = tl.dot(xv, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, tl.trans(w), acc)
            if TWO_DOTS:
                xv = tl.load(x_row[:, None] + (offs_k + 1)[None, :] * stride_xk,
                             mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                xv = _to_compute(xv, COMPUTE)
                if DOT_F32:
                    acc = tl.dot(xv, tl.trans(w2), acc, input_precision="ieee")
                else:
                    acc = tl.dot(xv, tl.trans(w2), acc)
    if MODE == 1:
        acc = tl.trans(acc)

    acc = _epilogue_scale(acc, offs_m, m_mask, offs_n, n_mask, s_ptr, xs_ptr, gs_ptr, SCHEME, NVFP4_ASM)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if SPLIT_K:
            b = tl.where(pid_k == 0, b, 0.0)  # the first split adds the bias
        acc = acc + b[None, :]
    y = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if SPLIT_K:
        tl.atomic_add(y, acc, mask=m_mask[:, None] & n_mask[None, :])
    else:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------------------------------ wrappers

def _weight_args(qw: QuantizedWeight) -> tuple:
    """The kernels' weight arguments: (weight, scale, global scale, scale strides, zero points, their strides,
    has_zero); per-channel scales take strides (1, 0), and unused pointers repeat a present tensor."""
    t = qw.tensors
    w = t["weight"]
    if qw.scheme in ("fp8", "int8"):
        s, gs, s_strides = t["scale"], t["scale"], (1, 0)
    elif qw.scheme == "int4":
        s, gs, s_strides = t["scale"], t["scale"], t["scale"].stride()
    else:
        s, gs, s_strides = t["block_scale"], t["global_scale"], t["block_scale"].stride()
    has_zero = qw.scheme == "int4" and "zero" in t
    z, z_strides = (t["zero"], t["zero"].stride()) if has_zero else (w, (0, 0))
    return w, s, gs, s_strides, z, z_strides, has_zero


def _split_k(programs: int, k: int, block_k: int, target_programs: int, max_split: int) -> tuple[int, int]:
    """(splits, K columns a split, a multiple of block_k): K is split while fewer than target_programs programs would
    run, up to max_split ways and with at least two K tiles a split."""
    split = 1
    if programs < target_programs:
        split = max(1, min(max_split, triton.cdiv(target_programs, programs), k // (2 * block_k)))
    k_chunk = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return triton.cdiv(k, k_chunk), k_chunk


@triton.jit
def dequantize_kernel(out_ptr, w_ptr, s_ptr, gs_ptr, z_ptr, N, K,
                      stride_on, stride_wn, stride_sn, stride_sk, stride_zn, stride_zk,
                      SCHEME: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[N, K] = the weight's values (dequantize_weight's f32 arithmetic), rounded once to out's dtype. One
    program per (BLOCK_N rows, BLOCK_K columns); nibble schemes decode BLOCK_K // 2 bytes and interleave."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    o_rows = out_ptr + offs_n.to(tl.int64)[:, None] * stride_on
    if SCHEME <= 1:  # fp8 / int8: value * scale[n]
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        if SCHEME == 0:
            q = tl.load(w_rows + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            q = tl.load(w_rows + offs_k[None, :], mask=mask, other=0).to(tl.float32)
        scale = tl.load(s_ptr + offs_n, mask=n_mask, other=0.0)
        tl.store(o_rows + offs_k[None, :], (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_b = pid_k * HALF + tl.arange(0, HALF)  # byte b holds columns 2b (low nibble) and 2b + 1
        mask = n_mask[:, None] & (offs_b < K // 2)[None, :]
        packed = tl.load(w_rows + offs_b[None, :], mask=mask, other=0).to(tl.int32)
        lo = packed & 15
        hi = (packed >> 4) & 15
        group = (2 * offs_b) // GROUP  # GROUP is even: both nibbles of a byte share it
        s_at = s_ptr + offs_n[:, None] * stride_sn + group[None, :] * stride_sk
        if SCHEME == 2:
            scale = tl.load(s_at, mask=mask, other=0.0).to(tl.float32)
            if HAS_ZERO:
                zero = tl.load(z_ptr + offs_n[:, None] * stride_zn + group[None, :] * stride_zk, mask=mask,
                               other=0).to(tl.float32)
            else:
                zero = tl.full([BLOCK_N, HALF], 8.0, tl.float32)
            v_lo = (lo.to(tl.float32) - zero) * scale
            v_hi = (hi.to(tl.float32) - zero) * scale
        else:
            denom = tl.load(s_at, mask=mask, other=0.0).to(tl.float32) * tl.load(gs_ptr)
            v_lo = _e2m1_to_f32(lo) * denom
            v_hi = _e2m1_to_f32(hi) * denom
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        vals = tl.interleave(v_lo, v_hi)  # [BLOCK_N, BLOCK_K]: columns 2b, 2b + 1
        tl.store(o_rows + offs_k[None, :], vals.to(out_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (offs_k < K)[None, :])


DEQUANT_TILES = {"cuda": {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 4},
                 "interpret": {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 4}}


def dequantize_to(qw: QuantizedWeight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """QuantizedWeight -> [N, K] in `dtype` (bf16 / f16 / f32) on the weight's device, in one kernel: exactly
    dequantize_weight(qw).to(dtype). For weight-only GEMMs at prefill sizes, where dequantizing a weight and
    calling cuBLAS beats decoding it once per row tile inside the GEMM."""
    _validate_qweight(qw)
    _check(dtype in (torch.bfloat16, torch.float16, torch.float32), f"dtype must be bf16, f16 or f32, got {dtype}")
    n, k = qw.out_features, qw.in_features
    if out is None:
        out = torch.empty((n, k), dtype=dtype, device=qw.device)
    else:
        _check(out.shape == (n, k) and out.dtype == dtype and out.stride(1) == 1 and out.device == qw.device,
               f"out must be {dtype}[{n}, {k}] with unit column stride on {qw.device}")
    w, s, gs, s_strides, z, z_strides, has_zero = _weight_args(qw)
    cfg = DEQUANT_TILES[_target(qw.device)]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))
    dequantize_kernel[grid](out, w, s, gs, z, n, k, out.stride(0), w.stride(0), *s_strides, *z_strides,
                            SCHEME=SCHEMES[qw.scheme], GROUP=qw.group_size or 2, HAS_ZERO=has_zero,
                            BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"])
    return out


def quantize_activation_fp8(x: torch.Tensor):
    """x [M, K] float -> (float8_e4m3fn[M, K], f32[M] scale): per-row scale max(amax / 448, FLT_MIN),
    values RNE(clamp(x * (1 / scale), +-448)) (Triton; formats.quantize_fp8_tokens's rule)."""
    _check(x.dim() == 2, f"x must be [M, K], got shape {tuple(x.shape)}")
    _check(x.dtype in (torch.bfloat16, torch.float16, torch.float32), f"x dtype {x.dtype} unsupported")
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0 or k == 0:
        return q, scale.fill_(torch.finfo(torch.float32).tiny)
    block = min(ACT_QUANT_BLOCK[_target(x.device)], triton.next_power_of_2(k))
    quantize_fp8_kernel[(m,)](q, scale, x, k, *x.stride(), q.stride(0), BLOCK_K=block,
                              ROUND_F32=_interpreting(),
                              num_warps=8 if block >= 4096 else 4 if block >= 512 else 1)
    return q, scale


def _validate_qweight(qw):
    _check(isinstance(qw, QuantizedWeight), f"expected a QuantizedWeight, got {type(qw).__name__}")
    _check(qw.scheme in SCHEMES, f"unknown scheme {qw.scheme!r}")
    n, k, t = qw.out_features, qw.in_features, qw.tensors
    need = {"fp8": ("weight", "scale"), "int8": ("weight", "scale"), "int4": ("weight", "scale"),
            "nvfp4": ("weight", "block_scale", "global_scale")}[qw.scheme]
    for name in need:
        _check(name in t and isinstance(t[name], torch.Tensor), f"{qw.scheme} weight lacks tensor {name!r}")
    w = t["weight"]
    _check(w.stride(-1) == 1 if w.dim() == 2 else False, f"{qw.scheme} weight must be 2-D with a unit K stride")
    if qw.scheme in ("fp8", "int8"):
        dt = torch.float8_e4m3fn if qw.scheme == "fp8" else torch.int8
        _check(w.dtype == dt and tuple(w.shape) == (n, k), f"{qw.scheme} weight must be {dt}[{n}, {k}], got "
               f"{w.dtype}{list(w.shape)}")
        s = t["scale"]
        _check(s.dtype == torch.float32 and tuple(s.shape) == (n,) and s.is_contiguous(),
               f"{qw.scheme} scale must be contiguous f32[{n}], got {s.dtype}{list(s.shape)}")
    else:
        g = qw.group_size
        _check(isinstance(g, int) and g >= 16 and g & (g - 1) == 0, f"group_size must be a power of two >= 16, got {g}")
        _check(k % g == 0, f"in_features K={k} must be a multiple of the group size {g}")
        _check(w.dtype == torch.uint8 and tuple(w.shape) == (n, k // 2),
               f"{qw.scheme} weight must be packed uint8[{n}, {k // 2}], got {w.dtype}{list(w.shape)}")
        if qw.scheme == "int4":
            s = t["scale"]
            _check(s.dtype in (torch.float16, torch.bfloat16, torch.float32) and tuple(s.shape) == (n, k // g),
                   f"int4 scale must be f16/bf16/f32[{n}, {k // g}], got {s.dtype}{list(s.shape)}")
            z = t.get("zero")
            _check(z is None or (isinstance(z, torch.Tensor) and z.dtype == torch.uint8
                                 and tuple(z.shape) == (n, k // g)),
                   f"int4 zero must be uint8[{n}, {k // g}], got "
                   f"{f'{z.dtype}{list(z.shape)}' if isinstance(z, torch.Tensor) else type(z).__name__}")
        else:
            _check(g == NVFP4_GROUP, f"nvfp4 group_size must be {NVFP4_GROUP}, got {g}")
            s = t["block_scale"]
            _check(s.dtype == torch.float8_e4m3fn and tuple(s.shape) == (n, k // NVFP4_GROUP),
                   f"nvfp4 block_scale must be float8_e4m3fn[{n}, {k // NVFP4_GROUP}], got {s.dtype}{list(s.shape)}")
            gs = t["global_scale"]
            _check(gs.dtype == torch.float32 and gs.numel() == 1, "nvfp4 global_scale must be an f32 scalar")
    _check("zero" not in t or qw.scheme == "int4", f"only int4 weights take zero points, not {qw.scheme}")
    for name, tt in t.items():
        _check(tt.device == w.device, f"tensor {name!r} is on {tt.device}, weight on {w.device}")


def tile_config(device: torch.device, scheme: str, m: int) -> dict:
    target = _target(device)
    if m <= DECODE_MAX_M:
        phase = "decode"
    elif m <= BATCH_MAX_M and (target, scheme, "batch") in TILE_SIZES:
        buckets = TILE_SIZES[(target, scheme, "batch")]
        return dict(buckets[min(b for b in buckets if b >= m)], phase="batch")
    else:
        phase = "prefill"
    return dict(TILE_SIZES[(target, scheme, phase)], phase=phase)


def uses_gemm_kernels(scheme: str, m: int, device: torch.device) -> bool:
    """Whether quant_linear's kernels are the fast way to multiply m activation rows by a `scheme` weight: decode
    sizes, batched decode where the scheme has "batch" tiles, and fp8 (W8A8) at any size. Elsewhere (weight-only
    prefill) dequantizing the weight and calling cuBLAS is faster: the kernels decode each weight once per
    BLOCK_M rows."""
    return scheme == "fp8" or tile_config(device, scheme, m)["phase"] != "prefill"


def _check_bias_out(bias, out, m: int, n: int, dtype, device):
    """The checked, contiguous bias (or None) and the output buffer (out, or a new [m, n] of dtype)."""
    if bias is not None:
        _check(isinstance(bias, torch.Tensor) and tuple(bias.shape) == (n,), f"bias must be [{n}], got "
               f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
        _check(bias.dtype in (torch.bfloat16, torch.float16, torch.float32), f"bias dtype {bias.dtype} unsupported")
        _check(bias.device == device, f"bias is on {bias.device}, x on {device}")
        bias = bias.contiguous()
    if out is None:
        out = torch.empty((m, n), dtype=dtype, device=device)
    else:
        _check(isinstance(out, torch.Tensor) and out.shape == (m, n) and out.dtype == dtype and out.device == device,
               f"out must be {dtype}[{m}, {n}] on {device}")
    return bias, out


def quant_linear(x: torch.Tensor, qw: QuantizedWeight, bias=None, *, config=None, out=None) -> torch.Tensor:
    """y[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias) in x.dtype (bf16/f16; f32 accepted for tests).

    config: tile overrides (keys of TILE_SIZES entries), for tuning.
    """
    _validate_qweight(qw)
    _check(isinstance(x, torch.Tensor) and x.dim() == 2,
           f"x must be a 2-D [M, K] tensor, got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x)}")
    _check(x.dtype in (torch.bfloat16, torch.float16, torch.float32),
           f"x dtype must be bfloat16, float16 or float32, got {x.dtype}")
    m, k = x.shape
    _check(k == qw.in_features, f"x has K={k} columns but the weight has in_features={qw.in_features}")
    _check(x.device == qw.device, f"x is on {x.device}, the weight on {qw.device}")
    bias, out = _check_bias_out(bias, out, m, qw.out_features, x.dtype, x.device)
    if m == 0:
        return out
    if qw.scheme == "fp8":
        xq, xs = quantize_activation_fp8(x)
        return _launch(xq, xs, qw, bias, out, config, act_dtype=x.dtype)
    return _launch(x, None, qw, bias, out, config, act_dtype=x.dtype)


def fp8_linear(xq: torch.Tensor, x_scale: torch.Tensor, qw: QuantizedWeight, bias=None, *, out_dtype=None,
               config=None, out=None) -> torch.Tensor:
    """W8A8 with activations already quantized (kernels_gpu.norms.add_rms_norm_fp8, kernels_gpu.activations
    .silu_and_mul_fp8, quantize_activation_fp8): y[M, N] = (xq * x_scale[:, None]) @ dequant(W)^T (+ bias), in
    out_dtype (default bf16). xq: float8_e4m3fn[M, K]; x_scale: f32[M]; qw: an "fp8" QuantizedWeight."""
    _validate_qweight(qw)
    _check(qw.scheme == "fp8", f"fp8_linear takes an fp8 (W8A8) weight, got scheme {qw.scheme!r}")
    _check(isinstance(xq, torch.Tensor) and xq.dim() == 2 and xq.dtype == torch.float8_e4m3fn,
           f"xq must be float8_e4m3fn[M, K], got "
           f"{f'{xq.dtype}{list(xq.shape)}' if isinstance(xq, torch.Tensor) else type(xq).__name__}")
    m, k = xq.shape
    _check(k == qw.in_features, f"xq has K={k} columns but the weight has in_features={qw.in_features}")
    _check(xq.device == qw.device, f"xq is on {xq.device}, the weight on {qw.device}")
    _check(isinstance(x_scale, torch.Tensor) and x_scale.dtype == torch.float32 and tuple(x_scale.shape) == (m,)
           and x_scale.is_contiguous() and x_scale.device == xq.device,
           f"x_scale must be a contiguous f32[{m}] on {xq.device}, got "
           f"{f'{x_scale.dtype}{list(x_scale.shape)}' if isinstance(x_scale, torch.Tensor) else type(x_scale)}")
    out_dtype = torch.bfloat16 if out_dtype is None else out_dtype
    _check(out_dtype in (torch.bfloat16, torch.float16, torch.float32), f"out_dtype {out_dtype} unsupported")
    bias, out = _check_bias_out(bias, out, m, qw.out_features, out_dtype, xq.device)
    if m == 0:
        return out
    return _launch(xq, x_scale, qw, bias, out, config, act_dtype=out_dtype)


def _fp8_tensor_cores(device: torch.device) -> bool:
    """Whether this CUDA device multiplies fp8 on its tensor cores (sm_89+); cached per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _FP8_TENSOR_CORES.get(index)
    if ok is None:
        ok = _FP8_TENSOR_CORES[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return ok


def _scaled_mm_ok(xq, qw, out, cfg) -> bool:
    """Whether torch._scaled_mm (cuBLASLt / CUTLASS fp8 with row-wise scales) runs this W8A8 product: a CUDA GPU
    with fp8 tensor cores (sm_89+), M at least the tile's SCALED_MM_MIN_M, K and N multiples of 16, bf16 out."""
    if not _SCALED_MM["enabled"] or cfg.get("SCALED_MM_MIN_M") is None or xq.shape[0] < cfg["SCALED_MM_MIN_M"]:
        return False
    if xq.device.type != "cuda" or out.dtype != torch.bfloat16 or _interpreting():
        return False
    n, k = qw.out_features, qw.in_features
    return (n % 16 == 0 and k % 16 == 0 and xq.stride(1) == 1 and xq.stride(0) % 16 == 0
            and xq.data_ptr() % 16 == 0 and _fp8_tensor_cores(xq.device))


def _scaled_mm(xq, xs, qw, bias, out, w_t=None, ws_row=None):
    """out = torch._scaled_mm(xq, W^T) with scales xs[M, 1] x scale[1, N] (+ bias); False when this torch cannot
    (then the Triton kernel runs, and torch._scaled_mm is not tried again in this process). w_t / ws_row: the
    weight's transposed view and its scales as [1, N], when the caller holds them."""
    if w_t is None:
        w_t, ws_row = qw.tensors["weight"].t(), qw.tensors["scale"].view(1, -1)
    fused_bias = bias is not None and bias.dtype == out.dtype
    direct = out.is_contiguous() and (bias is None or fused_bias)
    try:
        kwargs = {"out": out} if direct else {}
        y = torch._scaled_mm(xq, w_t, scale_a=xs.view(-1, 1), scale_b=ws_row, bias=bias if fused_bias else None,
                             out_dtype=out.dtype, use_fast_accum=SCALED_MM_FAST_ACCUM, **kwargs)
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        import warnings

        _SCALED_MM["enabled"] = False
        warnings.warn(f"quant_linear: torch._scaled_mm is unavailable here ({str(exc)[:200]}); W8A8 GEMMs use the "
                      "Triton kernel", RuntimeWarning, stacklevel=3)
        return False
    if not direct:
        out.copy_(y if bias is None or fused_bias else (y.float() + bias.float()).to(out.dtype))
    return True


class Fp8Linear:
    """fp8_linear bound to one W8A8 weight, checked once: what a compiled program calls at every step (the per-call
    checks of fp8_linear cost host time that an eager prefill step, ~100 GEMMs, feels). Call with activations from
    kernels_gpu.norms.add_rms_norm_fp8 / kernels_gpu.activations.silu_and_mul_fp8 / quantize_activation_fp8."""

    def __init__(self, qw: QuantizedWeight):
        _validate_qweight(qw)
        _check(qw.scheme == "fp8", f"Fp8Linear takes an fp8 (W8A8) weight, got scheme {qw.scheme!r}")
        self.qw = qw
        self.out_features = qw.out_features
        self._w_t = qw.tensors["weight"].t()
        self._ws_row = qw.tensors["scale"].view(1, -1)

    def __call__(self, xq: torch.Tensor, x_scale: torch.Tensor, bias=None, *, out_dtype) -> torch.Tensor:
        m = xq.shape[0]
        _check(xq.dtype == torch.float8_e4m3fn and xq.dim() == 2 and xq.shape[1] == self.qw.in_features
               and x_scale.shape == (m,), f"Fp8Linear: xq must be float8_e4m3fn[M, {self.qw.in_features}] with "
               f"x_scale f32[M], got {xq.dtype}{list(xq.shape)} and {list(x_scale.shape)}")
        out = torch.empty((m, self.out_features), dtype=out_dtype, device=xq.device)
        if m == 0:
            return out
        return _launch(xq, x_scale, self.qw, None if bias is None else bias.contiguous(), out, None,
                       act_dtype=out_dtype, scaled_mm_views=(self._w_t, self._ws_row))


def _launch(x_in, xs, qw, bias, out, config, *, act_dtype, scaled_mm_views=(None, None)) -> torch.Tensor:
    """The GEMV / tiled-GEMM / torch._scaled_mm launch of quant_linear, fp8_linear and Fp8Linear: x_in is the
    activation (fp8 scheme: its fp8 quantization, with row scales xs); act_dtype the activation dtype that picks the
    dot precision; scaled_mm_views: _scaled_mm's w_t / ws_row when the caller holds them."""
    x = x_in
    m, k = x.shape
    n = qw.out_features
    cfg = tile_config(x.device, qw.scheme, m)
    if config:
        cfg.update(config)
    interp = _interpreting()
    on_gpu = x.device.type == "cuda" and not interp
    scheme = qw.scheme
    t = qw.tensors
    if xs is None:
        xs = t["weight"]  # placeholder pointer for unused arguments
    # fp8 multiplies the quantized activations, so f32 inputs need no f32 dot on the GPU (f32 tiles of the fp8
    # GEMM's config overflow shared memory there: 288 KiB asked, 227 KiB available on the H100)
    dot_f32 = interp or (act_dtype == torch.float32 and scheme != "fp8")
    fp8_dot = scheme == "fp8" and on_gpu and not dot_f32

    w, s, gs, s_strides, z, z_strides, has_zero = _weight_args(qw)
    g = qw.group_size or 1
    bias_arg = bias if bias is not None else out

    if cfg["phase"] == "decode" and m <= cfg.get("GEMV_MAX_M", 0):
        block_n, block_k = cfg["GEMV_BLOCK_N"], cfg["GEMV_BLOCK_K"]
        _check(g == 1 or block_k % g == 0 or g % block_k == 0, f"GEMV_BLOCK_K={block_k} incompatible with group {g}")
        programs = triton.cdiv(n, block_n)
        split, k_chunk = _split_k(programs, k, block_k, cfg.get("SPLIT_K_PROGRAMS", 0), cfg.get("MAX_SPLIT_K", 1))
        y = torch.zeros((1, n), dtype=torch.float32, device=x.device) if split > 1 else out
        words = (cfg.get("GEMV_WORDS", False) and w.stride(0) % 4 == 0 and w.data_ptr() % 4 == 0
                 and (min(g, block_k) % 8 == 0 if scheme in ("int4", "nvfp4") else k % 4 == 0 and block_k >= 4))
        w_arg, w_strides = (w.view(torch.int32), (w.stride(0) // 4, 1)) if words else (w, w.stride())
        gemv_kernel[(programs, split)](
            y, x_in, xs, w_arg, s, gs, bias_arg, z,
            n, k, k_chunk,
            x_in.stride(1), *w_strides, *s_strides, *z_strides, y.stride(1),
            SCHEME=SCHEMES[scheme], GROUP=g, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
            HAS_BIAS=bias is not None, NVFP4_ASM=on_gpu, WORDS=words, HAS_ZERO=has_zero,
            PAIRS=cfg.get("GEMV_PAIRS", False),
            num_warps=cfg.get("GEMV_WARPS", 4), num_stages=cfg.get("GEMV_STAGES", 1),
        )
        if split > 1:
            out.copy_(y)
        return out

    if scheme == "fp8" and _scaled_mm_ok(x_in, qw, out, cfg) and _scaled_mm(x_in, xs, qw, bias, out,
                                                                            *scaled_mm_views):
        return out
    block_k = cfg["BLOCK_K"]
    block_n = cfg["BLOCK_N"]
    block_m = cfg["BLOCK_M"]
    mode = cfg["MODE"]
    group_m = cfg.get("GROUP_M", 1)
    if cfg["phase"] == "decode":
        block_m = max(16, min(block_m, triton.next_power_of_2(m)))
        while block_n > cfg.get("MIN_BLOCK_N", 16) and triton.cdiv(n, block_n) * triton.cdiv(m, block_m) < \
                cfg.get("target_programs", 0):
            block_n //= 2
    _check(g == 1 or block_k % g == 0 or g % block_k == 0, f"BLOCK_K={block_k} incompatible with group size {g}")
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    split, k_chunk = _split_k(tiles, k, block_k, cfg.get("GEMM_SPLIT_K_PROGRAMS", 0), cfg.get("GEMM_MAX_SPLIT_K", 1))
    y = torch.zeros((m, n), dtype=torch.float32, device=x.device) if split > 1 else out
    if dot_f32:
        compute = 0
    elif scheme == "fp8":
        compute = 1  # fp8 -> f16 is exact
    else:
        compute = 1 if act_dtype == torch.float16 else 2
    quant_linear_kernel[(tiles, split)](
        y, x_in, xs, w, s, gs, bias_arg, z,
        m, n, k, k_chunk,
        *x_in.stride(), *w.stride(), *s_strides, *z_strides, *y.stride(),
        SCHEME=SCHEMES[scheme], GROUP=qw.group_size or 1, MODE=mode,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        COMPUTE=compute, FP8_DOT=fp8_dot, DOT_F32=dot_f32, HAS_BIAS=bias is not None,
        NVFP4_ASM=on_gpu, HAS_ZERO=has_zero, SPLIT_K=split > 1, PAIRS=cfg.get("PAIRS", False),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        out.copy_(y)
    return out
