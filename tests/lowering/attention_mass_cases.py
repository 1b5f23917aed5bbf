"""Shared ragged batches and a float64 numpy reference for the attention_mass op (H2O accumulated attention).

Used by tests/lowering/test_attention_mass.py (the jnp reference), tests/kernels_gpu/test_attention_mass.py
(Triton) and tests/kernels_pallas/test_attention_mass.py (Pallas). Every case is plain numpy; unused pool slots
(page tails, spare pages, the pages garbage block-table entries point at) hold NaN K and a NaN or finite mass
that the op must leave as it is, and the slots of this step's new tokens start out NaN (the op zeroes them first).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from lowering import ops
from lowering.quant import formats

# (q_len, context length after the step) per sequence: a prefill chunk with a cached prefix, decodes, a k+1 = 3
# verification, a fresh prefill, an idle sequence, a one-token sequence.
MIXED = [(5, 13), (1, 9), (3, 11), (0, 6), (7, 7), (1, 1)]


def make_case(spec=MIXED, *, block_size=16, num_heads=4, num_kv_heads=2, head_dim=16, kv_format=None,
              q_dtype=np.float32, pool_dtype=np.float32, pad_rows=2, seed=0):
    """A dict: q [T, Hq*Dh] (the last pad_rows rows belong to no sequence, slot -1), k_pool and kv_extras in
    kv_format's encoding, query_start, seq_lens, block_tables (padding entries point at NaN pages), slot_mapping,
    mass f32[N, Bs, Hkv], k_f32 (the pool dequantized, NaN where unused), used bool[N, Bs] (slots holding context),
    attrs (the op's attributes)."""
    rng = np.random.default_rng(seed)
    q_lens = [a for a, _ in spec]
    ctx_lens = [c for _, c in spec]
    num_seqs = len(spec)
    pages = [-(-c // block_size) for c in ctx_lens]
    width = max(pages) + 2
    num_blocks = sum(pages) + 4  # spare pages: NaN K, never seen
    perm = rng.permutation(num_blocks)
    spare = perm[sum(pages):]
    tables = np.zeros((num_seqs, width), np.int32)
    used = np.zeros((num_blocks, block_size), bool)
    at = 0
    for s, (n, c) in enumerate(zip(pages, ctx_lens)):
        tables[s, :n] = perm[at:at + n]
        tables[s, n:] = rng.choice(spare, width - n)  # garbage entries past the context
        for j in range(c):
            used[perm[at + j // block_size], j % block_size] = True
        at += n
    query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    seq_lens = np.array(ctx_lens, np.int32)
    num_tokens = int(query_start[-1]) + pad_rows
    slot_mapping = np.full((num_tokens,), -1, np.int32)
    for s in range(num_seqs):
        for t in range(query_start[s], query_start[s + 1]):
            pos = seq_lens[s] - (query_start[s + 1] - t)
            slot_mapping[t] = tables[s, pos // block_size] * block_size + pos % block_size

    k = rng.standard_normal((num_blocks, block_size, num_kv_heads, head_dim)).astype(np.float32)
    extras: tuple = ()
    if kv_format is None:
        k_pool = k.astype(pool_dtype)
        k_pool[~used] = np.nan
    elif kv_format == "fp8":
        k_scale = (np.abs(k).max(axis=(0, 1, 3)) / formats.FP8_MAX * 1.2).astype(np.float32)  # f32[Hkv]
        k_pool = np.array(formats.jnp_quantize_fp8(jnp.asarray(k), jnp.asarray(k_scale)[:, None]))
        k_pool[~used] = np.nan
        extras = (k_scale, np.ones(num_kv_heads, np.float32))
    elif kv_format == "nvfp4":
        gk = formats.nvfp4_global_scale(np.abs(k).max())
        packed, k_bs = formats.jnp_quantize_nvfp4(jnp.asarray(k), gk)
        k_pool, k_bs = np.array(packed), np.array(k_bs)
        k_bs[~used] = np.nan  # the whole head of an unused slot decodes to NaN
        extras = (k_bs, np.zeros_like(k_bs), np.asarray(gk, np.float32), np.float32(1.0))
    else:
        raise ValueError(kv_format)
    k_f32 = np.array(ops.dequantize_kv(jnp.asarray(k_pool), tuple(jnp.asarray(e) for e in extras), kv_format, 0))

    # mass: finite on context slots, NaN or finite on the others; the new tokens' slots start as NaN (garbage)
    mass = rng.uniform(0.0, 3.0, (num_blocks, block_size, num_kv_heads)).astype(np.float32)
    mass[~used & (rng.uniform(size=used.shape) < 0.5)] = np.nan
    for slot in slot_mapping[slot_mapping >= 0]:
        mass[slot // block_size, slot % block_size] = np.nan
    q = rng.standard_normal((num_tokens, num_heads * head_dim)).astype(np.float32).astype(q_dtype)
    attrs = dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, scale=head_dim ** -0.5,
                 kv_format=kv_format)
    return dict(q=q, k_pool=k_pool, extras=extras, query_start=query_start, seq_lens=seq_lens, block_tables=tables,
                slot_mapping=slot_mapping, mass=mass, k_f32=k_f32, used=used, attrs=attrs)


def op_args(case):
    """(positional jnp arrays, attrs) for ops.ref_attention_mass / the Pallas kernel."""
    args = tuple(jnp.asarray(case[n]) for n in ("q", "k_pool", "query_start", "seq_lens", "block_tables",
                                                   "slot_mapping", "mass"))
    return args + tuple(jnp.asarray(e) for e in case["extras"]), dict(case["attrs"])


def mass_f64(case):
    """attention_mass's contract in float64 loops over sequences, rows, kv heads (K from k_f32) -> f64[N, Bs, Hkv]."""
    kf, bs = case["k_f32"], case["k_f32"].shape[1]
    a = case["attrs"]
    hkv, d = a["num_kv_heads"], a["head_dim"]
    group = a["num_heads"] // hkv
    qs, tables = case["query_start"], case["block_tables"]
    out = case["mass"].astype(np.float64)
    for slot in case["slot_mapping"]:
        if slot >= 0:
            out[slot // bs, slot % bs] = 0.0
    for s, seq_len in enumerate(case["seq_lens"]):
        for t in range(qs[s], qs[s + 1]):
            pos = seq_len - (qs[s + 1] - t)
            ctx = np.arange(pos + 1)
            pages, offs = tables[s][ctx // bs], ctx % bs
            qh = np.asarray(case["q"], np.float64)[t].reshape(hkv, group, d)
            for g in range(hkv):
                kk = kf[pages, offs, g].astype(np.float64)  # [C, D]
                for h in range(group):
                    sc = kk @ qh[g, h] * a["scale"]
                    p = np.exp(sc - sc.max())
                    np.add.at(out[:, :, g], (pages, offs), p / p.sum())
    return out


def seen_slots(case) -> np.ndarray:
    """bool[N, Bs]: the slots some step sequence's rows see (what the op may change, besides the new slots)."""
    bs = case["k_f32"].shape[1]
    seen = np.zeros(case["used"].shape, bool)
    qs, tables = case["query_start"], case["block_tables"]
    for s, seq_len in enumerate(case["seq_lens"]):
        if qs[s + 1] > qs[s]:
            ctx = np.arange(seq_len)
            seen[tables[s][ctx // bs], ctx % bs] = True
    for slot in case["slot_mapping"]:
        if slot >= 0:
            seen[slot // bs, slot % bs] = True
    return seen


def check_mass(got, case, *, rtol=1e-5, atol=1e-5):
    """got f32[N, Bs, Hkv] against mass_f64 on the slots the step sees; every other slot bit for bit unchanged."""
    got = np.asarray(got, np.float32)
    want = mass_f64(case)
    seen = seen_slots(case)
    assert got.shape == case["mass"].shape and got.dtype == np.float32
    assert np.isfinite(got[seen]).all()
    np.testing.assert_allclose(got[seen], want[seen], rtol=rtol, atol=atol)
    np.testing.assert_array_equal(got[~seen].view(np.uint32), case["mass"][~seen].view(np.uint32))


def padded_case(**kwargs):
    """(case, padded): `padded` is `case` with one more sequence whose rows are padding (slot -1, as the CPU step
    padding and the CUDA-graph batch padding make them: seq_len = its rows, a table of block 0), which must add
    no mass anywhere — block 0 may belong to a real sequence."""
    case = make_case(MIXED, pad_rows=0, **kwargs)
    padded = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in case.items()}
    rows = 3
    padded["query_start"] = np.concatenate([case["query_start"], [case["query_start"][-1] + rows]]).astype(np.int32)
    padded["seq_lens"] = np.concatenate([case["seq_lens"], [rows]]).astype(np.int32)
    padded["block_tables"] = np.concatenate([case["block_tables"], np.zeros_like(case["block_tables"][:1])])
    padded["slot_mapping"] = np.concatenate([case["slot_mapping"], np.full(rows, -1, np.int32)])
    padded["q"] = np.concatenate([case["q"], case["q"][:rows]])
    return case, padded
