"""fused_gemv (decode GEMV with a fused RMSNorm / SwiGLU / GeGLU prologue) against float64 references and the unfused
kernels it replaces."""
import pytest
import torch

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 2e-5}  # relative (Frobenius) error
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M, N, K): one to thirteen rows (a verification step's k + 1); N and K multiples of no tile (the interpreter's
# tiles are 8 x 32, 16 x 32 for the tensor-core path)
SHAPES = [(1, 37, 100), (2, 64, 96), (3, 13, 257), (4, 40, 64), (5, 24, 70), (8, 19, 33), (13, 21, 50)]


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


def make(m, n, k, dtype, device, *, seed=0, bias=False, x_rows=None):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(x_rows or m, k, generator=gen) * 3).to(dtype).to(device)  # [T, K]
    w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype).to(device)  # [N, K]
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None  # [N]
    return x, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("offset", [None, 1.0], ids=["llama", "gemma"])
def test_norm_gemv_matches_reference(kernel_module, device, dtype, m, n, k, with_residual, offset):
    fg = kernel_module("fused_gemv")
    x, w, b = make(m, n, k, dtype, device, seed=m * 1000 + n, bias=offset is None)
    gen = torch.Generator().manual_seed(k)
    residual = torch.randn(m, k, generator=gen).to(dtype).to(device) if with_residual else None
    norm_w = (1 + 0.3 * torch.randn(k, generator=gen)).to(dtype).to(device)
    y, new_residual = fg.norm_gemv(x, residual, norm_w, 1e-5, w, b, weight_offset=offset)
    want, want_residual = fg.ref_norm_gemv(x, residual, norm_w, 1e-5, w, b, weight_offset=offset)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, want) < TOL[dtype]
    if with_residual:
        assert new_residual.dtype == dtype
        torch.testing.assert_close(new_residual.double(), want_residual.double(), atol=TOL[dtype], rtol=TOL[dtype])
    else:
        assert new_residual is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_norm_gemv_equals_add_rms_norm_then_linear(kernel_module, device, dtype):
    """Against the unfused kernels: the same new residual bit for bit; in f32 the same output, in bf16 one at least
    as close to the float64 reference (the unfused norm rounds its output to bf16 twice before the dot; the fused
    kernel does not). The output is f32 here, so its own rounding does not hide a difference."""
    fg = kernel_module("fused_gemv")
    norms = kernel_module("norms")
    x, w, _ = make(2, 48, 160, dtype, device, seed=7)
    residual = torch.randn(2, 160).to(dtype).to(device)
    norm_w = (1 + 0.3 * torch.randn(160)).to(dtype).to(device)
    y, new_residual = fg.norm_gemv(x, residual, norm_w, 1e-6, w, out_dtype=torch.float32)
    normed, summed = norms.add_rms_norm(x, residual, norm_w, 1e-6)
    unfused = (normed.double() @ w.double().t())
    assert torch.equal(new_residual, summed)
    if dtype == torch.float32:
        assert rel_err(y, unfused) < 1e-5
    else:
        want, _ = fg.ref_norm_gemv(x, residual, norm_w, 1e-6, w)
        assert rel_err(y, want) <= rel_err(unfused, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_norm_gemv_rows_and_f32_logits(kernel_module, device, dtype):
    """The final norm fused into the logits: rows picks the sampled rows, the output is float32."""
    fg = kernel_module("fused_gemv")
    x, w, _ = make(3, 70, 96, dtype, device, seed=3, x_rows=6)
    rows = torch.tensor([5, 0, 2], dtype=torch.int32, device=device)
    norm_w = (1 + 0.3 * torch.randn(96)).to(dtype).to(device)
    y, none = fg.norm_gemv(x, None, norm_w, 1e-5, w, rows=rows, out_dtype=torch.float32)
    want, _ = fg.ref_norm_gemv(x, None, norm_w, 1e-5, w, rows=rows)
    assert none is None and y.dtype == torch.float32 and y.shape == (3, 70)
    assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_final_norm_into_logits_with_residual_and_rows(kernel_module, device, dtype):
    """The last layer's residual add + final norm + logits: rows pick the sampled rows of the sum, the sum itself is
    not kept, and the logits are rounded to the activation dtype before widening (the IR's logits rule)."""
    fg = kernel_module("fused_gemv")
    x, w, _ = make(2, 50, 64, dtype, device, seed=11, x_rows=5)
    residual = torch.randn(5, 64).to(dtype).to(device)
    norm_w = (1 + 0.3 * torch.randn(64)).to(dtype).to(device)
    rows = torch.tensor([4, 1], dtype=torch.int32, device=device)
    y, kept = fg.norm_gemv(x, residual, norm_w, 1e-5, w, rows=rows, out_dtype=torch.float32, keep_residual=False,
                           round_to_act=True)
    want, _ = fg.ref_norm_gemv(x, residual, norm_w, 1e-5, w, rows=rows)
    assert kept is None and y.dtype == torch.float32
    assert torch.equal(y, y.to(dtype).float())  # rounded to the activation dtype
    assert rel_err(y, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_gemv_matches_reference(kernel_module, device, dtype, m, n, k, act):
    fg = kernel_module("fused_gemv")
    gate_up, w, b = make(m, n, 2 * k, dtype, device, seed=m + n, bias=m % 2 == 1)
    w = w[:, :k].contiguous()  # [N, K]
    y = fg.act_gemv(gate_up, w, b, act=act)
    want = fg.ref_act_gemv(gate_up, w, b, act=act)
    assert y.shape == (m, n) and y.dtype == dtype
    assert rel_err(y, want) < TOL[dtype]


def test_act_gemv_reads_split_halves_of_a_wider_row(kernel_module, device):
    """gate | up as views of a [M, 2F] tensor whose rows are padded (row stride > 2F)."""
    fg = kernel_module("fused_gemv")
    base = torch.randn(2, 2 * 80 + 16).to(device)  # [M, 2F + pad]
    gate_up = base[:, :160]
    w = torch.randn(24, 80).to(device)
    torch.testing.assert_close(fg.act_gemv(gate_up, w).double(), fg.ref_act_gemv(gate_up, w), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "f16", "f32"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_matches_reference(kernel_module, device, dtype, m, n, k):
    fg = kernel_module("fused_gemv")
    x, w, b = make(m, n, k, dtype, device, seed=n, bias=True)
    y = fg.gemv(x, w, b)
    assert rel_err(y, fg.ref_gemv(x, w, b)) < TOL[dtype]


def test_unused_rows_are_never_read(kernel_module, device):
    """Rows outside `rows` (and activations past M) may hold NaN: nothing of them reaches the output."""
    fg = kernel_module("fused_gemv")
    x, w, _ = make(1, 20, 64, torch.float32, device, x_rows=4)
    x[1:] = float("nan")
    rows = torch.tensor([0], dtype=torch.int32, device=device)
    norm_w = torch.ones(64, device=device)
    y, _ = fg.norm_gemv(x, None, norm_w, 1e-5, w, rows=rows)
    assert torch.isfinite(y).all()
    y = fg.gemv(x, w, rows=rows)
    assert torch.isfinite(y).all()


def test_bad_input_is_refused_by_name(kernel_module, device, monkeypatch):
    fg = kernel_module("fused_gemv")
    x, w, _ = make(1, 8, 32, torch.float32, device)
    with pytest.raises(ValueError, match="FUSED_MAX_M"):
        fg.gemv(torch.randn(fg.FUSED_MAX_M + 1, 32, device=device), w)
    with pytest.raises(ValueError, match="K=32"):
        fg.gemv(x, torch.randn(8, 31, device=device))
    with pytest.raises(ValueError, match="keep_residual=False"):
        fg.norm_gemv(x, x, torch.ones(32, device=device), 1e-5, w, rows=torch.zeros(1, dtype=torch.int32,
                                                                                     device=device))
    with pytest.raises(ValueError, match="norm weight"):
        fg.norm_gemv(x, None, torch.ones(31, device=device), 1e-5, w)
    with pytest.raises(ValueError, match="even"):
        fg.act_gemv(torch.randn(1, 33, device=device), w)
    with pytest.raises(ValueError, match="act must be"):
        fg.act_gemv(torch.randn(1, 64, device=device), w, act="relu")
    with pytest.raises(ValueError, match="dtype"):
        fg.gemv(x.to(torch.int32), w)
    monkeypatch.setattr(fg, "MULTI_ROW", "rowz")
    with pytest.raises(ValueError, match="MULTI_ROW"):
        fg.gemv(torch.randn(2, 32, device=device), w)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "loop"])
@pytest.mark.parametrize("k", [20, 64, 100])  # one K step (the loop after the first is empty), two, four ragged
def test_one_row_with_and_without_the_first_tile_prefetched(kernel_module, device, monkeypatch, prefetch, k):
    """The one-row path peels its first K step (its weight tile loaded before the wait on the kernel before, with
    programmatic dependent launch on a GPU); either way every prologue matches its reference."""
    fg = kernel_module("fused_gemv")
    monkeypatch.setattr(fg, "PREFETCH_FIRST_TILE", prefetch)
    x, w, b = make(1, 45, k, torch.float32, device, seed=k, bias=True, x_rows=3)
    gen = torch.Generator().manual_seed(k + 1)
    residual = torch.randn(3, k, generator=gen).to(device)
    norm_w = (1 + 0.3 * torch.randn(k, generator=gen)).to(device)
    y, new_residual = fg.norm_gemv(x[:1], residual[:1], norm_w, 1e-5, w, b)
    want, want_residual = fg.ref_norm_gemv(x[:1], residual[:1], norm_w, 1e-5, w, b)
    assert rel_err(y, want) < TOL[torch.float32]
    torch.testing.assert_close(new_residual.double(), want_residual.double())
    rows = torch.tensor([2], dtype=torch.int32, device=device)
    y, _ = fg.norm_gemv(x, residual, norm_w, 1e-5, w, rows=rows, keep_residual=False)
    assert rel_err(y, fg.ref_norm_gemv(x, residual, norm_w, 1e-5, w, rows=rows)[0]) < TOL[torch.float32]
    gate_up = torch.randn(1, 2 * k, generator=gen).to(device)
    assert rel_err(fg.act_gemv(gate_up, w, b), fg.ref_act_gemv(gate_up, w, b)) < TOL[torch.float32]
    assert rel_err(fg.gemv(x, w, rows=rows), fg.ref_gemv(x, w, rows=rows)) < TOL[torch.float32]


def test_prologue_tile_tables_are_keyed_by_k(kernel_module, monkeypatch):
    """A (target, BLOCK_M, prologue) tile table is looked up by K; without one, (target, BLOCK_M)'s by N."""
    fg = kernel_module("fused_gemv")
    dev = torch.device("cpu")
    key = (fg._target(dev), 16)
    monkeypatch.setitem(fg.TILE_SIZES, (*key, "none"), [(64, 16, 64, 4, 1), (1 << 62, 16, 32, 4, 2)])
    assert fg._tiles(dev, 16, 1 << 20, 64, "none") == (16, 64, 4, 1)
    assert fg._tiles(dev, 16, 8, 65, "none") == (16, 32, 4, 2)
    assert fg._tiles(dev, 16, 8, 1 << 20, "rms_norm") == fg.TILE_SIZES[key][0][1:]


@pytest.mark.parametrize("mode,m", [("dot", 2), ("dot", 5), ("dot", 9), ("dot", 16), ("row_split", 3),
                                    ("row_split", 8), ("rows", 2), ("rows", 5)])
def test_multi_row_paths_match_reference(kernel_module, device, monkeypatch, mode, m):
    """Every way of running M > 1 rows (all rows in one tensor-core tile, one program per row, all rows on the CUDA
    cores) gives the reference's norm + GEMV with the new residual of every row, and SwiGLU + GEMV, for rows taken
    out of order; the tile path with and without its first weight tile prefetched (odd / even M)."""
    fg = kernel_module("fused_gemv")
    monkeypatch.setattr(fg, "MULTI_ROW", mode)
    monkeypatch.setattr(fg, "PREFETCH_FIRST_TILE", m % 2 == 1 or None)
    if fg._target(torch.device(device)) == "interpret":  # the plain GEMV over several N tiles and K steps too
        monkeypatch.setitem(fg.TILE_SIZES, ("interpret", 16, "none"), fg.TILE_SIZES[("interpret", 16)])
    dtype = torch.float32
    x, w, b = make(m, 45, 70, dtype, device, seed=m, bias=True)
    gen = torch.Generator().manual_seed(m)
    residual = torch.randn(m, 70, generator=gen).to(dtype).to(device)
    norm_w = (1 + 0.3 * torch.randn(70, generator=gen)).to(dtype).to(device)
    y, new_residual = fg.norm_gemv(x, residual, norm_w, 1e-5, w, b)
    want, want_residual = fg.ref_norm_gemv(x, residual, norm_w, 1e-5, w, b)
    assert rel_err(y, want) < TOL[dtype]
    torch.testing.assert_close(new_residual.double(), want_residual.double(), atol=TOL[dtype], rtol=TOL[dtype])
    gu = (torch.randn(m, 2 * 70, generator=gen) * 2).to(dtype).to(device)
    assert rel_err(fg.act_gemv(gu, w, b, act="silu"), fg.ref_act_gemv(gu, w, b, act="silu")) < TOL[dtype]
    xs = torch.randn(m + 3, 70, generator=gen).to(dtype).to(device)
    rows = torch.randperm(m + 3, generator=gen)[:m].to(torch.int32).to(device)
    want3 = xs.double()[rows.long()] @ w.double().T + b.double()
    assert rel_err(fg.gemv(xs, w, b, rows=rows), want3) < TOL[dtype]

