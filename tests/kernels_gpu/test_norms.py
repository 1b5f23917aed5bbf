"""add_rms_norm against its float64 reference and Hugging Face LlamaRMSNorm."""
import pytest
import torch

from kernels_gpu.norms import add_rms_norm, ref_add_rms_norm
from tests.kernels_gpu.fp8_checks import assert_same_fp8_rows

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    # NOTE: bf16 output is rounded twice (normalized row, then times weight), as HF does.
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("num_tokens, hidden", [(1, 64), (7, 576), (13, 1000), (3, 4096)])
def test_add_rms_norm_matches_reference(device, dtype, with_residual, num_tokens, hidden):
    torch.manual_seed(num_tokens * 10000 + hidden)
    x = (torch.randn(num_tokens, hidden, device=device) * 3).to(dtype)  # [T, H]
    residual = torch.randn(num_tokens, hidden, device=device).to(dtype) if with_residual else None
    weight = (1 + 0.5 * torch.randn(hidden, device=device)).to(dtype)  # [H]
    eps = 1e-5
    normed, new_residual = add_rms_norm(x, residual, weight, eps)
    want, want_residual = ref_add_rms_norm(x, residual, weight, eps)
    assert normed.dtype == dtype and normed.shape == x.shape
    torch.testing.assert_close(normed.double(), want, **TOLERANCES[dtype])
    if with_residual:
        # NOTE: the interpreter rounds fp32 -> bf16/fp16 inexactly, so allow one rounding of slack.
        torch.testing.assert_close(new_residual.double(), want_residual.double(), **TOLERANCES[dtype])
        assert new_residual.dtype == residual.dtype
    else:
        assert new_residual is None


def test_add_rms_norm_fp32_weight_and_strided_rows(device):
    x_full = torch.randn(6, 640, device=device, dtype=torch.bfloat16)
    x = x_full[:, :576]  # [6, 576], row stride 640
    weight = torch.randn(576, device=device)  # f32 weight under bf16 activations
    normed, _ = add_rms_norm(x, None, weight, 1e-6)
    want, _ = ref_add_rms_norm(x, None, weight, 1e-6)
    torch.testing.assert_close(normed.double(), want, **TOLERANCES[torch.bfloat16])


def test_add_rms_norm_matches_hf_llama_rms_norm(device):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    torch.manual_seed(0)
    hidden = 576
    norm = modeling_llama.LlamaRMSNorm(hidden, eps=1e-5).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(hidden))
    x = torch.randn(9, hidden, device=device, dtype=torch.bfloat16)
    residual = torch.randn(9, hidden, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        want = norm(x + residual)
    normed, new_residual = add_rms_norm(x, residual, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(new_residual, x + residual, **TOLERANCES[torch.bfloat16])
    torch.testing.assert_close(normed, want, **TOLERANCES[torch.bfloat16])


def test_add_rms_norm_rejects_bad_input(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="weight"):
        add_rms_norm(x, None, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm(x, torch.randn(4, 32, device=device), torch.ones(64, device=device), 1e-6)
    with pytest.raises(ValueError, match=r"\[T, H\]"):
        add_rms_norm(x[None], None, torch.ones(64, device=device), 1e-6)


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_with_weight_offset_matches_reference(device, dtype, with_residual):
    """Gemma's (1 + w) RMSNorm: the weight is an offset from one, the product rounded once."""
    torch.manual_seed(3)
    x = (torch.randn(7, 640, device=device) * 3).to(dtype)  # [T, H]
    residual = torch.randn(7, 640, device=device).to(dtype) if with_residual else None
    weight = (0.5 * torch.randn(640, device=device)).to(dtype)  # [H], around zero
    normed, _ = add_rms_norm(x, residual, weight, 1e-6, weight_offset=1.0)
    want, _ = ref_add_rms_norm(x, residual, weight, 1e-6, weight_offset=1.0)
    torch.testing.assert_close(normed.double(), want, **TOLERANCES[dtype])


def test_add_rms_norm_with_weight_offset_matches_hf_gemma3_rms_norm(device):
    modeling_gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    torch.manual_seed(0)
    norm = modeling_gemma3.Gemma3RMSNorm(640, eps=1e-6).to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(0.3 * torch.randn(640))
    x = torch.randn(9, 640, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        want = norm(x)
    normed, _ = add_rms_norm(x, None, norm.weight.detach(), 1e-6, weight_offset=1.0)
    torch.testing.assert_close(normed, want, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("offset", [None, 1.0])
@pytest.mark.parametrize("num_tokens, hidden", [(1, 64), (7, 576), (5, 1000)])
def test_add_rms_norm_fp8_equals_norm_then_activation_quantizer(kernel_module, device, dtype, with_residual, offset,
                                                                num_tokens, hidden):
    """The W8A8 norm: the row add_rms_norm stores, quantized as quant_linear.quantize_activation_fp8 does."""
    norms, ql = kernel_module("norms"), kernel_module("quant_linear")
    torch.manual_seed(num_tokens + hidden)
    x = (torch.randn(num_tokens, hidden, device=device) * 3).to(dtype)
    x[-1] *= 1e-4  # a row of small values (its own scale)
    residual = torch.randn(num_tokens, hidden, device=device).to(dtype) if with_residual else None
    weight = (0.5 * torch.randn(hidden, device=device)).to(dtype)
    q, scale, summed = norms.add_rms_norm_fp8(x, residual, weight, 1e-5, offset)
    normed, want_summed = norms.add_rms_norm(x, residual, weight, 1e-5, offset)
    want_q, want_scale = ql.quantize_activation_fp8(normed)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and scale.shape == (num_tokens,)
    assert_same_fp8_rows(q, scale, want_q, want_scale)
    if with_residual:
        torch.testing.assert_close(summed, want_summed, rtol=0, atol=0)
    else:
        assert summed is None
    # against float64: the e4m3 step (2**-3 relative) bounds each element
    ref, _ = norms.ref_add_rms_norm(x, residual, weight, 1e-5, offset)
    deq = q.double() * scale.double()[:, None]
    assert ((deq - ref).abs() <= ref.abs() * 0.07 + scale.double()[:, None] * 2 ** -8 + 2e-2 * ref.abs()).all()


def test_add_rms_norm_fp8_empty_and_bad_input(kernel_module, device):
    norms = kernel_module("norms")
    q, scale, _ = norms.add_rms_norm_fp8(torch.empty(0, 64, device=device), None, torch.ones(64, device=device), 1e-6)
    assert q.shape == (0, 64) and scale.shape == (0,)
    with pytest.raises(ValueError, match="weight"):
        norms.add_rms_norm_fp8(torch.randn(4, 64, device=device), None, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="dtype"):
        norms.add_rms_norm_fp8(torch.ones(4, 64, dtype=torch.int32, device=device), None,
                               torch.ones(64, device=device), 1e-6)
