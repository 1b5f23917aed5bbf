"""The Pallas TPU ragged paged attention kernel, in TPU interpret mode on CPU, against a float64 reference of
`lowering.ops.ref_paged_attention`; plus the Pallas -> Mosaic lowering for real model configs (jax.export)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pltpu = pytest.importorskip("jax.experimental.pallas.tpu")

from kernels_pallas import ragged_paged_attention as rpa_mod  # noqa: E402
from kernels_pallas.ragged_paged_attention import ragged_paged_attention, vmem_bytes  # noqa: E402
from lowering import ops  # noqa: E402
from lowering.quant import formats  # noqa: E402

# (query length, context length after this step) per sequence: a decode, a prefill chunk with a cached prefix,
# an empty padding sequence, a k+1 = 3 verification, a fresh prefill, another decode.
MIXED = [(1, 13), (7, 20), (0, 0), (3, 11), (5, 5), (1, 1)]


def _batch(rng, seqs, *, num_kv_heads, head_dim, block_size, table_width, num_blocks, pad_rows=3):
    """Ragged batch metadata, a block table whose unused slots hold garbage ids of NaN pages, and raw K/V."""
    qlens = [a for a, _ in seqs]
    query_start = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    seq_lens = np.array([c for _, c in seqs], np.int32)
    perm = rng.permutation(num_blocks)
    tables = np.zeros((len(seqs), table_width), np.int32)
    used = 0
    for s, (_, ctx) in enumerate(seqs):
        n = -(-ctx // block_size)
        tables[s, :n] = perm[used:used + n]
        used += n
    nan_pages = perm[used:]
    assert len(nan_pages) >= 2
    for s, (_, ctx) in enumerate(seqs):
        n = -(-ctx // block_size)
        tables[s, n:] = rng.choice(nan_pages, table_width - n)
    k = rng.standard_normal((num_blocks, block_size, num_kv_heads, head_dim)).astype(np.float32)
    v = rng.standard_normal((num_blocks, block_size, num_kv_heads, head_dim)).astype(np.float32)
    num_tokens = int(query_start[-1]) + pad_rows
    return query_start, seq_lens, tables, nan_pages, k, v, num_tokens


def _pools(k, v, nan_pages, kv_format, dtype):
    """(k_pool, v_pool, extras, k_f32, v_f32): the stored pools and their exact dequantized values; the unused
    pages hold NaN (through the block scales for nvfp4)."""
    n, bs, hkv, d = k.shape
    if kv_format is None:
        kp, vp = k.astype(dtype), v.astype(dtype)
        kp[nan_pages] = np.nan
        vp[nan_pages] = np.nan
        return kp, vp, (), kp.astype(np.float32), vp.astype(np.float32)
    flat_k, flat_v = k.reshape(n * bs, hkv * d), v.reshape(n * bs, hkv * d)
    slots = jnp.arange(n * bs, dtype=jnp.int32)
    if kv_format == "fp8":
        ks = np.abs(k).max(axis=(0, 1, 3)) / formats.FP8_MAX
        vs = np.abs(v).max(axis=(0, 1, 3)) / formats.FP8_MAX
        extras = (jnp.asarray(ks, jnp.float32), jnp.asarray(vs, jnp.float32))
        kp, vp = ops.ref_kv_write(flat_k, flat_v, slots, jnp.zeros(k.shape, jnp.float8_e4m3fn),
                                  jnp.zeros(k.shape, jnp.float8_e4m3fn), *extras, kv_format="fp8")
        kp, vp = np.array(kp), np.array(vp)
        kp[nan_pages] = np.nan
        vp[nan_pages] = np.nan
    else:
        gk = jnp.asarray(formats.nvfp4_global_scale(np.abs(k).max()))
        gv = jnp.asarray(formats.nvfp4_global_scale(np.abs(v).max()))
        packed = (n, bs, hkv, d // 2)
        scales = (n, bs, hkv, d // formats.NVFP4_BLOCK)
        kp, vp, kb, vb = ops.ref_kv_write_nvfp4(
            flat_k, flat_v, slots, jnp.zeros(packed, jnp.uint8), jnp.zeros(packed, jnp.uint8),
            jnp.zeros(scales, jnp.float8_e4m3fn), jnp.zeros(scales, jnp.float8_e4m3fn), gk, gv)
        kp, vp, kb, vb = map(np.array, (kp, vp, kb, vb))
        kb[nan_pages] = np.nan
        vb[nan_pages] = np.nan
        extras = (jnp.asarray(kb), jnp.asarray(vb), gk, gv)
    kf = np.asarray(ops.dequantize_kv(jnp.asarray(kp), extras, kv_format, 0))
    vf = np.asarray(ops.dequantize_kv(jnp.asarray(vp), extras, kv_format, 1))
    return kp, vp, extras, kf, vf


def _reference_f64(q, kf, vf, query_start, seq_lens, tables, *, num_heads, num_kv_heads, head_dim, scale,
                   window=None):
    """ref_paged_attention's semantics in float64 numpy, for the rows that belong to a sequence."""
    group = num_heads // num_kv_heads
    out = np.zeros((int(query_start[-1]), num_heads * head_dim))
    for s in range(len(seq_lens)):
        for t in range(query_start[s], query_start[s + 1]):
            pos = seq_lens[s] - (query_start[s + 1] - t)
            ctx = np.arange(0 if window is None else max(pos - window + 1, 0), pos + 1)
            pages = tables[s][ctx // kf.shape[1]]
            kk = kf[pages, ctx % kf.shape[1]].astype(np.float64)  # [C, Hkv, D]
            vv = vf[pages, ctx % kf.shape[1]].astype(np.float64)
            qh = q[t].astype(np.float64).reshape(num_kv_heads, group, head_dim)
            sc = np.einsum("kgd,ckd->kgc", qh, kk) * scale
            p = np.exp(sc - sc.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[t] = np.einsum("kgc,ckd->kgd", p, vv).reshape(-1)
    return out


def _case(seed, *, num_heads, num_kv_heads, head_dim, block_size, table_width, kv_format=None, dtype=np.float32,
          seqs=MIXED, num_blocks=None, window=None):
    """(kernel args, attrs, float64 reference). With a window, the table entries of the pages wholly before each
    sequence's window (of its first new token) point at NaN pages, as after the block manager freed them."""
    rng = np.random.default_rng(seed)
    num_blocks = num_blocks or len(seqs) * table_width + 2
    query_start, seq_lens, tables, nan_pages, k, v, num_tokens = _batch(
        rng, seqs, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size, table_width=table_width,
        num_blocks=num_blocks)
    if window is not None:
        for s, (q_len, ctx) in enumerate(seqs):
            freed = max(ctx - q_len - window + 1, 0) // block_size
            tables[s, :freed] = rng.choice(nan_pages, freed)
    kp, vp, extras, kf, vf = _pools(k, v, nan_pages, kv_format, dtype)
    q = rng.standard_normal((num_tokens, num_heads * head_dim)).astype(dtype)
    kw = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=head_dim ** -0.5)
    ref = _reference_f64(np.asarray(q, np.float32), kf, vf, query_start, seq_lens, tables, **kw, window=window)
    args = (jnp.asarray(q), jnp.asarray(kp), jnp.asarray(vp), jnp.asarray(query_start), jnp.asarray(seq_lens),
            jnp.asarray(tables), *extras)
    return args, kw, ref


TOL = {np.float32: 2e-5, jnp.bfloat16: 3e-2}

# (num_heads, num_kv_heads, head_dim, block_size, table_width, kv_format, dtype, pages_per_block, queries_per_block)
CASES = [
    pytest.param(2, 2, 32, 8, 4, None, np.float32, 2, 8, id="f32-gqa1"),
    pytest.param(3, 1, 32, 8, 3, None, jnp.bfloat16, 2, 16, id="bf16-gqa3"),
    pytest.param(4, 1, 32, 4, 6, "fp8", np.float32, 3, 8, id="fp8-gqa4"),
    pytest.param(4, 2, 32, 8, 3, "nvfp4", np.float32, 1, 8, id="nvfp4-gqa2"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,table_width,kv_format,dtype,ppb,bq", CASES)
def test_matches_float64_reference(num_heads, num_kv_heads, head_dim, block_size, table_width, kv_format, dtype,
                                   ppb, bq):
    args, kw, ref = _case(1, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                          block_size=block_size, table_width=table_width, kv_format=kv_format, dtype=dtype)
    out = ragged_paged_attention(*args, **kw, kv_format=kv_format, pages_per_block=ppb, queries_per_block=bq,
                                 interpret=True)
    assert out.shape == args[0].shape and out.dtype == args[0].dtype
    out = np.asarray(out, np.float32)
    n = ref.shape[0]
    assert np.isfinite(out).all()  # padding rows included
    np.testing.assert_allclose(out[:n], ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert not np.abs(out[n:]).any()  # rows of no sequence are 0


# decodes, prefill chunks with a cached prefix, a fresh prefill, an idle slot: contexts past several windows
WINDOW_SEQS = [(1, 29), (6, 30), (0, 0), (3, 17), (9, 9), (1, 1)]


@pytest.mark.parametrize("window,kv_format,dtype,block_size,ppb,bq", [
    pytest.param(3, None, np.float32, 8, 2, 8, id="f32-window-under-page"),
    pytest.param(13, "fp8", jnp.bfloat16, 8, 1, 16, id="fp8-window-over-page-not-multiple"),
])
def test_sliding_window(window, kv_format, dtype, block_size, ppb, bq):
    # pages wholly before each window are NaN (freed): never copied, and the result stays finite
    width = -(-30 // block_size) + 1
    args, kw, ref = _case(8, num_heads=4, num_kv_heads=2, head_dim=32, block_size=block_size, table_width=width,
                          kv_format=kv_format, dtype=dtype, seqs=WINDOW_SEQS, window=window)
    out = np.asarray(ragged_paged_attention(*args, **kw, kv_format=kv_format, window=window, pages_per_block=ppb,
                                            queries_per_block=bq, interpret=True), np.float32)
    n = ref.shape[0]
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[:n], ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert not np.abs(out[n:]).any()
    want = np.asarray(ops.ref_paged_attention(*args, **kw, kv_format=kv_format, window=window), np.float32)
    np.testing.assert_allclose(want[:n], ref, atol=TOL[dtype], rtol=TOL[dtype])  # the op reference agrees


@pytest.mark.parametrize("kv_format, block_size", [(None, 16), ("nvfp4", 32)])
def test_sliding_window_lowers_to_mosaic(kv_format, block_size):
    sds = jax.ShapeDtypeStruct
    stored, pool_dtype = (64, jnp.uint8) if kv_format == "nvfp4" else (128, jnp.bfloat16)
    pool = sds((4096, block_size, 8, stored), pool_dtype)
    args = [sds((2048, 32 * 128), jnp.bfloat16), pool, pool, sds((257,), jnp.int32), sds((256,), jnp.int32),
            sds((256, 64), jnp.int32)]
    if kv_format == "nvfp4":
        args += [sds((4096, block_size, 8, 8), jnp.float8_e4m3fn)] * 2 + [sds((), jnp.float32)] * 2
    fn = functools.partial(ragged_paged_attention, num_heads=32, num_kv_heads=8, head_dim=128, scale=0.088,
                           kv_format=kv_format, window=1024, interpret=False)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()


def test_sliding_window_validation():
    args, kw, _ = _case(9, num_heads=2, num_kv_heads=1, head_dim=16, block_size=4, table_width=3,
                        seqs=[(1, 3), (2, 5)])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            ragged_paged_attention(*args, **kw, window=bad, interpret=True)


def test_reference_op_agrees_with_float64_reference():
    # the kernel is checked against a numpy float64 transcription; tie that to the op reference itself
    args, kw, ref = _case(2, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, table_width=3)
    out = np.asarray(ops.ref_paged_attention(*args, **kw))
    np.testing.assert_allclose(out[:ref.shape[0]], ref, atol=2e-5, rtol=2e-5)


def test_no_races_and_no_uninitialized_reads():
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as interp

    args, kw, ref = _case(3, num_heads=2, num_kv_heads=1, head_dim=16, block_size=4, table_width=6,
                          seqs=[(1, 9), (6, 14), (0, 0), (2, 7)])
    params = pltpu.InterpretParams(detect_races=True, uninitialized_memory="nan")
    out = np.asarray(ragged_paged_attention(*args, **kw, pages_per_block=2, queries_per_block=8,
                                            interpret=params))
    assert interp.races is not None and not interp.races.races_found
    np.testing.assert_allclose(out[:ref.shape[0]], ref, atol=2e-5, rtol=2e-5)
    assert not np.abs(out[ref.shape[0]:]).any()


def test_agrees_with_jax_paged_attention_on_decode():
    from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

    seqs = [(1, 5), (1, 16), (1, 9), (1, 1)]
    hq, hkv, d, bs, width = 4, 2, 128, 8, 2
    args, kw, ref = _case(4, num_heads=hq, num_kv_heads=hkv, head_dim=d, block_size=bs, table_width=width,
                          dtype=jnp.bfloat16, seqs=seqs)
    q, kp, vp, query_start, seq_lens, tables = args
    out = np.asarray(ragged_paged_attention(*args, **kw, pages_per_block=2, queries_per_block=16,
                                            interpret=True), np.float32)
    # jax's kernel: q [S, Hq, D] (unscaled), pages [Hkv, N, Bs, D], one query per sequence. It lets the NaN of an
    # unused page slot reach the output (0 * NaN), so it gets the pools with those pages zeroed.
    kp, vp = (jnp.where(jnp.isnan(x), 0, x) for x in (kp, vp))
    q_j = (q[:len(seqs)].astype(jnp.float32) * d ** -0.5).astype(jnp.bfloat16).reshape(len(seqs), hq, d)
    with pltpu.force_tpu_interpret_mode():
        theirs = paged_attention(q_j, jnp.transpose(kp, (2, 0, 1, 3)), jnp.transpose(vp, (2, 0, 1, 3)), seq_lens,
                                 tables, pages_per_compute_block=2)
    theirs = np.asarray(theirs, np.float32).reshape(len(seqs), hq * d)
    np.testing.assert_allclose(out[:len(seqs)], theirs, atol=3e-2, rtol=3e-2)
    np.testing.assert_allclose(out[:len(seqs)], ref, atol=3e-2, rtol=3e-2)


# decode-only batches: one new token per sequence (the TPU backend passes decode_queries_per_block then)
DECODE = [(1, 13), (1, 20), (1, 1), (1, 11), (1, 5), (1, 24), (1, 7), (1, 16), (1, 3)]


@pytest.mark.parametrize("dtype,bq", [(np.float32, 8), (jnp.bfloat16, 8), (jnp.bfloat16, 16), (np.float32, 3)])
def test_decode_only_batch_with_small_query_blocks(dtype, bq):
    # bq 8 on bf16 q rounds up to 16 (sublane packing), 3 on f32 up to 8: any positive value is accepted
    args, kw, ref = _case(6, num_heads=4, num_kv_heads=2, head_dim=32, block_size=8, table_width=3, dtype=dtype,
                          seqs=DECODE)
    out = np.asarray(ragged_paged_attention(*args, **kw, pages_per_block=2, queries_per_block=bq, interpret=True),
                     np.float32)
    n = ref.shape[0]
    np.testing.assert_allclose(out[:n], ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert not np.abs(out[n:]).any()


@pytest.mark.parametrize("gen", ["default", "v5e", "v6e", "v7"])
@pytest.mark.parametrize("kv_format", [None, "fp8"])
def test_decode_only_batch_with_tuned_defaults(gen, kv_format):
    """Each generation's tuned decode blocks (decode_queries_per_block as queries_per_block, pages_per_block
    clamped to the table) and its prefill blocks on the same decode batch, bf16 q as on TPU."""
    from kernels_pallas import tuning

    args, kw, ref = _case(7, num_heads=4, num_kv_heads=1, head_dim=32, block_size=4, table_width=7,
                          kv_format=kv_format, dtype=jnp.bfloat16, seqs=DECODE * 2)
    blocks = tuning.block_sizes("ragged_paged_attention", gen)
    for bq in (blocks["decode_queries_per_block"], blocks["queries_per_block"]):
        out = np.asarray(ragged_paged_attention(*args, **kw, kv_format=kv_format,
                                                pages_per_block=blocks["pages_per_block"], queries_per_block=bq,
                                                interpret=True), np.float32)
        n = ref.shape[0]
        np.testing.assert_allclose(out[:n], ref, atol=4e-2, rtol=4e-2)
        assert not np.abs(out[n:]).any()


def test_attention_blocks_keep_the_tuned_kv_block_in_tokens():
    from kernels_pallas import tuning

    for gen in ("default", "v5e", "v6e", "v7"):
        tuned = tuning.block_sizes("ragged_paged_attention", gen)
        page = tuning.recommended_page_size(gen)
        at_rec = tuning.attention_blocks(page, decode=True, generation=gen)
        assert at_rec == {"pages_per_block": tuned["pages_per_block"],
                          "queries_per_block": tuned["decode_queries_per_block"]}
        assert tuning.attention_blocks(page, decode=False, generation=gen)["queries_per_block"] == \
            tuned["queries_per_block"]
        for bs in (16, 32, 64, 128):
            ppb = tuning.attention_blocks(bs, decode=True, generation=gen)["pages_per_block"]
            assert ppb * bs == max(bs, tuned["pages_per_block"] * page)


def test_defaults_under_jit():
    args, kw, ref = _case(5, num_heads=2, num_kv_heads=1, head_dim=16, block_size=4, table_width=3,
                          seqs=[(1, 3), (4, 10)])
    # tuning defaults, interpret mode chosen off-TPU, traced under jit as the backend does
    out = np.asarray(jax.jit(functools.partial(ragged_paged_attention, **kw))(*args))
    np.testing.assert_allclose(out[:ref.shape[0]], ref, atol=2e-5, rtol=2e-5)


# (num_heads, num_kv_heads, head_dim, block_size, dtype, kv_format): Llama-3-8B and SmolLM2-135M
EXPORT_CONFIGS = [
    pytest.param(32, 8, 128, 16, jnp.bfloat16, None, id="llama3-8b-bf16-p16"),
    pytest.param(32, 8, 128, 32, jnp.bfloat16, None, id="llama3-8b-bf16-p32"),
    pytest.param(32, 8, 128, 16, jnp.bfloat16, "fp8", id="llama3-8b-fp8-p16"),
    pytest.param(32, 8, 128, 32, jnp.bfloat16, "nvfp4", id="llama3-8b-nvfp4-p32"),
    pytest.param(32, 8, 128, 64, jnp.bfloat16, None, id="llama3-8b-bf16-p64"),
    pytest.param(32, 8, 128, 64, jnp.bfloat16, "fp8", id="llama3-8b-fp8-p64"),
    pytest.param(9, 3, 64, 16, jnp.float32, None, id="smollm2-f32"),
    pytest.param(9, 3, 64, 16, jnp.bfloat16, None, id="smollm2-bf16"),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size,dtype,kv_format", EXPORT_CONFIGS)
def test_lowers_to_mosaic_for_tpu(num_heads, num_kv_heads, head_dim, block_size, dtype, kv_format):
    sds = jax.ShapeDtypeStruct
    tokens, seqs, blocks, width = 2048, 256, 4096, 64
    stored = head_dim // 2 if kv_format == "nvfp4" else head_dim
    pool_dtype = {None: dtype, "fp8": jnp.float8_e4m3fn, "nvfp4": jnp.uint8}[kv_format]
    pool = sds((blocks, block_size, num_kv_heads, stored), pool_dtype)
    args = [sds((tokens, num_heads * head_dim), dtype), pool, pool, sds((seqs + 1,), jnp.int32),
            sds((seqs,), jnp.int32), sds((seqs, width), jnp.int32)]
    if kv_format == "fp8":
        args += [sds((num_kv_heads,), jnp.float32)] * 2
    elif kv_format == "nvfp4":
        args += [sds((blocks, block_size, num_kv_heads, head_dim // 16), jnp.float8_e4m3fn)] * 2
        args += [sds((), jnp.float32)] * 2
    fn = functools.partial(ragged_paged_attention, num_heads=num_heads, num_kv_heads=num_kv_heads,
                           head_dim=head_dim, scale=head_dim ** -0.5, kv_format=kv_format, interpret=False)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()
    assert exported.out_avals[0].shape == (tokens, num_heads * head_dim)


@pytest.mark.parametrize("gen", ["v5e", "v6e", "v7"])
@pytest.mark.parametrize("block_size", [None, 64])
@pytest.mark.parametrize("kv_format", [None, "fp8"])
@pytest.mark.parametrize("decode", [True, False])
def test_lowers_with_each_generations_tuned_blocks(gen, block_size, kv_format, decode):
    """Llama-3-8B, bf16 q, at the generation's recommended page and at page 64, with the blocks the backend
    takes (tuning.attention_blocks: decode_queries_per_block for decode-only steps)."""
    from kernels_pallas import tuning

    sds = jax.ShapeDtypeStruct
    bs = block_size or tuning.recommended_page_size(gen)
    width = 4096 // bs
    seqs, tokens = (64, 64) if decode else (8, 2048)
    pool_dtype = jnp.float8_e4m3fn if kv_format == "fp8" else jnp.bfloat16
    pool = sds((4096, bs, 8, 128), pool_dtype)
    args = [sds((tokens, 32 * 128), jnp.bfloat16), pool, pool, sds((seqs + 1,), jnp.int32),
            sds((seqs,), jnp.int32), sds((seqs, width), jnp.int32)]
    if kv_format == "fp8":
        args += [sds((8,), jnp.float32)] * 2
    blocks = tuning.attention_blocks(bs, decode=decode, generation=gen)
    fn = functools.partial(ragged_paged_attention, num_heads=32, num_kv_heads=8, head_dim=128, scale=0.088,
                           kv_format=kv_format, interpret=False, **blocks)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "tpu_custom_call" in exported.mlir_module()


def test_lowers_with_large_blocks_and_raised_vmem_limit():
    sds = jax.ShapeDtypeStruct
    pool = sds((1024, 16, 8, 128), jnp.bfloat16)
    args = [sds((512, 32 * 128), jnp.bfloat16), pool, pool, sds((65,), jnp.int32), sds((64,), jnp.int32),
            sds((64, 128), jnp.int32)]
    fn = functools.partial(ragged_paged_attention, num_heads=32, num_kv_heads=8, head_dim=128, scale=0.088,
                           pages_per_block=32, queries_per_block=128, interpret=False)
    assert vmem_bytes(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, pages_per_block=32,
                      queries_per_block=128) > 12 << 20
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    assert "scoped_memory_configs" in exported.mlir_module()  # the raised VMEM limit reaches Mosaic


def test_vmem_bytes():
    kw = dict(num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, pages_per_block=8, queries_per_block=32)
    bf16 = vmem_bytes(**kw, q_dtype=jnp.bfloat16)
    # K/V slots 2*2*8*16*(8->16 rows)*128*2 + q/o 2*2*8*4*32*128*2 + m, l 2*8*128*128*4 + acc 8*128*128*4
    assert bf16 == 2 * 2 * 8 * 16 * 16 * 128 * 2 + 2 * 2 * 8 * 4 * 32 * 128 * 2 + 2 * 8 * 128 * 128 * 4 \
        + 8 * 128 * 128 * 4
    # 8-bit pools with 8 kv heads fill (32, 128) tiles a quarter: no smaller than bf16 in VMEM
    assert vmem_bytes(**kw, kv_format="fp8") <= bf16
    assert vmem_bytes(**kw, kv_format="nvfp4") > vmem_bytes(**kw, kv_format="fp8")
    assert vmem_bytes(**{**kw, "pages_per_block": 16}) > bf16
    assert rpa_mod.__doc__ and "Block structure" in rpa_mod.__doc__
