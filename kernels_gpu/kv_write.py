"""Scatter new K/V rows into the paged KV cache in place, quantizing to FP8 or NVFP4 on write."""
import torch
import triton
import triton.language as tl

from kernels_gpu import kv_formats
from kernels_gpu.paged_attention import _e2m1_to_f32
from kernels_gpu.triton_env import tile_target

# Tuning data: one program writes the K and V rows of one token for up to
# KV_WRITE_ELEMENTS // padded head_dim kv heads (values, or 16-value groups * 16 for NVFP4).
KV_WRITE_ELEMENTS = 1024
KV_WRITE_NUM_WARPS = 4
# With k_feedback (NVFP4 K coded one element after another), on a GPU: kv heads per program and warps.
KV_WRITE_FEEDBACK_HEADS = 1
KV_WRITE_FEEDBACK_NUM_WARPS = 1

KV_FORMATS = {"bf16": 0, "fp8": 1, "nvfp4": 2}  # "bf16": stored as the cache's own dtype (bf16/fp16/fp32)
_PLAIN_CACHE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_NVFP4_GROUP = kv_formats.NVFP4_BLOCK  # 16 values share one block scale


@triton.jit
def _round_to_e4m3(x):
    """f32 -> f32 on the float8_e4m3fn grid: round to nearest even, saturating at +-448.

    NOTE: rounding is done exactly in integer/power-of-two arithmetic so the later cast to fp8 is
    exact, whatever rounding the hardware convert (or the interpreter) would apply.
    """
    bits = x.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # the fp32 sign bit
    mag = tl.minimum(tl.abs(x), 448.0)  # f32, saturated
    exponent = ((mag.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # e4m3 keeps 3 mantissa bits for exponents >= -6; below that (subnormals) the spacing stays 2^-9.
    ulp_exponent = tl.maximum(exponent, -6) - 3
    ulp = ((ulp_exponent + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exponent) << 23).to(tl.float32, bitcast=True)
    steps = mag * inv_ulp  # exact: in [0, 16)
    whole = steps.to(tl.int32)  # floor, steps >= 0
    frac = steps - whole.to(tl.float32)
    round_up = (frac > 0.5) | ((frac == 0.5) & ((whole & 1) == 1))
    rounded = (whole + round_up.to(tl.int32)).to(tl.float32) * ulp
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_code(v, denom):
    """f32 value and its f32 scale -> i32 E2M1 nibble (RNE, ties to even code, saturating; bit 3 = sign)."""
    safe = tl.where(denom != 0.0, denom, 1.0)
    a = tl.abs(tl.math.div_rn(v, safe))
    code = ((a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
            + (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32)
            + (a > 5.0).to(tl.int32))
    code = code | ((v.to(tl.int32, bitcast=True) >> 28) & 8)  # IEEE sign bit -> nibble bit 3
    return tl.where(denom != 0.0, code, 0)


@triton.jit
def _write_rows_plain(src, dst, head_ok, row_ok, head_dim, BLOCK_D: tl.constexpr):
    """src, dst: row pointers [BLOCK_H, 1]; head_ok: bool[BLOCK_H, 1] (head exists); row_ok: and slot >= 0."""
    cols = tl.arange(0, BLOCK_D)[None, :]  # i32[1, BLOCK_D]
    in_row = cols < head_dim
    # NOTE: loads are masked by head_ok only, so they can issue before the slot is known.
    x = tl.load(src + cols, mask=in_row & head_ok)  # [BLOCK_H, BLOCK_D]
    tl.store(dst + cols, x.to(dst.dtype.element_ty), mask=in_row & row_ok)


@triton.jit
def _write_rows_fp8(src, dst, scale, head_ok, row_ok, head_dim, BLOCK_D: tl.constexpr):
    """As _write_rows_plain, storing RNE(sat(x / scale)) as e4m3; scale: f32[BLOCK_H, 1] per head."""
    cols = tl.arange(0, BLOCK_D)[None, :]  # i32[1, BLOCK_D]
    in_row = cols < head_dim
    x = tl.load(src + cols, mask=in_row & head_ok, other=0.0).to(tl.float32)  # f32[BLOCK_H, BLOCK_D]
    q = _round_to_e4m3(tl.math.div_rn(x, scale + tl.zeros_like(x)))
    tl.store(dst + cols, q.to(tl.float8e4nv), mask=in_row & row_ok)


@triton.jit
def _e2m1_magnitude(a):
    """|value| (already divided by its scale) -> the E2M1 magnitude it rounds to (as _e2m1_code), f32."""
    return tl.where(a > 5.0, 6.0, tl.where(a >= 3.5, 4.0, tl.where(a > 2.5, 3.0, tl.where(
        a >= 1.75, 2.0, tl.where(a > 1.25, 1.5, tl.where(a >= 0.75, 1.0, tl.where(a > 0.25, 0.5, 0.0)))))))


@triton.jit
def _nvfp4_scale_error(lo, hi, amax, block_scale, gs):
    """i32[BLOCK_H, BLOCK_G]: lowering.quant.formats.nvfp4_scale_error of each 16-block (lo, hi: its even
    and odd values f32[BLOCK_H, BLOCK_G, 8]) stored with block_scale (f32 on the e4m3 grid). Integer sums,
    and no multiply feeds an add, so the result does not depend on reduction order or FMA contraction."""
    den = block_scale * gs
    ok = (den != 0.0) & (amax != 0.0)
    safe_den = tl.where(ok, den, 1.0)
    ratio = tl.math.div_rn(safe_den, tl.where(ok, amax, 1.0))[:, :, None]
    d3 = safe_den[:, :, None] + tl.zeros_like(lo)
    y_lo = tl.abs(tl.math.div_rn(lo, d3))
    y_hi = tl.abs(tl.math.div_rn(hi, d3))
    r_lo = (y_lo - _e2m1_magnitude(y_lo)) * ratio
    r_hi = (y_hi - _e2m1_magnitude(y_hi)) * ratio
    e_lo = tl.floor(tl.minimum(r_lo * r_lo, 4.0) * 1048576.0).to(tl.int32)
    e_hi = tl.floor(tl.minimum(r_hi * r_hi, 4.0) * 1048576.0).to(tl.int32)
    return tl.where(ok, tl.sum(e_lo, axis=2) + tl.sum(e_hi, axis=2), 0)


@triton.jit
def _write_rows_nvfp4(src, codes, block_scales, global_scale, head_ok, row_ok, num_groups, center,
                      BLOCK_G: tl.constexpr, HAS_CENTER: tl.constexpr, SCALE_RULE: tl.constexpr):
    """Rows of D = 16 * num_groups values -> D/2 packed bytes + num_groups e4m3 block scales per row.

    src, codes: [BLOCK_H, 1, 1] row pointers; block_scales: [BLOCK_H, 1]; global_scale: f32 scalar;
    head_ok, row_ok: bool[BLOCK_H, 1] as in _write_rows_plain; center: [BLOCK_H, 1, 1] row pointers of an
    f32 vector subtracted from the values first (HAS_CENTER). SCALE_RULE 0: block amax -> 6; 1 ("mse46"):
    the better of amax -> 6 and amax -> 4 by _nvfp4_scale_error (lowering.quant.formats.nvfp4_block_scales).
    Each row is viewed as [group, pair]: elements 16*g + 2*p (low nibble) and 16*g + 2*p + 1 (high
    nibble) land in byte 8*g + p.
    """
    groups = tl.arange(0, BLOCK_G)  # i32[BLOCK_G]
    pairs = tl.arange(0, 8)  # i32[8]
    even = groups[None, :, None] * 16 + pairs[None, None, :] * 2  # i32[1, BLOCK_G, 8]
    in_row = (groups[None, :, None] < num_groups) & (pairs[None, None, :] < 8)  # bool[1, BLOCK_G, 8]
    load_ok = in_row & head_ok[:, :, None]  # bool[BLOCK_H, BLOCK_G, 8]
    lo = tl.load(src + even, mask=load_ok, other=0.0).to(tl.float32)  # f32[BLOCK_H, BLOCK_G, 8]
    hi = tl.load(src + even + 1, mask=load_ok, other=0.0).to(tl.float32)
    if HAS_CENTER:
        lo = lo - tl.load(center + even, mask=load_ok, other=0.0)
        hi = hi - tl.load(center + even + 1, mask=load_ok, other=0.0)
    amax = tl.maximum(tl.max(tl.abs(lo), axis=2), tl.max(tl.abs(hi), axis=2))  # f32[BLOCK_H, BLOCK_G]
    gs = global_scale + tl.zeros_like(amax)
    block_scale = _round_to_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 6.0 + tl.zeros_like(amax)), gs))
    if SCALE_RULE == 1:
        scale4 = _round_to_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 4.0 + tl.zeros_like(amax)), gs))
        use4 = ((_nvfp4_scale_error(lo, hi, amax, scale4, gs) < _nvfp4_scale_error(lo, hi, amax, block_scale, gs))
                & (scale4 != 0.0))
        block_scale = tl.where(use4, scale4, block_scale)
    tl.store(block_scales + groups[None, :], block_scale.to(tl.float8e4nv),
             mask=(groups[None, :] < num_groups) & row_ok)
    denom = (block_scale * gs)[:, :, None]  # f32[BLOCK_H, BLOCK_G, 1]
    packed = _e2m1_code(lo, denom) | (_e2m1_code(hi, denom) << 4)  # i32[BLOCK_H, BLOCK_G, 8]
    byte = groups[None, :, None] * 8 + pairs[None, None, :]  # i32[1, BLOCK_G, 8]
    tl.store(codes + byte, packed.to(tl.uint8), mask=in_row & row_ok[:, :, None])


@triton.jit
def _column(x, cols, j):
    """Column j of x f32[BLOCK_H, N] (cols: i32[1, N]) -> f32[BLOCK_H, 1], bit for bit: an integer sum of the
    selected element and zeros, so neither -0.0 nor the reduction order can change it."""
    bits = tl.where(cols == j, x.to(tl.int32, bitcast=True), 0)
    return tl.sum(bits, axis=1)[:, None].to(tl.float32, bitcast=True)


@triton.jit
def _write_k_nvfp4_feedback(src, codes, block_scales, global_scale, head_ok, row_ok, head_dim, center, factor,
                            BLOCK_H: tl.constexpr, BLOCK_G: tl.constexpr, HAS_CENTER: tl.constexpr,
                            SCALE_RULE: tl.constexpr):
    """_write_rows_nvfp4 with score-aware rounding (error feedback), exactly
    lowering.quant.formats.quantize_nvfp4_feedback: the D values x of a row are coded in order j = 0 .. D-1;
    at the first element of each 16-block its scale is chosen from the block's current values (SCALE_RULE,
    as _write_rows_nvfp4); x_j gets its E2M1 code, then r = (x_j - decoded_j) / U[j, j] and
    x_k -= r * U[j, k] for every k > j (each a correctly rounded f32 operation when FP fusion is off).

    src, codes, block_scales, center: [BLOCK_H, 1] row pointers (center: f32[D], HAS_CENTER only); factor:
    [BLOCK_H, 1] pointers of each head's U f32[D, D] (row-major, upper triangular); global_scale: f32 scalar;
    head_ok, row_ok: bool[BLOCK_H, 1] as in _write_rows_plain. The row is kept whole, x f32[BLOCK_H, 16 *
    BLOCK_G]; a loop over the elements reads column j and U's row j, and gathers codes and block scales.
    """
    cols = tl.arange(0, BLOCK_G * 16)[None, :]  # i32[1, BLOCK_N]: element
    pair_cols = tl.arange(0, BLOCK_G * 8)[None, :]  # i32[1, BLOCK_N / 2]: byte (elements 2p, 2p + 1)
    group_cols = tl.arange(0, BLOCK_G)[None, :]  # i32[1, BLOCK_G]: 16-block
    in_row = cols < head_dim
    load_ok = in_row & head_ok  # bool[BLOCK_H, BLOCK_N]
    x = tl.load(src + cols, mask=load_ok, other=0.0).to(tl.float32)  # f32[BLOCK_H, BLOCK_N]
    if HAS_CENTER:
        x = x - tl.load(center + cols, mask=load_ok, other=0.0)
    gs = global_scale + tl.zeros([BLOCK_H, 1], tl.float32)  # f32[BLOCK_H, 1]
    packed = tl.zeros([BLOCK_H, BLOCK_G * 8], tl.int32)  # i32[BLOCK_H, BLOCK_N / 2]: nibbles gathered
    scales = tl.zeros([BLOCK_H, BLOCK_G], tl.float32)  # f32[BLOCK_H, BLOCK_G]: block scales on the e4m3 grid
    # U[h, j, k > j] and the pivot U[h, j, j] of the element j being coded, loaded one element ahead so their
    # latency hides behind the previous element's work.
    u = tl.load(factor + cols, mask=load_ok & (cols > 0), other=0.0)  # f32[BLOCK_H, BLOCK_N]
    pivot = tl.load(factor, mask=head_ok, other=1.0)  # f32[BLOCK_H, 1]
    num_groups = head_dim // 16
    for g in range(0, num_groups):
        start = g * 16
        xb = tl.where((cols >= start) & (cols < start + 16), x, 0.0)  # f32[BLOCK_H, BLOCK_N]: block g
        amax = tl.max(tl.abs(xb), axis=1)[:, None]  # f32[BLOCK_H, 1]
        block_scale = _round_to_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 6.0 + tl.zeros_like(amax)), gs))
        if SCALE_RULE == 1:
            lo = xb[:, None, :]  # f32[BLOCK_H, 1, BLOCK_N]: the zeros outside the block add no error
            hi = tl.zeros_like(lo)
            scale4 = _round_to_e4m3(tl.math.div_rn(tl.math.div_rn(amax, 4.0 + tl.zeros_like(amax)), gs))
            use4 = ((_nvfp4_scale_error(lo, hi, amax, scale4, gs) < _nvfp4_scale_error(lo, hi, amax, block_scale, gs))
                    & (scale4 != 0.0))
            block_scale = tl.where(use4, scale4, block_scale)
        scales = tl.where(group_cols == g, block_scale, scales)
        denom = block_scale * gs  # f32[BLOCK_H, 1]
        for i in range(0, 16):
            j = start + i
            ahead = tl.minimum(j + 1, head_dim - 1)  # the next row (clamped: the last one is not used)
            u_next = tl.load(factor + ahead * head_dim + cols, mask=load_ok & (cols > ahead), other=0.0)
            pivot_next = tl.load(factor + ahead * (head_dim + 1), mask=head_ok, other=1.0)
            xj = _column(x, cols, j)  # f32[BLOCK_H, 1]
            code = _e2m1_code(xj, denom)  # i32[BLOCK_H, 1]
            packed = packed | tl.where(pair_cols == j // 2, code << (4 * (j % 2)), 0)
            r = tl.math.div_rn(xj - _e2m1_to_f32(code) * denom, pivot)  # f32[BLOCK_H, 1]
            x = tl.where(cols > j, x - r * u, x)
            u = u_next
            pivot = pivot_next
    tl.store(codes + pair_cols, packed.to(tl.uint8), mask=(pair_cols < head_dim // 2) & row_ok)
    tl.store(block_scales + group_cols, scales.to(tl.float8e4nv), mask=(group_cols < num_groups) & row_ok)


@triton.jit
def kv_write_kernel(
    k_ptr, v_ptr, slot_mapping_ptr, k_cache_ptr, v_cache_ptr,
    k_scale_ptr, v_scale_ptr, k_block_scale_ptr, v_block_scale_ptr, k_center_ptr, k_feedback_ptr,
    num_kv_heads, block_size, head_dim,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcn, stride_kcb, stride_kch, stride_vcn, stride_vcb, stride_vch,
    stride_ksn, stride_ksb, stride_ksh, stride_vsn, stride_vsb, stride_vsh,
    KV_FORMAT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_CENTER: tl.constexpr = False, SCALE_RULE: tl.constexpr = 0, HAS_FEEDBACK: tl.constexpr = False,
):
    """One program per (token, BLOCK_H kv heads): write K[t, h] and V[t, h] to slot slot_mapping[t] (skip if < 0).

    KV_FORMAT 0: plain copy/cast; 1: FP8 with per-head scale; 2: NVFP4 with per-layer global scale
    (BLOCK_D then counts 16-value groups); HAS_FEEDBACK: K with score-aware rounding by the factors
    k_feedback f32[Hkv, D, D] (_write_k_nvfp4_feedback).
    """
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # i32[BLOCK_H]
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    head_ok = (heads < num_kv_heads)[:, None]  # bool[BLOCK_H, 1]
    # NOTE: the slot test is made on a broadcast tensor: the interpreter mistypes scalar-bool masks.
    row_ok = head_ok & ((slot + tl.zeros([BLOCK_H, 1], tl.int64)) >= 0)  # bool[BLOCK_H, 1]
    slot = tl.maximum(slot, 0)
    block = slot // block_size
    offset = slot % block_size
    rows = heads[:, None].to(tl.int64)  # i64[BLOCK_H, 1]
    k_src = k_ptr + token * stride_kt + rows * stride_kh
    v_src = v_ptr + token * stride_vt + rows * stride_vh
    k_dst = k_cache_ptr + block * stride_kcn + offset * stride_kcb + rows * stride_kch
    v_dst = v_cache_ptr + block * stride_vcn + offset * stride_vcb + rows * stride_vch
    if KV_FORMAT == 0:
        _write_rows_plain(k_src, k_dst, head_ok, row_ok, head_dim, BLOCK_D)
        _write_rows_plain(v_src, v_dst, head_ok, row_ok, head_dim, BLOCK_D)
    elif KV_FORMAT == 1:
        k_scale = tl.load(k_scale_ptr + rows, mask=head_ok, other=1.0)  # f32[BLOCK_H, 1]
        v_scale = tl.load(v_scale_ptr + rows, mask=head_ok, other=1.0)
        _write_rows_fp8(k_src, k_dst, k_scale, head_ok, row_ok, head_dim, BLOCK_D)
        _write_rows_fp8(v_src, v_dst, v_scale, head_ok, row_ok, head_dim, BLOCK_D)
    else:
        num_groups = head_dim // 16
        k_bs = k_block_scale_ptr + block * stride_ksn + offset * stride_ksb + rows * stride_ksh
        v_bs = v_block_scale_ptr + block * stride_vsn + offset * stride_vsb + rows * stride_vsh
        k_center = k_center_ptr + rows * head_dim  # f32[Hkv, D] contiguous (HAS_CENTER only)
        if HAS_FEEDBACK:
            k_factor = k_feedback_ptr + rows * head_dim * head_dim  # f32[Hkv, D, D] contiguous
            _write_k_nvfp4_feedback(k_src, k_dst, k_bs, tl.load(k_scale_ptr), head_ok, row_ok, head_dim, k_center,
                                    k_factor, BLOCK_H, BLOCK_D, HAS_CENTER, SCALE_RULE)
        else:
            _write_rows_nvfp4(k_src[:, :, None], k_dst[:, :, None], k_bs, tl.load(k_scale_ptr), head_ok, row_ok,
                              num_groups, k_center[:, :, None], BLOCK_D, HAS_CENTER, SCALE_RULE)
        _write_rows_nvfp4(v_src[:, :, None], v_dst[:, :, None], v_bs, tl.load(v_scale_ptr), head_ok, row_ok,
                          num_groups, k_center[:, :, None], BLOCK_D, False, SCALE_RULE)


def _check(cond, msg):
    if not cond:
        raise ValueError(f"kv_write: {msg}")


def validate_kv_write(k, v, slot_mapping, k_cache, v_cache, kv_format="bf16", k_scale=None, v_scale=None,
                      k_block_scale=None, v_block_scale=None, check_slots=True):
    """kv_write's argument checks (ValueError naming the problem); also for kernels that write the cache in
    kv_write's layout themselves (kernels_gpu.rope.rope_kv_write)."""
    _check(kv_format in KV_FORMATS, f"unknown kv_format {kv_format!r} (one of {sorted(KV_FORMATS)})")
    _check(k.dim() == 3 and v.shape == k.shape, f"k and v must both be [T, Hkv, D], got "
           f"{tuple(k.shape)} and {tuple(v.shape)}")
    _check(k.dtype in _INPUT_DTYPES and v.dtype in _INPUT_DTYPES,
           f"k/v dtype must be bf16, fp16 or fp32, got {k.dtype}/{v.dtype}")
    num_tokens, num_kv_heads, head_dim = k.shape
    _check(head_dim <= 1 or (k.stride(2) == 1 and v.stride(2) == 1), "k and v must be contiguous in D")
    _check(slot_mapping.shape == (num_tokens,) and slot_mapping.dtype in (torch.int32, torch.int64),
           f"slot_mapping must be i32[{num_tokens}], got {slot_mapping.dtype}{list(slot_mapping.shape)}")
    _check(k_cache.dim() == 4 and v_cache.shape == k_cache.shape,
           f"k_cache and v_cache must both be [N, block_size, Hkv, D'], got {tuple(k_cache.shape)} "
           f"and {tuple(v_cache.shape)}")
    _check(k_cache.dtype == v_cache.dtype, f"k_cache dtype {k_cache.dtype} != v_cache dtype {v_cache.dtype}")
    _check(k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "caches must be contiguous in the last dim")
    stored_dim = head_dim // 2 if kv_format == "nvfp4" else head_dim
    _check(k_cache.shape[2] == num_kv_heads and k_cache.shape[3] == stored_dim,
           f"cache shape {tuple(k_cache.shape)} does not fit Hkv={num_kv_heads}, D={head_dim} in {kv_format}")
    devices = {t.device for t in (k, v, slot_mapping, k_cache, v_cache)}
    if kv_format == "bf16":
        _check(k_cache.dtype in _PLAIN_CACHE_DTYPES, f"bf16 format needs a bf16/fp16/fp32 cache, got {k_cache.dtype}")
    elif kv_format == "fp8":
        _check(k_cache.dtype == torch.float8_e4m3fn, f"fp8 format needs float8_e4m3fn caches, got {k_cache.dtype}")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check(s is not None and s.shape == (num_kv_heads,) and s.dtype == torch.float32,
                   f"fp8 format needs {name} f32[{num_kv_heads}], got "
                   f"{None if s is None else f'{s.dtype}{list(s.shape)}'}")
            devices.add(s.device)
    else:
        _check(head_dim % _NVFP4_GROUP == 0, f"nvfp4 needs head_dim % {_NVFP4_GROUP} == 0, got {head_dim}")
        _check(k_cache.dtype == torch.uint8, f"nvfp4 format needs uint8 caches, got {k_cache.dtype}")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check(s is not None and s.numel() == 1 and s.dtype == torch.float32,
                   f"nvfp4 format needs {name} as an f32 scalar global scale")
            devices.add(s.device)
        want = (*k_cache.shape[:3], head_dim // _NVFP4_GROUP)
        for name, s in (("k_block_scale", k_block_scale), ("v_block_scale", v_block_scale)):
            _check(s is not None and s.shape == want and s.dtype == torch.float8_e4m3fn,
                   f"nvfp4 format needs {name} float8_e4m3fn{list(want)}, got "
                   f"{None if s is None else f'{s.dtype}{list(s.shape)}'}")
            _check(s.stride(3) == 1, f"{name} must be contiguous in the last dim")
            devices.add(s.device)
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if check_slots and num_tokens:
        # NOTE: this reads slot_mapping back to the host; pass check_slots=False in CUDA-graph capture.
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        lo, hi = int(slot_mapping.min()), int(slot_mapping.max())
        _check(lo >= -1 and hi < num_slots, f"slot_mapping values must be in [-1, {num_slots}), got [{lo}, {hi}]")


def kv_write(k, v, slot_mapping, k_cache, v_cache, *, kv_format="bf16", k_scale=None, v_scale=None,
             k_block_scale=None, v_block_scale=None, check_slots=True, k_center=None, scale_rule="amax",
             k_feedback=None):
    """Write k, v [T, Hkv, D] into k_cache, v_cache [N, block_size, Hkv, D'] at slot_mapping i32[T] (-1: skip).

    kv_format "bf16": caches in their own float dtype (D' = D), values cast.
              "fp8":  float8_e4m3fn caches (D' = D), k_scale/v_scale f32[Hkv]: stored = RNE(sat(x / scale)).
              "nvfp4": uint8 caches (D' = D/2), k_scale/v_scale f32 scalar global scales, k_block_scale /
                      v_block_scale float8_e4m3fn[N, block_size, Hkv, D/16] written alongside; optional
                      k_center f32[Hkv, D] subtracted from K first; scale_rule "amax" | "mse46": how block
                      scales are chosen (kv_formats.quantize_nvfp4); optional k_feedback f32[Hkv, D, D]
                      (upper triangular, lowering.quant.formats.feedback_factor): K rounded score-aware
                      (error feedback, lowering.quant.formats.quantize_nvfp4_feedback), V as without it.
    Updates the caches (and block scales) in place; returns nothing. Slots not named are untouched.
    """
    validate_kv_write(k, v, slot_mapping, k_cache, v_cache, kv_format, k_scale, v_scale, k_block_scale,
                      v_block_scale, check_slots)
    _check(scale_rule in kv_formats.SCALE_RULES, f"unknown scale_rule {scale_rule!r}")
    _check((k_center is None and scale_rule == "amax") or kv_format == "nvfp4",
           "k_center and scale_rule are nvfp4 options")
    if k_feedback is not None:
        _check(kv_format == "nvfp4", f"k_feedback is an nvfp4 option, got kv_format={kv_format!r}")
    wants = {"k_center": tuple(k.shape[1:]), "k_feedback": (*k.shape[1:], k.shape[2])}
    for (name, want), t in zip(wants.items(), (k_center, k_feedback)):
        if t is not None:
            _check(tuple(t.shape) == want and t.dtype == torch.float32 and t.is_contiguous() and t.device == k.device,
                   f"{name} must be a contiguous f32{list(want)} on {k.device}, got {t.dtype}{list(t.shape)} on "
                   f"{t.device}")
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0 or num_kv_heads == 0 or head_dim == 0:
        return
    block_size = k_cache.shape[1]
    slot_mapping = slot_mapping.contiguous()
    if kv_format == "nvfp4":
        k_scale, v_scale = k_scale.reshape(()), v_scale.reshape(())
        k_bs, v_bs = k_block_scale, v_block_scale
        block_d = triton.next_power_of_2(head_dim // _NVFP4_GROUP)
    else:
        # NOTE: the kernel never dereferences the block-scale pointers outside nvfp4; pass the caches.
        k_bs, v_bs = k_cache, v_cache
        block_d = triton.next_power_of_2(head_dim)
        if kv_format == "fp8":
            k_scale, v_scale = k_scale.contiguous(), v_scale.contiguous()
        else:
            k_scale, v_scale = k_cache, v_cache
    padded_dim = block_d * _NVFP4_GROUP if kv_format == "nvfp4" else block_d
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, KV_WRITE_ELEMENTS // padded_dim))
    # NOTE: no FMA contraction with feedback, so x - r * u rounds twice as in quantize_nvfp4_feedback (the
    # interpreter ignores the option); without it the launch (and compiled kernel) stays as before.
    feedback = {} if k_feedback is None else dict(HAS_FEEDBACK=True, enable_fp_fusion=False)
    num_warps = KV_WRITE_NUM_WARPS
    if k_feedback is not None and tile_target(k.device) == "cuda":
        # NOTE: the element loop is a chain of dependent steps: on a GPU it runs fastest on small tiles, with more
        # programs sharing the work (H200, one token of 8 kv heads, D = 128: ~45 us as 8 programs of 1 warp, ~95 us
        # as one of 4 warps); the interpreter keeps the larger tiles (fewer programs, fewer numpy calls).
        block_h, num_warps = min(block_h, KV_WRITE_FEEDBACK_HEADS), KV_WRITE_FEEDBACK_NUM_WARPS
    kv_write_kernel[(num_tokens, triton.cdiv(num_kv_heads, block_h))](
        k, v, slot_mapping, k_cache, v_cache,
        k_scale, v_scale, k_bs, v_bs, k_center if k_center is not None else k_scale,
        k_feedback if k_feedback is not None else k_scale,
        num_kv_heads, block_size, head_dim,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        k_bs.stride(0), k_bs.stride(1), k_bs.stride(2),
        v_bs.stride(0), v_bs.stride(1), v_bs.stride(2),
        KV_FORMAT=KV_FORMATS[kv_format], BLOCK_H=block_h, BLOCK_D=block_d, num_warps=num_warps,
        HAS_CENTER=k_center is not None, SCALE_RULE=kv_formats.SCALE_RULES.index(scale_rule), **feedback,
    )


def ref_kv_write(k, v, slot_mapping, k_cache, v_cache, *, kv_format="bf16", k_scale=None, v_scale=None,
                 k_block_scale=None, v_block_scale=None, k_center=None, scale_rule="amax", k_feedback=None):
    """Plain-torch kv_write (same arguments, same in-place effect) built on kernels_gpu.kv_formats; K with
    k_feedback by numpy's lowering.quant.formats.quantize_nvfp4_feedback (on the host)."""
    keep = slot_mapping >= 0  # bool[T]
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k, v = k[keep], v[keep]  # [T', Hkv, D]
    if kv_format == "bf16":
        k_cache[blocks, offsets] = k.to(k_cache.dtype)
        v_cache[blocks, offsets] = v.to(v_cache.dtype)
    elif kv_format == "fp8":
        k_cache[blocks, offsets] = kv_formats.quantize_fp8(k, k_scale)
        v_cache[blocks, offsets] = kv_formats.quantize_fp8(v, v_scale)
    elif kv_format == "nvfp4":
        if k_center is not None:
            k = k.float() - k_center.float()
        for src, cache, scales, global_scale, factor in ((k, k_cache, k_block_scale, k_scale, k_feedback),
                                                         (v, v_cache, v_block_scale, v_scale, None)):
            if factor is not None:
                packed, block_scale = _ref_nvfp4_feedback(src, global_scale, factor, scale_rule)
            else:
                packed, block_scale = kv_formats.quantize_nvfp4(src, global_scale.reshape(()), scale_rule)
            cache[blocks, offsets] = packed
            scales[blocks, offsets] = block_scale
    else:
        raise ValueError(f"ref_kv_write: unknown kv_format {kv_format!r}")


def _ref_nvfp4_feedback(x, global_scale, factor, scale_rule):
    """x [T, Hkv, D] -> (packed u8[T, Hkv, D/2], block_scale float8_e4m3fn[T, Hkv, D/16]) on x's device, by
    lowering.quant.formats.quantize_nvfp4_feedback."""
    from lowering.quant import formats

    parts = formats.quantize_nvfp4_feedback(x.detach().float().cpu().numpy(), float(global_scale.reshape(())),
                                            factor.detach().float().cpu().numpy(), scale_rule)
    packed = torch.from_numpy(parts["q"]).to(x.device)
    block_scale = torch.from_numpy(parts["block_scale"].view("uint8")).view(torch.float8_e4m3fn).to(x.device)
    return packed, block_scale
