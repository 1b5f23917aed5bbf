"""Native GGUF matmul (cpu_native): parts converters match gguf-py bit for bit, the kernels match a float64
reference for any M/N/K, work under jax.jit, stay finite, and reject bad shapes/dtypes clearly."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering.backends import cpu_native as cn
from lowering.quant import formats

pytestmark = pytest.mark.skipif(not cn.available(), reason=f"native kernels unavailable: {cn.unavailable_reason()}")

gguf = pytest.importorskip("gguf")
GGUF_FILES = sorted((Path.home() / ".cache" / "llmc" / "models" / "smollm2-135m").glob("*.gguf"))
QTYPE = {"q4_1": gguf.GGMLQuantizationType.Q4_1, "q8_0": gguf.GGMLQuantizationType.Q8_0}


def random_f16(rng, shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float16)


def random_raw_blocks(rng, n, k, fmt):
    """Random GGUF block bytes for a weight (N, K): finite f16 scales (some subnormal/zero), random codes."""
    nb = k // 32
    d = random_f16(rng, (n, nb), 0.05)
    d.reshape(-1)[::7] = np.float16(6e-8)  # subnormal scales too
    d.reshape(-1)[::11] = 0
    if fmt == "q4_1":
        m = random_f16(rng, (n, nb), 0.3)
        codes = rng.integers(0, 256, (n, nb, 16), dtype=np.uint8)
        raw = np.concatenate([d.view(np.uint8).reshape(n, nb, 2), m.view(np.uint8).reshape(n, nb, 2), codes], -1)
    else:
        codes = rng.integers(-128, 128, (n, nb, 32), dtype=np.int8).view(np.uint8)
        raw = np.concatenate([d.view(np.uint8).reshape(n, nb, 2), codes], -1)
    return raw.reshape(n, -1)


def parts_from_raw(raw, shape, fmt):
    parts = formats.gguf_parts_from_blocks(fmt, raw, shape)
    return [parts[name] for name in formats.WEIGHT_PARTS[fmt]]


def random_parts(rng, n, k, fmt):
    return parts_from_raw(random_raw_blocks(rng, n, k, fmt), (n, k), fmt)


def dequant(parts, fmt):
    return formats.dequantize_gguf(dict(zip(formats.WEIGHT_PARTS[fmt], parts)), fmt)


@pytest.mark.parametrize("fmt", formats.GGUF_FORMATS)
def test_parts_dequantize_bit_identical_to_gguf(fmt):
    rng = np.random.default_rng(1)
    n, k = 37, 96
    raw = random_raw_blocks(rng, n, k, fmt)
    want = gguf.quants.dequantize(raw, QTYPE[fmt]).reshape(n, k)
    got = dequant(parts_from_raw(raw, (n, k), fmt), fmt)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))


@pytest.mark.skipif(not GGUF_FILES, reason="no cached SmolLM2 GGUF under ~/.cache/llmc/models/smollm2-135m")
def test_real_gguf_tensors_bit_identical():
    reader = gguf.GGUFReader(GGUF_FILES[0])
    seen = set()
    for t in reader.tensors:
        fmt = {QTYPE["q4_1"]: "q4_1", QTYPE["q8_0"]: "q8_0"}.get(t.tensor_type)
        if fmt is None or fmt in seen:
            continue
        seen.add(fmt)
        k = int(t.shape[0])  # GGUF lists ne0 (in_features) first
        raw = np.asarray(t.data)[:512]  # a slice of rows keeps this quick
        n = raw.shape[0]
        want = gguf.quants.dequantize(raw, t.tensor_type).reshape(n, k)
        parts = parts_from_raw(raw, (n, k), fmt)
        got = dequant(parts, fmt)
        np.testing.assert_array_equal(got.view(np.uint32), want.astype(np.float32).view(np.uint32))
        x = np.random.default_rng(0).normal(size=(3, k)).astype(np.float32)
        y = np.asarray(cn.gguf_matmul(jnp.asarray(x), *map(jnp.asarray, parts), format=fmt))
        check_close(y, x, want)
    assert seen, "no Q4_1/Q8_0 tensor in the cached GGUF"


def check_close(y, x, w, rtol=1e-5):
    """|y - x @ w.T| <= rtol * (|x| @ |w|.T) elementwise, against a float64 reference."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    ref = x64 @ w64.T
    bound = np.abs(x64) @ np.abs(w64).T
    assert y.shape == ref.shape and y.dtype == np.float32
    assert np.isfinite(y).all()
    err = np.abs(y.astype(np.float64) - ref)
    assert (err <= rtol * bound + 1e-30).all(), f"max relative error {np.max(err / (bound + 1e-30)):.3g}"


@pytest.mark.parametrize("fmt", formats.GGUF_FORMATS)
def test_matmul_matches_float64_reference_under_jit(fmt):
    rng = np.random.default_rng(2)
    f = jax.jit(lambda x, *p: cn.gguf_matmul(x, *p, format=fmt))
    for k in (32, 576, 1536):
        for n in (1, 7, 193, 576):
            parts = random_parts(rng, n, k, fmt)
            w = dequant(parts, fmt)
            jparts = [jnp.asarray(p) for p in parts]
            for m in (1, 3, 8, 13, 40):
                x = rng.normal(size=(m, k)).astype(np.float32)
                check_close(np.asarray(f(jnp.asarray(x), *jparts)), x, w)


@pytest.mark.parametrize("fmt", formats.GGUF_FORMATS)
@pytest.mark.parametrize("m", [1, 8, 40])  # the small-M kernels and the dequantize-to-scratch path
def test_kernel_weights_bit_identical(fmt, m):
    """One-hot rows of x read single weights back: y[i, n] = 1 * w[n, k_i] + zeros is exact, so the weights the
    kernel uses must equal gguf-py's bit for bit (nibble order, scale choice and rounding all show here).
    NOTE: d * code is exact in f32 (11-bit f16 significand times a 4- or 8-bit integer), so a fused
    multiply-add would give the same weights too; the kernel still does a separate multiply and add."""
    rng = np.random.default_rng(6)
    n, k = 37, 96
    raw = random_raw_blocks(rng, n, k, fmt)
    want = gguf.quants.dequantize(raw, QTYPE[fmt]).reshape(n, k).astype(np.float32)
    parts = [jnp.asarray(p) for p in parts_from_raw(raw, (n, k), fmt)]
    f = jax.jit(lambda x, *p: cn.gguf_matmul(x, *p, format=fmt))
    for k0 in range(0, k, m):
        rows = np.arange(k0, min(k, k0 + m))
        x = np.zeros((m, k), np.float32)
        x[np.arange(rows.size), rows] = 1.0
        y = np.asarray(f(jnp.asarray(x), *parts))[: rows.size]
        np.testing.assert_array_equal(y, want[:, rows].T)


@pytest.mark.parametrize("fmt", formats.GGUF_FORMATS)
def test_large_finite_values_stay_finite(fmt):
    rng = np.random.default_rng(3)
    n, k = 64, 1536
    parts = random_parts(rng, n, k, fmt)
    parts[1][:] = np.float16(65504)  # the largest f16 scale
    if fmt == "q4_1":
        parts[2][:] = np.float16(-65504)
    w = dequant(parts, fmt)
    x = rng.normal(size=(8, k)).astype(np.float32)
    y = np.asarray(cn.gguf_matmul(jnp.asarray(x), *map(jnp.asarray, parts), format=fmt))
    check_close(y, x, w)


def test_composes_with_other_ops_in_jit():
    rng = np.random.default_rng(4)
    parts = [jnp.asarray(p) for p in random_parts(rng, 96, 64, "q4_1")]
    w = dequant([np.asarray(p) for p in parts], "q4_1")
    x = rng.normal(size=(5, 64)).astype(np.float32)

    @jax.jit
    def f(x, q, d, m):
        return jnp.tanh(cn.gguf_matmul(x * 2.0, q, d, m, format="q4_1")) + 1.0

    np.testing.assert_allclose(np.asarray(f(jnp.asarray(x), *parts)), np.tanh((2 * x) @ w.T) + 1.0, rtol=1e-5,
                               atol=1e-5)


def test_bad_shapes_and_dtypes_raise_value_error():
    rng = np.random.default_rng(5)
    q, d, m = (jnp.asarray(p) for p in random_parts(rng, 8, 64, "q4_1"))
    x = jnp.ones((2, 64), jnp.float32)
    cases = [
        ((jnp.ones((2, 60), jnp.float32), q, d, m), "q4_1", "multiple of 32"),
        ((jnp.ones((2, 96), jnp.float32), q, d, m), "q4_1", "expected"),
        ((x.astype(jnp.float16), q, d, m), "q4_1", "float32"),
        ((jnp.ones((64,), jnp.float32), q, d, m), "q4_1", "2-D"),
        ((x, q.astype(jnp.int8), d, m), "q4_1", "uint8"),
        ((x, q, d.astype(jnp.float32), m), "q4_1", "float16"),
        ((x, q, d, m[:4]), "q4_1", "'m'"),
        ((x, q, d), "q4_1", "3 parts"),
        ((x, q, d, m), "q4_0", "unknown GGUF format"),
        ((x, jnp.zeros((8, 64), jnp.uint8), d), "q8_0", "int8"),
    ]
    for args, fmt, msg in cases:
        with pytest.raises(ValueError, match=msg):
            cn.gguf_matmul(*args, format=fmt)
    with pytest.raises(formats.FormatError, match="do not hold"):
        formats.gguf_parts_from_blocks("q4_1", np.zeros(100, np.uint8), (8, 64))


def test_scalar_fallback_build(tmp_path):
    """The portable path (no AVX-512) compiles and matches too (own build, in a subprocess)."""
    code = (
        "import numpy as np, jax.numpy as jnp\n"
        "from lowering.backends import cpu_native as cn\n"
        "from lowering.quant import formats\n"
        "assert cn.available(), cn.unavailable_reason()\n"
        "assert not cn.uses_avx512()\n"
        "rng = np.random.default_rng(0)\n"
        "for fmt in formats.GGUF_FORMATS:\n"
        "    for m, n, k in ((1, 7, 64), (9, 33, 96)):\n"
        "        parts = [rng.integers(0, 256, (n, k // 2), dtype=np.uint8)] if fmt == 'q4_1' else "
        "[rng.integers(-128, 128, (n, k), dtype=np.int8)]\n"
        "        parts += [rng.normal(size=(n, k // 32)).astype(np.float16) for _ in range(len(formats.WEIGHT_PARTS[fmt]) - 1)]\n"
        "        w = formats.dequantize_gguf(dict(zip(formats.WEIGHT_PARTS[fmt], parts)), fmt).astype(np.float64)\n"
        "        x = rng.normal(size=(m, k)).astype(np.float32)\n"
        "        y = np.asarray(cn.gguf_matmul(jnp.asarray(x), *map(jnp.asarray, parts), format=fmt))\n"
        "        assert (np.abs(y - x @ w.T) <= 1e-5 * (np.abs(x) @ np.abs(w).T)).all()\n"
        "print('ok')\n")
    env = dict(os.environ, LLMC_NATIVE_NO_AVX512="1", JAX_PLATFORMS="cpu")
    root = Path(__file__).resolve().parents[3]
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
