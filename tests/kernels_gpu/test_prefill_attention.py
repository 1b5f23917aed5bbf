"""prefill_attention (Triton) against its float64 reference: ragged causal batches, GQA, strided views."""
import pytest
import torch

# Relative error (Frobenius norm) of the kernel against the float64 reference, by q dtype.
REL_ERR = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}
RAGGED = [1, 37, 16, 0, 5, 50]  # length 1, tile non-multiples, an exact tile, an empty sequence
GPU_RAGGED = [1000, 1, 513, 2048, 127, 4096]


@pytest.fixture
def pf(kernel_module):
    return kernel_module("prefill_attention")


def make_batch(lengths, *, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0, fused=False, extra_rows=0):
    """Random q/k/v for a ragged batch; fused=True slices them out of one [T, (Hq+2Hkv)*D] projection output."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths) + extra_rows
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    if fused:
        qkv = torch.randn(total, width + 8, generator=gen).to(dtype).to(device)[:, 8:]  # padded rows, offset base
        q = qkv[:, :num_q_heads * head_dim].view(total, num_q_heads, head_dim)
        k = qkv[:, num_q_heads * head_dim:(num_q_heads + num_kv_heads) * head_dim].view(total, num_kv_heads, head_dim)
        v = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].view(total, num_kv_heads, head_dim)
    else:
        q = torch.randn(total, num_q_heads, head_dim, generator=gen).to(dtype).to(device)
        k = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
        v = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype).to(device)
    cu = torch.tensor([0] + list(lengths), dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    return dict(q=q, k=k, v=v, cu_seqlens=cu, scale=head_dim ** -0.5)


def check(pf, batch, out=None, **kwargs):
    q = batch["q"]
    if out is None:
        out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)  # every row must be written
    got = pf.prefill_attention(**batch, out=out, **kwargs)
    assert got is out
    rows = int(batch["cu_seqlens"][-1])
    assert not torch.isnan(got[:rows]).any(), f"{torch.isnan(got[:rows]).sum().item()} elements unwritten or NaN"
    assert torch.isnan(got[rows:]).all(), "rows past cu_seqlens[S] must be left alone"
    want = pf.ref_prefill_attention(**batch, **kwargs)[:rows]
    err = float((got[:rows].double() - want).norm() / want.norm())
    assert err < REL_ERR[q.dtype], f"rel err {err:.2e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_q_heads, num_kv_heads", [(2, 2), (4, 1), (6, 2)])
def test_ragged_gqa(pf, device, dtype, num_q_heads, num_kv_heads):
    batch = make_batch(RAGGED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=64, dtype=dtype,
                       device=device, seed=num_q_heads)
    check(pf, batch, max_seqlen=max(RAGGED))


@pytest.mark.parametrize("tiles", [
    {"LAZY_RESCALE": True}, {"PIPELINE_QK": True}, {"PIPELINE_QK": True, "LAZY_RESCALE": True},
    {"BLOCK_M": 32, "BLOCK_N": 16, "PIPELINE_QK": True}, {"BLOCK_M": 16, "BLOCK_N": 32, "ORDER": 0},
    {"ORDER": 2, "BLOCK_M": 64, "BLOCK_N": 32}, {"ONE_LOOP": True}, {"ONE_LOOP": True, "BLOCK_M": 32, "BLOCK_N": 16},
    {"ONE_LOOP": True, "BLOCK_M": 16, "BLOCK_N": 32, "LAZY_RESCALE": True},
])
def test_kernel_variants(pf, device, tiles):
    batch = make_batch(RAGGED, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=device,
                       seed=21)
    batch["q"] = batch["q"] * 4  # wide score range: the lazy rescale must take both branches
    check(pf, batch, max_seqlen=max(RAGGED), tiles=tiles)


@pytest.mark.parametrize("window, dtype, tiles", [
    (1, torch.float32, {}),  # each token sees only itself
    (7, torch.float32, {"BLOCK_M": 16, "BLOCK_N": 32, "LAZY_RESCALE": True}),  # window < tile
    (20, torch.bfloat16, {"ONE_LOOP": True, "BLOCK_M": 32, "BLOCK_N": 16}),  # > tile, not a multiple
    (23, torch.float32, {"PIPELINE_QK": True, "BLOCK_M": 32, "BLOCK_N": 16}),
    (50, torch.float32, {}),  # >= every sequence: plain causal attention
])
def test_sliding_window(pf, device, window, dtype, tiles):
    batch = make_batch(RAGGED, num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=dtype, device=device, seed=window)
    batch["q"] = batch["q"] * 4  # wide score range: the lazy rescale takes both branches
    got = check(pf, batch, max_seqlen=max(RAGGED), tiles=tiles, window=window)
    if window >= max(RAGGED):
        want = pf.ref_prefill_attention(**batch)
        rows = want.shape[0]
        assert float((got[:rows].double() - want).norm() / want.norm()) < REL_ERR[dtype]


def test_sliding_window_large_cuda(pf, device):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    batch = make_batch(GPU_RAGGED, num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, device=device,
                       seed=41)
    for tiles in ({}, {"USE_TMA": 0}, {"USE_TMA": 1}, {"USE_TMA": 2, "ONE_LOOP": True}, {"PIPELINE_QK": True},
                  {"LAZY_RESCALE": True, "DIAG_STAGES": 1}, {"WARP_SPEC": True}):
        check(pf, batch, max_seqlen=max(GPU_RAGGED), tiles=tiles, window=1000)


@pytest.mark.parametrize("head_dim", [80, 128, 256])
def test_head_dims_and_sync_free_default(pf, device, head_dim):
    lengths = [19, 1, 33] if head_dim == 256 else [40, 1, 17]
    batch = make_batch(lengths, num_q_heads=2, num_kv_heads=1, head_dim=head_dim, dtype=torch.float32,
                       device=device, seed=head_dim, extra_rows=3)
    check(pf, batch)  # max_seqlen from cu_seqlens
    check(pf, batch, max_seqlen=100)  # a generous bound is fine too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_views(pf, device, dtype):
    batch = make_batch([29, 1, 8], num_q_heads=6, num_kv_heads=2, head_dim=64, dtype=dtype, device=device,
                       seed=5, fused=True)
    assert not batch["q"].is_contiguous() and batch["k"].stride(0) == 10 * 64 + 8
    before = batch["k"].data_ptr()
    out_buf = torch.full((batch["q"].shape[0], 6, 64 + 16), float("nan"), dtype=dtype, device=device)
    got = check(pf, batch, out=out_buf[:, :, :64], max_seqlen=29)  # strided out as well
    assert batch["k"].data_ptr() == before and torch.isnan(out_buf[:, :, 64:]).all()
    assert got.data_ptr() == out_buf.data_ptr()


def test_single_sequence_and_allocated_out(pf, device):
    batch = make_batch([45], num_q_heads=3, num_kv_heads=3, head_dim=64, dtype=torch.float32, device=device, seed=9)
    got = pf.prefill_attention(**batch)
    want = pf.ref_prefill_attention(**batch)
    assert float((got.double() - want).norm() / want.norm()) < REL_ERR[torch.float32]
    # causal: token 0 of a sequence only sees itself
    torch.testing.assert_close(got[0].double(), batch["v"][0].double().expand(3, -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head_dim, num_q_heads, num_kv_heads", [(128, 32, 8), (64, 8, 8), (256, 6, 2)])
def test_large_ragged_cuda(pf, device, head_dim, num_q_heads, num_kv_heads):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    batch = make_batch(GPU_RAGGED, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                       dtype=torch.bfloat16, device=device, seed=head_dim)
    check(pf, batch, max_seqlen=max(GPU_RAGGED))
    check(pf, batch, max_seqlen=max(GPU_RAGGED), tiles={"USE_TMA": False})
    for tiles in ({"USE_TMA": 1}, {"USE_TMA": 2}, {"USE_TMA": 2, "ONE_LOOP": True}, {"USE_TMA": 1, "ONE_LOOP": True},
                  {"USE_TMA": 0, "ONE_LOOP": True}, {"USE_TMA": 2, "DIAG_STAGES": 1}):
        check(pf, batch, max_seqlen=max(GPU_RAGGED), tiles=tiles)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_views_cuda(pf, device, dtype):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    batch = make_batch([700, 3, 1300], num_q_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, device=device,
                       seed=1, fused=True, extra_rows=5)
    check(pf, batch, max_seqlen=1300)
    check(pf, batch, max_seqlen=1300, tiles={"USE_TMA": 2, "ONE_LOOP": True})  # host descriptors, strided rows


def test_validation_errors(pf, device):
    good = make_batch([3, 4], num_q_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=device)

    def fails(match, **changes):
        with pytest.raises(ValueError, match=match):
            pf.prefill_attention(**{**good, **changes})

    fails("q must be", q=good["q"][0])
    fails("dtypes differ", k=good["k"].double())
    fails("Hq=3", q=good["q"][:, :3])
    fails("head_dim", q=good["q"][..., :40], k=good["k"][..., :40], v=good["v"][..., :40])
    fails("k/v must be", k=good["k"][:5], v=good["v"][:5])
    fails("k and v shapes", v=good["v"][:, :1])
    fails("cu_seqlens", cu_seqlens=good["cu_seqlens"].long())
    fails("cu_seqlens", cu_seqlens=good["cu_seqlens"][:1])
    fails("scale", scale=0.0)
    for window in (0, -1, 3.0, False):
        fails("window must be a positive int", window=window)
    with pytest.raises(ValueError, match="out must match"):
        pf.prefill_attention(**good, out=torch.empty_like(good["q"], dtype=torch.float16))
