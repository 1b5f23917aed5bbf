"""The Pallas TPU attention_mass kernel, in TPU interpret mode on CPU, against the op's jnp reference
(lowering.ops.ref_attention_mass, tied to float64 loops by tests/lowering/test_attention_mass.py)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("jax.experimental.pallas.tpu")

from kernels_pallas.attention_mass import attention_mass  # noqa: E402
from lowering import ops  # noqa: E402
from tests.lowering.attention_mass_cases import (MIXED, check_mass, make_case, op_args, padded_case,  # noqa: E402
                                                 seen_slots)


@pytest.mark.parametrize("kv_format,block_size,num_heads,num_kv_heads,ppb,bq", [
    pytest.param(None, 16, 4, 2, 1, 8, id="f32-gqa2-page16"),
    pytest.param("fp8", 5, 2, 2, 3, 8, id="fp8-mha-page5"),
    pytest.param("nvfp4", 8, 4, 1, 2, 16, id="nvfp4-gqa4-page8"),
])
def test_matches_reference(kv_format, block_size, num_heads, num_kv_heads, ppb, bq):
    case = make_case(MIXED, block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=32,
                     kv_format=kv_format, seed=block_size + num_heads)
    args, attrs = op_args(case)
    fn = jax.jit(functools.partial(attention_mass, **attrs, pages_per_block=ppb, queries_per_block=bq,
                                   interpret=True))
    got = np.asarray(fn(*args))
    want = np.asarray(ops.ref_attention_mass(*args, **attrs))
    seen = seen_slots(case)
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-5, atol=1e-6)
    check_mass(got, case)  # float64 on the seen slots, the others bit for bit unchanged


def test_bf16_queries_and_pool_under_jit():
    case = make_case(MIXED, block_size=8, num_heads=6, num_kv_heads=2, head_dim=32, q_dtype=jnp.bfloat16,
                     pool_dtype=jnp.bfloat16, seed=3)
    args, attrs = op_args(case)
    fn = jax.jit(functools.partial(attention_mass, **attrs, pages_per_block=2, queries_per_block=16,
                                   interpret=True))
    check_mass(fn(*args), case, rtol=1e-4, atol=1e-5)


def test_validation():
    case = make_case(MIXED[:2], seed=4)
    args, attrs = op_args(case)
    with pytest.raises(ValueError, match="unknown kv_format"):
        attention_mass(*args, **dict(attrs, kv_format="int4"), interpret=True)
    with pytest.raises(ValueError, match="takes 2 kv_extras"):
        attention_mass(*args, **dict(attrs, kv_format="fp8"), interpret=True)
    with pytest.raises(ValueError, match="mass_pool must be f32"):
        attention_mass(*args[:6], args[6].astype(jnp.bfloat16), **attrs, interpret=True)


@pytest.mark.parametrize("kv_format, block_size", [("fp8", 16), ("nvfp4", 32)])
def test_lowers_to_mosaic(kv_format, block_size):
    # a real model config (Hq=32, Hkv=8, Dh=128, 256 sequences) through the Pallas -> Mosaic lowering
    sds = jax.ShapeDtypeStruct
    stored, pool_dtype = {None: (128, jnp.bfloat16), "fp8": (128, jnp.float8_e4m3fn),
                          "nvfp4": (64, jnp.uint8)}[kv_format]
    args = [sds((2048, 32 * 128), jnp.bfloat16), sds((4096, block_size, 8, stored), pool_dtype),
            sds((257,), jnp.int32), sds((256,), jnp.int32), sds((256, 64), jnp.int32), sds((2048,), jnp.int32),
            sds((4096, block_size, 8), jnp.float32)]
    if kv_format == "fp8":
        args += [sds((8,), jnp.float32)] * 2
    elif kv_format == "nvfp4":
        args += [sds((4096, block_size, 8, 8), jnp.float8_e4m3fn)] * 2 + [sds((), jnp.float32)] * 2
    fn = functools.partial(attention_mass, num_heads=32, num_kv_heads=8, head_dim=128, scale=0.088,
                           kv_format=kv_format, interpret=False)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()


def test_padding_sequences_add_no_mass():
    case, padded = padded_case(block_size=8, head_dim=32, seed=2)
    run = lambda c: np.asarray(attention_mass(*op_args(c)[0], **op_args(c)[1], interpret=True))  # noqa: E731
    want, got = run(case), run(padded)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-6, atol=1e-7)
