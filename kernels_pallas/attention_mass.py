"""H2O accumulated attention (the attention_mass op) for TPU (Pallas / Mosaic) over the ragged step.

Semantics are exactly those of `lowering.ops.ref_attention_mass`: the slots of this step's new tokens
(slot_mapping) are set to 0, then every cached key j of sequence s gains, per kv head, the float32 softmax
probability of every query row t of s (over the keys 0..pos(t), pos(t) = seq_lens[s] - (query_start[s+1] - t))
summed over the query heads of the kv head's group. Only the K pool is read.

Block structure (a simple design: correctness first, not tuned)
---------------------------------------------------------------
* Grid: one step per sequence, "parallel". Scalar prefetch (SMEM): query_start, seq_lens, the flattened block
  table.
* The step walks its sequence's query rows in blocks of `queries_per_block` (bq) rows, copied HBM -> VMEM as
  one [Hkv, G, bq, Dh] slice of q (laid out [Hkv, G, T_pad, Dh] by the wrapper, as ragged_paged_attention
  does). For each query block it walks the context the block's last row sees in KV blocks of
  `pages_per_block` (ppb) pages twice: pass 1 keeps each row's running max and sum of exp in f32 scratch,
  pass 2 recomputes the scores and adds the probabilities, summed over the block's rows (and the G query heads
  of each kv head), into the sequence's output block. Pages are copied one DMA per page (plus one per
  block-scale page for nvfp4), without double buffering; pages past the context are never copied, so garbage
  table entries are never dereferenced; masked scores (stale VMEM, NaN pages) are replaced before any exp.
* Output: the per-sequence mass f32[S, nkb, Hkv, ppb*Bs] (nkb KV blocks covering the block table), which the
  wrapper scatter-adds (XLA) into the mass pool after zeroing the new slots. The kernel never writes the pool,
  so sequences sharing pages (prefix caching) need no atomics.
* KV formats as in ragged_paged_attention: plain f32 / bf16 pools, "fp8" (per-kv-head f32 scales in SMEM,
  applied to the scores) and "nvfp4" (the two nibble planes decoded separately against q's head_dim permuted
  to [even | odd]; block scales expanded to lanes with a 0/1 matmul).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tuning
from kernels_pallas.ragged_paged_attention import (_MASK, NVFP4_BLOCK, _cdiv, _cdiv_i32, _dot_nn, _dot_nt,
                                                   _e2m1_value, _nvfp4_perm, _round_up, _sublanes)


def _head_tile(buf, head, kv_rows, dtype):
    """The [ppb*Bs, D] tile of one kv head from a KV buffer [ppb, Bs, Hkv, D], widened first (as
    ragged_paged_attention's _head_tile)."""
    return buf[:, :, head, :].astype(dtype).reshape(kv_rows, buf.shape[-1])


def _kernel(qs_ref, sl_ref, bt_ref, q_hbm, k_hbm, *rest, num_kv_heads, group, head_dim, block_size,
            pages_per_block, queries_per_block, table_width, scale, kv_format, mxu_dtype):
    if kv_format == "nvfp4":
        ks_hbm, kgs_ref, o_ref, qbuf, kbuf, ksbuf, sem, m_ref, l_ref = rest
        srcs, bufs = (k_hbm, ks_hbm), (kbuf, ksbuf)
    elif kv_format == "fp8":
        kscale_ref, o_ref, qbuf, kbuf, sem, m_ref, l_ref = rest
        srcs, bufs = (k_hbm,), (kbuf,)
    else:
        o_ref, qbuf, kbuf, sem, m_ref, l_ref = rest
        srcs, bufs = (k_hbm,), (kbuf,)

    bq, ppb, bs = queries_per_block, pages_per_block, block_size
    kvb = ppb * bs
    rows = group * bq
    num_ctx = table_width * bs
    half = head_dim // 2
    s = pl.program_id(0)
    q_begin, q_end, seq_len = qs_ref[s], qs_ref[s + 1], sl_ref[s]
    o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)
    if kv_format == "nvfp4":
        nb = head_dim // NVFP4_BLOCK
        expand = (lax.shift_right_logical(lax.broadcasted_iota(jnp.int32, (nb, half), 1), 3)
                  == lax.broadcasted_iota(jnp.int32, (nb, half), 0)).astype(jnp.float32)

    def page_copies(blk, n_pages):
        """[(needed, [copies])] for each page of KV block blk."""
        out = []
        for j in range(ppb):
            page = blk * ppb + j
            page_id = bt_ref[s * table_width + jnp.minimum(page, table_width - 1)]
            out.append((page < n_pages, [pltpu.make_async_copy(src.at[page_id], buf.at[j], sem.at[1 + n, j])
                                         for n, (src, buf) in enumerate(zip(srcs, bufs))]))
        return out

    def load_block(blk, n_pages):
        copies = page_copies(blk, n_pages)
        for needed, cs in copies:
            @pl.when(needed)
            def _():
                for c in cs:
                    c.start()
        for needed, cs in copies:
            @pl.when(needed)
            def _():
                for c in cs:
                    c.wait()

    def scores(h, mask):
        """Masked f32 scores [rows, kvb] of kv head h against the KV block in VMEM."""
        q2 = qbuf[h].reshape(rows, head_dim)
        if kv_format == "nvfp4":
            q2 = q2.astype(jnp.float32)
            k_sc = _dot_nn(_head_tile(ksbuf, h, kvb, jnp.float32), expand)
            k_codes = _head_tile(kbuf, h, kvb, jnp.int32)
            k_even, k_odd = _e2m1_value(k_codes & 15) * k_sc, _e2m1_value(k_codes >> 4) * k_sc
            s_ = (_dot_nt(q2[:, :half], k_even) + _dot_nt(q2[:, half:], k_odd)) * (scale * kgs_ref[0])
        else:
            k = _head_tile(kbuf, h, kvb, jnp.float32).astype(mxu_dtype)
            s_ = _dot_nt(q2.astype(mxu_dtype), k)
            s_ = s_ * (scale * kscale_ref[h] if kv_format == "fp8" else scale)
        return jnp.where(mask, s_, _MASK)

    def q_block(i, carry):
        row0 = q_begin + i * bq
        q_copy = pltpu.make_async_copy(q_hbm.at[:, :, pl.ds(row0, bq), :], qbuf, sem.at[0, 0])
        q_copy.start()
        q_copy.wait()
        # the block's last row sees indices < kv_need (clipped to the table's width, like the reference)
        kv_need = jnp.clip(seq_len - q_end + jnp.minimum(q_end, row0 + bq), 0, num_ctx)
        n_pages = _cdiv_i32(kv_need, bs)
        n_blocks = _cdiv_i32(kv_need, kvb)
        t = row0 + lax.broadcasted_iota(jnp.int32, (group, bq, kvb), 1).reshape(rows, kvb)
        pos = seq_len - (q_end - t)

        def mask_of(blk):
            col = blk * kvb + lax.broadcasted_iota(jnp.int32, (group, bq, kvb), 2).reshape(rows, kvb)
            return (t < q_end) & (col <= pos) & (col < kv_need)

        m_ref[...] = jnp.full(m_ref.shape, _MASK, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

        def pass1(blk, c):
            load_block(blk, n_pages)
            mask = mask_of(blk)
            for h in range(num_kv_heads):
                s_ = scores(h, mask)
                m_prev = m_ref[h]
                m_new = jnp.maximum(m_prev, jnp.max(s_, axis=1, keepdims=True))
                p = jnp.where(mask, jnp.exp(s_ - m_new), 0.0)
                l_ref[h] = jnp.exp(m_prev - m_new) * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
                m_ref[h] = m_new
            return c

        def pass2(blk, c):
            load_block(blk, n_pages)
            mask = mask_of(blk)
            for h in range(num_kv_heads):
                s_ = scores(h, mask)
                l = l_ref[h]
                p = jnp.where(mask, jnp.exp(s_ - m_ref[h]) / jnp.where(l > 0, l, 1.0), 0.0)  # [rows, kvb]
                o_ref[0, blk, pl.ds(h, 1), :] = o_ref[0, blk, pl.ds(h, 1), :] + jnp.sum(p, axis=0, keepdims=True)
            return c

        lax.fori_loop(0, n_blocks, pass1, 0)
        lax.fori_loop(0, n_blocks, pass2, 0)
        return carry

    lax.fori_loop(0, _cdiv_i32(jnp.maximum(q_end - q_begin, 0), bq), q_block, 0)


def attention_mass(q, k_pool, query_start, seq_lens, block_tables, slot_mapping, mass_pool, *kv_extras, num_heads,
                   num_kv_heads, head_dim, scale, kv_format=None, pages_per_block=None, queries_per_block=None,
                   interpret=None):
    """Drop-in for `lowering.ops.ref_attention_mass` on TPU; see the module docstring.

    q [T, Hq*Dh]; k_pool [N, Bs, Hkv, Dh] (nvfp4: u8 [N, Bs, Hkv, Dh/2]); query_start i32[S+1]; seq_lens i32[S];
    block_tables i32[S, B]; slot_mapping i32[T] (-1: none); mass_pool f32[N, Bs, Hkv]; kv_extras: () |
    (k_scale, v_scale) f32[Hkv] for "fp8" | (k_block_scale, v_block_scale, k_scale, v_scale) for "nvfp4" (the
    V entries are never read). -> the new mass pool f32[N, Bs, Hkv].
    pages_per_block / queries_per_block: default to ragged_paged_attention's tuning (kernels_pallas.tuning).
    interpret: None = interpret mode unless running on a TPU; True / pltpu.InterpretParams / False.
    """
    if kv_format not in (None, "fp8", "nvfp4"):
        raise ValueError(f"attention_mass: unknown kv_format {kv_format!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"attention_mass: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_format == "nvfp4" and head_dim % NVFP4_BLOCK:
        raise ValueError(f"attention_mass: nvfp4 KV needs head_dim divisible by {NVFP4_BLOCK}, got {head_dim}")
    n_extras = {None: 0, "fp8": 2, "nvfp4": 4}[kv_format]
    if len(kv_extras) != n_extras:
        raise ValueError(f"attention_mass: kv_format {kv_format!r} takes {n_extras} kv_extras, got {len(kv_extras)}")
    num_blocks, block_size = k_pool.shape[:2]
    if mass_pool.dtype != jnp.float32 or tuple(mass_pool.shape) != (num_blocks, block_size, num_kv_heads):
        raise ValueError(f"attention_mass: mass_pool must be f32[{num_blocks}, {block_size}, {num_kv_heads}], got "
                         f"{mass_pool.dtype}{list(mass_pool.shape)}")
    defaults = tuning.block_sizes("ragged_paged_attention")
    ppb = int(pages_per_block or defaults["pages_per_block"])
    bq = int(queries_per_block or defaults["queries_per_block"])
    if interpret is None:
        interpret = jax.devices()[0].platform != "tpu"

    num_tokens = q.shape[0]
    num_seqs, table_width = block_tables.shape
    group = num_heads // num_kv_heads
    num_ctx = table_width * block_size
    ppb = max(1, min(ppb, table_width))
    kvb = ppb * block_size
    num_kv_blocks = _cdiv(table_width, ppb)
    sub = _sublanes(q.dtype)
    bq = max(sub, min(_round_up(bq, sub), _round_up(max(num_tokens, 1), sub)))

    qh = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if kv_format == "nvfp4":
        qh = jnp.take(qh, _nvfp4_perm(head_dim), axis=3)
    qh = jnp.transpose(qh, (1, 2, 0, 3))
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, bq), (0, 0)))  # a query block starting at any row stays in bounds

    query_start = query_start.astype(jnp.int32)
    seq_lens = seq_lens.astype(jnp.int32)
    block_tables = block_tables.astype(jnp.int32)
    scalars = (query_start, seq_lens, block_tables.reshape(-1))
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    smem_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    inputs = [qh, k_pool]
    in_specs = [any_spec, any_spec]
    scratch = [pltpu.VMEM((num_kv_heads, group, bq, head_dim), q.dtype),
               pltpu.VMEM((ppb,) + k_pool.shape[1:], k_pool.dtype)]
    if kv_format == "fp8":
        inputs += [kv_extras[0].astype(jnp.float32).reshape(num_kv_heads)]
        in_specs += [smem_spec]
    elif kv_format == "nvfp4":
        inputs += [kv_extras[0], kv_extras[2].astype(jnp.float32).reshape(1)]
        in_specs += [any_spec, smem_spec]
        scratch += [pltpu.VMEM((ppb,) + kv_extras[0].shape[1:], kv_extras[0].dtype)]
    rows = group * bq
    scratch += [pltpu.SemaphoreType.DMA((len(scratch), ppb)),
                pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32)]
    plain_bf16 = q.dtype == jnp.bfloat16 and (kv_format == "fp8" or (kv_format is None and
                                                                     k_pool.dtype == jnp.bfloat16))
    kernel = functools.partial(
        _kernel, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size,
        pages_per_block=ppb, queries_per_block=bq, table_width=table_width, scale=float(scale),
        kv_format=kv_format, mxu_dtype=jnp.bfloat16 if plain_bf16 else jnp.float32)
    out_shape = (num_seqs, num_kv_blocks, num_kv_heads, kvb)
    per_seq = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars), grid=(num_seqs,), in_specs=in_specs,
            out_specs=pl.BlockSpec((1,) + out_shape[1:], lambda s, *_: (s, 0, 0, 0)), scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=interpret,
        name="attention_mass",
    )(*scalars, *inputs)
    per_seq = jnp.transpose(per_seq, (0, 1, 3, 2)).reshape(num_seqs, num_kv_blocks * kvb, num_kv_heads)[:, :num_ctx]

    # the new tokens' slots start from 0, then each sequence's mass lands on the slots of its context
    dropped = num_blocks * block_size
    flat = mass_pool.reshape(dropped, num_kv_heads)
    flat = flat.at[jnp.where(slot_mapping < 0, dropped, slot_mapping)].set(0.0, mode="drop")
    ctx = jnp.arange(num_ctx, dtype=jnp.int32)
    slots = jnp.take(block_tables, ctx // block_size, axis=1) * block_size + ctx % block_size  # i32[S, C]
    q_lens = query_start[1:] - query_start[:-1]
    # a sequence whose rows all have slot -1 is padding (a real row always writes its K/V): it adds no mass
    seg = jnp.searchsorted(query_start[1:], jnp.arange(num_tokens, dtype=jnp.int32), side="right")
    real = jax.ops.segment_max((slot_mapping >= 0).astype(jnp.int32), seg, num_segments=num_seqs) > 0
    seen = (ctx[None, :] < seq_lens[:, None]) & ((q_lens > 0) & real)[:, None]
    flat = flat.at[jnp.where(seen, slots, dropped)].add(per_seq, mode="drop")
    return flat.reshape(mass_pool.shape)
