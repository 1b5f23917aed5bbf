"""Weight-only quantized matmul (y = x @ dequant(W)^T [+ bias]) as a Pallas TPU kernel.

Semantics: `lowering.ops.ref_qlinear` for the formats of `lowering.quant.formats` -- int8 and fp8 (per-row
f32 scale), int4 (asymmetric per group of G along K: packed nibbles u8[N, K/2], element 2i in the low
nibble, f16 scale and u8 zero [N, K/G]), nvfp4 (packed E2M1 u8[N, K/2], e4m3 block scales [N, K/16], f32[]
global scale), and the GGUF-native q4_1 (u8[N, K/2] in GGUF's nibble order, f16 d and m [N, K/32],
W = d * code + m) and q8_0 (i8[N, K], f16 d [N, K/32]). Weight tiles are dequantized in VMEM; accumulation
is f32; the output has x's dtype. act_format="fp8" (W8A8) and other formats raise NotImplementedError (the
backend keeps XLA for them).

Block structure: grid (M/bm, N/bn, K/bk), K innermost ("arbitrary"), M and N "parallel"; an f32 [bm, bn]
VMEM accumulator is zeroed at k == 0 and written out (scaled, + bias, cast) at the last k.
  * int8 / fp8: x tile [bm, bk], weight tile q [bn, bk] (converted to x.dtype exactly: |q| <= 127 / e4m3
    values fit bf16) contracted on K ("NT" matmul); the per-row scale [1, bn] multiplies the accumulator.
  * grouped formats (int4, nvfp4, q4_1, q8_0): the weight tile (packed: q [bn, bk/2]; q8_0: [bn, bk]) is
    widened to i32 and transposed to [K, N] orientation; packed tiles are split into their low and high
    nibbles, each decoded to f32. The x columns each nibble plane multiplies are split in XLA before the
    kernel (int4/nvfp4: x[:, 0::2] and x[:, 1::2]; q4_1: the two 16-column halves of each 32-block; cheap
    next to the weight), so no lane interleave is ever needed:
        acc += x_lo[bm, bk/2] @ W_lo[bk/2, bn] + x_hi[bm, bk/2] @ W_hi[bk/2, bn]     (q8_0: one term)
    In this orientation a group's scale is a sublane broadcast: the scales of the bn rows come whole
    ([bn, K/G] blocks, full last dim, fetched once per column of tiles), are transposed at k == 0 into f32
    VMEM scratch [K/G, bn] (int4 zeros and q4_1 m too), and each k step takes its bk/G rows (an aligned
    dynamic sublane slice) and broadcasts each to the G/2 (q8_0: G) rows it covers. int4: W = (code - zero)
    * scale; nvfp4: W = e2m1(code) * block_scale (exact in bf16), the global scale (SMEM) multiplies the
    accumulator; q4_1: W = d * code + m; q8_0: W = code * d. W is cast to x.dtype for the MXU.
Ragged shapes: T and N need not divide bm, bn -- edge blocks are partial; their out-of-range rows/columns
are computed on padding and never written. K must be tiled exactly (garbage would enter the sum), so bk is
chosen among divisors of K that respect the TPU tiling (see `_pick_block_k`), else bk = K (a full dim).
The scoped-VMEM limit asked of Mosaic follows `vmem_bytes` (norms.vmem_limit_bytes).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tuning
from kernels_pallas.norms import resolve_interpret, vmem_limit_bytes
from lowering.quant import formats

NVFP4_BLOCK = formats.NVFP4_BLOCK


def _round_down(x: int, m: int) -> int:
    return max(m, (x // m) * m)


KERNEL_FORMATS = ("int8", "fp8", "int4", "nvfp4", "q4_1", "q8_0")


def _group(fmt: str, group_size: int | None) -> int:
    """Elements along K that share one scale (grouped formats)."""
    return {"int4": group_size, "nvfp4": NVFP4_BLOCK}.get(fmt, formats.GGUF_BLOCK)


def _x_parts(x, fmt):
    """The columns of x each nibble plane multiplies: int4/nvfp4 pack elements (2i, 2i+1) in a byte, so
    (x[:, 0::2], x[:, 1::2]); q4_1 packs (32b + j, 32b + 16 + j), so the two 16-column halves of each 32-block;
    q8_0 is not packed: (x,)."""
    t, k = x.shape
    if fmt == "q8_0":
        return [x]
    if fmt == "q4_1":
        xb = x.reshape(t, k // 32, 2, 16)
        return [xb[:, :, 0, :].reshape(t, k // 2), xb[:, :, 1, :].reshape(t, k // 2)]
    return [x[:, 0::2], x[:, 1::2]]


def _k_unit(fmt: str, group_size: int | None) -> int:
    """bk must be a multiple of this (or be K): lane-dense tiles (128 lanes of x and of q; bk/2 for packed
    formats), and for grouped formats a whole number of 8-row (f32 sublane) slices of the scale scratch."""
    if fmt in ("int8", "fp8"):
        return 128
    if fmt == "q8_0":  # not packed: 128 lanes of q; 8 groups of 32
        return 256
    return math.lcm(256, 8 * _group(fmt, group_size))


def _pick_block_k(k: int, fmt: str, group_size: int | None, block_k: int) -> int:
    unit = _k_unit(fmt, group_size)
    valid = [c for c in range(unit, k, unit) if k % c == 0]
    if not valid:
        return k
    fitting = [c for c in valid if c <= block_k]
    return max(fitting) if fitting else min(valid)


def pick_blocks(t: int, n: int, k: int, fmt: str, group_size: int | None = None, block_m: int | None = None,
                block_n: int | None = None, block_k: int | None = None) -> tuple[int, int, int]:
    """(bm, bn, bk) actually used: tuning defaults, rounded to the TPU tiling, a full dim when it fits."""
    d = tuning.block_sizes("quantized_matmul")
    block_m, block_n, block_k = block_m or d["block_m"], block_n or d["block_n"], block_k or d["block_k"]
    bm = _round_down(block_m, 16)
    bm = t if t <= bm else bm
    bn = n if n <= block_n else _round_down(block_n, 128)
    bk = _pick_block_k(k, fmt, group_size, block_k)
    return bm, bn, bk


def vmem_bytes(fmt: str, block_m: int, block_n: int, block_k: int, in_features: int, group_size: int | None = None,
               x_bytes: int = 2, bias: bool = False) -> int:
    """VMEM footprint estimate of one kernel instance (pipelined operands double-buffered):
        x tiles      2 * bm * bk * x_bytes                 (packed formats: two [bm, bk/2] halves)
        weight tile  2 * bn * bk * w_bytes                 (w_bytes: 1 int8/fp8/q8_0, 1/2 int4/nvfp4/q4_1)
        scales       int8/fp8: 2 * bn * 4;  grouped (K/G groups): 2 * bn * (K/G) * sb (sb: bytes of the
                     scale parts: int4 3 (f16 + u8), nvfp4 1, q4_1 4 (2 x f16), q8_0 2) + f32 scratch
                     (K/G) * bn * 4 per scale part (int4, q4_1: 2; nvfp4, q8_0: 1)
        out tile     2 * bm * bn * x_bytes;   accumulator  bm * bn * 4;   bias 2 * bn * 4
        temporaries  dequantized weight: int8/fp8 bk * bn * (4 + x_bytes); grouped (codes, expanded scales,
                     f32 weight) ~ 3 * bk * bn * 4
    """
    bm, bn, bk, k = block_m, block_n, block_k, in_features
    total = 2 * bm * bk * x_bytes + 2 * bm * bn * x_bytes + bm * bn * 4 + (2 * bn * 4 if bias else 0)
    if fmt in ("int8", "fp8"):
        return total + 2 * bn * bk + 2 * bn * 4 + bk * bn * (4 + x_bytes)
    w_bytes = 1.0 if fmt == "q8_0" else 0.5
    total += int(2 * bn * bk * w_bytes) + 3 * bk * bn * 4
    if fmt == "int4":
        group_size = group_size or formats.int4_group_size(k)
    groups = k // _group(fmt, group_size)
    scale_bytes, n_scratch = {"int4": (3, 2), "nvfp4": (1, 1), "q4_1": (4, 2), "q8_0": (2, 1)}[fmt]
    return total + 2 * bn * groups * scale_bytes + n_scratch * groups * bn * 4


# ------------------------------------------------------------------------------------------ kernels

def _e2m1_decode(code):
    """i32 codes in [0, 15] -> f32 E2M1 values, arithmetically (no table gather in Mosaic)."""
    m = code & 7
    e = m >> 1
    mant = m & 1
    big = ((2 + mant) << e).astype(jnp.float32) * 0.25  # m >= 2: (1 + mant/2) * 2**(e-1)
    mag = jnp.where(m < 2, m.astype(jnp.float32) * 0.5, big)
    return jnp.where((code & 8) != 0, -mag, mag)


def _expand_rows(s, rows_per_group):
    """[g, bn] -> [g * rows_per_group, bn], each row repeated (a sublane broadcast)."""
    g, bn = s.shape
    return jnp.broadcast_to(s[:, None, :], (g, rows_per_group, bn)).reshape(g * rows_per_group, bn)


def _dense_kernel(x_ref, q_ref, s_ref, *rest, has_bias, n_k):
    if has_bias:
        b_ref, o_ref, acc_ref = rest
    else:
        (o_ref, acc_ref), b_ref = rest, None
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    x = x_ref[...]
    w = q_ref[...].astype(x.dtype)
    acc_ref[...] += jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    @pl.when(k == n_k - 1)
    def _done():
        y = acc_ref[...] * s_ref[...]
        if b_ref is not None:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def _grouped_kernel(*refs, fmt, n_x, has_bias, n_k, rows_per_group, groups_per_tile):
    """int4 / nvfp4 / q4_1 (packed nibbles, n_x = 2 x halves) and q8_0 (int8 codes, n_x = 1)."""
    refs = list(refs)
    x_refs, q_ref = refs[:n_x], refs[n_x]
    rest = refs[n_x + 1:]
    s_ref = rest.pop(0)  # group scales [bn, K/G]: int4 scale, nvfp4 block_scale, GGUF d
    z_ref = rest.pop(0) if fmt in ("int4", "q4_1") else None  # int4 zero, q4_1 m
    gs_ref = rest.pop(0) if fmt == "nvfp4" else None
    b_ref = rest.pop(0) if has_bias else None
    o_ref, acc_ref, st_ref = rest[:3]
    zt_ref = rest[3] if z_ref is not None else None
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)
        st_ref[...] = s_ref[...].astype(jnp.float32).T
        if zt_ref is not None:
            zt_ref[...] = z_ref[...].astype(jnp.float32).T

    if n_k == 1:
        rows = slice(None)
    else:
        rows = pl.ds(pl.multiple_of(k * groups_per_tile, groups_per_tile), groups_per_tile)
    scale = _expand_rows(st_ref[rows, :], rows_per_group)  # f32[rows of the tile, bn]
    zero = _expand_rows(zt_ref[rows, :], rows_per_group) if zt_ref is not None else None
    qt = q_ref[...].astype(jnp.int32).T  # [bk/2 or bk, bn]
    codes = [qt] if n_x == 1 else [qt & 15, (qt >> 4) & 15]
    xdt = x_refs[0].dtype
    acc = acc_ref[...]
    for x_ref, code in zip(x_refs, codes):
        if fmt == "int4":
            w = (code.astype(jnp.float32) - zero) * scale
        elif fmt == "nvfp4":
            w = _e2m1_decode(code) * scale
        elif fmt == "q4_1":
            w = scale * code.astype(jnp.float32) + zero
        else:  # q8_0
            w = code.astype(jnp.float32) * scale
        acc += jnp.dot(x_ref[...], w.astype(xdt), preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == n_k - 1)
    def _done():
        y = acc_ref[...]
        if gs_ref is not None:
            y = y * gs_ref[0, 0]
        if b_ref is not None:
            y = y + b_ref[...]
        o_ref[...] = y.astype(o_ref.dtype)


def quantized_matmul(x, *parts, format, in_features, out_features, group_size=None, bias=None, act_format=None,
                     block_m=None, block_n=None, block_k=None, interpret=None):
    """x: [T, K]; parts: formats.WEIGHT_PARTS[format] of a [N, K] weight; bias: [N] or None -> [T, N] x.dtype."""
    if act_format is not None:
        raise NotImplementedError(f"quantized_matmul: act_format={act_format!r} (W8A8) is not implemented")
    if format not in KERNEL_FORMATS:
        raise NotImplementedError(f"quantized_matmul: format {format!r} has no kernel (have {KERNEL_FORMATS})")
    n_parts = len(formats.WEIGHT_PARTS[format])
    if len(parts) == n_parts + 1 and bias is None:  # the op's calling convention: parts then bias
        parts, bias = parts[:n_parts], parts[n_parts]
    if len(parts) != n_parts:
        raise ValueError(f"quantized_matmul: {format} takes parts {formats.WEIGHT_PARTS[format]}, got {len(parts)}")
    t, kdim = x.shape
    n = out_features
    if kdim != in_features:
        raise ValueError(f"quantized_matmul: x has {kdim} features, the weight {in_features}")
    if format == "int4":
        group_size = in_features // parts[1].shape[1]
    if format in formats.GGUF_FORMATS and kdim % formats.GGUF_BLOCK:
        raise ValueError(f"quantized_matmul: {format} needs K divisible by {formats.GGUF_BLOCK}, got {kdim}")
    bm, bn, bk = pick_blocks(t, n, kdim, format, group_size, block_m, block_n, block_k)
    n_k = kdim // bk
    vmem_limit = vmem_limit_bytes(vmem_bytes(format, bm, bn, bk, kdim, group_size, x.dtype.itemsize, bias is not None))
    grid = (pl.cdiv(t, bm), pl.cdiv(n, bn), n_k)
    has_bias = bias is not None
    bias_args = [bias.astype(jnp.float32).reshape(1, n)] if has_bias else []
    row_vec_spec = pl.BlockSpec((1, bn), lambda i, j, k: (0, j))
    out_spec = pl.BlockSpec((bm, bn), lambda i, j, k: (i, j))
    scratch = [pltpu.VMEM((bm, bn), jnp.float32)]

    if format in ("int8", "fp8"):
        q, scale = parts
        kernel = functools.partial(_dense_kernel, has_bias=has_bias, n_k=n_k)
        in_specs = [pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)), pl.BlockSpec((bn, bk), lambda i, j, k: (j, k)),
                    row_vec_spec] + [row_vec_spec] * has_bias
        args = [x, q, scale.astype(jnp.float32).reshape(1, n)] + bias_args
    else:
        q = parts[0]
        group = _group(format, group_size)
        groups = kdim // group
        packed = format != "q8_0"
        n_x = 2 if packed else 1
        tile_k = bk // 2 if packed else bk  # columns of q (and of each x part) per K step
        kernel = functools.partial(_grouped_kernel, fmt=format, n_x=n_x, has_bias=has_bias, n_k=n_k,
                                   rows_per_group=group // 2 if packed else group, groups_per_tile=bk // group)
        x_spec = pl.BlockSpec((bm, tile_k), lambda i, j, k: (i, k))
        scale_spec = pl.BlockSpec((bn, groups), lambda i, j, k: (j, 0))  # whole rows: fetched once per j
        in_specs = [x_spec] * n_x + [pl.BlockSpec((bn, tile_k), lambda i, j, k: (j, k)), scale_spec]
        args = _x_parts(x, format) + [q, parts[1]]
        if format in ("int4", "q4_1"):
            in_specs.append(scale_spec)
            args.append(parts[2])
        if format == "nvfp4":
            in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
            args.append(jnp.asarray(parts[2], jnp.float32).reshape(1, 1))
        in_specs += [row_vec_spec] * has_bias
        args += bias_args
        scratch += [pltpu.VMEM((groups, bn), jnp.float32)] * (2 if format in ("int4", "q4_1") else 1)

    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        out_shape=jax.ShapeDtypeStruct((t, n), x.dtype),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        interpret=resolve_interpret(interpret),
        name=f"quantized_matmul_{format}",
    )(*args)
