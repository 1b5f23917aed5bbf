"""RMSNorm and fused residual-add + RMSNorm as Pallas TPU kernels.

Semantics (match `lowering.ops.ref_rms_norm`):
    rms_norm(x, w)            = w.astype(x.dtype) * (x32 * rsqrt(mean(x32**2) + eps)).astype(x.dtype)
    add_rms_norm(x, r, w)     = (rms_norm(s, w), s) with s = x + r.astype(x.dtype) (rounded to x.dtype)

Block structure: a 1-D grid over row blocks. Each grid step loads a [block_rows, D] tile of x (and of the
residual) into VMEM -- D is always whole, so the row statistics are computed in one pass in f32 -- plus the
[1, D] weight (same block every step, so it is fetched once), and writes the [block_rows, D] output tile(s).
T need not be a multiple of block_rows: the last block is partial, its out-of-range rows are computed on
whatever the padding holds and never written back (rows are independent). The grid axis is "parallel".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tuning


def resolve_interpret(interpret):
    """None -> interpret mode (TPU semantics, `pltpu.InterpretParams()`) unless the first device is a TPU;
    True -> `pltpu.InterpretParams()`; False -> compile with Mosaic; an InterpretParams is passed through."""
    if interpret is None:
        interpret = jax.devices()[0].platform != "tpu"
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or False


def vmem_limit_bytes(estimate: int) -> int:
    """The scoped-VMEM limit asked of Mosaic for a kernel whose `vmem_bytes` estimate is `estimate`: 1.5x
    plus 4 MiB of headroom for Mosaic's internal scratch, at least 32 MiB (above v5e's 16 MiB default) and at
    most 56 MiB (v7 has 64 MiB of VMEM per core)."""
    return int(min(max(1.5 * estimate + (4 << 20), 32 << 20), 56 << 20))


def _row_block(num_rows: int, block_rows: int, itemsize: int) -> int:
    """block_rows rounded to the dtype's sublane tiling (8 rows of 32-bit, 16 of 16-bit, 32 of 8-bit), or
    all the rows when they fit in one block (a full dim is always a legal block dim)."""
    sub = 8 * max(1, 4 // itemsize)
    block_rows = max(sub, (block_rows // sub) * sub)
    return num_rows if num_rows <= block_rows else block_rows


def vmem_bytes(block_rows: int, hidden: int, dtype_bytes: int = 2, *, fused_add: bool = True,
               weight_bytes: int = 4) -> int:
    """VMEM footprint of one kernel instance: double-buffered input and output tiles, the (double-buffered)
    weight row, and ~2 f32 temporaries of the tile (the upcast rows and the normalized rows).

        tiles  = 2 * block_rows * hidden * dtype_bytes * (4 if fused_add else 2)   # x, r | normed, summed
        weight = 2 * hidden * weight_bytes
        temps  = 2 * block_rows * hidden * 4
    """
    n_tiles = 4 if fused_add else 2
    return (2 * block_rows * hidden * dtype_bytes * n_tiles + 2 * hidden * weight_bytes
            + 2 * block_rows * hidden * 4)


def _normalize(s, w, eps, out_dtype):
    s32 = s.astype(jnp.float32)
    var = jnp.mean(s32 * s32, axis=-1, keepdims=True)
    normed = (s32 * jax.lax.rsqrt(var + eps)).astype(out_dtype)
    return w.astype(out_dtype) * normed


def _add_rms_kernel(x_ref, r_ref, w_ref, normed_ref, summed_ref, *, eps):
    s = x_ref[...] + r_ref[...].astype(x_ref.dtype)
    summed_ref[...] = s
    normed_ref[...] = _normalize(s, w_ref[...], eps, normed_ref.dtype)


def _rms_kernel(x_ref, w_ref, normed_ref, *, eps):
    normed_ref[...] = _normalize(x_ref[...], w_ref[...], eps, normed_ref.dtype)


def _norm_call(kernel, arrays, weight, n_out, block_rows, interpret):
    x = arrays[0]
    t, d = x.shape
    if block_rows is None:
        block_rows = tuning.block_sizes("add_rms_norm")["block_rows"]
    br = _row_block(t, block_rows, x.dtype.itemsize)
    row_spec = pl.BlockSpec((br, d), lambda i: (i, 0))
    vmem_limit = vmem_limit_bytes(vmem_bytes(br, d, x.dtype.itemsize, fused_add=len(arrays) == 2,
                                             weight_bytes=weight.dtype.itemsize))
    out_shape = [jax.ShapeDtypeStruct((t, d), x.dtype)] * n_out
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, br),),
        in_specs=[row_spec] * len(arrays) + [pl.BlockSpec((1, d), lambda i: (0, 0))],
        out_specs=[row_spec] * n_out,
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit),
        interpret=resolve_interpret(interpret),
        name=kernel.func.__name__.strip("_"),
    )(*arrays, weight.reshape(1, d))


def add_rms_norm(x, residual, weight, *, eps, block_rows=None, interpret=None):
    """x, residual: [T, D]; weight: [D] -> (normed [T, D], summed [T, D]), both x.dtype."""
    normed, summed = _norm_call(functools.partial(_add_rms_kernel, eps=float(eps)), (x, residual), weight, 2,
                                block_rows, interpret)
    return normed, summed


def rms_norm(x, weight, *, eps, block_rows=None, interpret=None):
    """x: [T, D]; weight: [D] -> [T, D] (x.dtype), = lowering.ops.ref_rms_norm."""
    (normed,) = _norm_call(functools.partial(_rms_kernel, eps=float(eps)), (x,), weight, 1, block_rows, interpret)
    return normed
