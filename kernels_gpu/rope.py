"""Rotary position embedding (rotate-half / Hugging Face convention) with cos/sin computed in-kernel in fp32.

Also LongRoPE (Phi-3: a second frequency set for positions >= long_from, cos/sin scaled by an attention
factor) and partial rotation (only each head's first rotary_dim features rotate; Phi-4-mini).
"""
import math

import torch
import triton
import triton.language as tl

from kernels_gpu.fused_gemv import gdc_launch_dependents, gdc_wait, pdl_launch
from kernels_gpu.kv_write import validate_kv_write

# Tuning data: heads rotated per loop step by one program (one program per token).
ROPE_BLOCK_H = 8
ROPE_NUM_WARPS = 4


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, cos, sin,
    num_heads, half_dim,
    stride_sh, stride_dh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate every head of one token row: [x1, x2] -> [x1*cos - x2*sin, x2*cos + x1*sin]."""
    heads = tl.arange(0, BLOCK_H)[:, None]  # i32[BLOCK_H, 1]
    cols = tl.arange(0, BLOCK_HALF)[None, :]  # i32[1, BLOCK_HALF]
    for h0 in range(0, num_heads, BLOCK_H):
        mask = (h0 + heads < num_heads) & (cols < half_dim)  # [BLOCK_H, BLOCK_HALF]
        src = src_ptr + (h0 + heads) * stride_sh + cols
        dst = dst_ptr + (h0 + heads) * stride_dh + cols
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half_dim, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half_dim, (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _copy_heads(src_ptr, dst_ptr, num_heads, head_dim, stride_sh, stride_dh, BLOCK_H: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Copy every head of one row (cast to dst's dtype)."""
    heads = tl.arange(0, BLOCK_H)[:, None]  # i32[BLOCK_H, 1]
    cols = tl.arange(0, BLOCK_D)[None, :]  # i32[1, BLOCK_D]
    for h0 in range(0, num_heads, BLOCK_H):
        mask = (h0 + heads < num_heads) & (cols < head_dim)
        x = tl.load(src_ptr + (h0 + heads) * stride_sh + cols, mask=mask, other=0.0)
        tl.store(dst_ptr + (h0 + heads) * stride_dh + cols, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, inv_freq_ptr, long_inv_freq_ptr,
    v_ptr, v_out_ptr, slots_ptr,  # WRITE_KV: v [T, Hk, D], the v pool, i32[T] slots (-1: write nothing)
    num_q_heads, num_k_heads, half_dim, long_from, attention_factor, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    stride_vt, stride_vh, stride_kpn, stride_kpb, stride_vpn, stride_vpb, stride_vph,
    HAS_LONG: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr = False,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (kernels_gpu.fused_gemv.pdl_enabled)
):
    """One program per token: angle = f32(position) * inv_freq (fp32, as HF), then rotate all q and k heads.

    half_dim is half the rotated features (rotary_dim / 2); HAS_LONG: positions >= long_from use long_inv_freq.
    WRITE_KV: k_out_ptr is the paged K pool [N, block, Hk, D] (head stride stride_koh): the rotated k and the v row
    go to the token's slot in the K / V pools instead of a k output (kv_write's plain format, in the same launch).
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # q / k / v are the previous kernel's output
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)  # i32[BLOCK_HALF]
    position = tl.load(positions_ptr + row)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half_dim, other=0.0)  # f32[BLOCK_HALF]
    if HAS_LONG:
        long_inv_freq = tl.load(long_inv_freq_ptr + cols, mask=cols < half_dim, other=0.0)
        inv_freq = tl.where(position >= long_from, long_inv_freq, inv_freq)
    angle = (position.to(tl.float32) * inv_freq)[None, :]  # f32[1, BLOCK_HALF]
    cos = tl.cos(angle) * attention_factor
    sin = tl.sin(angle) * attention_factor
    _rotate_heads(q_ptr + row * stride_qt, q_out_ptr + row * stride_qot, cos, sin,
                  num_q_heads, half_dim, stride_qh, stride_qoh, BLOCK_H, BLOCK_HALF)
    if WRITE_KV:
        slot = tl.load(slots_ptr + row).to(tl.int64)
        heads = tl.where(slot >= 0, num_k_heads, 0)  # a padding row (slot -1) writes nothing
        safe = tl.maximum(slot, 0)
        k_dst = k_out_ptr + (safe // block_size) * stride_kpn + (safe % block_size) * stride_kpb
        v_dst = v_out_ptr + (safe // block_size) * stride_vpn + (safe % block_size) * stride_vpb
        _rotate_heads(k_ptr + row * stride_kt, k_dst, cos, sin, heads, half_dim, stride_kh, stride_koh, BLOCK_H,
                      BLOCK_HALF)
        _copy_heads(v_ptr + row * stride_vt, v_dst, heads, 2 * half_dim, stride_vh, stride_vph, BLOCK_H,
                    2 * BLOCK_HALF)
    else:
        _rotate_heads(k_ptr + row * stride_kt, k_out_ptr + row * stride_kot, cos, sin,
                      num_k_heads, half_dim, stride_kh, stride_koh, BLOCK_H, BLOCK_HALF)


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _validate(q, k, positions, inv_freq, long_inv_freq, rotary_dim):
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"apply_rope: {name} must be [T, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"apply_rope: unsupported {name} dtype {t.dtype} (bf16, fp16, fp32)")
        if t.device != q.device:
            raise ValueError(f"apply_rope: {name} is on {t.device}, q on {q.device}")
        if t.shape[2] > 1 and t.stride(2) != 1:
            raise ValueError(f"apply_rope: {name}'s last dim must be contiguous")
    num_tokens, _, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"apply_rope: k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in T or D")
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim must be even, got {head_dim}")
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise ValueError(f"apply_rope: rotary_dim must be even and in (0, {head_dim}], got {rotary_dim}")
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"apply_rope: positions must be i32/i64[{num_tokens}], got "
                         f"{positions.dtype}{list(positions.shape)}")
    tables = [("inv_freq", inv_freq)] + ([] if long_inv_freq is None else [("long_inv_freq", long_inv_freq)])
    for name, t in tables:
        if t.shape != (rotary_dim // 2,) or t.dtype != torch.float32:
            raise ValueError(f"apply_rope: {name} must be f32[{rotary_dim // 2}], got {t.dtype}{list(t.shape)}")
    for name, t in [("positions", positions)] + tables:
        if t.device != q.device:
            raise ValueError(f"apply_rope: {name} is on {t.device}, q on {q.device}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               *, inplace: bool = False, rotary_dim: int | None = None, long_inv_freq: torch.Tensor | None = None,
               long_from: int = 0, attention_factor: float = 1.0):
    """q: [T, Hq, D], k: [T, Hk, D], positions: i32/i64[T], inv_freq: f32[R/2] -> (q_rot, k_rot).

    rotary_dim R (default D): only each head's first R features rotate, the rest are copied. LongRoPE:
    long_inv_freq f32[R/2] replaces inv_freq for tokens at positions >= long_from; cos and sin are multiplied
    by attention_factor. inplace=True rotates q and k in place and returns them; otherwise new tensors are
    returned.
    """
    rotary_dim = q.shape[-1] if rotary_dim is None else int(rotary_dim)
    _validate(q, k, positions, inv_freq, long_inv_freq, rotary_dim)
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q_out = q if inplace else torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    k_out = k if inplace else torch.empty_like(k, memory_format=torch.contiguous_format)  # [T, Hk, D]
    if num_tokens == 0 or head_dim == 0:
        return q_out, k_out
    if rotary_dim < head_dim and not inplace:  # the features the kernel does not rotate
        q_out[..., rotary_dim:] = q[..., rotary_dim:]
        k_out[..., rotary_dim:] = k[..., rotary_dim:]
    positions = positions.contiguous()
    inv_freq = inv_freq.contiguous()
    has_long = long_inv_freq is not None
    long_inv_freq = long_inv_freq.contiguous() if has_long else inv_freq
    half_dim = rotary_dim // 2
    rope_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, inv_freq, long_inv_freq, q, q, positions,
        num_q_heads, num_k_heads, half_dim, int(long_from), float(attention_factor), 1,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        0, 0, 0, 0, 0, 0, 0,
        HAS_LONG=has_long, BLOCK_H=ROPE_BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half_dim),
        num_warps=ROPE_NUM_WARPS, **pdl_launch(q.device),
    )
    return q_out, k_out


def rope_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                  slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, *, inplace: bool = False,
                  long_inv_freq: torch.Tensor | None = None, long_from: int = 0, attention_factor: float = 1.0):
    """apply_rope on q and k, then kernels_gpu.kv_write's plain write of the rotated k and of v, in one launch.

    q: [T, Hq, D], k / v: [T, Hk, D], slots: i32[T] (-1: the row writes nothing), k_pool / v_pool: [N, block, Hk, D]
    (bf16 / fp16 / fp32, updated in place) -> q_rot (q itself when inplace). Every feature rotates (no partial
    rotation); the pools are written in their dtype as kv_write does.
    """
    _validate(q, k, positions, inv_freq, long_inv_freq, q.shape[-1])
    try:
        validate_kv_write(k, v, slots, k_pool, v_pool, check_slots=False)
    except ValueError as e:
        raise ValueError(f"rope_kv_write: {e}") from None
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q_out = q if inplace else torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    if num_tokens == 0 or head_dim == 0:
        return q_out
    has_long = long_inv_freq is not None
    half_dim = head_dim // 2
    rope_kernel[(num_tokens,)](
        q, k, q_out, k_pool, positions.contiguous(), inv_freq.contiguous(),
        long_inv_freq.contiguous() if has_long else inv_freq, v, v_pool, slots.contiguous(),
        num_q_heads, num_k_heads, half_dim, int(long_from), float(attention_factor), k_pool.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), 0, k_pool.stride(2),
        v.stride(0), v.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        v_pool.stride(2),
        HAS_LONG=has_long, BLOCK_H=ROPE_BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half_dim), WRITE_KV=True,
        num_warps=ROPE_NUM_WARPS, **pdl_launch(q.device),
    )
    return q_out


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """f32[head_dim // 2] inverse frequencies following HF's default, linear and llama3 rope rules."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # f32[D/2]
    kind = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_inv_freq: unsupported rope scaling {kind!r} (default, linear, llama3)")


def ref_apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                   *, rotary_dim: int | None = None, long_inv_freq: torch.Tensor | None = None, long_from: int = 0,
                   attention_factor: float = 1.0):
    """float64 reference of apply_rope (same arguments) -> (f64[T, Hq, D], f64[T, Hk, D]).

    The angle is the fp32 product position * inv_freq (the kernel's and HF's definition); cos, sin
    and the rotation are float64.
    """
    rotary_dim = q.shape[-1] if rotary_dim is None else int(rotary_dim)
    freqs = inv_freq.float()[None, :].expand(positions.shape[0], -1)  # f32[T, R/2]
    if long_inv_freq is not None:
        freqs = torch.where((positions >= long_from)[:, None], long_inv_freq.float()[None, :], freqs)
    angle = (positions.float()[:, None] * freqs).double()  # f64[T, R/2]
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)[:, None, :] * attention_factor  # f64[T, 1, R]
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1)[:, None, :] * attention_factor

    def rotate(x):
        x = x.double()
        x1, x2 = x[..., :rotary_dim].chunk(2, dim=-1)
        rotated = x[..., :rotary_dim] * cos + torch.cat([-x2, x1], dim=-1) * sin
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)

    return rotate(q), rotate(k)
