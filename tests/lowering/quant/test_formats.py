"""Quantized formats: hand-computed encodings bit for bit, round trips, jnp == numpy, torch kernels' refs agree."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from lowering.quant import formats


def test_fp8_hand_computed_bytes():
    # 1.0 = 0 0111 000; 0.3 -> 1.25 * 2^-2 (0.3125 is nearer than 0.28125) = 0 0101 010; -448 = max, 500
    # saturates to 448; 1e-9 underflows to 0; 1.0625 is the midpoint of 1.0 and 1.125 -> even mantissa (1.0);
    # 1.1875 is the midpoint of 1.125 (001) and 1.25 (010) -> 1.25
    x = np.array([1.0, 0.3, -448.0, 500.0, 1e-9, 1.0625, 1.1875, -600.0], np.float32)
    q = formats.to_fp8(x)
    assert q.view(np.uint8).tolist() == [0x38, 0x2A, 0xFE, 0x7E, 0x00, 0x38, 0x3A, 0xFE]


def test_fp8_rows_scales_and_round_trip():
    w = np.array([[448.0, -224.0, 1.0], [0.0, 0.0, 0.0]], np.float32)
    q, scale = formats.quantize_fp8_rows(w)
    assert scale[0] == 1.0 and scale[1] == np.float32(formats.F32_TINY)  # an all-zero row gets FLT_MIN
    np.testing.assert_array_equal(formats.dequantize_fp8(q, scale), w)


def test_int8_hand_computed():
    w = np.array([[127.0, -63.5, 0.5, 1.5], [-2.54, 0.0, 0.0, 0.0]], np.float32)
    parts = formats.quantize_int8(w)
    assert parts["scale"][0] == 1.0
    assert parts["q"][0].tolist() == [127, -64, 0, 2]  # RNE: -63.5 -> -64, 0.5 -> 0, 1.5 -> 2
    assert parts["q"][1, 0] == -127


def test_int4_hand_computed_asymmetric():
    # one group of 16: range [-1.5, 2.25] -> scale 3.75 / 15 = 0.25, zero = 1.5 / 0.25 = 6
    g = np.array([-1.5, 2.25, 0.125, 0.375, 0.0, -0.25, 1.0, 5.0, -9.0, 0.6, 0.63, 2.0, -1.0, 0.875, 1.125, 0.5],
                 np.float32)
    g[7], g[8] = 2.25, -1.5  # keep the range exact
    parts = formats.quantize_int4(g[None, :], group_size=16)
    assert parts["scale"].dtype == np.float16 and parts["scale"][0, 0] == 0.25
    assert parts["zero"][0, 0] == 6
    codes = formats.unpack_nibbles(parts["q"])[0].tolist()
    # rint(w / 0.25) + 6: 0.125 -> 0.5 -> 0 (even) -> 6; 0.375 -> 1.5 -> 2 -> 8; 0.6 -> 2.4 -> 2 -> 8;
    # 0.63 -> 2.52 -> 3 -> 9; 0.875 -> 3.5 -> 4 -> 10; 1.125 -> 4.5 -> 4 -> 10
    assert codes == [0, 15, 6, 8, 6, 5, 10, 15, 0, 8, 9, 14, 2, 10, 10, 8]
    assert parts["q"][0, 0] == (0 | 15 << 4)  # element 0 in the low nibble
    deq = formats.dequantize_int4(parts)[0]
    assert deq[3] == 0.5 and deq[0] == -1.5 and deq[4] == 0.0  # zero is exact


def test_int4_all_zero_and_tiny_groups():
    w = np.zeros((2, 32), np.float32)
    w[1, 16:] = 1e-9
    parts = formats.quantize_int4(w, group_size=16)
    assert np.isfinite(formats.dequantize_int4(parts)).all()
    np.testing.assert_array_equal(formats.dequantize_int4(parts)[0], 0.0)


def test_int4_group_size_falls_back_to_a_divisor():
    assert formats.int4_group_size(1536) == 128
    assert formats.int4_group_size(576) == 64
    assert formats.int4_group_size(40) is None
    parts = formats.quantize_weight(np.ones((3, 576), np.float32), "int4")
    assert parts["scale"].shape == (3, 9)
    with pytest.raises(formats.FormatError, match="int4"):
        formats.quantize_weight(np.ones((3, 40), np.float32), "int4")


NVFP4_X = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.2, -0.5, -6.0, 0.0, -0.0, 6.0, 0.1, 1.4, 2.9], np.float32)
# every E2M1 midpoint (0.25 .. 5) rounds to the even code; 6.2 saturates; -0.0 keeps its sign bit
NVFP4_CODES = [0, 2, 2, 4, 4, 6, 6, 7, 9, 15, 0, 8, 7, 0, 3, 5]


def test_nvfp4_hand_computed():
    parts = formats.quantize_nvfp4(NVFP4_X[None, :], global_scale=1.0)
    assert parts["block_scale"].view(np.uint8).tolist() == [[0x38]]  # e4m3(6.2 / 6) = 1.0
    assert formats.unpack_nibbles(parts["q"])[0].tolist() == NVFP4_CODES
    assert parts["q"][0].tolist() == [0x20, 0x42, 0x64, 0x76, 0xF9, 0x80, 0x07, 0x53]
    np.testing.assert_array_equal(formats.dequantize_nvfp4(parts)[0],
                                  [0, 1, 1, 2, 2, 4, 4, 6, -0.5, -6, 0, -0.0, 6, 0, 1.5, 3])


def test_nvfp4_global_and_block_scales():
    x = np.zeros((1, 32), np.float32)
    x[0, :16] = NVFP4_X
    x[0, 16] = 0.3  # a second block with a small amax
    parts = formats.quantize_nvfp4(x)
    gs = parts["global_scale"]
    assert gs.shape == () and gs == np.float32(6.2) / np.float32(6 * 448)
    want_bs = formats.to_fp8(np.array([6.2, 0.3], np.float32) / 6 / gs)
    np.testing.assert_array_equal(parts["block_scale"][0].view(np.uint8), want_bs.view(np.uint8))
    zero = formats.quantize_nvfp4(np.zeros((2, 16), np.float32))
    np.testing.assert_array_equal(formats.dequantize_nvfp4(zero), 0.0)


@pytest.mark.parametrize("fmt", formats.WEIGHT_FORMATS)
def test_weight_round_trip_error_bounds(fmt):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(40, 256)).astype(np.float32)
    parts = formats.quantize_weight(w, fmt)
    types = formats.weight_part_types(fmt, w.shape)
    assert set(parts) == set(types) == set(formats.WEIGHT_PARTS[fmt])
    for name, (shape, dtype) in types.items():
        assert parts[name].shape == shape and parts[name].dtype.name == dtype, name
    err = np.abs(formats.dequantize_weight(parts, fmt) - w).max()
    bound = {"int8": 0.5 / 127, "fp8": 2 ** -4, "int4": 0.6 / 15 * 2, "nvfp4": 0.5}[fmt] * np.abs(w).max()
    assert err <= bound
    jw = np.asarray(formats.jnp_dequantize_weight(fmt, *(jnp.asarray(parts[p]) for p in formats.WEIGHT_PARTS[fmt])))
    np.testing.assert_array_equal(jw, formats.dequantize_weight(parts, fmt))


def test_jnp_quantizers_match_numpy_bit_for_bit():
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(64, 4, 32)) * np.exp(rng.normal(size=(64, 4, 1)) * 2)).astype(np.float32)
    x[0, 0, :4] = [0.0, -0.0, 1e-30, -1e-30]
    scale = np.array([0.01, 0.1, 1.0, 3.0], np.float32)
    got = np.asarray(formats.jnp_quantize_fp8(jnp.asarray(x), jnp.asarray(scale)[:, None]))
    np.testing.assert_array_equal(got.view(np.uint8), formats.to_fp8(x / scale[:, None]).view(np.uint8))
    gs = formats.nvfp4_global_scale(np.abs(x).max())
    q, bs = formats.jnp_quantize_nvfp4(jnp.asarray(x), gs)
    ref = formats.quantize_nvfp4(x, gs)
    np.testing.assert_array_equal(np.asarray(q), ref["q"])
    np.testing.assert_array_equal(np.asarray(bs).view(np.uint8), ref["block_scale"].view(np.uint8))
    np.testing.assert_array_equal(np.asarray(formats.jnp_dequantize_nvfp4(q, bs, gs)), formats.dequantize_nvfp4(ref))


def test_torch_kernel_references_agree_with_formats():
    torch = pytest.importorskip("torch")
    from kernels_gpu import kv_formats

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(33, 2, 64)) * 3).astype(np.float32)
    gs = formats.nvfp4_global_scale(np.abs(x).max())
    packed, bs = kv_formats.quantize_nvfp4(torch.from_numpy(x), torch.tensor(float(gs)))
    ref = formats.quantize_nvfp4(x, gs)
    np.testing.assert_array_equal(packed.numpy(), ref["q"])
    np.testing.assert_array_equal(bs.view(torch.uint8).numpy(), ref["block_scale"].view(np.uint8))
    scale = np.array([0.02, 0.5], np.float32)
    q8 = kv_formats.quantize_fp8(torch.from_numpy(x), torch.from_numpy(scale))
    np.testing.assert_array_equal(q8.view(torch.uint8).numpy(), formats.to_fp8(x / scale[:, None]).view(np.uint8))


def test_hadamard_is_orthonormal():
    h = formats.hadamard(64)
    np.testing.assert_allclose(h @ h.T, np.eye(64), atol=1e-12)
    with pytest.raises(formats.FormatError, match="power-of-two"):
        formats.hadamard(48)


def test_bytes_per_kv_value():
    assert formats.kv_bytes_per_value("fp8") / formats.kv_bytes_per_value(None) == 0.5
    assert formats.kv_bytes_per_value("nvfp4") / formats.kv_bytes_per_value(None) <= 0.282
    assert formats.FP8 == np.dtype(ml_dtypes.float8_e4m3fn)


def test_arithmetic_fp8_rounding_matches_the_cast_under_jit():
    """jnp_round_fp8 (what fake quantization uses, since XLA on GPUs may drop an f32->f8->f32 cast pair) equals
    the e4m3 cast bit for bit: normals, subnormals, ties, saturation, zeros, NaN."""
    import jax

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=20000) * np.exp(rng.normal(size=20000) * 4),
                        [0.0, -0.0, 448, 449, 464, 465, 480, 1e9, -1e9, 2 ** -9, 2 ** -10, 1.5 * 2 ** -10,
                         3 * 2 ** -11, 1.0625, 1.1875, np.nan]]).astype(np.float32)
    got = np.asarray(jax.jit(formats.jnp_round_fp8)(x))
    want = formats.to_fp8(x).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got[~np.isnan(want)]), np.signbit(want[~np.isnan(want)]))
    fake = np.asarray(jax.jit(formats.jnp_fake_quant_fp8_rows)(x[:20000].reshape(100, 200)))
    q, s = formats.quantize_fp8_tokens(x[:20000].reshape(100, 200))
    np.testing.assert_allclose(fake, formats.dequantize_fp8(q, s), rtol=1e-6)


# ---- GGUF-native formats (compile_model(weights="gguf")) ----------------------------------------------------


def random_gguf_blocks(fmt, n, k, seed=0):
    """Raw GGUF bytes of a [n, k] tensor: finite f16 scales / mins, random codes."""
    rng = np.random.default_rng(seed)
    nb = n * k // 32
    d = rng.uniform(-0.05, 0.05, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    if fmt == "q4_1":
        m = rng.uniform(-0.4, 0.1, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
        codes = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        return np.concatenate([d, m, codes], axis=1)
    return np.concatenate([d, rng.integers(0, 256, (nb, 32), dtype=np.uint8)], axis=1)


@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_gguf_parts_dequantize_bit_identical_to_gguf_py(fmt):
    import gguf

    n, k = 7, 96
    raw = random_gguf_blocks(fmt, n, k)
    want = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, fmt.upper())).reshape(n, k)
    parts = formats.gguf_parts_from_blocks(fmt, raw, (n, k))
    assert tuple(parts) == formats.WEIGHT_PARTS[fmt]
    assert {p: (v.shape, v.dtype.name) for p, v in parts.items()} == {
        p: (tuple(s), dt) for p, (s, dt) in formats.weight_part_types(fmt, (n, k)).items()}
    np.testing.assert_array_equal(formats.dequantize_weight(parts, fmt).view(np.uint32), want.view(np.uint32))
    traced = np.asarray(formats.jnp_dequantize_weight(fmt, *(jnp.asarray(parts[p]) for p in formats.WEIGHT_PARTS[fmt])))
    np.testing.assert_array_equal(traced.view(np.uint32), want.view(np.uint32))
    # hand-checked element: block 0, element 17 = high nibble of byte 1 (GGUF order), times d (+ m)
    d = float(parts["d"][0, 0])
    if fmt == "q4_1":
        code = int(parts["q"][0, 1]) >> 4
        expect = np.float32(np.float32(d) * np.float32(code)) + np.float32(parts["m"][0, 0])
    else:
        expect = np.float32(parts["q"][0, 17]) * np.float32(d)
    assert want[0, 17] == expect


def test_gguf_parts_reject_bad_input():
    with pytest.raises(formats.FormatError, match="not a multiple of the block size 32"):
        formats.gguf_parts_from_blocks("q4_1", np.zeros(20, np.uint8), (1, 48))
    with pytest.raises(formats.FormatError, match="do not hold"):
        formats.gguf_parts_from_blocks("q8_0", np.zeros(33, np.uint8), (1, 32))
    with pytest.raises(formats.FormatError, match="unknown GGUF format"):
        formats.gguf_parts_from_blocks("q5_k", np.zeros(20, np.uint8), (1, 32))


def test_nvfp4_mse46_scale_rule_hand_computed():
    # global scale 1, so block scales are the e4m3 values themselves
    x = np.zeros((3, 16), np.float32)
    x[0] = [6.0] + [4.5] * 15  # amax->6: scale 1, 4.5 -> 4 (SSE 15 * 0.25); amax->4: scale 1.5, 4.5 = 3 * 1.5 exact
    x[1, :2] = [6.0, 1.0]  # amax->6 exact; amax->4: 1 / 1.5 rounds to 0.5 -> keeps scale 1
    amax = np.abs(x).max(axis=1)
    s6, s4 = formats.to_fp8(amax / 6), formats.to_fp8(amax / 4)
    e6 = formats.nvfp4_scale_error(x.reshape(3, 16), amax, s6, 1.0)
    e4 = formats.nvfp4_scale_error(x.reshape(3, 16), amax, s4, 1.0)
    # r = (|y| - e2m1(y)) * den / amax: block 0 at scale 1: 15 * floor((0.5 / 6)**2 * 2**20); row 2 is all zero
    assert e6.tolist() == [15 * int(np.float32(0.5 / 6) ** 2 * 2 ** 20), 0, 0]
    assert e4.tolist() == [0, int(np.float32(np.float32(1 / 1.5 - 0.5) * np.float32(1.5 / 6)) ** 2 * 2 ** 20), 0]
    parts = formats.quantize_nvfp4(x, 1.0, "mse46")
    assert parts["block_scale"].astype(np.float32)[:, 0].tolist() == [1.5, 1.0, 0.0]
    assert formats.unpack_nibbles(parts["q"])[0].tolist() == [6] + [5] * 15  # 6/1.5 = 4 (code 6), 3 (code 5)
    np.testing.assert_array_equal(formats.dequantize_nvfp4(parts), x)
    amax_rule = formats.quantize_nvfp4(x, 1.0)  # the default keeps amax -> 6
    assert amax_rule["block_scale"].astype(np.float32)[:, 0].tolist() == [1.0, 1.0, 0.0]
    with pytest.raises(formats.FormatError, match="scale rule"):
        formats.quantize_nvfp4(x, 1.0, "best")


def test_nvfp4_mse46_lowers_error_and_matches_jnp_and_torch():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(256, 3, 64)) * np.exp(rng.normal(size=(256, 3, 1)) * 2)).astype(np.float32)
    x[0, 0, :16] = 0.0
    x[1, 1, :16] = 1e-30  # scales that round to 0 in e4m3
    x[2, 2, :16] = 3.0  # an exact tie between the two candidates keeps amax -> 6
    gs = formats.nvfp4_global_scale(np.abs(x).max())
    ref = formats.quantize_nvfp4(x, gs, "mse46")
    amax_err = ((formats.dequantize_nvfp4(formats.quantize_nvfp4(x, gs)) - x) ** 2).sum()
    assert ((formats.dequantize_nvfp4(ref) - x) ** 2).sum() < 0.9 * amax_err
    q, bs = formats.jnp_quantize_nvfp4(jnp.asarray(x), gs, "mse46")
    np.testing.assert_array_equal(np.asarray(q), ref["q"])
    np.testing.assert_array_equal(np.asarray(bs).view(np.uint8), ref["block_scale"].view(np.uint8))
    torch = pytest.importorskip("torch")
    from kernels_gpu import kv_formats

    packed, tbs = kv_formats.quantize_nvfp4(torch.from_numpy(x), torch.tensor(float(gs)), "mse46")
    np.testing.assert_array_equal(packed.numpy(), ref["q"])
    np.testing.assert_array_equal(tbs.view(torch.uint8).numpy(), ref["block_scale"].view(np.uint8))


def _anisotropic_second_moment(rng, heads, dim, n=400):
    # queries whose energy sits in a few directions, seen in a rotated (Hadamard) basis as the KV pass sees them
    a = (rng.standard_normal((heads, n, dim)) * np.geomspace(4.0, 0.1, dim)) @ formats.hadamard(dim)
    return np.einsum("hnd,hne->hde", a, a) / n


def test_feedback_factor_inverts_the_damped_second_moment():
    rng = np.random.default_rng(3)
    h = _anisotropic_second_moment(rng, 2, 32)
    u = formats.feedback_factor(h, damp=0.01)
    assert u.shape == (2, 32, 32) and u.dtype == np.float32
    assert np.allclose(np.tril(u, -1), 0)  # upper triangular
    for i in range(2):
        want = np.linalg.inv(h[i] + 0.01 * np.mean(np.diag(h[i])) * np.eye(32))
        np.testing.assert_allclose(u[i].T.astype(np.float64) @ u[i], want, rtol=2e-3, atol=1e-6 * np.abs(want).max())
    zero = formats.feedback_factor(np.zeros((1, 16, 16)))  # a head no calibration token reached: nearest rounding
    np.testing.assert_array_equal(zero[0], np.eye(16, dtype=np.float32))
    with pytest.raises(formats.FormatError, match="square"):
        formats.feedback_factor(np.zeros((2, 16, 8)))


@pytest.mark.parametrize("rule", formats.NVFP4_SCALE_RULES)
def test_nvfp4_feedback_rounding(rule):
    rng = np.random.default_rng(4)
    heads, dim = 3, 64
    h = _anisotropic_second_moment(rng, heads, dim)
    x = (rng.standard_normal((40, heads, dim)) * rng.uniform(0.1, 3.0, (40, heads, 1))).astype(np.float32)
    x[3, 1] = 0.0  # an all-zero head vector stores zeros
    gs = formats.nvfp4_global_scale(np.abs(x).max())
    plain = formats.quantize_nvfp4(x, gs, rule)
    # the identity factor is nearest rounding, byte for byte
    eye = formats.quantize_nvfp4_feedback(x, gs, np.broadcast_to(np.eye(dim, dtype=np.float32), (heads, dim, dim)),
                                          rule)
    np.testing.assert_array_equal(eye["q"], plain["q"])
    np.testing.assert_array_equal(eye["block_scale"].view(np.uint8), plain["block_scale"].view(np.uint8))
    u = formats.feedback_factor(h)
    fb = formats.quantize_nvfp4_feedback(x, gs, u, rule)
    assert (formats.dequantize_nvfp4(fb)[3, 1] == 0).all()

    def score_error(parts):  # E[(q . e)^2] under the second moment the factor came from
        e = (formats.dequantize_nvfp4(parts) - x).astype(np.float64)
        return np.einsum("thd,hde,the->", e, h, e)

    assert score_error(fb) < 0.8 * score_error(plain)
    # the jitted version computes the same bytes
    q, bs = formats.jnp_quantize_nvfp4_feedback(jnp.asarray(x), gs, jnp.asarray(u), rule)
    np.testing.assert_array_equal(np.asarray(q), fb["q"])
    np.testing.assert_array_equal(np.asarray(bs).view(np.uint8), fb["block_scale"].view(np.uint8))
    with pytest.raises(formats.FormatError, match="factor"):
        formats.quantize_nvfp4_feedback(x, gs, u[:2], rule)
