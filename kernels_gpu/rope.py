"""Rotary position embedding (rotate-half / Hugging Face convention) with cos/sin computed in-kernel in fp32."""
import math

import torch
import triton
import triton.language as tl

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
def rope_kernel(
    q_ptr, k_ptr, q_out_ptr, k_out_ptr, positions_ptr, inv_freq_ptr,
    num_q_heads, num_k_heads, half_dim,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """One program per token: angle = f32(position) * inv_freq (fp32, as HF), then rotate all q and k heads."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_HALF)  # i32[BLOCK_HALF]
    pos = tl.load(positions_ptr + row).to(tl.float32)
    inv_freq = tl.load(inv_freq_ptr + cols, mask=cols < half_dim, other=0.0)  # f32[BLOCK_HALF]
    angle = (pos * inv_freq)[None, :]  # f32[1, BLOCK_HALF]
    cos = tl.cos(angle)
    sin = tl.sin(angle)
    _rotate_heads(q_ptr + row * stride_qt, q_out_ptr + row * stride_qot, cos, sin,
                  num_q_heads, half_dim, stride_qh, stride_qoh, BLOCK_H, BLOCK_HALF)
    _rotate_heads(k_ptr + row * stride_kt, k_out_ptr + row * stride_kot, cos, sin,
                  num_k_heads, half_dim, stride_kh, stride_koh, BLOCK_H, BLOCK_HALF)


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _validate(q, k, positions, inv_freq):
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
    if positions.shape != (num_tokens,) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"apply_rope: positions must be i32/i64[{num_tokens}], got "
                         f"{positions.dtype}{list(positions.shape)}")
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32:
        raise ValueError(f"apply_rope: inv_freq must be f32[{head_dim // 2}], got "
                         f"{inv_freq.dtype}{list(inv_freq.shape)}")
    for name, t in (("positions", positions), ("inv_freq", inv_freq)):
        if t.device != q.device:
            raise ValueError(f"apply_rope: {name} is on {t.device}, q on {q.device}")


def apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               *, inplace: bool = False):
    """q: [T, Hq, D], k: [T, Hk, D], positions: i32/i64[T], inv_freq: f32[D/2] -> (q_rot, k_rot).

    inplace=True rotates q and k in place and returns them; otherwise new tensors are returned.
    """
    _validate(q, k, positions, inv_freq)
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    q_out = q if inplace else torch.empty_like(q, memory_format=torch.contiguous_format)  # [T, Hq, D]
    k_out = k if inplace else torch.empty_like(k, memory_format=torch.contiguous_format)  # [T, Hk, D]
    if num_tokens == 0 or head_dim == 0:
        return q_out, k_out
    positions = positions.contiguous()
    inv_freq = inv_freq.contiguous()
    half_dim = head_dim // 2
    rope_kernel[(num_tokens,)](
        q, k, q_out, k_out, positions, inv_freq,
        num_q_heads, num_k_heads, half_dim,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
        BLOCK_H=ROPE_BLOCK_H, BLOCK_HALF=triton.next_power_of_2(half_dim), num_warps=ROPE_NUM_WARPS,
    )
    return q_out, k_out


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


def ref_apply_rope(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor):
    """float64 reference of apply_rope -> (f64[T, Hq, D], f64[T, Hk, D]).

    The angle is the fp32 product position * inv_freq (the kernel's and HF's definition); cos, sin
    and the rotation are float64.
    """
    angle = (positions.float()[:, None] * inv_freq.float()[None, :]).double()  # f64[T, D/2]
    cos = torch.cat([angle.cos(), angle.cos()], dim=-1)[:, None, :]  # f64[T, 1, D]
    sin = torch.cat([angle.sin(), angle.sin()], dim=-1)[:, None, :]

    def rotate(x):
        x = x.double()
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return rotate(q), rotate(k)
