"""Bit-exact and round-trip tests of the FP8 / NVFP4 KV cache reference formats."""
import pytest
import torch

from kernels_gpu.kv_formats import (E2M1_VALUES, dequantize_fp8, dequantize_nvfp4, e2m1_decode, e2m1_encode,
                                    nvfp4_global_scale, quantize_fp8, quantize_nvfp4)


def _encode(values):
    return e2m1_encode(torch.tensor(values, dtype=torch.float32)).tolist()


def test_e2m1_table():
    assert E2M1_VALUES == (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    codes = torch.arange(16, dtype=torch.uint8)
    assert e2m1_decode(codes).tolist() == list(E2M1_VALUES) + [-v for v in E2M1_VALUES]


def test_e2m1_exact_values_roundtrip():
    assert _encode(list(E2M1_VALUES)) == list(range(8))
    assert _encode([-v for v in E2M1_VALUES[1:]]) == list(range(9, 16))


def test_e2m1_ties_to_even_code():
    # midpoints between codes (c, c+1) go to the even code
    assert _encode([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) == [0, 2, 2, 4, 4, 6, 6]
    assert _encode([-0.75, -5.0]) == [8 | 2, 8 | 6]


def test_e2m1_nearest_off_ties():
    assert _encode([0.26, 0.74, 1.3, 1.7, 2.6, 3.4, 5.01, 0.1]) == [1, 1, 3, 3, 5, 5, 7, 0]


def test_e2m1_saturates():
    assert _encode([6.0, 7.0, 1e9, float("inf"), -7.0, -1e9]) == [7, 7, 7, 7, 15, 15]


def test_e2m1_negative_zero_keeps_sign():
    assert _encode([0.0, -0.0, -0.1]) == [0, 8, 8]
    assert e2m1_decode(torch.tensor([8], dtype=torch.uint8)).item() == 0.0


def test_nvfp4_bit_exact_block():
    # amax 6 with global scale 1 -> block scale exactly 1.0, so codes are the plain E2M1 encodings
    x = torch.tensor([6.0, 0.75, -5.0, 1.25, 0.0, -0.0, 3.0, -0.5, 1.0, 2.0, 4.0, 1.5, 0.25, 2.5, 3.5, -6.0])
    packed, bscale = quantize_nvfp4(x, 1.0)
    assert bscale.float().tolist() == [1.0]
    codes = [7, 2, 8 | 6, 2, 0, 8, 5, 8 | 1, 2, 4, 6, 3, 0, 4, 6, 8 | 7]
    assert packed.tolist() == [codes[2 * i] | (codes[2 * i + 1] << 4) for i in range(8)]
    assert dequantize_nvfp4(packed, bscale, 1.0).tolist() == [e2m1_decode(torch.tensor(c)).item() for c in codes]


def test_nvfp4_packing_order():
    x = torch.zeros(16)
    x[0], x[1] = 6.0, 0.5  # element 0 -> low nibble, element 1 -> high nibble
    packed, _ = quantize_nvfp4(x, 1.0)
    assert packed[0].item() == 0x17


def test_nvfp4_block_scale_rounding_and_saturation():
    x = torch.zeros(2, 16)
    x[0, 0] = 6.0 * 1.06  # scale 1.06 -> e4m3 RNE -> 1.0 (step 0.125), value saturates to code 7
    x[1, 0] = 1e9  # block scale saturates at 448
    packed, bscale = quantize_nvfp4(x, 1.0)
    assert bscale.float().flatten().tolist() == [1.0, 448.0]
    assert (packed[:, 0] & 0xF).tolist() == [7, 7]


def test_nvfp4_zero_block():
    x = torch.zeros(32)
    x[16:] = torch.linspace(-3, 3, 16)
    x[:16] = -0.0
    packed, bscale = quantize_nvfp4(x, nvfp4_global_scale(x))
    assert bscale.float()[0].item() == 0.0
    assert packed[:8].tolist() == [0] * 8


def test_nvfp4_global_scale():
    x = torch.tensor([1.0, -2688.0, 3.0])
    assert nvfp4_global_scale(x).item() == pytest.approx(1.0)
    assert nvfp4_global_scale(torch.zeros(4)).item() > 0


@pytest.mark.parametrize("head_dim", [64, 128])
def test_nvfp4_round_trip(head_dim):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 2, head_dim) * 4  # [N, block_size, Hkv, D]
    gs = nvfp4_global_scale(x)
    packed, bscale = quantize_nvfp4(x, gs)
    assert packed.shape == (3, 5, 2, head_dim // 2) and packed.dtype == torch.uint8
    assert bscale.shape == (3, 5, 2, head_dim // 16) and bscale.dtype == torch.float8_e4m3fn
    y = dequantize_nvfp4(packed, bscale, gs)
    # per block: |err| <= half the widest E2M1 step (1.0 at 4..6) times the decoded block scale,
    # plus the block scale's own e4m3 rounding (<= 1/16 relative) acting on amax
    blocks = x.reshape(-1, 16)
    amax = blocks.abs().amax(-1, keepdim=True)
    err = (y.reshape(-1, 16) - blocks).abs()
    assert (err <= amax * (1 / 6 + 1 / 16) + 1e-6).all()
    assert (err.mean() / x.abs().mean()) < 0.15
    # re-quantizing the decoded values is exact
    p2, b2 = quantize_nvfp4(y, gs)
    assert torch.equal(dequantize_nvfp4(p2, b2, gs), y)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp8_round_trip(head_dim):
    torch.manual_seed(0)
    x = torch.randn(4, 16, 2, head_dim) * torch.tensor([1.0, 30.0])[:, None]  # [N, block_size, Hkv, D]
    scale = x.abs().amax(dim=(0, 1, 3)) / 448  # f32[Hkv]
    q = quantize_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    y = dequantize_fp8(q, scale)
    assert ((y - x).abs() <= x.abs() * 2 ** -4 + scale[:, None] * 2 ** -9).all()


def test_fp8_saturates_and_rounds_to_even():
    scale = torch.tensor([1.0, 2.0])
    x = torch.tensor([[1e6, -1e6, 1.0625, 1.1875], [1e6, 0.5, 2.125, 2.375]])[None]  # [1, Hkv=2, 4]
    q = quantize_fp8(x, scale).float()
    assert q[0, 0].tolist() == [448.0, -448.0, 1.0, 1.25]  # 1.0625 ties to even 1.0; 1.1875 ties to 1.25
    assert q[0, 1].tolist() == [448.0, 0.25, 1.0, 1.25]  # divided by the head's scale 2.0 first
    assert dequantize_fp8(quantize_fp8(x, scale), scale)[0, 1].tolist() == [896.0, 0.5, 2.0, 2.5]
