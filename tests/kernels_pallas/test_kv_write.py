"""Pallas TPU kv_write: stored bytes bit-identical to lowering.ops.ref_kv_write(_nvfp4), untouched slots
untouched, skipped tokens skipped (interpret mode); and the Pallas -> Mosaic lowering for Llama-3-8B shapes."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import kv_write as kw
from lowering import ops

T, H, D, N, BS = 13, 2, 32, 5, 4  # 20 slots, 13 tokens, 4 tokens per grid step (a partial last step)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((T, H * D)) * 2, jnp.float32)
    v = jnp.asarray(rng.standard_normal((T, H * D)) * 2, jnp.float32)
    slots = rng.permutation(N * BS)[:T].astype(np.int32)
    slots[3] = -1  # skipped
    slots[7] = -1
    slots[10] = N * BS + 5  # out of range: dropped, as the reference's scatter drops it
    return k, v, jnp.asarray(slots)


def _same_bytes(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


def _check_untouched(pool, slots, fill_bytes):
    flat = np.asarray(pool).view(np.uint8).reshape(N * BS, -1)
    written = {int(s) for s in np.asarray(slots) if 0 <= s < N * BS}
    for s in range(N * BS):
        if s not in written:
            np.testing.assert_array_equal(flat[s], fill_bytes)


@pytest.mark.parametrize("fmt,in_kernel", [("float32", True), ("bfloat16", True), ("fp8", True), ("fp8", False)])
def test_kv_write_bit_identical(fmt, in_kernel):
    k, v, slots = _inputs()
    dtype = jnp.float8_e4m3fn if fmt == "fp8" else jnp.dtype(fmt)
    pool = jnp.full((N, BS, H, D), jnp.nan, dtype)
    scales = (jnp.asarray([0.01, 0.02], jnp.float32), jnp.asarray([0.015, 0.03], jnp.float32)) if fmt == "fp8" else ()
    kv_format = "fp8" if fmt == "fp8" else None
    k_in, v_in = (k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)) if fmt == "bfloat16" else (k, v)
    out = kw.kv_write(k_in, v_in, slots, pool, pool, *scales, kv_format=kv_format, rows_per_step=4,
                      encode_in_kernel=in_kernel, interpret=True)
    ref = ops.ref_kv_write(k_in, v_in, slots, pool, pool, *scales, kv_format=kv_format)
    fill = np.asarray(pool).view(np.uint8).reshape(N * BS, -1)[0]
    for got, want in zip(out, ref):
        _same_bytes(got, want)
        _check_untouched(got, slots, fill)
    if fmt == "fp8":  # saturation happened somewhere (|x| / 0.01 > 448), and was stored as the reference does
        assert np.any(np.abs(np.asarray(out[0], np.float32)) == 448)


@pytest.mark.parametrize("variant", ["amax", "mse46+k_center"])
def test_kv_write_nvfp4_bit_identical_with_race_detection(variant):
    k, v, slots = _inputs(seed=1)
    pool = jnp.full((N, BS, H, D // 2), 0xFF, jnp.uint8)
    bscale = jnp.full((N, BS, H, D // 16), jnp.nan, jnp.float8_e4m3fn)
    gs = (jnp.float32(0.004), jnp.float32(0.002))
    if variant == "amax":
        extra, kwargs = (), {}
    else:  # the calibrated K centering and the mse46 block-scale rule of the nvfp4 KV encoder
        extra = (jnp.asarray(np.random.default_rng(2).standard_normal((H, D)), jnp.float32),)
        kwargs = {"scale_rule": "mse46"}
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    out = kw.kv_write_nvfp4(k, v, slots, pool, pool, bscale, bscale, *gs, *extra, **kwargs, rows_per_step=4,
                            interpret=params)
    ref = ops.ref_kv_write_nvfp4(k, v, slots, pool, pool, bscale, bscale, *gs, *extra, **kwargs)
    for got, want, fill in zip(out, ref, (pool, pool, bscale, bscale)):
        _same_bytes(got, want)
        _check_untouched(got, slots, np.asarray(fill).view(np.uint8).reshape(N * BS, -1)[0])


def test_vmem_bytes_formula():
    assert kw.vmem_bytes(16, 8, 128, None, 2, encode_in_kernel=False) == 2 * 16 * 8 * 2 * 256
    assert kw.vmem_bytes(16, 8, 128, "fp8", encode_in_kernel=False) == 2 * 16 * 8 * 2 * 128
    assert kw.vmem_bytes(16, 8, 128, "nvfp4") == 2 * 16 * 8 * 4 * 128
    # in-kernel encoding: raw bf16 input tiles (double-buffered) + one encoded fp8 scratch tile per pool
    assert kw.vmem_bytes(16, 8, 128, "fp8", 2, encode_in_kernel=True) == 2 * (2 * 16 * 8 * 256 + 16 * 8 * 128)


@pytest.mark.parametrize("kv_format,in_kernel", [(None, True), ("fp8", True), ("fp8", False), ("nvfp4", False)])
def test_tpu_lowering_llama3_8b(kv_format, in_kernel):
    s = jax.ShapeDtypeStruct
    t, hkv, dh, blocks, bs = 100, 8, 128, 64, 16
    kv = [s((t, hkv * dh), jnp.bfloat16)] * 2 + [s((t,), jnp.int32)]
    if kv_format == "nvfp4":
        args = kv + [s((blocks, bs, hkv, dh // 2), jnp.uint8)] * 2 + \
            [s((blocks, bs, hkv, dh // 16), jnp.float8_e4m3fn)] * 2 + [s((), jnp.float32)] * 2 + \
            [s((hkv, dh), jnp.float32)]  # k_center
        fn = partial(kw.kv_write_nvfp4, scale_rule="mse46", interpret=False)
    elif kv_format == "fp8":
        args = kv + [s((blocks, bs, hkv, dh), jnp.float8_e4m3fn)] * 2 + [s((hkv,), jnp.float32)] * 2
        fn = partial(kw.kv_write, kv_format="fp8", encode_in_kernel=in_kernel, interpret=False)
    else:
        args = kv + [s((blocks, bs, hkv, dh), jnp.bfloat16)] * 2
        fn = partial(kw.kv_write, interpret=False)
    module = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args).mlir_module()
    assert "tpu_custom_call" in module
    assert "output_operand_aliases" in module  # the pools are updated in place
