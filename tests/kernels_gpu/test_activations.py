"""silu_and_mul and gelu_tanh_and_mul against their float64 references over ragged shapes and every supported
dtype."""
import pytest
import torch

from kernels_gpu.activations import gelu_tanh_and_mul, ref_gelu_tanh_and_mul, ref_silu_and_mul, silu_and_mul
from tests.kernels_gpu.fp8_checks import assert_same_fp8_rows

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens, num_features", [(1, 64), (7, 1000), (13, 576), (3, 1536)])
def test_silu_and_mul_matches_reference(device, dtype, num_tokens, num_features):
    torch.manual_seed(num_tokens * 1000 + num_features)
    gate_up = (torch.randn(num_tokens, 2 * num_features, device=device) * 4).to(dtype)  # [T, 2F]
    out = silu_and_mul(gate_up)  # [T, F]
    assert out.shape == (num_tokens, num_features) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_silu_and_mul(gate_up), **TOLERANCES[dtype])


def test_silu_and_mul_strided_rows_and_empty(device):
    base = torch.randn(5, 2 * 96 + 32, device=device)  # rows with padding after gate|up
    gate_up = base[:, : 2 * 96]  # [5, 192], row stride 224
    torch.testing.assert_close(silu_and_mul(gate_up).double(), ref_silu_and_mul(gate_up), **TOLERANCES[torch.float32])
    assert silu_and_mul(torch.empty(0, 8, device=device)).shape == (0, 4)


def test_silu_and_mul_rejects_bad_input(device):
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="T, 2F"):
        silu_and_mul(torch.randn(2, 3, 8, device=device))
    with pytest.raises(ValueError, match="dtype"):
        silu_and_mul(torch.ones(2, 8, dtype=torch.int32, device=device))


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens, num_features", [(1, 64), (7, 1000), (3, 1536)])
def test_gelu_tanh_and_mul_matches_reference(device, dtype, num_tokens, num_features):
    torch.manual_seed(num_tokens * 1000 + num_features + 1)
    gate_up = (torch.randn(num_tokens, 2 * num_features, device=device) * 4).to(dtype)  # [T, 2F]
    out = gelu_tanh_and_mul(gate_up)  # [T, F]
    assert out.shape == (num_tokens, num_features) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_gelu_tanh_and_mul(gate_up), **TOLERANCES[dtype])


def test_gelu_tanh_and_mul_strided_rows_and_bad_input(device):
    base = torch.randn(5, 2 * 96 + 32, device=device) * 6  # rows with padding after gate|up; large |x| saturates
    gate_up = base[:, : 2 * 96]
    torch.testing.assert_close(gelu_tanh_and_mul(gate_up).double(), ref_gelu_tanh_and_mul(gate_up),
                               **TOLERANCES[torch.float32])
    with pytest.raises(ValueError, match="gelu_tanh_and_mul: last dim must be even"):
        gelu_tanh_and_mul(torch.randn(2, 7, device=device))


@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens, num_features", [(1, 64), (7, 1000), (3, 1536)])
def test_act_and_mul_fp8_equals_act_then_activation_quantizer(kernel_module, device, gelu, dtype, num_tokens,
                                                              num_features):
    """The W8A8 SwiGLU / GeGLU: the row silu_and_mul / gelu_tanh_and_mul stores, quantized as
    quant_linear.quantize_activation_fp8 does (rows longer than the kernel's block are read twice)."""
    act, ql = kernel_module("activations"), kernel_module("quant_linear")
    torch.manual_seed(num_tokens * 7 + num_features)
    base = torch.randn(num_tokens, 2 * num_features + 16, device=device) * 4
    base[0] *= 1e-3
    gate_up = base[:, : 2 * num_features].to(dtype)  # rows with padding after gate | up
    fused, plain = (act.gelu_tanh_and_mul_fp8, act.gelu_tanh_and_mul) if gelu else \
        (act.silu_and_mul_fp8, act.silu_and_mul)
    q, scale = fused(gate_up)
    want_q, want_scale = ql.quantize_activation_fp8(plain(gate_up))
    assert q.dtype == torch.float8_e4m3fn and q.shape == (num_tokens, num_features)
    assert_same_fp8_rows(q, scale, want_q, want_scale)
    ref = (ref_gelu_tanh_and_mul if gelu else ref_silu_and_mul)(gate_up).to(dtype).double()  # the row as stored
    deq = q.double() * scale.double()[:, None]
    assert ((deq - ref).abs() <= ref.abs() * 0.09 + scale.double()[:, None] * 2 ** -8).all()


def test_act_and_mul_fp8_empty_and_bad_input(kernel_module, device):
    act = kernel_module("activations")
    q, scale = act.silu_and_mul_fp8(torch.empty(0, 8, device=device))
    assert q.shape == (0, 4) and scale.shape == (0,)
    q, scale = act.silu_and_mul_fp8(torch.empty(3, 0, device=device))
    assert q.shape == (3, 0) and (scale == torch.finfo(torch.float32).tiny).all()
    with pytest.raises(ValueError, match="silu_and_mul_fp8: last dim must be even"):
        act.silu_and_mul_fp8(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="gelu_tanh_and_mul_fp8: unsupported dtype"):
        act.gelu_tanh_and_mul_fp8(torch.ones(2, 8, dtype=torch.int32, device=device))
