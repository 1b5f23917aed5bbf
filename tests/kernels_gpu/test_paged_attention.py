"""paged_attention (Triton) against its float64 reference on ragged mixed batches, all KV formats."""
import math

import pytest
import torch

from kernels_gpu.kv_formats import nvfp4_global_scale, quantize_fp8, quantize_nvfp4

# Ragged batches: (q_len, context length after the step) per sequence.
MIXED = [(5, 13), (1, 9), (3, 11), (1, 1), (0, 6), (7, 7)]  # chunk w/ prefix, decode, verify, tiny, idle, prefill
DECODE_LONG = [(1, 70), (3, 45)]
GPU_MIXED = [(300, 1500), (1, 4000), (4, 2049), (1, 17), (128, 128), (1, 777), (9, 3001)]


def make_batch(spec, *, block_size, num_q_heads, num_kv_heads, head_dim, kv_format, q_dtype, device, seed=0):
    """Random q and a paged KV pool; unused pages, page tails and block-table padding hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    q_lens = [a for a, _ in spec]
    ctx_lens = [c for _, c in spec]
    num_seqs = len(spec)
    pages = [math.ceil(c / block_size) for c in ctx_lens]
    max_pages = max(pages) + 2  # padding slots
    num_blocks = sum(pages) + 3  # spare NaN pages; the last one is the padding target
    nan_block = num_blocks - 1
    perm = torch.randperm(num_blocks - 1, generator=gen)
    block_tables = torch.full((num_seqs, max_pages), nan_block, dtype=torch.int32)  # i32[S, B]
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)  # [N, block_size] slots holding context
    i = 0
    for s, (n, c) in enumerate(zip(pages, ctx_lens)):
        block_tables[s, :n] = perm[i:i + n].int()
        for j in range(c):
            used[perm[i + j // block_size], j % block_size] = True
        i += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen)  # f32[N, block_size, Hkv, D]
    v = torch.randn(shape, generator=gen)
    k[~used] = float("nan")
    v[~used] = float("nan")
    extra = {}
    if kv_format == "bf16":
        cache_dtype = torch.float32 if q_dtype == torch.float32 else torch.bfloat16
        k_cache, v_cache = k.to(cache_dtype), v.to(cache_dtype)
    elif kv_format == "fp8":
        ks = k[used].abs().amax(dim=(0, 2)) / 448 * 1.3  # f32[Hkv]
        vs = v[used].abs().amax(dim=(0, 2)) / 448 * 0.9  # some values saturate
        k_cache, v_cache = quantize_fp8(k, ks), quantize_fp8(v, vs)
        extra = dict(k_scale=ks, v_scale=vs)
    else:
        ks, vs = nvfp4_global_scale(k[used]), nvfp4_global_scale(v[used])
        k_cache, kbs = quantize_nvfp4(torch.nan_to_num(k), ks)
        v_cache, vbs = quantize_nvfp4(torch.nan_to_num(v), vs)
        kbs.view(torch.uint8)[~used] = 0x7F  # e4m3fn NaN
        vbs.view(torch.uint8)[~used] = 0x7F
        extra = dict(k_scale=ks, v_scale=vs, k_block_scale=kbs, v_block_scale=vbs)
    extra = {name: t.to(device) for name, t in extra.items()}
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(q_dtype)  # [T, Hq, D]
    query_start = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)  # i32[S+1]
    seq_lens = torch.tensor(ctx_lens, dtype=torch.int32)  # i32[S]
    return dict(q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
                query_start=query_start.to(device), seq_lens=seq_lens.to(device),
                block_tables=block_tables.to(device), scale=head_dim ** -0.5, kv_format=kv_format, **extra)


def check_against_ref(pa, batch, tolerances, **kwargs):
    q = batch["q"]
    out = torch.full_like(q, float("nan"))  # every element must be written
    got = pa.paged_attention(**batch, out=out, **kwargs)
    assert got is out
    want = pa.ref_paged_attention(**batch, **kwargs)
    assert not torch.isnan(got).any(), f"{torch.isnan(got).sum().item()} output elements unwritten or NaN"
    atol, rtol = tolerances[(q.dtype, batch["kv_format"])]
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)
    return got


@pytest.fixture
def pa(kernel_module):
    return kernel_module("paged_attention")


@pytest.mark.parametrize("kv_format", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mixed_batch(pa, device, tolerances, kv_format, block_size, group, num_splits):
    head_dim = 64 if block_size != 5 else 128
    batch = make_batch(MIXED, block_size=block_size, num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                       kv_format=kv_format, q_dtype=torch.float32, device=device, seed=block_size + group)
    check_against_ref(pa, batch, tolerances, num_splits=num_splits)


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv_format", ["bf16", "fp8", "nvfp4"])
def test_half_precision_queries(pa, device, tolerances, q_dtype, kv_format):
    batch = make_batch(MIXED, block_size=16, num_q_heads=4, num_kv_heads=1, head_dim=64, kv_format=kv_format,
                       q_dtype=q_dtype, device=device, seed=7)
    check_against_ref(pa, batch, tolerances, num_splits=2)


@pytest.mark.parametrize("num_q_heads, num_kv_heads, head_dim", [(6, 2, 64), (2, 2, 80), (3, 1, 128)])
def test_odd_group_and_head_dim(pa, device, tolerances, num_q_heads, num_kv_heads, head_dim):
    batch = make_batch(DECODE_LONG + MIXED[:3], block_size=24, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                       head_dim=head_dim, kv_format="bf16", q_dtype=torch.float32, device=device, seed=3)
    check_against_ref(pa, batch, tolerances, num_splits=1)
    check_against_ref(pa, batch, tolerances, num_splits=4)


def test_automatic_splits(pa, device, tolerances):
    spec = [(1, 700)]
    assert pa.choose_num_splits(num_tiles=1, num_kv_heads=1, max_seq_len=700) > 1
    batch = make_batch(spec, block_size=16, num_q_heads=2, num_kv_heads=1, head_dim=64, kv_format="fp8",
                       q_dtype=torch.float32, device=device, seed=11)
    check_against_ref(pa, batch, tolerances)  # num_splits=None picks > 1 here
    check_against_ref(pa, batch, tolerances, max_q_len=1, max_seq_len=700)


def test_choose_num_splits():
    from kernels_gpu.paged_attention import SPLIT_KV, choose_num_splits

    assert choose_num_splits(num_tiles=1000, num_kv_heads=8, max_seq_len=100_000) == 1  # grid already full
    assert choose_num_splits(num_tiles=4, num_kv_heads=8, max_seq_len=100) == 1  # contexts too short
    assert choose_num_splits(num_tiles=1, num_kv_heads=1, max_seq_len=10 ** 6) == SPLIT_KV["max_splits"]
    assert choose_num_splits(num_tiles=4, num_kv_heads=8, max_seq_len=8192) == 17
    # a tile table's own rule (the D=64 grouped decode tiles): a lone 256-token context splits 4 ways, 64 do not
    assert choose_num_splits(num_tiles=1, num_kv_heads=8, max_seq_len=256) == 1
    assert choose_num_splits(num_tiles=1, num_kv_heads=8, max_seq_len=256, target_programs=256,
                             min_tokens_per_split=64) == 4
    assert choose_num_splits(num_tiles=64, num_kv_heads=8, max_seq_len=256, target_programs=256,
                             min_tokens_per_split=64) == 1


def test_grouped_heads_and_splits_of_a_small_batch():
    """A small decode batch gets its programs from more head groups and splits (the D=128 rule, sweep in the
    GROUPED_DECODE comment); a large one keeps the tile's HG and does not split."""
    from kernels_gpu.paged_attention import GROUPED_DECODE, choose_num_splits, grouped_heads

    tiles = {"HG": 4, "hg_min_programs": 8}
    assert grouped_heads(tiles, num_seqs=1, num_kv_heads=8) == 1
    assert grouped_heads(tiles, num_seqs=1, num_kv_heads=4) == 1
    assert grouped_heads(tiles, num_seqs=2, num_kv_heads=8) == 2
    assert grouped_heads(tiles, num_seqs=8, num_kv_heads=8) == 4
    assert grouped_heads({"HG": 4}, num_seqs=1, num_kv_heads=8) == 4  # no rule: the tile's HG
    bf16 = GROUPED_DECODE[("cuda", 128, "bf16")]

    def plan(num_seqs, ctx, hkv=8):
        hg = grouped_heads(bf16, num_seqs, hkv)
        return hg, choose_num_splits(num_seqs, hkv // hg, ctx, bf16["target_programs"], bf16["min_tokens_per_split"])

    assert plan(1, 512) == (1, 16)  # 8 programs x 16 splits of 32 positions (was 2 programs x 2 splits)
    assert plan(1, 512, hkv=4) == (1, 16)  # a tensor-parallel rank's 4 kv heads
    assert plan(64, 4096) == (4, 1)


def test_more_splits_than_context(pa, device, tolerances):
    batch = make_batch([(1, 3), (2, 2)], block_size=5, num_q_heads=2, num_kv_heads=2, head_dim=64,
                       kv_format="nvfp4", q_dtype=torch.float32, device=device, seed=5)
    check_against_ref(pa, batch, tolerances, num_splits=8)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_large_mixed_batch_cuda(pa, device, tolerances, kv_format, num_splits):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    batch = make_batch(GPU_MIXED, block_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128, kv_format=kv_format,
                       q_dtype=torch.bfloat16, device=device, seed=13)
    check_against_ref(pa, batch, tolerances, num_splits=num_splits)


@pytest.mark.parametrize("head_dim, group, block_size", [(64, 8, 16), (256, 1, 32), (128, 4, 24)])
def test_decode_batch_cuda(pa, device, tolerances, head_dim, group, block_size):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    spec = [(1, 100 + 371 * i) for i in range(24)]
    batch = make_batch(spec, block_size=block_size, num_q_heads=2 * group, num_kv_heads=2, head_dim=head_dim,
                       kv_format="bf16", q_dtype=torch.bfloat16, device=device, seed=17)
    check_against_ref(pa, batch, tolerances)


DECODE_ONLY = [(1, 70), (3, 45), (1, 1), (4, 33), (0, 5), (2, 130)]  # max q_len 4: the decode tiles


@pytest.mark.parametrize("kv_format", ["bf16", "fp8", "nvfp4"])
@pytest.mark.parametrize("variant", [
    {"grid_order": 1},
    {"grid_order": 1, "maxnreg": 128, "BLOCK_N": 32},
    {"grid_order": 0, "num_warps": 8, "num_stages": 2},
])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_tile_variants(pa, device, tolerances, monkeypatch, kv_format, variant, num_splits):
    """Every decode tile option (grid order, register cap, tile shape) gives the same answer."""
    for target in ("cuda", "interpret"):
        monkeypatch.setitem(pa.FORMAT_OVERRIDES, (target, "decode", kv_format),
                            {**pa.FORMAT_OVERRIDES.get((target, "decode", kv_format), {}), **variant})
    for q_dtype in (torch.float32, torch.bfloat16):
        batch = make_batch(DECODE_ONLY, block_size=16, num_q_heads=8, num_kv_heads=2, head_dim=64,
                           kv_format=kv_format, q_dtype=q_dtype, device=device, seed=19)
        check_against_ref(pa, batch, tolerances, num_splits=num_splits)


GROUPED_DECODE = [(1, 70), (1, 45), (1, 1), (0, 5), (1, 130), (1, 16), (1, 33)]  # one new token each, one idle


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("block_size, group, num_kv_heads, tiles", [
    (16, 4, 2, {}), (8, 1, 4, {"HG": 4, "BLOCK_N": 32}), (32, 8, 2, {"HG": 1, "BLOCK_N": 16}),
    (16, 4, 8, {"HG": 8, "BLOCK_N": 16, "num_stages": 2}),
    (16, 2, 8, {"HG": 8, "BLOCK_N": 16, "hg_min_programs": 20, "min_tokens_per_split": 16}),  # 7 seqs: HG 2
])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_grouped_decode(pa, device, tolerances, monkeypatch, kv_format, block_size, group, num_kv_heads, tiles,
                        num_splits):
    """Decode steps (one token per sequence) take the grouped kernel: every head group / tile / split agrees."""
    for target in ("cuda", "interpret"):
        key = (target, 64, kv_format)
        monkeypatch.setitem(pa.GROUPED_DECODE, key, {**pa.GROUPED_DECODE.get(key, {"HG": 2, "BLOCK_N": 16,
                                                     "num_warps": 4, "num_stages": 2}), **tiles})
    batch = make_batch(GROUPED_DECODE, block_size=block_size, num_q_heads=group * num_kv_heads,
                       num_kv_heads=num_kv_heads, head_dim=64, kv_format=kv_format, q_dtype=torch.bfloat16,
                       device=device, seed=23 + block_size)
    assert pa._grouped_tiles(batch["q"], batch["k_cache"], 1, kv_format) is not None
    check_against_ref(pa, batch, tolerances, num_splits=num_splits, max_q_len=1)


# Verification steps: every sequence's last token and a draft (q_len k + 1), one shorter, one idle, one whose whole
# context is the new tokens
VERIFY = [(5, 70), (5, 5), (3, 40), (0, 4), (5, 130), (2, 17), (5, 33)]


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
@pytest.mark.parametrize("group, num_kv_heads, max_q_len", [(3, 3, 5), (4, 2, 8), (1, 4, 5)])
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "general"])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_verification_rows(pa, device, tolerances, monkeypatch, kv_format, group, num_kv_heads, max_q_len, grouped,
                           num_splits):
    """Several new tokens per sequence, causal among themselves: the grouped kernel's rows (new token x q head of
    each kv head, whole splits that some rows see nothing of) and paged_attention_kernel agree with the reference."""
    monkeypatch.setattr(pa, "GROUPED_VERIFY", grouped)
    for target in ("cuda", "interpret"):  # grouped tiles for every format here (the GPU table lacks fp8 at D=64)
        key = (target, 64, kv_format)
        monkeypatch.setitem(pa.GROUPED_DECODE, key, pa.GROUPED_DECODE.get(key, {"HG": 2, "BLOCK_N": 32,
                                                                                "num_warps": 4, "num_stages": 2}))
    spec = [(min(a, max_q_len), c) for a, c in VERIFY]
    batch = make_batch(spec, block_size=16, num_q_heads=group * num_kv_heads, num_kv_heads=num_kv_heads,
                       head_dim=64, kv_format=kv_format, q_dtype=torch.bfloat16, device=device, seed=group)
    tiles = pa._grouped_tiles(batch["q"], batch["k_cache"], max_q_len, kv_format)
    assert tiles is not None and tiles["MULTI_Q"] and tiles["ROWS"] >= max_q_len * group
    check_against_ref(pa, batch, tolerances, num_splits=num_splits, max_q_len=max_q_len)


def test_grouped_verification_limits(pa, device):
    """Windowed steps and rows past GROUPED_MAX_ROWS keep paged_attention_kernel; HG shrinks to fit the rows."""
    q = torch.zeros(8, 16, 64, device=device, dtype=torch.bfloat16)
    cache = torch.zeros(4, 16, 4, 64, device=device, dtype=torch.bfloat16)
    assert pa._grouped_tiles(q, cache, 4, "bf16", window=8) is None
    assert pa._grouped_tiles(q, cache, 4, "bf16")["ROWS"] == 16
    assert pa._grouped_tiles(q, cache, pa.GROUPED_MAX_ROWS // 4 + 1, "bf16") is None
    tiles = pa._grouped_tiles(q, cache, pa.GROUPED_MAX_ROWS // 4, "bf16")
    assert tiles["ROWS"] == pa.GROUPED_MAX_ROWS and tiles["HG"] == 1 and tiles["MULTI_Q"]
    assert not pa._grouped_tiles(q, cache, 1, "bf16")["MULTI_Q"]


# Sliding window: decodes and prefill chunks whose cached prefixes span several windows, a verify-sized chunk, a
# one-token context, an idle slot and a fresh prefill, all in one step.
WINDOW_MIXED = [(5, 40), (1, 37), (3, 29), (1, 1), (0, 6), (9, 9), (2, 50)]


def free_before_window(batch, spec, window):
    """The batch with the block-table entries of the pages wholly before each sequence's window (that of its first
    new token) pointing at the NaN page, as after the block manager freed them."""
    tables = batch["block_tables"].clone()
    num_blocks, block_size = batch["k_cache"].shape[:2]
    for s, (q_len, ctx) in enumerate(spec):
        tables[s, :max(ctx - q_len - window + 1, 0) // block_size] = num_blocks - 1  # make_batch's NaN page
    return {**batch, "block_tables": tables}


@pytest.mark.parametrize("kv_format, q_dtype, block_size, window, num_splits", [
    ("bf16", torch.float32, 16, 3, 1),  # window < page
    ("bf16", torch.float32, 5, 21, 3),  # window > page and not a multiple of it; split-KV
    ("fp8", torch.float32, 16, 21, 3),
    ("nvfp4", torch.float32, 5, 11, 1),
    ("bf16", torch.bfloat16, 16, 50, 2),  # window >= every context: plain causal attention
])
def test_sliding_window(pa, device, tolerances, kv_format, q_dtype, block_size, window, num_splits):
    batch = make_batch(WINDOW_MIXED, block_size=block_size, num_q_heads=4, num_kv_heads=2, head_dim=64,
                       kv_format=kv_format, q_dtype=q_dtype, device=device, seed=29 + window)
    batch = free_before_window(batch, WINDOW_MIXED, window)
    got = check_against_ref(pa, batch, tolerances, num_splits=num_splits, window=window)
    if window >= max(c for _, c in WINDOW_MIXED):  # the full causal reference
        atol, rtol = tolerances[(q_dtype, kv_format)]
        torch.testing.assert_close(got.double(), pa.ref_paged_attention(**batch), atol=atol, rtol=rtol)


@pytest.mark.parametrize("kv_format, block_size, window, num_splits", [
    ("bf16", 16, 3, None), ("fp8", 8, 21, 3), ("bf16", 8, 40, 1),
])
def test_sliding_window_grouped_decode(pa, device, tolerances, monkeypatch, kv_format, block_size, window,
                                       num_splits):
    for target in ("cuda", "interpret"):  # the grouped kernel at head_dim 64 (tuned on the GPU for 128 only)
        key = (target, 64, kv_format)
        monkeypatch.setitem(pa.GROUPED_DECODE, key, pa.GROUPED_DECODE.get(key, {"HG": 2, "BLOCK_N": 16,
                                                                                "num_warps": 4, "num_stages": 2}))
    batch = make_batch(GROUPED_DECODE, block_size=block_size, num_q_heads=8, num_kv_heads=2, head_dim=64,
                       kv_format=kv_format, q_dtype=torch.bfloat16, device=device, seed=31 + window)
    batch = free_before_window(batch, GROUPED_DECODE, window)
    assert pa._grouped_tiles(batch["q"], batch["k_cache"], 1, kv_format) is not None
    check_against_ref(pa, batch, tolerances, num_splits=num_splits, max_q_len=1, window=window)


@pytest.mark.parametrize("kv_format", ["bf16", "fp8", "nvfp4"])
def test_sliding_window_large_cuda(pa, device, tolerances, kv_format):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    window = 1000
    for spec, max_q_len in ((GPU_MIXED, None), ([(1, 100 + 371 * i) for i in range(24)], 1)):  # decode: grouped
        batch = make_batch(spec, block_size=16, num_q_heads=32, num_kv_heads=8, head_dim=128, kv_format=kv_format,
                           q_dtype=torch.bfloat16, device=device, seed=37)
        check_against_ref(pa, free_before_window(batch, spec, window), tolerances, window=window, max_q_len=max_q_len)


def test_validation_errors(pa, device):
    good = make_batch(MIXED[:2], block_size=4, num_q_heads=4, num_kv_heads=2, head_dim=64, kv_format="bf16",
                      q_dtype=torch.float32, device=device)

    def fails(match, **changes):
        with pytest.raises(ValueError, match=match):
            pa.paged_attention(**{**good, **changes})

    fails("kv_format", kv_format="int4")
    fails("q must be", q=good["q"][0])
    fails("Hq=3", q=good["q"][:, :3])
    fails("head_dim", q=good["q"][..., :40], k_cache=good["k_cache"][..., :40], v_cache=good["v_cache"][..., :40])
    fails("cache head_dim", k_cache=good["k_cache"][..., :32], v_cache=good["v_cache"][..., :32])
    fails("k_cache/v_cache", v_cache=good["v_cache"][:, :2])
    fails("query_start", query_start=good["query_start"].long())
    fails("seq_lens", seq_lens=good["seq_lens"][:1])
    fails("block_tables", block_tables=good["block_tables"][:1])
    fails("fp8 KV format needs float8", kv_format="fp8")
    fp8 = {**good, "kv_format": "fp8", "k_cache": good["k_cache"].to(torch.float8_e4m3fn),
           "v_cache": good["v_cache"].to(torch.float8_e4m3fn)}
    with pytest.raises(ValueError, match="k_scale"):
        pa.paged_attention(**fp8)
    fails("nvfp4 KV format needs a uint8", kv_format="nvfp4")
    for window in (0, -3, 2.5, True, "8"):
        fails("window must be a positive int", window=window)
    with pytest.raises(ValueError, match="out must match"):
        pa.paged_attention(**good, out=torch.empty_like(good["q"], dtype=torch.float16))
