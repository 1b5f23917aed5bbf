"""Fused residual-add + RMSNorm (Hugging Face LlamaRMSNorm semantics, or Gemma's (1 + w) form), fp32 statistics."""
import torch
import triton
import triton.language as tl

from kernels_gpu.quant_linear import fp8_inv_scale, fp8_row_scale, fp8_scaled
from kernels_gpu.fused_gemv import pdl_launch
from kernels_gpu.triton_env import gdc_launch_dependents, gdc_wait, interpreting

# Tuning data: a row is normalized by one program holding it whole; warps by padded row width.
NORM_MAX_HIDDEN = 65536
NORM_NUM_WARPS = ((1024, 4), (4096, 8), (NORM_MAX_HIDDEN, 16))  # (max padded width, warps)


@triton.jit
def rms_normalize(h, weight_ptr, cols, mask, hidden_size, eps, weight_offset, out_ty: tl.constexpr,
                  HAS_OFFSET: tl.constexpr):
    """A row h (f32[BLOCK_H], zeros past hidden_size) normalized: w * cast(h * rsqrt(mean(h^2) + eps)), or with
    HAS_OFFSET (Gemma) cast(h * rsqrt(mean(h^2) + eps) * (weight_offset + w)); cast = to out_ty."""
    variance = tl.sum(h * h, axis=0) / hidden_size
    normed = h * (1.0 / tl.sqrt(variance + eps))  # f32[BLOCK_H]
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:  # Gemma: the whole product in fp32, rounded once
        w = w + weight_offset
    else:
        # NOTE: HF Llama casts the normalized row to the input dtype *before* multiplying by the weight.
        normed = normed.to(out_ty).to(tl.float32)
    return (normed * w).to(out_ty)


@triton.jit
def add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden_size, eps, weight_offset,
    stride_xt, stride_rt, stride_ot, stride_rot,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_H: tl.constexpr,
    scale_ptr=None,  # FP8_OUT: f32[T] row scales
    FP8_OUT: tl.constexpr = False, ROUND_F32: tl.constexpr = False,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (fused_gemv.pdl_launch)
):
    """One program per token row: h = x (+ residual, rounded to its dtype);
    out = w * cast(h * rsqrt(mean(h^2) + eps)), or with HAS_OFFSET (Gemma)
    out = cast(h * rsqrt(mean(h^2) + eps) * (weight_offset + w)), cast = to x's dtype.
    FP8_OUT (W8A8): that row, as x's dtype holds it, quantized per row to e4m3 (out) with its scale (scale_ptr),
    as quant_linear.quantize_activation_fp8 would quantize it."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # x / residual are the previous kernel's output
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)  # i32[BLOCK_H]
    mask = cols < hidden_size
    h = tl.load(x_ptr + row * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_rt + cols, mask=mask, other=0.0).to(tl.float32)
        # NOTE: the sum is rounded to the stream's dtype before normalizing, as HF's `residual + h` is.
        summed = (h + r).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_rot + cols, summed, mask=mask)
        h = summed.to(tl.float32)
    y = rms_normalize(h, weight_ptr, cols, mask, hidden_size, eps, weight_offset, x_ptr.dtype.element_ty, HAS_OFFSET)
    if FP8_OUT:
        v = y.to(tl.float32)
        scale = fp8_row_scale(tl.max(tl.abs(v), 0))
        tl.store(scale_ptr + row, scale)
        y = fp8_scaled(v, fp8_inv_scale(scale), ROUND_F32).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(out_ptr + row * stride_ot + cols, y, mask=mask)


_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _validate(x, residual, weight):
    if x.dim() != 2:
        raise ValueError(f"add_rms_norm: x must be [T, H], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"add_rms_norm: unsupported x dtype {x.dtype} (bf16, fp16, fp32)")
    hidden = x.shape[1]
    if weight.shape != (hidden,):
        raise ValueError(f"add_rms_norm: weight must be [{hidden}], got {tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"add_rms_norm: unsupported weight dtype {weight.dtype}")
    if hidden > NORM_MAX_HIDDEN:
        raise ValueError(f"add_rms_norm: hidden size {hidden} > {NORM_MAX_HIDDEN} is not supported")
    tensors = [("x", x), ("weight", weight)]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
        if residual.dtype not in _DTYPES:
            raise ValueError(f"add_rms_norm: unsupported residual dtype {residual.dtype}")
        tensors.append(("residual", residual))
    for name, t in tensors:
        if t.device != x.device:
            raise ValueError(f"add_rms_norm: {name} is on {t.device}, x on {x.device}")
        if hidden > 1 and t.stride(-1) != 1:
            raise ValueError(f"add_rms_norm: {name}'s last dim must be contiguous")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 weight_offset: float | None = None, *, pdl: bool = False):
    """x: [T, H]; residual: [T, H] or None; weight: [H] -> (normed [T, H] in x's dtype, new_residual or None).

    new_residual = x + residual (in residual's dtype); normed = weight * cast_x(h / rms(h)) with h the
    new residual (or x when residual is None); with weight_offset (Gemma's 1.0),
    normed = cast_x(h / rms(h) * (weight_offset + weight)) in fp32. Nothing is updated in place. pdl: launched with
    programmatic dependent launch where it is on (fused_gemv.pdl_launch), for a consumer that loads its weights
    before waiting on this kernel.
    """
    _validate(x, residual, weight)
    out, _, residual_out = _launch(x, residual, weight, eps, weight_offset, fp8=False, pdl=pdl)
    return out, residual_out


def add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     weight_offset: float | None = None):
    """add_rms_norm whose normed row is quantized for a W8A8 linear in the same kernel: -> (float8_e4m3fn[T, H],
    f32[T] row scales, new_residual or None). Equal, bit for bit, to quant_linear.quantize_activation_fp8 of
    add_rms_norm's normed output (the row is rounded to x's dtype first); the bf16 row is never stored."""
    _validate(x, residual, weight)
    return _launch(x, residual, weight, eps, weight_offset, fp8=True)


def _launch(x, residual, weight, eps, weight_offset, *, fp8: bool, pdl: bool = False):
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn if fp8 else x.dtype, device=x.device)
    scale = torch.empty((num_tokens,), dtype=torch.float32, device=x.device) if fp8 else None
    residual_out = None if residual is None else torch.empty_like(residual, memory_format=torch.contiguous_format)
    if num_tokens == 0 or hidden == 0:
        if fp8:
            scale.fill_(torch.finfo(torch.float32).tiny)
        return out, scale, residual_out
    block_h = triton.next_power_of_2(hidden)
    num_warps = next(w for width, w in NORM_NUM_WARPS if block_h <= width)
    has_residual = residual is not None
    add_rms_norm_kernel[(num_tokens,)](
        x, residual if has_residual else x, weight, out, residual_out if has_residual else out,
        hidden, float(eps), float(weight_offset or 0.0),
        x.stride(0), residual.stride(0) if has_residual else 0, out.stride(0),
        residual_out.stride(0) if has_residual else 0,
        HAS_RESIDUAL=has_residual, HAS_OFFSET=weight_offset is not None, BLOCK_H=block_h,
        scale_ptr=scale, FP8_OUT=fp8, ROUND_F32=fp8 and interpreting(), num_warps=num_warps,
        **(pdl_launch(x.device) if pdl else {}),
    )
    return out, scale, residual_out


def ref_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     weight_offset: float | None = None):
    """float64 reference of add_rms_norm -> (f64[T, H] normed, new residual in residual's dtype or None).

    The residual sum is rounded to the residual dtype (the kernel stores it there, then normalizes it);
    everything after that is float64 with no intermediate rounding.
    """
    new_residual = None
    h = x.double()
    if residual is not None:
        new_residual = (x.double() + residual.double()).to(residual.dtype)
        h = new_residual.double()
    rms = torch.sqrt(h.pow(2).mean(dim=-1, keepdim=True) + eps)  # f64[T, 1]
    return h / rms * (weight.double() + (weight_offset or 0.0)), new_residual
