"""Pallas TPU RMSNorm / fused add+RMSNorm: interpret-mode numerics vs float64 numpy, and TPU lowering."""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import norms

EPS = 1e-5


def _np_rms(s, w):
    s = np.asarray(s, np.float64)
    return s / np.sqrt(np.mean(s * s, axis=-1, keepdims=True) + EPS) * np.asarray(w, np.float64)


def _data(t, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, r = (jnp.asarray(rng.standard_normal((t, d)) * 3, dtype) for _ in range(2))
    w = jnp.asarray(rng.standard_normal(d), dtype)
    return x, r, w


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_add_rms_norm_matches_numpy(dtype, tol):
    x, r, w = _data(13, 256, dtype)  # 13 rows, 8-row blocks: a partial last block
    normed, summed = norms.add_rms_norm(x, r, w, eps=EPS, block_rows=8, interpret=True)
    assert normed.dtype == summed.dtype == dtype and normed.shape == summed.shape == (13, 256)
    np.testing.assert_array_equal(np.asarray(summed), np.asarray(x + r))  # x + residual rounded to x.dtype
    ref = _np_rms(np.asarray(summed, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(np.asarray(normed, np.float64), ref, rtol=tol, atol=tol)


def test_rms_norm_races_and_uninitialized_memory():
    x, _, w = _data(21, 128, jnp.float32, seed=1)
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    out = norms.rms_norm(x, w, eps=EPS, block_rows=8, interpret=params)
    np.testing.assert_allclose(np.asarray(out, np.float64), _np_rms(x, w), rtol=1e-5, atol=1e-5)


def test_vmem_bytes_formula():
    assert norms.vmem_bytes(256, 4096, 2) == 2 * 256 * 4096 * 2 * 4 + 2 * 4096 * 4 + 2 * 256 * 4096 * 4
    assert norms.vmem_bytes(8, 128, 4, fused_add=False) < norms.vmem_bytes(8, 128, 4)


@pytest.mark.parametrize("t", [1, 300])
def test_tpu_lowering(t):
    s = jax.ShapeDtypeStruct
    x = s((t, 4096), jnp.bfloat16)
    exp = jax.export.export(jax.jit(partial(norms.add_rms_norm, eps=EPS, interpret=False)), platforms=["tpu"])(
        x, x, s((4096,), jnp.bfloat16))
    assert "tpu_custom_call" in exp.mlir_module()
    exp = jax.export.export(jax.jit(partial(norms.rms_norm, eps=EPS, interpret=False)), platforms=["tpu"])(
        x, s((4096,), jnp.float32))
    assert "tpu_custom_call" in exp.mlir_module()
