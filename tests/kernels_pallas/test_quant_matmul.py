"""Pallas TPU weight-only quantized matmul: interpret-mode numerics vs float64 numpy on ragged shapes, and the
Pallas -> Mosaic lowering for Llama-3-8B linears."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import quant_matmul as qm
from lowering import ops
from lowering.quant import formats


def _gguf_parts(fmt, n, k, rng):
    """Random GGUF-native parts (as compile_model(weights="gguf") keeps them)."""
    blocks = k // formats.GGUF_BLOCK
    d = (rng.uniform(0.5, 2.0, (n, blocks)) / 16).astype(np.float16)
    if fmt == "q8_0":
        return {"q": rng.integers(-127, 128, (n, k)).astype(np.int8), "d": d}
    return {"q": rng.integers(0, 256, (n, k // 2)).astype(np.uint8), "d": d,
            "m": (-rng.uniform(0, 1, (n, blocks))).astype(np.float16)}


def _case(fmt, t, n, k, group=None, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32)
    if fmt in formats.GGUF_FORMATS:
        p = _gguf_parts(fmt, n, k, rng)
    else:
        p = formats.quantize_weight(w, fmt, group_size=group)
    parts = [jnp.asarray(p[name]) for name in formats.WEIGHT_PARTS[fmt]]
    x = rng.standard_normal((t, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    ref = x.astype(np.float64) @ formats.dequantize_weight(p, fmt).astype(np.float64).T + b
    return x, parts, b, ref


# (format, T, N, K, group, blocks): T, N never multiples of the blocks; several K steps where the tiling allows
CASES = [
    ("int8", 13, 300, 384, None, (8, 128, 128)),     # 2 x 3 x 3 grid
    ("fp8", 13, 300, 256, None, (16, 128, 128)),
    ("int4", 13, 300, 576, 64, (8, 128, 256)),       # SmolLM2's K: no legal K tile -> bk = K
    ("int4", 5, 200, 1024, 64, (8, 128, 512)),       # 2 K steps: dynamic slices of the scale scratch
    ("nvfp4", 13, 300, 512, None, (8, 128, 256)),    # 2 K steps
    ("q4_1", 13, 300, 576, None, (8, 128, 256)),     # GGUF-native SmolLM2 (K = 18 blocks of 32): bk = K
    ("q4_1", 5, 200, 512, None, (8, 128, 256)),      # GGUF nibble order over 2 K steps
    ("q8_0", 13, 300, 512, None, (8, 128, 256)),
]


@pytest.mark.parametrize("fmt,t,n,k,group,blocks", CASES, ids=[f"{c[0]}-K{c[3]}" for c in CASES])
def test_matches_float64_reference(fmt, t, n, k, group, blocks):
    x, parts, b, ref = _case(fmt, t, n, k, group)
    bm, bn, bk = blocks
    y = qm.quantized_matmul(jnp.asarray(x), *parts, format=fmt, in_features=k, out_features=n, group_size=group,
                            bias=jnp.asarray(b), block_m=bm, block_n=bn, block_k=bk, interpret=True)
    assert y.shape == (t, n) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-4 * np.abs(ref).max())


def test_bf16_nvfp4_bias_as_part_under_race_detection():
    x, parts, b, ref = _case("nvfp4", 13, 300, 512, seed=3)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    xb = jnp.asarray(x, jnp.bfloat16)
    ref = np.asarray(xb, np.float64) @ np.asarray(formats.jnp_dequantize_weight("nvfp4", *parts), np.float64).T + b
    # bias passed after the parts, as the qlinear op does
    y = qm.quantized_matmul(xb, *parts, jnp.asarray(b), format="nvfp4", in_features=512, out_features=300,
                            block_m=8, block_n=128, block_k=256, interpret=params)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2e-2, atol=1e-2 * np.abs(ref).max())
    want = ops.ref_qlinear(xb, *parts, jnp.asarray(b), format="nvfp4", in_features=512, out_features=300)
    np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(want, np.float64), rtol=2e-2,
                               atol=1e-2 * np.abs(ref).max())


def test_w8a8_not_implemented():
    with pytest.raises(NotImplementedError):
        qm.quantized_matmul(jnp.zeros((2, 128)), jnp.zeros((128, 128), jnp.int8), jnp.ones(128), format="int8",
                            in_features=128, out_features=128, act_format="fp8", interpret=True)


def test_block_choice_respects_tiling():
    assert qm.pick_blocks(1, 4096, 4096, "int4", 128) == (1, 256, 1024)
    assert qm.pick_blocks(300, 14336, 4096, "nvfp4") == (128, 256, 512)
    assert qm.pick_blocks(13, 1539, 576, "int4", 64) == (13, 256, 576)
    assert qm.vmem_bytes("int8", 128, 256, 512, 4096) < 8 * 2 ** 20
    assert qm.vmem_bytes("int4", 128, 256, 1024, 14336, 128) < 16 * 2 ** 20


@pytest.mark.parametrize("fmt", qm.KERNEL_FORMATS)
@pytest.mark.parametrize("t,n,k", [(1, 4096, 4096), (300, 14336, 4096), (7, 4096, 14336), (13, 1539, 576)])
def test_tpu_lowering_llama3_8b(fmt, t, n, k):
    s = jax.ShapeDtypeStruct
    types = formats.weight_part_types(fmt, (n, k))
    parts = [s(types[p][0], jnp.dtype(types[p][1])) for p in formats.WEIGHT_PARTS[fmt]]
    fn = partial(qm.quantized_matmul, format=fmt, in_features=k, out_features=n, interpret=False)
    exp = jax.export.export(jax.jit(fn), platforms=["tpu"])(s((t, k), jnp.bfloat16), *parts, s((n,), jnp.bfloat16))
    assert "tpu_custom_call" in exp.mlir_module()
