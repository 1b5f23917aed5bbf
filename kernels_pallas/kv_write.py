"""KV-cache write (quantization on write) as a Pallas TPU kernel: each token's K and V rows scattered to
their slots of the paged pools, in place.

Semantics: exactly `lowering.ops.ref_kv_write` / `ref_kv_write_nvfp4` -- slot = block * Bs + offset,
slot < 0 (or >= N * Bs) skips the token; stored bytes are bit-identical to the reference.

Where the encoding happens (checked by exporting each encoder inside a Pallas kernel for TPU):
  * plain and fp8 (default encode_in_kernel=True): in the kernel. Each step's raw rows [R, Hkv, Dh] are
    encoded in VMEM with `formats.jnp_quantize_fp8` (x / scale[head], its [Hkv, 1] scale tile) and a cast to
    the pool dtype -- the same functions `lowering.ops.kv_rows_to_store` calls, so the bytes are identical
    and follow any change of the encoder -- into a VMEM scratch tile the DMAs read from.
  * nvfp4: in XLA just before the kernel, with `lowering.ops.kv_rows_to_store` itself (the reference's own
    code path). `formats.jnp_quantize_nvfp4` does not lower in Mosaic: nibble packing takes every other lane
    (`codes[..., 0::2]`), a lane-strided slice ("'vector.extract_strided_slice' op expected strides to be
    confined to 1"). The encode is one elementwise XLA fusion over [T, Hkv*Dh], tiny next to the pools, and
    the kernel scatters the encoded rows (codes u8[T, Hkv, Dh/2] and block scales e4m3[T, Hkv, Dh/16]).
    encode_in_kernel=False takes this path for plain/fp8 too (a fallback should a chip's Mosaic reject an
    in-kernel fp8 conversion).
  * The scatter: the pools stay in HBM (`memory_space=pl.ANY`) and are aliased input->output
    (`input_output_aliases`; donate them at the jit boundary for a true in-place update), so only the written
    rows move. slot_mapping is scalar-prefetched into SMEM.

Block structure: a 1-D grid over blocks of R = `rows_per_step` tokens. Each step gets, per pool p, a VMEM
tile [R, Hkv, D'_p] of rows (BlockSpec-pipelined: the next step's rows load while this step's DMAs run; the
last two dims are whole, so any D' is a legal tile), encoded into a [R, Hkv, D'_p] VMEM scratch when the
kernel encodes. For each token i of the step with a valid slot it starts one async DMA per pool, VMEM
(encoded) rows[i] -> HBM pool[block, offset] ([Hkv, D'_p], contiguous in the pool), each with its own DMA
semaphore (scratch DMA[n_pools, R]); then it waits on exactly the DMAs it started (same predicate), so all
of a step's copies are in flight together and none outlives the step (its VMEM source tile is overwritten
by a later step). T need not be a multiple of R: slot_mapping is padded with -1, so the rows past T are
never copied. The grid axis is "arbitrary" (sequential): with duplicate slots the later token wins across
steps, as in a sequential scatter (duplicates within one step race, as they do in XLA's scatter).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tuning
from kernels_pallas.norms import resolve_interpret
from lowering import ops
from lowering.quant import formats

DEFAULT_ROWS_PER_STEP = 16


def _rows_per_step(rows_per_step):
    if rows_per_step is None:
        try:
            rows_per_step = tuning.block_sizes("kv_write")["rows_per_step"]
        except KeyError:
            rows_per_step = DEFAULT_ROWS_PER_STEP
    return max(1, int(rows_per_step))


def vmem_bytes(rows_per_step: int, num_kv_heads: int, head_dim: int, kv_format: str | None = None,
               dtype_bytes: int = 2, *, encode_in_kernel: bool = True, pool_dtype_bytes: int | None = None) -> int:
    """VMEM footprint (DMA semaphores and the SMEM slot_mapping aside), with each [Hkv, D'] tile padded to
    the 128-lane tiling (rup(b) = b rounded up to 128 bytes; Hkv rows; R = rows_per_step):
      encoded in XLA (nvfp4 always; plain/fp8 with encode_in_kernel=False): the double-buffered encoded-row
        tiles of every pool,  2 * R * Hkv * sum_p rup(D'_p * itemsize_p)  with per pool
        plain: Dh * pool_dtype_bytes;  fp8: Dh;  nvfp4: Dh/2 (codes) and Dh/16 (block scales);
      encoded in the kernel (plain/fp8): the double-buffered raw input tiles plus one encoded scratch tile,
        per pool  2 * R * Hkv * rup(Dh * dtype_bytes) + R * Hkv * rup(Dh * pool_bytes)  (+ the [Hkv, 1] scales).
    dtype_bytes: the input (k, v) element size; pool_dtype_bytes defaults to dtype_bytes for plain pools.
    encode_in_kernel defaults to what kv_write does by default (True; nvfp4 ignores it)."""
    rup = lambda b: -(-b // 128) * 128  # noqa: E731
    r, h = rows_per_step, num_kv_heads
    if kv_format == "nvfp4":
        return 2 * r * h * (2 * rup(head_dim // 2) + 2 * rup(head_dim // 16))
    pool_bytes = 1 if kv_format == "fp8" else (pool_dtype_bytes or dtype_bytes)
    if not encode_in_kernel:
        return 2 * r * h * 2 * rup(head_dim * pool_bytes)
    return 2 * (2 * r * h * rup(head_dim * dtype_bytes) + r * h * rup(head_dim * pool_bytes))


def _scatter_kernel(slots_ref, *refs, n_pools, n_scales, encode, rows_per_step, block_size, num_slots):
    row_refs = refs[:n_pools]
    scale_refs = refs[n_pools:n_pools + n_scales]
    at = n_pools + n_scales + n_pools  # skip the aliased pool inputs: the kernel writes through the outputs
    out_refs = refs[at:at + n_pools]
    enc_refs = refs[at + n_pools:at + 2 * n_pools] if encode else row_refs
    sems = refs[-1]
    base = pl.program_id(0) * rows_per_step

    if encode:  # quantization on write: the step's rows encoded into VMEM, then DMA'd from there
        for p in range(n_pools):
            rows = row_refs[p][...]
            if n_scales:
                rows = formats.jnp_quantize_fp8(rows, scale_refs[p][...])  # [R, H, D] / [H, 1]
            enc_refs[p][...] = rows.astype(enc_refs[p].dtype)

    def copies(i, slot):
        # slot >= 0 here: truncating div/rem (floor division would emit a sign op, whose Mosaic lowering
        # needs the TPU generation at trace time)
        blk, off = jax.lax.div(slot, block_size), jax.lax.rem(slot, block_size)
        return [pltpu.make_async_copy(enc_refs[p].at[i], out_refs[p].at[blk, off], sems.at[p, i])
                for p in range(n_pools)]

    def valid(slot):
        return jnp.logical_and(slot >= 0, slot < num_slots)

    slots = [slots_ref[base + i] for i in range(rows_per_step)]
    for i in range(rows_per_step):
        @pl.when(valid(slots[i]))
        def _start(i=i):
            for c in copies(i, slots[i]):
                c.start()
    for i in range(rows_per_step):
        @pl.when(valid(slots[i]))
        def _wait(i=i):
            for c in copies(i, slots[i]):
                c.wait()


def scatter_rows(slot_mapping, pairs, *, scales=(), encode=False, rows_per_step=None, interpret=None):
    """pairs: [(rows [T, Hkv, D'], pool [N, Bs, Hkv, D'])] -> pools with row t written at slot_mapping[t]
    (slot < 0 or past the pool skipped). The Pallas counterpart of `lowering.ops._scatter_rows`.

    encode=False: rows are already in the pool's encoding. encode=True: rows are raw ([T, Hkv, Dh], any float
    dtype) and the kernel encodes them -- to the pool dtype, through formats.jnp_quantize_fp8 with
    scales[p] f32[Hkv, 1] first when scales are given."""
    n = len(pairs)
    t = pairs[0][0].shape[0]
    if t == 0:
        return tuple(pool for _, pool in pairs)
    num_blocks, block_size = pairs[0][1].shape[:2]
    r = min(_rows_per_step(rows_per_step), max(t, 1))
    steps = pl.cdiv(t, r)
    slots = jnp.full((steps * r,), -1, jnp.int32).at[:t].set(slot_mapping.astype(jnp.int32))
    rows = [x if encode else x.astype(pool.dtype) for x, pool in pairs]
    pools = [pool for _, pool in pairs]
    scales = [s.astype(jnp.float32).reshape(-1, 1) for s in scales]
    row_specs = [pl.BlockSpec((r, *x.shape[1:]), lambda s, slots_ref: (s, 0, 0)) for x in rows]
    scale_specs = [pl.BlockSpec(s.shape, lambda s_, slots_ref: (0, 0)) for s in scales]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    scratch = [pltpu.VMEM((r, *pool.shape[2:]), pool.dtype) for pool in pools] if encode else []
    kernel = functools.partial(_scatter_kernel, n_pools=n, n_scales=len(scales), encode=encode, rows_per_step=r,
                               block_size=block_size, num_slots=num_blocks * block_size)
    first_pool = 1 + n + len(scales)  # operand indices count the scalar-prefetch operand (slots = 0)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(steps,),
            in_specs=row_specs + scale_specs + [any_spec] * n,
            out_specs=[any_spec] * n,
            scratch_shapes=scratch + [pltpu.SemaphoreType.DMA((n, r))],
        ),
        out_shape=[jax.ShapeDtypeStruct(p.shape, p.dtype) for p in pools],
        input_output_aliases={first_pool + p: p for p in range(n)},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=resolve_interpret(interpret),
        name="kv_write",
    )(slots, *rows, *scales, *pools)
    return tuple(out)


def kv_write(k, v, slot_mapping, k_pool, v_pool, *scales, kv_format=None, interpret=None, rows_per_step=None,
             encode_in_kernel=True):
    """k, v: [T, Hkv*Dh]; slot_mapping: i32[T] (-1 = skip); pools [N, Bs, Hkv, Dh] (f32/bf16, or
    float8_e4m3fn with kv_format="fp8" and scales (k_scale, v_scale) f32[Hkv]) -> (k_pool, v_pool).

    encode_in_kernel=False encodes in XLA (lowering.ops.kv_rows_to_store) and only scatters in the kernel."""
    if kv_format not in (None, "fp8"):
        raise ValueError(f"kv_write: kv_format {kv_format!r} (nvfp4 goes through kv_write_nvfp4)")
    if kv_format == "fp8" and len(scales) != 2:
        raise ValueError("kv_write: kv_format 'fp8' takes (k_scale, v_scale)")
    if not encode_in_kernel:
        pairs = ops.kv_rows_to_store(k, v, (k_pool, v_pool), scales, kv_format)
        return scatter_rows(slot_mapping, pairs, rows_per_step=rows_per_step, interpret=interpret)
    heads, dh = k_pool.shape[2:]
    pairs = [(k.reshape(-1, heads, dh), k_pool), (v.reshape(-1, heads, dh), v_pool)]
    return scatter_rows(slot_mapping, pairs, scales=scales if kv_format == "fp8" else (), encode=True,
                        rows_per_step=rows_per_step, interpret=interpret)


def kv_write_nvfp4(k, v, slot_mapping, k_pool, v_pool, k_block_scale, v_block_scale, k_scale, v_scale,
                   k_center=None, k_feedback=None, *, scale_rule="amax", interpret=None, rows_per_step=None):
    """k, v: [T, Hkv*Dh]; pools u8[N, Bs, Hkv, Dh/2]; block scales e4m3[N, Bs, Hkv, Dh/16]; k_scale, v_scale:
    f32[]; k_center: optional f32[Hkv, Dh] subtracted from K before quantizing; k_feedback: optional
    f32[Hkv, Dh, Dh], score-aware rounding of K (formats.quantize_nvfp4_feedback); scale_rule: how block scales
    are chosen (formats.NVFP4_SCALE_RULES) -> (k_pool, v_pool, k_block_scale, v_block_scale).
    Same inputs and attributes as lowering.ops.ref_kv_write_nvfp4; the encode is its own kv_rows_to_store."""
    extra = {} if k_center is None and k_feedback is None and scale_rule == "amax" else {
        "scale_rule": scale_rule, "k_center": k_center, "k_feedback": k_feedback}
    pairs = ops.kv_rows_to_store(k, v, (k_pool, v_pool, k_block_scale, v_block_scale), (k_scale, v_scale),
                                 "nvfp4", **extra)
    return scatter_rows(slot_mapping, pairs, rows_per_step=rows_per_step, interpret=interpret)
