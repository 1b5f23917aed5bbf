"""Fused activation-and-multiply for gated MLPs, computed in fp32: out = act(gate) * up.

silu_and_mul: SwiGLU (Llama family), act = SiLU.
gelu_tanh_and_mul: GeGLU (Gemma), act = GELU with the tanh approximation (torch's approximate="tanh").
"""
import math

import torch
import triton
import triton.language as tl

from kernels_gpu.quant_linear import fp8_inv_scale, fp8_row_scale, fp8_scaled
from kernels_gpu.triton_env import gdc_launch_dependents, gdc_wait, interpreting, tile_target

# Tuning data: columns of the output each program handles, and its warps.
SILU_BLOCK_F = 1024
SILU_NUM_WARPS = 4
# The fp8-quantizing variant (one program per row): columns per loop step (a row that fits is read once), warps.
SILU_FP8_BLOCK_F = {"cuda": 8192, "interpret": 64}
# H200, 2026-11-28, 8192 x 8192 SwiGLU rows: block 8192 with 16 warps 131 us, 8 warps 151 us, 4096 / 8 warps 135 us;
# 2026-11-29, values multiplied by the row's reciprocal scale instead of divided: 98 us (silu_and_mul's bf16 row: 99).
SILU_FP8_NUM_WARPS = ((2048, 4), (4096, 8), (1 << 30, 16))  # (max block, warps)

# 0.5 * (1 + tanh(u)) == sigmoid(2u): GELU-tanh is x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)).
_GELU_TANH_2K = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))
_GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def act_and_mul(gate, up, GELU_TANH: tl.constexpr):
    """f32 act(gate) * up, act = SiLU, or GELU-tanh when GELU_TANH (also kernels_gpu.fused_gemv's prologue)."""
    if GELU_TANH:
        inner = _GELU_TANH_2K * (gate + _GELU_TANH_CUBIC * gate * gate * gate)
        # NOTE: exp's argument is capped where the result is 0 to f32 precision anyway (no inf in between)
        act = gate / (1.0 + tl.exp(tl.minimum(-inner, 80.0)))
    else:
        act = gate / (1.0 + tl.exp(-gate))
    return act * up


@triton.jit
def silu_and_mul_kernel(
    gate_up_ptr, out_ptr,
    num_features,
    stride_gt, stride_ot,
    GELU_TANH: tl.constexpr, BLOCK_F: tl.constexpr,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (fused_gemv.pdl_launch)
):
    """One program per (token, BLOCK_F output columns): out[t, f] = act(gate[t, f]) * up[t, f], act = SiLU,
    or GELU-tanh when GELU_TANH."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # gate_up is the previous kernel's output
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)  # i32[BLOCK_F]
    mask = cols < num_features
    gate = tl.load(gate_up_ptr + row * stride_gt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_gt + num_features + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_ot + cols, act_and_mul(gate, up, GELU_TANH).to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _act_row_block(g_row, cols, num_features, GELU_TANH: tl.constexpr):
    """f32 act(gate) * up of columns `cols` of one gate | up row, rounded to the row's dtype (as silu_and_mul
    stores it); 0 past num_features."""
    m = cols < num_features
    h = act_and_mul(tl.load(g_row + cols, mask=m, other=0.0).to(tl.float32),
                    tl.load(g_row + num_features + cols, mask=m, other=0.0).to(tl.float32), GELU_TANH)
    return h.to(g_row.dtype.element_ty).to(tl.float32)


@triton.jit
def act_and_mul_fp8_kernel(
    gate_up_ptr, q_ptr, scale_ptr,
    num_features,
    stride_gt, stride_qt,
    GELU_TANH: tl.constexpr, BLOCK_F: tl.constexpr, ROUND_F32: tl.constexpr,
):
    """One program per token: h = act(gate) * up rounded to gate_up's dtype (as silu_and_mul stores it), then the
    row quantized to e4m3 with scale max(amax(|h|) / 448, FLT_MIN) (quant_linear.quantize_activation_fp8's rule).
    A row of at most BLOCK_F features is read once; longer rows are read twice (amax, then quantize)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_F)
    g_row = gate_up_ptr + row * stride_gt
    h = _act_row_block(g_row, offs, num_features, GELU_TANH)
    amax = tl.abs(h)
    for f0 in range(BLOCK_F, num_features, BLOCK_F):
        amax = tl.maximum(amax, tl.abs(_act_row_block(g_row, f0 + offs, num_features, GELU_TANH)))
    scale = fp8_row_scale(tl.max(amax, 0))
    tl.store(scale_ptr + row, scale)
    inv = fp8_inv_scale(scale)
    for f0 in range(0, num_features, BLOCK_F):
        cols = f0 + offs
        if f0 > 0:
            h = _act_row_block(g_row, cols, num_features, GELU_TANH)
        y = fp8_scaled(h, inv, ROUND_F32)
        tl.store(q_ptr + row * stride_qt + cols, y.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
                 mask=cols < num_features)


def _validate(gate_up, name):
    if gate_up.dim() != 2:
        raise ValueError(f"{name}: gate_up must be [T, 2F], got shape {tuple(gate_up.shape)}")
    if gate_up.shape[1] % 2:
        raise ValueError(f"{name}: last dim must be even (gate then up), got {gate_up.shape[1]}")
    if gate_up.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{name}: unsupported dtype {gate_up.dtype} (bf16, fp16, fp32)")
    if gate_up.shape[1] and gate_up.stride(1) != 1:
        raise ValueError(f"{name}: gate_up's last dim must be contiguous")


def _act_and_mul(gate_up: torch.Tensor, *, gelu_tanh: bool, name: str, pdl: bool) -> torch.Tensor:
    _validate(gate_up, name)
    num_tokens, num_features = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, num_features), dtype=gate_up.dtype, device=gate_up.device)  # [T, F]
    if num_tokens == 0 or num_features == 0:
        return out
    block_f = min(SILU_BLOCK_F, triton.next_power_of_2(num_features))
    grid = (num_tokens, triton.cdiv(num_features, block_f))
    silu_and_mul_kernel[grid](
        gate_up, out,
        num_features,
        gate_up.stride(0), out.stride(0),
        GELU_TANH=gelu_tanh, BLOCK_F=block_f, num_warps=SILU_NUM_WARPS,
        **(_pdl_launch(gate_up.device) if pdl else {}),
    )
    return out


def _pdl_launch(device) -> dict:
    from kernels_gpu.fused_gemv import pdl_launch  # (fused_gemv imports this module: imported when first used)

    return pdl_launch(device)


def _act_and_mul_fp8(gate_up: torch.Tensor, *, gelu_tanh: bool, name: str):
    _validate(gate_up, name)
    num_tokens, num_features = gate_up.shape[0], gate_up.shape[1] // 2
    q = torch.empty((num_tokens, num_features), dtype=torch.float8_e4m3fn, device=gate_up.device)
    scale = torch.empty((num_tokens,), dtype=torch.float32, device=gate_up.device)
    if num_tokens == 0:
        return q, scale
    if num_features == 0:
        return q, scale.fill_(torch.finfo(torch.float32).tiny)
    block_f = min(SILU_FP8_BLOCK_F[tile_target(gate_up.device)], triton.next_power_of_2(num_features))
    act_and_mul_fp8_kernel[(num_tokens,)](
        gate_up, q, scale, num_features, gate_up.stride(0), q.stride(0),
        GELU_TANH=gelu_tanh, BLOCK_F=block_f, ROUND_F32=interpreting(),
        num_warps=next(w for width, w in SILU_FP8_NUM_WARPS if block_f <= width),
    )
    return q, scale


def silu_and_mul_fp8(gate_up: torch.Tensor):
    """silu_and_mul quantized for a W8A8 linear in the same kernel: [T, 2F] -> (float8_e4m3fn[T, F], f32[T] row
    scales), bit for bit quant_linear.quantize_activation_fp8(silu_and_mul(gate_up)); the bf16 row is never
    stored."""
    return _act_and_mul_fp8(gate_up, gelu_tanh=False, name="silu_and_mul_fp8")


def gelu_tanh_and_mul_fp8(gate_up: torch.Tensor):
    """gelu_tanh_and_mul quantized for a W8A8 linear in the same kernel (as silu_and_mul_fp8)."""
    return _act_and_mul_fp8(gate_up, gelu_tanh=True, name="gelu_tanh_and_mul_fp8")


def silu_and_mul(gate_up: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """[T, 2F] (gate | up) -> [T, F] = silu(gate) * up, silu in fp32, output in gate_up's dtype. pdl: launched with
    programmatic dependent launch where it is on (fused_gemv.pdl_launch), for a consumer that loads its weights
    before waiting on this kernel."""
    return _act_and_mul(gate_up, gelu_tanh=False, name="silu_and_mul", pdl=pdl)


def gelu_tanh_and_mul(gate_up: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """[T, 2F] (gate | up) -> [T, F] = gelu_tanh(gate) * up, GELU (tanh approximation) in fp32, output in
    gate_up's dtype. pdl: as silu_and_mul's."""
    return _act_and_mul(gate_up, gelu_tanh=True, name="gelu_tanh_and_mul", pdl=pdl)


def ref_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """float64 reference of silu_and_mul: [T, 2F] -> float64[T, F]."""
    gate, up = gate_up.double().chunk(2, dim=-1)  # f64[T, F] each
    return gate * torch.sigmoid(gate) * up


def ref_gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """float64 reference of gelu_tanh_and_mul: [T, 2F] -> float64[T, F]."""
    gate, up = gate_up.double().chunk(2, dim=-1)  # f64[T, F] each
    return torch.nn.functional.gelu(gate, approximate="tanh") * up
