"""Plain-torch reference quantize/dequantize for the KV cache storage formats (FP8 e4m3, NVFP4)."""
import torch

# E2M1 magnitudes by 3-bit code; bit 3 of a nibble is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
NVFP4_BLOCK = 16  # values sharing one float8_e4m3fn block scale (along the last dim)

# Rounding thresholds between consecutive E2M1 codes: (midpoint, tie goes up?). A tie rounds to the
# even code, so it goes up exactly when the upper neighbour's code is even (codes 2, 4, 6).
_E2M1_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                   (2.5, False), (3.5, True), (5.0, False))


def _as_f32_scale(scale, device) -> torch.Tensor:
    return torch.as_tensor(scale, dtype=torch.float32, device=device)


def quantize_fp8(x: torch.Tensor, scale) -> torch.Tensor:
    """x: [..., Hkv, D] any float; scale: f32[Hkv] or scalar -> float8_e4m3fn[..., Hkv, D] = RNE(sat(x / scale))."""
    s = _as_f32_scale(scale, x.device)
    if s.dim() > 0:
        s = s[..., None]  # f32[Hkv, 1] against [..., Hkv, D]
    y = (x.float() / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(torch.float8_e4m3fn)  # NOTE: torch's float -> e4m3fn cast rounds to nearest even


def dequantize_fp8(q: torch.Tensor, scale) -> torch.Tensor:
    """q: float8_e4m3fn[..., Hkv, D]; scale: f32[Hkv] or scalar -> f32[..., Hkv, D] = q * scale."""
    s = _as_f32_scale(scale, q.device)
    if s.dim() > 0:
        s = s[..., None]
    return q.float() * s


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-tensor NVFP4 global scale: f32[] = amax(|x|) / (6 * 448), floored at the smallest normal f32."""
    amax = x.detach().abs().amax().float()
    return (amax / (E2M1_MAX * FP8_E4M3_MAX)).clamp_min(torch.finfo(torch.float32).tiny)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """f32[...] (already divided by its scale) -> u8[...] nibble codes: RNE to E2M1, ties to even code, saturating at +-6.

    The sign bit follows the IEEE sign (so -0.0 and small negatives that round to zero give 0x8, as the
    hardware cvt does); NaN encodes as +0.
    """
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for mid, tie_up in _E2M1_MIDPOINTS:
        code += (a >= mid if tie_up else a > mid).to(torch.uint8)
    sign = (torch.signbit(v) & ~torch.isnan(v)).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """u8[...] nibble codes (0..15) -> f32[...] E2M1 values (arithmetic: no host table, so CUDA graphs capture it)."""
    c = code.to(torch.int32)
    m = (c & 7).to(torch.float32)
    e = ((c & 7) >> 1).to(torch.float32)
    mag = torch.where(m < 2, 0.5 * m, torch.exp2(e - 1) * (1 + 0.5 * (c & 1).to(torch.float32)))
    return torch.where((c & 8) != 0, -mag, mag)


SCALE_RULES = ("amax", "mse46")  # as lowering.quant.formats.NVFP4_SCALE_RULES
_SCALE_ERROR_ONE = float(2 ** 20)


def nvfp4_scale_error(xb: torch.Tensor, amax: torch.Tensor, block_scale: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """i32[...]: the order-independent squared error of 16-blocks xb f32[..., 16] stored with block_scale
    (f32 values on the e4m3 grid), exactly lowering.quant.formats.nvfp4_scale_error: den = block_scale * gs,
    y = x / den, r = (|y| - |e2m1(y)|) * (den / amax), sum of floor(min(r * r, 4) * 2**20)."""
    den = block_scale * gs
    ok = (den != 0) & (amax != 0)
    one = torch.ones_like(den)
    safe_den = torch.where(ok, den, one)
    y = xb / safe_den[..., None]
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=xb.device)
    mag = table[(e2m1_encode(y) & 7).long()]
    r = (y.abs() - mag) * (safe_den / torch.where(ok, amax, one))[..., None]
    e = torch.floor(torch.clamp(r * r, max=4.0) * _SCALE_ERROR_ONE).to(torch.int32)
    return torch.where(ok, e.sum(dim=-1, dtype=torch.int32), torch.zeros_like(e[..., 0]))


def quantize_nvfp4(x: torch.Tensor, global_scale, scale_rule: str = "amax"):
    """x: [..., D] float (D % 16 == 0); global_scale: f32 scalar.

    Returns (packed u8[..., D//2], block_scale float8_e4m3fn[..., D//16]):
      block_scale = e4m3(sat, RNE)(amax(|block|) / 6 / global_scale)   (scale_rule "amax"; "mse46" keeps
                    e4m3(amax / 4 / global_scale) instead where nvfp4_scale_error is smaller and it is not 0)
      code        = e2m1(x / (float(block_scale) * global_scale))   (a block whose scale is 0 -> codes 0)
      packed[.., i] = code[.., 2i] | code[.., 2i+1] << 4            (element 2i in the LOW nibble)
    """
    *lead, d = x.shape
    if d % NVFP4_BLOCK != 0:
        raise ValueError(f"NVFP4 needs the last dim to be a multiple of {NVFP4_BLOCK}, got {d}")
    gs = _as_f32_scale(global_scale, x.device)
    xb = x.float().reshape(*lead, d // NVFP4_BLOCK, NVFP4_BLOCK)  # f32[..., D//16, 16]
    amax = xb.abs().amax(dim=-1)  # f32[..., D//16]
    if scale_rule not in SCALE_RULES:
        raise ValueError(f"unknown nvfp4 scale rule {scale_rule!r}")
    block_scale = (amax / E2M1_MAX / gs).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    if scale_rule == "mse46":
        s4 = (amax / 4.0 / gs).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        use4 = ((nvfp4_scale_error(xb, amax, s4.float(), gs) < nvfp4_scale_error(xb, amax, block_scale.float(), gs))
                & (s4.float() != 0))
        block_scale = torch.where(use4, s4.float(), block_scale.float()).to(torch.float8_e4m3fn)
    denom = (block_scale.float() * gs)[..., None]  # f32[..., D//16, 1]
    nonzero = denom != 0
    codes = e2m1_encode(xb / torch.where(nonzero, denom, torch.ones_like(denom)))
    codes = torch.where(nonzero, codes, torch.zeros_like(codes)).reshape(*lead, d)  # u8[..., D]
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # u8[..., D//2]
    return packed.contiguous(), block_scale.contiguous()


def dequantize_nvfp4(packed: torch.Tensor, block_scale: torch.Tensor, global_scale) -> torch.Tensor:
    """packed u8[..., D//2], block_scale float8_e4m3fn[..., D//16], global_scale f32 scalar -> f32[..., D].

    value = e2m1(code) * (float(block_scale) * global_scale)
    """
    *lead, half = packed.shape
    d = 2 * half
    if block_scale.shape[-1] * NVFP4_BLOCK != d:
        raise ValueError(f"block_scale last dim {block_scale.shape[-1]} does not match D={d}")
    gs = _as_f32_scale(global_scale, packed.device)
    lo = e2m1_decode(packed & 0xF)
    hi = e2m1_decode(packed >> 4)
    vals = torch.stack((lo, hi), dim=-1).reshape(*lead, d // NVFP4_BLOCK, NVFP4_BLOCK)
    denom = (block_scale.float() * gs)[..., None]  # f32[..., D//16, 1]
    return (vals * denom).reshape(*lead, d)
