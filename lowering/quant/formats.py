"""Quantized number formats: the one definition every pass, backend reference and test uses.

Weights are [N, K] (out_features, in_features); each format stores named parts (numpy at compile time,
params in the graph):

  "int8"  q int8[N, K], scale f32[N]                 symmetric per output channel:
          scale = max(amax|W[n]| / 127, FLT_MIN), q = RNE(W / scale) clipped to [-127, 127]; W ~ q * scale.
  "fp8"   q float8_e4m3fn[N, K], scale f32[N]        per output channel: scale = max(amax|W[n]| / 448, FLT_MIN),
          q = e4m3(RNE, saturating)(W / scale); W ~ q * scale. Used as W8A8: activations are quantized per
          token at run time with the same scale rule, the values multiplied by the f32 reciprocal of the scale
          (quantize_fp8_tokens: one division per row, as vLLM's and our GPU quantizers do).
  "int4"  q u8[N, K/2], scale f16[N, K/G], zero u8[N, K/G]   asymmetric per group of G along K (128, or the
          largest power of two >= 16 dividing K when 128 does not: int4_group_size):
          lo = min(group, 0), hi = max(group, 0), scale = f16((hi - lo) / 15) (1 when the group is all zero),
          zero = clip(RNE(-lo / scale), 0, 15), code = clip(RNE(W / scale) + zero, 0, 15);
          W ~ (code - zero) * scale. Two codes per byte, element 2i in the LOW nibble.
  "nvfp4" q u8[N, K/2], block_scale float8_e4m3fn[N, K/16], global_scale f32[]   NVIDIA's NVFP4:
          global_scale = max(amax|W| / (6 * 448), FLT_MIN) per tensor; per block of 16 along K
          block_scale = e4m3(RNE, saturating)(amax|block| / 6 / global_scale); code = E2M1(RNE, ties to the
          even code, saturating at +-6)(W / (block_scale * global_scale)) (a block whose scale is 0 stores 0);
          W ~ e2m1(code) * block_scale * global_scale. E2M1 = {0, 0.5, 1, 1.5, 2, 3, 4, 6} with a sign bit
          (bit 3); element 2i in the LOW nibble.

KV caches use "fp8" with a calibrated f32 scale per KV head (kv_write divides by it) and "nvfp4" with a
calibrated per-layer global scale and block scales computed on write (16 values of one head share one),
chosen by the "mse46" rule (nvfp4_block_scales: the better of amax -> 6 and amax -> 4 per block; same decode).

numpy functions (quantize_*, dequantize_*) are the exact references; the jnp_* functions compute the same
values inside jitted graphs (bit-identical, tested).
"""
from __future__ import annotations

import math
from typing import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

WEIGHT_FORMATS = ("int8", "fp8", "int4", "nvfp4")
KV_FORMATS = ("fp8", "nvfp4")
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0
INT8_MAX = 127.0
INT4_GROUP = 128
INT4_LEVELS = 15
NVFP4_BLOCK = 16
E2M1_MAX = 6.0
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)
# How nvfp4 block scales are chosen: "amax" maps each block's amax to 6; "mse46" also tries mapping it to 4
# (E2M1_ALT_MAX: finer steps near the top of the block) and keeps the scale with the smaller squared error.
# The stored format and its decode are the same for both.
NVFP4_SCALE_RULES = ("amax", "mse46")
E2M1_ALT_MAX = 4.0
_SCALE_ERROR_ONE = float(2 ** 20)  # fixed-point unit of nvfp4_scale_error
KV_NVFP4_SCALE_RULE = "mse46"  # the rule quantize_model gives nvfp4 KV caches (kv_write_nvfp4 attribute)
KV_FEEDBACK_DAMP = 0.01  # feedback_factor's damping, a share of the second moment's mean diagonal
F32_TINY = float(np.finfo(np.float32).tiny)
# Rounding thresholds between consecutive E2M1 magnitudes: (midpoint, does a tie round up?). A tie goes to
# the even code, i.e. up exactly when the upper neighbour's code (2, 4, 6) is even.
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True),
                   (5.0, False))

# Parts each weight format stores, in the order quantized ops take them.
WEIGHT_PARTS = {"int8": ("q", "scale"), "fp8": ("q", "scale"), "int4": ("q", "scale", "zero"),
                "nvfp4": ("q", "block_scale", "global_scale"), "q4_1": ("q", "d", "m"), "q8_0": ("q", "d")}


class FormatError(ValueError):
    """A tensor cannot be stored in the requested format (shape, dtype or name)."""


def int4_group_size(in_features: int, preferred: int = INT4_GROUP) -> int | None:
    """The int4 group size for K = in_features: `preferred` (128) when it divides K, else the largest power
    of two >= 16 below it that does (576 -> 64); None when none does."""
    g = preferred
    while g >= 16:
        if in_features % g == 0:
            return g
        g //= 2
    return None


def check_weight_format(fmt: str, shape: tuple[int, ...], group_size: int | None = None) -> None:
    if fmt not in WEIGHT_FORMATS:
        raise FormatError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if len(shape) != 2:
        raise FormatError(f"{fmt} weights must be 2-D [out, in], got shape {tuple(shape)}")
    k = shape[1]
    if fmt == "int4":
        g = group_size or int4_group_size(k)
        if g is None or k % g or g < 16 or g & (g - 1):
            raise FormatError(f"int4 needs in_features divisible by a power-of-two group size >= 16"
                              f"{f' (asked: {group_size})' if group_size else ''}, got {k}")
    if fmt == "nvfp4" and k % NVFP4_BLOCK:
        raise FormatError(f"nvfp4 needs in_features divisible by {NVFP4_BLOCK}, got {k}")


def supports(fmt: str, shape: tuple[int, ...], group_size: int | None = None) -> bool:
    try:
        check_weight_format(fmt, shape, group_size)
    except FormatError:
        return False
    return True


# ------------------------------------------------------------------------------------------ FP8 e4m3

def to_fp8(y: np.ndarray) -> np.ndarray:
    """f32 -> float8_e4m3fn, round to nearest even, saturating at +-448 (NaN stays NaN)."""
    return np.clip(np.asarray(y, np.float32), -FP8_MAX, FP8_MAX).astype(FP8)


def fp8_scale(amax) -> np.ndarray:
    return np.maximum(np.asarray(amax, np.float32) / np.float32(FP8_MAX), np.float32(F32_TINY)).astype(np.float32)


def quantize_fp8_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x f32[M, K] -> (q e4m3[M, K], scale f32[M]) with one scale per row (per channel / per token)."""
    x = np.asarray(x, np.float32)
    scale = fp8_scale(np.abs(x).max(axis=1))
    return to_fp8(x / scale[:, None]), scale


def quantize_fp8_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W8A8 activations x f32[M, K] -> (q e4m3[M, K], scale f32[M]): the scale rule of quantize_fp8_rows, the
    values multiplied by the reciprocal of their row's scale: q = e4m3(RNE, saturating)(x * f32(1 / scale))."""
    x = np.asarray(x, np.float32)
    scale = fp8_scale(np.abs(x).max(axis=1))
    return to_fp8(x * (np.float32(1.0) / scale)[:, None]), scale


def dequantize_fp8(q: np.ndarray, scale: np.ndarray, axis: int = 0) -> np.ndarray:
    """q e4m3 * scale, the scale broadcast along `axis` (0: per row of a [N, K] weight)."""
    s = np.asarray(scale, np.float32)
    shape = [1] * q.ndim
    if s.ndim:
        shape[axis] = s.shape[0]
    return q.astype(np.float32) * s.reshape(shape)


# ------------------------------------------------------------------------------------------ INT8

def quantize_int8(w: np.ndarray) -> dict[str, np.ndarray]:
    w = np.asarray(w, np.float32)
    scale = np.maximum(np.abs(w).max(axis=1) / np.float32(INT8_MAX), np.float32(F32_TINY)).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    return {"q": q, "scale": scale}


def dequantize_int8(parts: dict[str, np.ndarray]) -> np.ndarray:
    return parts["q"].astype(np.float32) * parts["scale"][:, None]


# ------------------------------------------------------------------------------------------ INT4

def int4_group_params(wg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """wg f32[..., G] -> (scale f16[...], zero u8[...]) for asymmetric 4-bit codes of each group."""
    lo = np.minimum(wg.min(axis=-1), 0.0)
    hi = np.maximum(wg.max(axis=-1), 0.0)
    scale = ((hi - lo) / np.float32(INT4_LEVELS)).astype(np.float16)
    # NOTE: a group too small for f16 (or all zero) would get scale 0: use the smallest f16 subnormal (all zero: 1)
    scale = np.where(scale > 0, scale, np.where(hi - lo > 0, np.float16(2.0 ** -24), np.float16(1.0)))
    zero = np.clip(np.rint(-lo / scale.astype(np.float32)), 0, INT4_LEVELS).astype(np.uint8)
    return scale.astype(np.float16), zero


def int4_codes(w: np.ndarray, scale: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Codes (u8 in [0, 15]) of w with the given per-element-broadcast scale (f16/f32) and zero."""
    return np.clip(np.rint(w / scale.astype(np.float32)) + zero.astype(np.float32), 0, INT4_LEVELS).astype(np.uint8)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """u8[..., 2n] codes in [0, 15] -> u8[..., n], element 2i in the low nibble."""
    codes = codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    return np.stack((packed & 0xF, packed >> 4), axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_int4(w: np.ndarray, group_size: int = INT4_GROUP) -> dict[str, np.ndarray]:
    w = np.asarray(w, np.float32)
    check_weight_format("int4", w.shape, group_size)
    n, k = w.shape
    wg = w.reshape(n, k // group_size, group_size)
    scale, zero = int4_group_params(wg)
    codes = int4_codes(wg, scale[..., None], zero[..., None]).reshape(n, k)
    return {"q": pack_nibbles(codes), "scale": scale, "zero": zero}


def dequantize_int4(parts: dict[str, np.ndarray]) -> np.ndarray:
    codes = unpack_nibbles(parts["q"]).astype(np.float32)
    n, k = codes.shape
    groups = parts["scale"].shape[1]
    cg = codes.reshape(n, groups, k // groups)
    return ((cg - parts["zero"][..., None].astype(np.float32)) * parts["scale"][..., None].astype(np.float32)
            ).reshape(n, k)


# ------------------------------------------------------------------------------------------ NVFP4

def e2m1_encode(v: np.ndarray) -> np.ndarray:
    """f32 (already divided by its scale) -> u8 codes: RNE to E2M1, ties to the even code, saturating;
    the sign bit follows the IEEE sign (so -0.0 gives 0x8, as the hardware cvt does); NaN gives +0."""
    v = np.asarray(v, np.float32)
    a = np.abs(v)
    code = np.zeros(v.shape, np.uint8)
    for mid, tie_up in _E2M1_MIDPOINTS:
        code += (a >= mid if tie_up else a > mid).astype(np.uint8)
    sign = (np.signbit(v) & ~np.isnan(v)).astype(np.uint8) << 3
    return code | sign


def e2m1_decode(code: np.ndarray) -> np.ndarray:
    code = np.asarray(code).astype(np.int64)
    mag = E2M1_VALUES[code & 7]
    return np.where(code & 8, -mag, mag).astype(np.float32)


def nvfp4_global_scale(amax) -> np.ndarray:
    return np.maximum(np.float32(amax) / np.float32(E2M1_MAX * FP8_MAX), np.float32(F32_TINY)).astype(np.float32)


def nvfp4_block_scales(xb: np.ndarray, global_scale, scale_rule: str = "amax") -> np.ndarray:
    """xb f32[..., 16] -> block scales e4m3[...]: e4m3(amax / 6 / global_scale) ("amax"), or for "mse46" the
    better of that and e4m3(amax / 4 / global_scale) by the block's squared error (nvfp4_scale_error)."""
    check_scale_rule(scale_rule)
    xb = np.asarray(xb, np.float32)
    gs = np.float32(global_scale)
    amax = np.abs(xb).max(axis=-1)
    s6 = to_fp8(amax / np.float32(E2M1_MAX) / gs)
    if scale_rule == "amax":
        return s6
    s4 = to_fp8(amax / np.float32(E2M1_ALT_MAX) / gs)
    e6, e4 = nvfp4_scale_error(xb, amax, s6, gs), nvfp4_scale_error(xb, amax, s4, gs)
    use4 = (e4 < e6) & (s4.astype(np.float32) != 0)
    return np.where(use4, s4, s6).astype(FP8)


def nvfp4_scale_error(xb: np.ndarray, amax: np.ndarray, block_scale: np.ndarray, global_scale) -> np.ndarray:
    """The squared error of a 16-block stored with `block_scale`, as an i32 (order-independent, so every
    implementation picks the same scale): with den = block_scale * global_scale, y = x / den,
    r = (|y| - |e2m1(y)|) * (den / amax) (the error relative to the block amax), each element contributes
    floor(min(r * r, 4) * 2**20) and the block sums them. Every step is one correctly rounded f32 operation
    (no fused multiply-add), so numpy, jnp, torch and the Triton kernel agree bit for bit."""
    den = block_scale.astype(np.float32) * np.float32(global_scale)
    ok = (den != 0) & (amax != 0)
    safe_den = np.where(ok, den, np.float32(1.0))
    y = xb / safe_den[..., None]
    mag = E2M1_VALUES[e2m1_encode(y) & 7]
    r = (np.abs(y) - mag) * (safe_den / np.where(ok, amax, np.float32(1.0)))[..., None]
    e = np.floor(np.minimum(r * r, np.float32(4.0)) * np.float32(_SCALE_ERROR_ONE)).astype(np.int32)
    return np.where(ok, e.sum(axis=-1, dtype=np.int32), np.int32(0))


def check_scale_rule(scale_rule: str) -> None:
    if scale_rule not in NVFP4_SCALE_RULES:
        raise FormatError(f"unknown nvfp4 scale rule {scale_rule!r}; choose one of {', '.join(NVFP4_SCALE_RULES)}")


def nvfp4_codes(x: np.ndarray, block_scale: np.ndarray, global_scale) -> np.ndarray:
    """Codes of x (block_scale broadcast against x, already expanded) as in the module docstring."""
    denom = block_scale.astype(np.float32) * np.float32(global_scale)
    safe = np.where(denom != 0, denom, np.float32(1.0))
    return np.where(denom != 0, e2m1_encode(np.asarray(x, np.float32) / safe), 0).astype(np.uint8)


def quantize_nvfp4(x: np.ndarray, global_scale=None, scale_rule: str = "amax") -> dict[str, np.ndarray]:
    """x f32[..., D] (D % 16 == 0) -> {"q": u8[..., D/2], "block_scale": e4m3[..., D/16], "global_scale": f32[]}
    (block scales by `scale_rule`, see nvfp4_block_scales)."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    if d % NVFP4_BLOCK:
        raise FormatError(f"nvfp4 needs the last dim divisible by {NVFP4_BLOCK}, got {d}")
    gs = nvfp4_global_scale(np.abs(x).max() if x.size else 0.0) if global_scale is None else np.float32(global_scale)
    xb = x.reshape(*x.shape[:-1], d // NVFP4_BLOCK, NVFP4_BLOCK)
    bs = nvfp4_block_scales(xb, gs, scale_rule)
    codes = nvfp4_codes(xb, bs[..., None], gs).reshape(x.shape)
    return {"q": pack_nibbles(codes), "block_scale": bs, "global_scale": np.asarray(gs, np.float32).reshape(())}


def feedback_factor(second_moment: np.ndarray, damp: float = KV_FEEDBACK_DAMP) -> np.ndarray:
    """f32[..., D, D]: the upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 for each second moment
    H = E[q q^T] [..., D, D] of the queries that will read a head's keys (quantize_nvfp4_feedback's `factor`).
    A head with no calibration data (H = 0) gets the identity (plain nearest rounding)."""
    h = np.asarray(second_moment, np.float64)
    d = h.shape[-1]
    if h.shape[-2:] != (d, d):
        raise FormatError(f"feedback_factor needs square second moments, got {h.shape}")
    flat = h.reshape(-1, d, d)
    out = np.empty_like(flat)
    for i, m in enumerate(flat):
        m = (m + m.T) / 2
        level = float(np.mean(np.diag(m)))
        if not np.isfinite(level) or level <= 0:
            out[i] = np.eye(d)
            continue
        inv = np.linalg.inv(m + damp * level * np.eye(d))
        out[i] = np.linalg.cholesky((inv + inv.T) / 2).T  # upper: inv = U^T U
    return out.reshape(h.shape).astype(np.float32)


def quantize_nvfp4_feedback(x: np.ndarray, global_scale, factor: np.ndarray,
                            scale_rule: str = "amax") -> dict[str, np.ndarray]:
    """Score-aware NVFP4 rounding of head vectors (GPTQ's error feedback on each vector): x f32[..., H, D]
    (D % 16 == 0), factor f32[H, D, D] upper triangular (feedback_factor) -> the parts of quantize_nvfp4.

    Elements are coded in order j = 0 .. D-1. At the first element of each 16-block the block scale is chosen
    (by `scale_rule`, nvfp4_block_scales) from the block's current values; element j gets the nearest E2M1
    code of x_j / (block_scale * global_scale) (nvfp4_codes); then r = (x_j - decoded_j) / U[h, j, j] and
    x_k -= r * U[h, j, k] for every k > j (each a correctly rounded f32 operation). With U from
    H = E[q q^T] this greedily minimizes the expected squared score error E[(q . e)^2] instead of |e|^2 (the
    quantization error moves into directions the queries hardly read); with U = I it is quantize_nvfp4."""
    x = np.array(x, np.float32)  # a copy: updated in place
    u = np.asarray(factor, np.float32)
    heads, d = x.shape[-2:]
    if d % NVFP4_BLOCK or u.shape != (heads, d, d):
        raise FormatError(f"quantize_nvfp4_feedback needs x [..., H, D] with D % {NVFP4_BLOCK} == 0 and a "
                          f"factor [H, D, D]; got x {x.shape} and factor {u.shape}")
    gs = np.float32(global_scale)
    codes = np.zeros(x.shape, np.uint8)
    scales = np.zeros((*x.shape[:-1], d // NVFP4_BLOCK), FP8)
    for b in range(d // NVFP4_BLOCK):
        bs = nvfp4_block_scales(x[..., b * NVFP4_BLOCK:(b + 1) * NVFP4_BLOCK], gs, scale_rule)
        scales[..., b] = bs
        den = bs.astype(np.float32) * gs
        for j in range(b * NVFP4_BLOCK, (b + 1) * NVFP4_BLOCK):
            codes[..., j] = nvfp4_codes(x[..., j], bs, gs)
            r = (x[..., j] - e2m1_decode(codes[..., j]) * den) / u[:, j, j]
            x[..., j + 1:] -= r[..., None] * u[:, j, j + 1:]
    return {"q": pack_nibbles(codes), "block_scale": scales, "global_scale": np.asarray(gs, np.float32).reshape(())}


def dequantize_nvfp4(parts: dict[str, np.ndarray]) -> np.ndarray:
    vals = e2m1_decode(unpack_nibbles(parts["q"]))
    d = vals.shape[-1]
    vb = vals.reshape(*vals.shape[:-1], d // NVFP4_BLOCK, NVFP4_BLOCK)
    denom = parts["block_scale"].astype(np.float32) * np.float32(parts["global_scale"])
    return (vb * denom[..., None]).reshape(vals.shape)


# ------------------------------------------------------------------------------------------ weights

def quantize_weight(w: np.ndarray, fmt: str, *, group_size: int | None = None) -> dict[str, np.ndarray]:
    """Round-to-nearest quantization of a [N, K] weight; returns the format's parts (WEIGHT_PARTS order)."""
    w = np.asarray(w, np.float32)
    check_weight_format(fmt, w.shape, group_size)
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "fp8":
        q, scale = quantize_fp8_rows(w)
        return {"q": q, "scale": scale}
    if fmt == "int4":
        return quantize_int4(w, group_size or int4_group_size(w.shape[1]))
    return quantize_nvfp4(w)


def dequantize_weight(parts: dict[str, np.ndarray], fmt: str) -> np.ndarray:
    if fmt == "int8":
        return dequantize_int8(parts)
    if fmt == "fp8":
        return dequantize_fp8(parts["q"], parts["scale"])
    if fmt == "int4":
        return dequantize_int4(parts)
    if fmt == "nvfp4":
        return dequantize_nvfp4(parts)
    if fmt in GGUF_FORMATS:
        return dequantize_gguf(parts, fmt)
    raise FormatError(f"unknown weight format {fmt!r}")


def bits_per_weight(fmt: str, group_size: int | None = None) -> float:
    """Stored bits per weight element, scales included (per-tensor scalars and per-row scales ignored)."""
    return {"int8": 8.0, "fp8": 8.0, "int4": 4.0 + 24.0 / (group_size or INT4_GROUP),
            "nvfp4": 4.0 + 8.0 / NVFP4_BLOCK, "q4_1": 4.0 + 32.0 / GGUF_BLOCK, "q8_0": 8.0 + 16.0 / GGUF_BLOCK}[fmt]


def kv_bytes_per_value(fmt: str | None, dtype_bytes: int = 2) -> float:
    """Bytes one K or V element costs in the pool (scales included)."""
    return {None: float(dtype_bytes), "fp8": 1.0, "nvfp4": 0.5 + 1.0 / NVFP4_BLOCK}[fmt]


# ------------------------------------------------------------------------------------------ jnp versions

def jnp_round_fp8(y):
    """f32 -> f32 values on the float8_e4m3fn grid (RNE, saturating at +-448), computed arithmetically.

    NOTE: XLA on GPUs (xla_allow_excess_precision) drops a convert pair f32 -> f8 -> f32, bitcasts included,
    so a fake quantization written as casts does no rounding there. Scaling by the power of two of the value's
    binade (subnormals share the 2**-6 binade) and rounding half to even is exact in f32 and cannot be elided.
    """
    y = jnp.clip(y.astype(jnp.float32), -FP8_MAX, FP8_MAX)
    _, exp = jnp.frexp(y)  # |y| = m * 2**exp, m in [0.5, 1)
    step = jnp.ldexp(jnp.float32(1.0), jnp.maximum(exp - 1, -6) - 3)  # spacing of 3 mantissa bits
    return jnp.clip(jnp.round(y / step) * step, -FP8_MAX, FP8_MAX)


def jnp_to_fp8(y):
    """f32 -> float8_e4m3fn (RNE, saturating); the cast itself is exact (the value is already on the grid)."""
    return jnp_round_fp8(y).astype(jnp.float8_e4m3fn)


def jnp_quantize_fp8(x, scale):
    """x f32[..., H, D], scale f32[H] (per head) or f32[..., 1] -> e4m3 (same rule as to_fp8(x / scale))."""
    return jnp_to_fp8(x.astype(jnp.float32) / scale)


def jnp_fake_quant_fp8_rows(x):
    """Per-row (per-token) fp8 quantize + dequantize of x f32[M, K]: what W8A8 does to activations
    (quantize_fp8_tokens's rule)."""
    x32 = x.astype(jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(x32), axis=1, keepdims=True) / FP8_MAX, F32_TINY)
    return jnp_round_fp8(x32 * (jnp.float32(1.0) / scale)) * scale


def jnp_unpack_nibbles(packed):
    lo = packed & jnp.uint8(0xF)
    hi = packed >> jnp.uint8(4)
    return jnp.stack((lo, hi), axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def jnp_pack_nibbles(codes):
    return codes[..., 0::2] | (codes[..., 1::2] << jnp.uint8(4))


def jnp_e2m1_decode(code):
    table = jnp.asarray(E2M1_VALUES)
    mag = table[(code & 7).astype(jnp.int32)]
    return jnp.where((code & 8) != 0, -mag, mag)


def jnp_e2m1_encode(v):
    a = jnp.abs(v)
    code = jnp.zeros(v.shape, jnp.uint8)
    for mid, tie_up in _E2M1_MIDPOINTS:
        code = code + (a >= mid if tie_up else a > mid).astype(jnp.uint8)
    sign = (jnp.signbit(v) & ~jnp.isnan(v)).astype(jnp.uint8) << jnp.uint8(3)
    return code | sign


def jnp_nvfp4_scale_error(xb, amax, bs32, gs):
    """nvfp4_scale_error inside a traced graph (bs32: the block scales as f32 values)."""
    den = bs32 * gs
    ok = (den != 0) & (amax != 0)
    safe_den = jnp.where(ok, den, jnp.float32(1.0))
    y = xb / safe_den[..., None]
    mag = jnp.asarray(E2M1_VALUES)[(jnp_e2m1_encode(y) & 7).astype(jnp.int32)]
    r = (jnp.abs(y) - mag) * (safe_den / jnp.where(ok, amax, jnp.float32(1.0)))[..., None]
    e = jnp.floor(jnp.minimum(r * r, jnp.float32(4.0)) * jnp.float32(_SCALE_ERROR_ONE)).astype(jnp.int32)
    return jnp.where(ok, jnp.sum(e, axis=-1, dtype=jnp.int32), jnp.int32(0))


def _jnp_block_scales(xb, gs, scale_rule: str):
    """jnp nvfp4_block_scales as f32 values: xb f32[..., 16] -> f32[...]."""
    amax = jnp.max(jnp.abs(xb), axis=-1)
    bs32 = jnp_round_fp8(amax / E2M1_MAX / gs)
    if scale_rule == "mse46":
        s4 = jnp_round_fp8(amax / E2M1_ALT_MAX / gs)
        use4 = (jnp_nvfp4_scale_error(xb, amax, s4, gs) < jnp_nvfp4_scale_error(xb, amax, bs32, gs)) & (s4 != 0)
        bs32 = jnp.where(use4, s4, bs32)
    return bs32


def jnp_quantize_nvfp4(x, global_scale, scale_rule: str = "amax"):
    """x [..., D] -> (packed u8[..., D/2], block_scale e4m3[..., D/16]) with the given f32 global scale
    (block scales by `scale_rule`, see nvfp4_block_scales)."""
    check_scale_rule(scale_rule)
    d = x.shape[-1]
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], d // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = jnp.asarray(global_scale, jnp.float32)
    bs32 = _jnp_block_scales(xb, gs, scale_rule)
    bs = bs32.astype(jnp.float8_e4m3fn)
    denom = (bs32 * gs)[..., None]
    ok = denom != 0
    codes = jnp.where(ok, jnp_e2m1_encode(xb / jnp.where(ok, denom, 1.0)), jnp.uint8(0)).astype(jnp.uint8)
    return jnp_pack_nibbles(codes.reshape(x.shape)), bs


def jnp_quantize_nvfp4_feedback(x, global_scale, factor, scale_rule: str = "amax"):
    """quantize_nvfp4_feedback inside a traced graph: x [..., H, D], factor f32[H, D, D] -> (packed u8[..., D/2],
    block_scale e4m3[..., D/16]). One loop over the 16 elements of each block (the blocks unrolled)."""
    import jax

    check_scale_rule(scale_rule)
    d = x.shape[-1]
    gs = jnp.asarray(global_scale, jnp.float32)
    u = factor.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    codes = jnp.zeros(x.shape, jnp.uint8)
    scales = []
    for b in range(d // NVFP4_BLOCK):
        bs32 = _jnp_block_scales(xf[..., b * NVFP4_BLOCK:(b + 1) * NVFP4_BLOCK], gs, scale_rule)
        scales.append(bs32)
        den = bs32 * gs
        ok = den != 0
        safe = jnp.where(ok, den, jnp.float32(1.0))

        def step(j, carry, den=den, ok=ok, safe=safe):
            xf, codes = carry
            xj = jax.lax.dynamic_index_in_dim(xf, j, axis=-1, keepdims=False)
            c = jnp.where(ok, jnp_e2m1_encode(xj / safe), jnp.uint8(0)).astype(jnp.uint8)
            row = jax.lax.dynamic_index_in_dim(u, j, axis=1, keepdims=False)  # [H, D]: U[h, j, :]
            pivot = jax.lax.dynamic_index_in_dim(row, j, axis=-1, keepdims=False)  # [H]
            r = (xj - jnp_e2m1_decode(c) * den) / pivot
            later = jnp.arange(d) > j  # only the elements still to be coded move
            xf = jnp.where(later, xf - r[..., None] * row, xf)
            codes = jax.lax.dynamic_update_index_in_dim(codes, c[..., None], j, axis=-1)
            return xf, codes

        xf, codes = jax.lax.fori_loop(b * NVFP4_BLOCK, (b + 1) * NVFP4_BLOCK, step, (xf, codes))
    bs = jnp.stack(scales, axis=-1).astype(jnp.float8_e4m3fn)
    return jnp_pack_nibbles(codes), bs


def jnp_dequantize_nvfp4(packed, block_scale, global_scale):
    vals = jnp_e2m1_decode(jnp_unpack_nibbles(packed))
    d = vals.shape[-1]
    vb = vals.reshape(*vals.shape[:-1], d // NVFP4_BLOCK, NVFP4_BLOCK)
    denom = block_scale.astype(jnp.float32) * jnp.asarray(global_scale, jnp.float32)
    return (vb * denom[..., None]).reshape(vals.shape)


def jnp_dequantize_weight(fmt: str, *parts):
    """The weight f32[N, K] from its parts (WEIGHT_PARTS order), inside a traced graph."""
    if fmt in ("int8", "fp8"):
        q, scale = parts
        return q.astype(jnp.float32) * scale[:, None].astype(jnp.float32)
    if fmt == "int4":
        q, scale, zero = parts
        codes = jnp_unpack_nibbles(q).astype(jnp.float32)
        n, k = codes.shape
        groups = scale.shape[1]
        cg = codes.reshape(n, groups, k // groups)
        return ((cg - zero[..., None].astype(jnp.float32)) * scale[..., None].astype(jnp.float32)).reshape(n, k)
    if fmt == "nvfp4":
        return jnp_dequantize_nvfp4(*parts)
    if fmt == "q4_1":
        q, d, m = parts
        n, k = q.shape[0], q.shape[1] * 2
        qb = q.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK // 2)
        codes = jnp.concatenate([qb & 0xF, qb >> 4], axis=-1).astype(jnp.float32)  # GGUF order: low nibbles first
        w = d[..., None].astype(jnp.float32) * codes
        return (w + m[..., None].astype(jnp.float32)).reshape(n, k)
    if fmt == "q8_0":
        q, d = parts
        n, k = q.shape
        w = q.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK).astype(jnp.float32) * d[..., None].astype(jnp.float32)
        return w.reshape(n, k)
    raise FormatError(f"unknown weight format {fmt!r}")


def weight_part_types(fmt: str, shape: tuple[int, int], group_size: int | None = None) -> dict[str, tuple]:
    """{part: (shape, dtype name)} of a quantized [N, K] weight."""
    n, k = shape
    if fmt in ("int8", "fp8"):
        return {"q": ((n, k), "int8" if fmt == "int8" else "float8_e4m3fn"), "scale": ((n,), "float32")}
    if fmt == "int4":
        g = group_size or int4_group_size(k)
        return {"q": ((n, k // 2), "uint8"), "scale": ((n, k // g), "float16"), "zero": ((n, k // g), "uint8")}
    if fmt == "q4_1":
        return {"q": ((n, k // 2), "uint8"), "d": ((n, k // GGUF_BLOCK), "float16"),
                "m": ((n, k // GGUF_BLOCK), "float16")}
    if fmt == "q8_0":
        return {"q": ((n, k), "int8"), "d": ((n, k // GGUF_BLOCK), "float16")}
    return {"q": ((n, k // 2), "uint8"), "block_scale": ((n, k // NVFP4_BLOCK), "float8_e4m3fn"),
            "global_scale": ((), "float32")}


def hadamard(n: int) -> np.ndarray:
    """Orthonormal Hadamard matrix f64[n, n] (Sylvester; n a power of two)."""
    if n < 1 or n & (n - 1):
        raise FormatError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


# ------------------------------------------------------------------------------------------ GGUF-native formats
# compile_model(gguf_file, weights="gguf") keeps a checkpoint's Q4_1 / Q8_0 tensors as llama.cpp stores them
# (blocks of 32 along K) instead of dequantizing them to float32; the values are bit-identical to gguf-py's
# float32 dequantization (a multiply, then an add: no fused multiply-add), i.e. to the weights Hugging Face
# transformers loads from the same file.
#   "q4_1"  q u8[N, K/2], d f16[N, K/32], m f16[N, K/32]. Byte j (0..15) of block b holds the code of element
#           32b + j in its low nibble and of 32b + j + 16 in its high nibble (GGUF's order); w = d * code + m.
#   "q8_0"  q i8[N, K], d f16[N, K/32]; w = q * d.

GGUF_FORMATS = ("q4_1", "q8_0")
GGUF_BLOCK = 32
_GGUF_BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}  # f16 d (+ f16 m) + the codes of 32 values


def gguf_parts_from_blocks(fmt: str, raw: np.ndarray, shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """A GGUF tensor's raw block bytes (u8, row-major over [N, K]) -> this module's parts of format `fmt`."""
    if fmt not in GGUF_FORMATS:
        raise FormatError(f"unknown GGUF format {fmt!r}; known: {', '.join(GGUF_FORMATS)}")
    n, k = shape
    if k % GGUF_BLOCK:
        raise FormatError(f"{fmt}: K = {k} is not a multiple of the block size {GGUF_BLOCK}")
    size = _GGUF_BLOCK_BYTES[fmt]
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != n * (k // GGUF_BLOCK) * size:
        raise FormatError(f"{fmt}: {raw.size} bytes do not hold a [{n}, {k}] tensor ({size} bytes per block of 32)")
    blocks = raw.reshape(n, k // GGUF_BLOCK, size)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if fmt == "q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        return {"q": blocks[..., 4:].reshape(n, k // 2).copy(), "d": d, "m": m}
    return {"q": blocks[..., 2:].copy().view(np.int8).reshape(n, k), "d": d}


def dequantize_gguf(parts: Mapping[str, np.ndarray], fmt: str) -> np.ndarray:
    """f32[N, K] from GGUF-native parts, computed exactly as gguf-py does (float32 multiply, then add)."""
    d = parts["d"].astype(np.float32)[..., None]
    if fmt == "q4_1":
        q = parts["q"]
        n, k = q.shape[0], q.shape[1] * 2
        qb = q.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK // 2)
        codes = np.concatenate([qb & 0xF, qb >> 4], axis=-1).astype(np.float32)
        return ((d * codes) + parts["m"].astype(np.float32)[..., None]).reshape(n, k)
    if fmt == "q8_0":
        q = parts["q"]
        n, k = q.shape
        return (q.reshape(n, k // GGUF_BLOCK, GGUF_BLOCK).astype(np.float32) * d).reshape(n, k)
    raise FormatError(f"unknown GGUF format {fmt!r}")
