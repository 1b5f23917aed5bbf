"""fused_qgemv (batch-1 GEMV over an int8 / int4 / nvfp4 weight with a fused RMSNorm / SwiGLU / GeGLU prologue and a
memset-free split-K) against float64 references over the dequantized weight, and against the unfused kernels."""
import pytest
import torch

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}  # relative (Frobenius) error
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (N, K): N a multiple of no tile (the interpreter's: 16 rows x 32 columns); K 96: one split; K 256 with N 20 / 37:
# three / two splits (SPLIT_K_PROGRAMS 6 in the interpreter), so the last-arrival reduction runs, with a ragged
# last N tile
SHAPES = [(37, 96), (20, 256), (37, 256)]
# the interpreter's tiles, forced on a GPU too where a test needs the split-K path on these small shapes
SMALL_TILES = {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "SPLIT_K_PROGRAMS": 6, "MAX_SPLIT_K": 4}
WEIGHTS = ["int8", "int4-g16", "int4-zero-g32", "nvfp4"]


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def make_weight(kind, n, k, device, seed):
    import numpy as np

    from kernels_gpu.quant_linear import QuantizedWeight, quantize_weight
    from lowering.quant import formats

    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    if kind == "int4-zero-g32":
        parts = formats.quantize_int4(w.numpy() + np.float32(0.02), 32)  # shifted: asymmetric groups
        return QuantizedWeight.from_parts("int4", parts, k, n, device=device)
    scheme, _, group = kind.partition("-g")
    return quantize_weight(w, scheme, group_size=int(group) if group else 128).to(device)


def make_case(kind, n, k, dtype, device, *, seed=0, bias=False, rows=1, width=None):
    from kernels_gpu.quant_linear import dequantize_weight

    gen = torch.Generator().manual_seed(seed + 17)
    qw = make_weight(kind, n, k, device, seed)
    x = (torch.randn(rows, width or k, generator=gen) * 3).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, qw, dequantize_weight(qw).to(device), b


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind", WEIGHTS)
def test_norm_qgemv_matches_reference(kernel_module, device, dtype, n, k, kind):
    fq = kernel_module("fused_qgemv")
    fg = kernel_module("fused_gemv")
    for with_residual, offset in ((True, None), (False, 1.0)):
        x, qw, w, b = make_case(kind, n, k, dtype, device, seed=n + k, bias=offset is None)
        gen = torch.Generator().manual_seed(k)
        residual = torch.randn(1, k, generator=gen).to(dtype).to(device) if with_residual else None
        norm_w = (1 + 0.3 * torch.randn(k, generator=gen)).to(dtype).to(device)
        # the default tiles, and on a GPU also the small ones (the split-K path on these shapes)
        for cfg in (None, SMALL_TILES) if device == "cuda" else (None,):
            y, new_residual = fq.norm_qgemv(x, residual, norm_w, 1e-5, qw, b, weight_offset=offset, config=cfg)
            want, want_residual = fg.ref_norm_gemv(x, residual, norm_w, 1e-5, w, b, weight_offset=offset)
            assert y.shape == (1, n) and y.dtype == dtype
            assert rel_err(y, want) < TOL[dtype], (kind, with_residual, cfg)
        if with_residual:
            assert new_residual.dtype == dtype  # every column, from every split (the interpreter rounds bf16 inexactly)
            torch.testing.assert_close(new_residual.double(), want_residual.double(), atol=TOL[dtype], rtol=TOL[dtype])
        else:
            assert new_residual is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_qgemv_matches_reference(kernel_module, device, dtype, n, k, kind, act):
    fq = kernel_module("fused_qgemv")
    fg = kernel_module("fused_gemv")
    x, qw, w, b = make_case(kind, n, k, dtype, device, seed=2 * n + k, bias=act == "silu", width=2 * k)
    want = fg.ref_act_gemv(x, w, b, act=act)
    for cfg in (None, SMALL_TILES) if device == "cuda" else (None,):
        y = fq.act_qgemv(x, qw, b, act=act, config=cfg)
        assert y.shape == (1, n) and y.dtype == dtype
        # the activation is rounded to the input dtype where silu_and_mul stores it (the reference does not round)
        assert rel_err(y, want) < TOL[dtype] * (1 if dtype == torch.float32 else 1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("kind", WEIGHTS)
def test_qgemv_matches_quant_linear_and_picks_rows(kernel_module, device, dtype, kind):
    """prologue none against quant_linear's GEMV (the same weight decode: equal up to summation order), a row picked
    out of several by `rows`, an f32 output."""
    fq = kernel_module("fused_qgemv")
    ql = kernel_module("quant_linear")
    for n, k in SHAPES:
        x, qw, w, b = make_case(kind, n, k, dtype, device, seed=n * k, bias=True, rows=3)
        rows = torch.tensor([2], dtype=torch.int32, device=device)
        want = x[2:].double() @ w.double().t() + b.double()
        other = ql.quant_linear(x[2:].contiguous(), qw, b).double()
        for decode in (0, 1):  # DECODE 1: int4 as 1 + c / 16 with the group-sum correction; nvfp4's lean asm (GPU)
            y = fq.qgemv(x, qw, b, rows=rows, out_dtype=torch.float32, config=dict(SMALL_TILES, DECODE=decode))
            assert y.shape == (1, n) and y.dtype == torch.float32
            assert rel_err(y, want) < (1e-5 if dtype == torch.float32 else 1e-4), decode  # f32 out: sums' rounding
            assert rel_err(y.to(dtype), other) < TOL[dtype]


def test_split_k_workspace_is_reused_and_left_zeroed(kernel_module, device):
    """The arrival counters are zero after every launch, so one workspace serves any number of launches (a CUDA
    graph replays the same pointers); a weight needing more room grows it."""
    fq = kernel_module("fused_qgemv")
    ws = fq.Workspace(device)
    for n, k, seed in ((20, 256, 0), (20, 256, 1), (37, 256, 2), (5, 512, 3)):
        x, qw, w, _ = make_case("int4-g16", n, k, torch.float32, device, seed=seed)
        y = fq.qgemv(x, qw, workspace=ws, config=SMALL_TILES)
        assert rel_err(y, x.double() @ w.double().t()) < 1e-5
        assert ws.counters is not None and int(ws.counters.abs().sum()) == 0
    assert ws.counters.numel() >= 3


def test_results_do_not_depend_on_the_split(kernel_module, device):
    """Split-K sums partials in split order: 1, 2 and 4 splits agree to f32 rounding, and a split run repeats bit
    for bit."""
    fq = kernel_module("fused_qgemv")
    x, qw, w, _ = make_case("nvfp4", 24, 512, torch.float32, device, seed=5)
    want = x.double() @ w.double().t()
    outs = []
    for split_programs in (0, 4, 8):
        cfg = dict(SMALL_TILES, SPLIT_K_PROGRAMS=split_programs)
        y = fq.qgemv(x, qw, config=cfg)
        assert rel_err(y, want) < 1e-5
        outs.append(y)
        assert torch.equal(fq.qgemv(x, qw, config=cfg), y)


def test_bad_inputs_raise_clear_errors(kernel_module, device):
    fq = kernel_module("fused_qgemv")
    from kernels_gpu.quant_linear import quantize_weight

    x, qw, _, _ = make_case("int4-g16", 16, 64, torch.float32, device)
    with pytest.raises(ValueError, match="one"):
        fq.qgemv(torch.randn(2, 64, device=device), qw)
    with pytest.raises(ValueError, match="in_features"):
        fq.qgemv(torch.randn(1, 32, device=device), qw)
    with pytest.raises(ValueError, match="W8A8"):
        fq.qgemv(x, quantize_weight(torch.randn(16, 64), "fp8").to(device))
    with pytest.raises(ValueError, match="bias"):
        fq.qgemv(x, qw, torch.zeros(17, device=device))
    with pytest.raises(ValueError, match="norm weight"):
        fq.norm_qgemv(x, None, torch.ones(63, device=device), 1e-5, qw)
    with pytest.raises(ValueError, match="even"):
        fq.act_qgemv(torch.randn(1, 63, device=device), qw)
    with pytest.raises(ValueError, match="act"):
        fq.act_qgemv(torch.randn(1, 128, device=device), qw, act="relu")
