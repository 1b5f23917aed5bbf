"""Comparison of fp8-quantized activation rows between two kernels that quantize the same values."""
import torch


def assert_same_fp8_rows(q, scale, want_q, want_scale, *, max_changed: float = 5e-3):
    """Equal row scales (to 1e-6 relative) and e4m3 values, except that at most max_changed of the elements may sit
    one e4m3 step away: on a GPU two kernels may sum a row's statistics in a different order, which moves an f32
    value by an ulp and, rarely, across a rounding boundary. (The interpreter may also flip a zero's sign.)"""
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    a, b = q.float(), want_q.float()
    changed = a != b
    assert changed.float().mean().item() <= max_changed, f"{int(changed.sum())} of {a.numel()} fp8 values differ"
    step = torch.maximum(a.abs(), b.abs()) * 0.125 + 2.0 ** -9  # one e4m3 step (the subnormal step 2**-9)
    assert ((a - b).abs() <= step).all(), "fp8 values more than one step apart"
