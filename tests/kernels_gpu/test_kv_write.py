"""kv_write against ref_kv_write for bf16/fp32, FP8 and NVFP4 caches: written slots match, all others stay NaN."""
import numpy as np
import pytest
import torch

from kernels_gpu import kv_formats
from kernels_gpu.kv_write import kv_write, ref_kv_write
from lowering.quant import formats

# Plain caches: (input dtype, cache dtype) -> tolerance of the stored values against the reference cast.
# NOTE: exact on a GPU; the interpreter rounds fp32 -> bf16/fp16 stores inexactly (one ulp).
PLAIN_TOLERANCES = {
    (torch.bfloat16, torch.bfloat16): dict(atol=0, rtol=0),
    (torch.float32, torch.float32): dict(atol=0, rtol=0),
    (torch.float32, torch.bfloat16): dict(atol=1e-5, rtol=8e-3),
    (torch.float16, torch.bfloat16): dict(atol=1e-5, rtol=8e-3),
    (torch.bfloat16, torch.float32): dict(atol=0, rtol=0),
}
NAN_BYTE = 0x7F  # float8_e4m3fn NaN; also the sentinel filling NVFP4 code caches
FP8_MANTISSA_STEP = 2.0 ** -3  # relative spacing of e4m3 normals

SHAPES = [  # (num_tokens, num_kv_heads, head_dim, block_size, num_blocks)
    (13, 2, 64, 1, 17),
    (11, 3, 128, 5, 4),
    (19, 2, 64, 16, 3),
    (6, 12, 128, 16, 1),  # more kv heads than one program takes
]


def _slot_mapping(num_tokens, num_slots, device, seed):
    """Distinct random slots with every third token padding (-1): i32[T]."""
    g = torch.Generator().manual_seed(seed)
    slots = torch.randperm(num_slots, generator=g)[:num_tokens].to(torch.int32)
    slots[::3] = -1
    return slots.to(device)


def _inputs(num_tokens, num_kv_heads, head_dim, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g) * 3  # [T, Hkv, D]
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=g)
    k[0, 0, :16] = 0.0  # an all-zero NVFP4 group (block scale 0)
    k[-1, -1, 3] = 1e4  # saturates FP8 at +-448 and skews an NVFP4 group
    return k.to(dtype).to(device), v.to(dtype).to(device)


def _written_mask(slot_mapping, num_blocks, block_size, device):
    """bool[N, block_size]: which cache rows slot_mapping names."""
    mask = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=device)
    mask[slot_mapping[slot_mapping >= 0].long()] = True
    return mask.view(num_blocks, block_size)


def _assert_untouched(cache, written, nan_byte=None):
    rest = cache[~written]  # [rows not written, Hkv, D']
    if nan_byte is None:
        assert torch.isnan(rest.float()).all(), "kv_write touched a slot that slot_mapping does not name"
    else:
        assert (rest.view(torch.uint8) == nan_byte).all(), "kv_write touched a slot that slot_mapping does not name"


def _assert_e4m3_codes_match(got, want, exact):
    """float8_e4m3fn got/want equal, except one code apart where the exact f32 value is a rounding tie."""
    g, w = got.float(), want.float()
    differ = g != w
    if differ.any():
        e = exact[differ]
        gd, wd = g[differ], w[differ]
        on_tie = (e - gd).abs() == (e - wd).abs()
        one_apart = (got.view(torch.uint8)[differ].int() - want.view(torch.uint8)[differ].int()).abs() == 1
        assert (on_tie & one_apart).all(), f"{int((~(on_tie & one_apart)).sum())} fp8 codes differ off a tie"


@pytest.mark.parametrize("dtypes", list(PLAIN_TOLERANCES))
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_write_plain(device, dtypes, shape):
    in_dtype, cache_dtype = dtypes
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = shape
    k, v = _inputs(num_tokens, num_kv_heads, head_dim, in_dtype, device, seed=sum(shape))
    slots = _slot_mapping(num_tokens, num_blocks * block_size, device, seed=num_tokens)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype, device=device)  # [N, bs, Hkv, D]
    v_cache = torch.full(cache_shape, float("nan"), dtype=cache_dtype, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_write(k, v, slots, k_cache, v_cache)
    ref_kv_write(k, v, slots, want_k, want_v)
    written = _written_mask(slots, num_blocks, block_size, device)
    for got, want in ((k_cache, want_k), (v_cache, want_v)):
        torch.testing.assert_close(got[written], want[written], **PLAIN_TOLERANCES[dtypes])
        _assert_untouched(got, written)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_write_fp8(device, in_dtype, shape):
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = shape
    k, v = _inputs(num_tokens, num_kv_heads, head_dim, in_dtype, device, seed=sum(shape))
    slots = _slot_mapping(num_tokens, num_blocks * block_size, device, seed=num_tokens)
    # per-head scales: amax/448 for most heads, a too-small one on head 0 of K to exercise saturation
    k_scale = (k.float().abs().amax(dim=(0, 2)) / 448).clamp_min(1e-6)  # f32[Hkv]
    k_scale[0] = 1e-3
    v_scale = torch.linspace(0.003, 0.02, num_kv_heads, device=device)  # f32[Hkv]
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), device=device).to(torch.float8_e4m3fn)
    v_cache = k_cache.clone()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_write(k, v, slots, k_cache, v_cache, kv_format="fp8", k_scale=k_scale, v_scale=v_scale)
    ref_kv_write(k, v, slots, want_k, want_v, kv_format="fp8", k_scale=k_scale, v_scale=v_scale)
    written = _written_mask(slots, num_blocks, block_size, device)
    keep = slots >= 0
    for src, scale, got, want in ((k, k_scale, k_cache, want_k), (v, v_scale, v_cache, want_v)):
        exact = (src[keep].float() / scale[:, None]).clamp(-448, 448)  # f32[T', Hkv, D]
        rows_got = got[written]  # rows in (block, offset) order; reorder the exact values to match
        order = torch.argsort(slots[keep].long())
        _assert_e4m3_codes_match(rows_got, want[written], exact[order])
        deq_got = kv_formats.dequantize_fp8(rows_got, scale)
        deq_want = kv_formats.dequantize_fp8(want[written], scale)
        torch.testing.assert_close(deq_got, deq_want, rtol=FP8_MANTISSA_STEP, atol=float(scale.max()) * 2.0 ** -9)
        assert rows_got.float().abs().max() <= 448
        _assert_untouched(got, written, nan_byte=NAN_BYTE)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kv_write_nvfp4(device, in_dtype, shape):
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = shape
    k, v = _inputs(num_tokens, num_kv_heads, head_dim, in_dtype, device, seed=sum(shape))
    slots = _slot_mapping(num_tokens, num_blocks * block_size, device, seed=num_tokens)
    k_gs = kv_formats.nvfp4_global_scale(k) * 4  # f32[]: coarse enough that some block scales round to 0
    v_gs = kv_formats.nvfp4_global_scale(v)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim // 2)
    scale_shape = (num_blocks, block_size, num_kv_heads, head_dim // 16)
    k_cache = torch.full(cache_shape, NAN_BYTE, dtype=torch.uint8, device=device)  # u8[N, bs, Hkv, D/2]
    v_cache = k_cache.clone()
    k_bs = torch.full(scale_shape, float("nan"), device=device).to(torch.float8_e4m3fn)  # e4m3[N, bs, Hkv, D/16]
    v_bs = k_bs.clone()
    want = [t.clone() for t in (k_cache, v_cache, k_bs, v_bs)]
    kv_write(k, v, slots, k_cache, v_cache, kv_format="nvfp4", k_scale=k_gs, v_scale=v_gs,
             k_block_scale=k_bs, v_block_scale=v_bs)
    ref_kv_write(k, v, slots, want[0], want[1], kv_format="nvfp4", k_scale=k_gs, v_scale=v_gs,
                 k_block_scale=want[2], v_block_scale=want[3])
    written = _written_mask(slots, num_blocks, block_size, device)
    order = torch.argsort(slots[slots >= 0].long())
    for src, gs, got_codes, got_bs, want_codes, want_bs in (
            (k, k_gs, k_cache, k_bs, want[0], want[2]), (v, v_gs, v_cache, v_bs, want[1], want[3])):
        rows = src[slots >= 0][order].float()  # f32[T', Hkv, D] in cache-row order
        groups = rows.reshape(*rows.shape[:2], -1, 16)  # f32[T', Hkv, D/16, 16]
        exact_bs = (groups.abs().amax(dim=-1) / 6 / gs).clamp(max=448)  # f32[T', Hkv, D/16]
        _assert_e4m3_codes_match(got_bs[written], want_bs[written], exact_bs)
        same_scale = got_bs[written].float() == want_bs[written].float()  # bool[T', Hkv, D/16]
        # codes: equal where the group scale agrees, except ties of v / (block_scale * gs)
        nibbles = lambda c: torch.stack((c & 0xF, c >> 4), dim=-1).reshape(*c.shape[:-1], -1, 16)
        got_n, want_n = nibbles(got_codes[written]), nibbles(want_codes[written])  # u8[T', Hkv, D/16, 16]
        denom = (want_bs[written].float() * gs)[..., None]  # f32[T', Hkv, D/16, 1]
        scaled = (groups / torch.where(denom == 0, torch.ones_like(denom), denom)).abs()
        on_tie = torch.isin(scaled, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], device=device))
        bad = (got_n != want_n) & same_scale[..., None] & ~on_tie
        assert not bad.any(), f"{int(bad.sum())} NVFP4 codes differ from the reference off a tie"
        deq_got = kv_formats.dequantize_nvfp4(got_codes[written], got_bs[written], gs)
        deq_want = kv_formats.dequantize_nvfp4(want_codes[written], want_bs[written], gs)
        step = (want_bs[written].float() * gs).repeat_interleave(16, dim=-1)  # largest code step is 2 units
        assert ((deq_got - deq_want).abs() <= 2 * step + 1e-12).all()
        # the quantized values track the input: error at most one (saturating) code step per group
        assert ((deq_got - rows).abs() <= 2 * step + 0.07 * groups.abs().amax(-1).repeat_interleave(16, -1)).all()
        _assert_untouched(got_codes, written, nan_byte=NAN_BYTE)
        _assert_untouched(got_bs, written, nan_byte=NAN_BYTE)


def test_kv_write_views_of_fused_qkv(device):
    num_tokens, num_kv_heads, head_dim, block_size = 9, 2, 64, 5
    qkv = torch.randn(num_tokens, (4 + 2 * num_kv_heads) * head_dim, device=device, dtype=torch.bfloat16)
    k = qkv[:, 4 * head_dim: (4 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, (4 + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.tensor([4, -1, 0, 9, 12, 3, -1, 7, 1], dtype=torch.int32, device=device)
    k_cache = torch.full((3, block_size, num_kv_heads, head_dim), float("nan"), dtype=torch.bfloat16, device=device)
    v_cache = k_cache.clone()
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_write(k, v, slots, k_cache, v_cache)
    ref_kv_write(k, v, slots, want_k, want_v)
    assert torch.equal(k_cache.nan_to_num(7.0), want_k.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), want_v.nan_to_num(7.0))


def test_kv_write_rejects_bad_input(device):
    k = torch.randn(4, 2, 64, device=device)
    cache = torch.zeros(2, 4, 2, 64, device=device)
    slots = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="slot_mapping values"):
        kv_write(k, k, torch.tensor([0, 1, 2, 8], dtype=torch.int32, device=device), cache, cache.clone())
    with pytest.raises(ValueError, match="slot_mapping values"):
        kv_write(k, k, torch.tensor([0, -2, 2, 3], dtype=torch.int32, device=device), cache, cache.clone())
    with pytest.raises(ValueError, match="slot_mapping must be"):
        kv_write(k, k, slots[:3], cache, cache.clone())
    with pytest.raises(ValueError, match="does not fit"):
        kv_write(k, k, slots, torch.zeros(2, 4, 2, 32, device=device), torch.zeros(2, 4, 2, 32, device=device))
    with pytest.raises(ValueError, match="k_scale"):
        fp8 = cache.to(torch.float8_e4m3fn)
        kv_write(k, k, slots, fp8, fp8.clone(), kv_format="fp8")
    with pytest.raises(ValueError, match="float8_e4m3fn caches"):
        kv_write(k, k, slots, cache, cache.clone(), kv_format="fp8", k_scale=torch.ones(2), v_scale=torch.ones(2))
    with pytest.raises(ValueError, match="k_block_scale"):
        packed = torch.zeros(2, 4, 2, 32, dtype=torch.uint8, device=device)
        gs = torch.tensor(1.0, device=device)
        kv_write(k, k, slots, packed, packed.clone(), kv_format="nvfp4", k_scale=gs, v_scale=gs)
    with pytest.raises(ValueError, match="unknown kv_format"):
        kv_write(k, k, slots, cache, cache.clone(), kv_format="int8")


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_kv_write_nvfp4_centered_mse46_matches_reference_exactly(device, in_dtype, shape):
    """K centering and the "mse46" block-scale rule: the kernel's bytes equal ref_kv_write's (the scale choice
    is an integer comparison, independent of reduction order), and the rule lowers the squared error."""
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = shape
    k, v = _inputs(num_tokens, num_kv_heads, head_dim, in_dtype, device, seed=sum(shape) + 1)
    g = torch.Generator().manual_seed(7)
    center = (torch.randn(num_kv_heads, head_dim, generator=g) * 2).to(device)  # f32[Hkv, D]
    k = (k.float() + center).to(in_dtype)
    slots = _slot_mapping(num_tokens, num_blocks * block_size, device, seed=num_tokens)
    k_gs = kv_formats.nvfp4_global_scale(k.float() - center)
    v_gs = kv_formats.nvfp4_global_scale(v)
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim // 2)
    scale_shape = (num_blocks, block_size, num_kv_heads, head_dim // 16)
    got = [torch.full(cache_shape, NAN_BYTE, dtype=torch.uint8, device=device) for _ in range(2)]
    got += [torch.full(scale_shape, float("nan"), device=device).to(torch.float8_e4m3fn) for _ in range(2)]
    want = [t.clone() for t in got]
    plain = [t.clone() for t in got]
    kw = dict(kv_format="nvfp4", k_scale=k_gs, v_scale=v_gs)
    kv_write(k, v, slots, got[0], got[1], k_block_scale=got[2], v_block_scale=got[3], k_center=center,
             scale_rule="mse46", **kw)
    ref_kv_write(k, v, slots, want[0], want[1], k_block_scale=want[2], v_block_scale=want[3], k_center=center,
                 scale_rule="mse46", **kw)
    ref_kv_write(k, v, slots, plain[0], plain[1], k_block_scale=plain[2], v_block_scale=plain[3], k_center=center,
                 **kw)
    written = _written_mask(slots, num_blocks, block_size, device)
    for a, b in zip(got, want):
        assert torch.equal(a[written].view(torch.uint8), b[written].view(torch.uint8))
        _assert_untouched(a, written, nan_byte=NAN_BYTE)
    order = torch.argsort(slots[slots >= 0].long())
    for i, (src, gs) in enumerate(((k.float() - center, k_gs), (v.float(), v_gs))):
        rows = src[slots >= 0][order]
        err = [((kv_formats.dequantize_nvfp4(c[i][written], c[2 + i][written], gs) - rows) ** 2).sum()
               for c in (want, plain)]
        assert err[0] < err[1]
    with pytest.raises(ValueError, match="k_center"):
        kv_write(k, v, slots, got[0], got[1], k_block_scale=got[2], v_block_scale=got[3],
                 k_center=center.double(), **kw)


def _nvfp4_caches(num_blocks, block_size, num_kv_heads, head_dim, device):
    """[k codes, v codes, k block scales, v block scales], every byte NAN_BYTE (never written by a slot)."""
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim // 2)
    scale_shape = (num_blocks, block_size, num_kv_heads, head_dim // 16)
    caches = [torch.full(cache_shape, NAN_BYTE, dtype=torch.uint8, device=device) for _ in range(2)]
    return caches + [torch.full(scale_shape, float("nan"), device=device).to(torch.float8_e4m3fn) for _ in range(2)]


def _anisotropic_factor(num_kv_heads, head_dim, seed):
    """(second moments H f64[Hkv, D, D] = A^T A / n, feedback factors U f32[Hkv, D, D]): A's columns have scales
    spanning 30x, in a random order per head."""
    rng = np.random.default_rng(seed)
    n = 2 * head_dim
    moments = []
    for _ in range(num_kv_heads):
        a = rng.standard_normal((n, head_dim)) * rng.permutation(np.geomspace(1.0, 30.0, head_dim))
        moments.append(a.T @ a / n)
    moments = np.stack(moments)
    return moments, torch.from_numpy(formats.feedback_factor(moments))


def _score_error(codes, block_scales, gs, rows, moments):
    """sum over rows and heads of e^T H e, e = dequantized - rows f32[T', Hkv, D] (float64)."""
    e = (kv_formats.dequantize_nvfp4(codes, block_scales, gs) - rows).double().cpu().numpy()
    return float(np.einsum("thi,hij,thj->", e, moments, e))


def test_kv_write_nvfp4_identity_feedback_is_plain_nvfp4(device):
    """U = I moves no error: the feedback kernel writes exactly the plain nvfp4 bytes (centered, "mse46")."""
    num_tokens, num_kv_heads, head_dim, block_size, num_blocks = 4, 3, 32, 3, 3
    k, v = _inputs(num_tokens, num_kv_heads, head_dim, torch.float32, device, seed=5)
    center = (torch.randn(num_kv_heads, head_dim, generator=torch.Generator().manual_seed(8)) * 2).to(device)
    slots = torch.tensor([7, -1, 0, 4], dtype=torch.int32, device=device)
    kw = dict(kv_format="nvfp4", k_scale=kv_formats.nvfp4_global_scale(k - center),
              v_scale=kv_formats.nvfp4_global_scale(v), k_center=center, scale_rule="mse46")
    eye = torch.eye(head_dim, device=device).expand(num_kv_heads, head_dim, head_dim).contiguous()
    got = _nvfp4_caches(num_blocks, block_size, num_kv_heads, head_dim, device)
    plain = [t.clone() for t in got]
    kv_write(k, v, slots, got[0], got[1], k_block_scale=got[2], v_block_scale=got[3], k_feedback=eye, **kw)
    kv_write(k, v, slots, plain[0], plain[1], k_block_scale=plain[2], v_block_scale=plain[3], **kw)
    for a, b in zip(got, plain):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("head_dim, scale_rule, in_dtype, num_tokens", [
    (64, "amax", torch.bfloat16, 4), (64, "mse46", torch.float32, 4), (128, "mse46", torch.bfloat16, 3)])
def test_kv_write_nvfp4_feedback_matches_reference(device, head_dim, scale_rule, in_dtype, num_tokens):
    """Score-aware K rounding against lowering.quant.formats.quantize_nvfp4_feedback (anisotropic factors,
    centered K, 3 kv heads, ragged slots): on the interpreter the same bytes; on a GPU nearly all, and the same
    score error e^T H e. It is well below plain rounding's; V is written as without feedback."""
    num_kv_heads, block_size, num_blocks = 3, 5, 2
    k, v = _inputs(num_tokens, num_kv_heads, head_dim, in_dtype, device, seed=head_dim + 3)
    center = (torch.randn(num_kv_heads, head_dim, generator=torch.Generator().manual_seed(9)) * 2).to(device)
    k = (k.float() + center).to(in_dtype)
    moments, factor = _anisotropic_factor(num_kv_heads, head_dim, seed=head_dim)
    factor = factor.to(device)
    slots = torch.tensor([6, -1, 0, 9][:num_tokens], dtype=torch.int32, device=device)
    k_gs = kv_formats.nvfp4_global_scale(k.float() - center)
    kw = dict(kv_format="nvfp4", k_scale=k_gs, v_scale=kv_formats.nvfp4_global_scale(v), k_center=center,
              scale_rule=scale_rule)
    got = _nvfp4_caches(num_blocks, block_size, num_kv_heads, head_dim, device)
    want, plain = [t.clone() for t in got], [t.clone() for t in got]
    kv_write(k, v, slots, got[0], got[1], k_block_scale=got[2], v_block_scale=got[3], k_feedback=factor, **kw)
    ref_kv_write(k, v, slots, want[0], want[1], k_block_scale=want[2], v_block_scale=want[3], k_feedback=factor,
                 **kw)
    ref_kv_write(k, v, slots, plain[0], plain[1], k_block_scale=plain[2], v_block_scale=plain[3], **kw)
    written = _written_mask(slots, num_blocks, block_size, device)
    for a in got:
        _assert_untouched(a, written, nan_byte=NAN_BYTE)
    for i in (1, 3):  # V: codes, block scales
        assert torch.equal(got[i][written].view(torch.uint8), plain[i][written].view(torch.uint8))
    got_codes, got_bs = got[0][written], got[2][written].view(torch.uint8)
    want_codes, want_bs = want[0][written], want[2][written].view(torch.uint8)
    same_codes = (got_codes == want_codes).float().mean().item()
    same_bs = (got_bs == want_bs).float().mean().item()
    order = torch.argsort(slots[slots >= 0].long())
    rows = (k.float() - center)[slots >= 0][order]  # f32[T', Hkv, D] in cache-row order
    err_got, err_want, err_plain = (_score_error(c[0][written], c[2][written], k_gs, rows, moments)
                                    for c in (got, want, plain))
    if device == "cpu":  # the interpreter: numpy's f32 arithmetic, step for step
        assert same_bs == 1.0 and same_codes >= 0.999, (same_bs, same_codes)
    else:  # the kernel may round an f32 division or product differently in rare codes, then diverge
        assert same_bs >= 0.99 and same_codes >= 0.99, (same_bs, same_codes)
    assert abs(err_got - err_want) <= 0.02 * err_want
    assert err_want < 0.85 * err_plain, (err_want, err_plain)


def test_kv_write_rejects_bad_feedback(device):
    num_kv_heads, head_dim = 2, 64
    k = torch.randn(4, num_kv_heads, head_dim, device=device)
    slots = torch.tensor([0, 1, 2, 3], dtype=torch.int32, device=device)
    caches = _nvfp4_caches(2, 4, num_kv_heads, head_dim, device)
    gs = torch.tensor(0.01, device=device)
    kw = dict(kv_format="nvfp4", k_scale=gs, v_scale=gs, k_block_scale=caches[2], v_block_scale=caches[3])
    eye = torch.eye(head_dim, device=device).expand(num_kv_heads, head_dim, head_dim).contiguous()
    for bad in (eye[:, :, :32].contiguous(), eye[:1].contiguous(), eye.double(), eye.transpose(1, 2)):
        with pytest.raises(ValueError, match="k_feedback"):
            kv_write(k, k, slots, caches[0], caches[1], k_feedback=bad, **kw)
    fp8 = torch.zeros(2, 4, num_kv_heads, head_dim, device=device).to(torch.float8_e4m3fn)
    scale = torch.ones(num_kv_heads, device=device)
    with pytest.raises(ValueError, match="k_feedback"):
        kv_write(k, k, slots, fp8, fp8.clone(), kv_format="fp8", k_scale=scale, v_scale=scale, k_feedback=eye)
    with pytest.raises(ValueError, match="k_feedback"):
        kv_write(k, k, slots, torch.zeros(2, 4, num_kv_heads, head_dim, device=device),
                 torch.zeros(2, 4, num_kv_heads, head_dim, device=device), k_feedback=eye)
    assert (caches[0] == NAN_BYTE).all()
