"""Ragged paged attention for TPU (Pallas / Mosaic): one kernel for decode, chunked prefill with a cached
prefix and k+1-token verification rows, all in one flat ragged batch.

Semantics are exactly those of `lowering.ops.ref_paged_attention`: token row t of sequence s sits at context
index seq_lens[s] - (query_start[s+1] - t) and attends causally to the cached keys 0..that index, read through
`block_tables[s]`; with `window` (sliding-window attention) only to the keys at indices > that index - window.
Rows that belong to no sequence (t >= query_start[S], or the padding of the last query block) come out as 0.

Block structure
---------------
* Grid: one axis over query blocks of `queries_per_block` (bq) flat token rows, "parallel". Every grid step
  handles all kv heads of its bq rows, so each KV page is copied HBM -> VMEM once per query block and serves
  every head (the pool layout [N, Bs, Hkv, Dh] keeps a page's heads together; a page of one head alone would
  be a strided DMA of Bs rows).
* Q / O blocks: the wrapper lays q out as [Hkv, G, T_pad, Dh] (G = Hq / Hkv), and the block is
  (Hkv, G, bq, Dh): last two dims bq (a multiple of the dtype's sublane packing) and the full Dh. Inside, the
  G query heads of kv head h are flattened to G*bq rows and multiplied against ONE copy of that head's K/V
  tile (GQA shares the pages and the MXU weight load).
* Scalar prefetch (SMEM): query_start i32[S+1], seq_lens i32[S], the flattened block table i32[S*B], and for
  each query block the range [seq_lo, seq_hi) of sequences whose rows overlap it (computed in the wrapper
  with a searchsorted over query_start, so the kernel does no per-step search).
* Query block size: `queries_per_block` is rounded up to the q dtype's sublane multiple (16 for bf16, 8 for
  f32) and capped at the padded token count, so any positive value is accepted. The TPU backend passes
  tuning's "decode_queries_per_block" for steps where every sequence has one new token (decode rows of
  different sequences share no KV, so a small block wastes less of the G*bq-row compute per KV block) and
  "queries_per_block" otherwise.
* KV walk: for each overlapping sequence, the context its rows in this block need (up to the last row's
  position) is cut in KV blocks of `pages_per_block` (ppb) pages = ppb*Bs tokens, and the grid step walks
  the (sequence, KV block) pairs in one loop. The pages of a KV block are copied from the HBM pools
  (memory_space ANY) with manual async copies into one of two VMEM slots, one DMA per page (and per scale
  array for nvfp4), on the slot's DMA semaphores; the copy of the next pair (next KV block of the same
  sequence, or the first block of the next sequence with work, so decode rows do not expose one DMA
  latency per sequence) is started before waiting on the current one: double buffering. Each grid step
  therefore exposes one KV DMA (its first pair's) and its last pair's compute, not one per sequence. Pages past a
  sequence's needed length are never copied, so garbage table entries are never dereferenced. With a sliding
  window the walk of a sequence starts at the KV block holding the first index its first row in this block
  sees, and the pages wholly before that index (which the block manager may have freed) are not copied either.
  Nothing is prefetched across grid steps (the axis is "parallel", megacore-shardable).
* Online softmax in f32 scratch: m, l [Hkv, G*bq, 1] and acc [Hkv, G*bq, Dh]; rows of different
  sequences occupy disjoint scratch rows, so one scratch serves the whole ragged block. Masked scores are a
  finite -1e30 and their probabilities are forced to exactly 0; V rows at context indices the block's rows
  never reach (unused page slots, stale VMEM, NaN pages) are zeroed before P@V, as the reference does.
* KV formats, dequantized in VMEM:
    - plain f32 / bf16 pools (bf16 with bf16 q uses bf16 MXU operands with f32 accumulation);
    - "fp8": float8_e4m3fn pools, per-kv-head f32 scales (SMEM) applied to the scores (K) and to P@V (V);
      with bf16 q the MXU operands are bf16 (e4m3 -> bf16 is exact), with f32 q they are f32;
    - "nvfp4": u8 pools [N, Bs, Hkv, Dh/2] with e4m3 block scales [N, Bs, Hkv, Dh/16] and f32[] global
      scales. The low nibble of byte j is element 2j, the high nibble 2j+1. The kernel decodes the two
      nibble planes separately (no lane interleave): the wrapper permutes q's head_dim to [even | odd] and
      undoes that permutation on the output; scores = q_even.K_even + q_odd.K_odd, and P@V_even / P@V_odd
      fill the two halves of acc. Block scales (one per 8 bytes) are expanded to lanes with a 0/1 matmul.
      value = e2m1(code) * block_scale * global_scale.
VMEM footprint: see `vmem_bytes`.
Only shapes and the static keyword arguments determine the compiled kernel.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tuning

_MASK = -1e30  # finite "minus infinity": exp(_MASK - m) underflows to 0 and _MASK - _MASK is 0, never NaN
NVFP4_BLOCK = 16


def _cdiv(a, b):
    return (a + b - 1) // b


def _cdiv_i32(a, b: int):
    """ceil(a / b) of a traced non-negative i32 (lax.div truncates; jnp's // lowers through sign())."""
    return lax.div(a + (b - 1), jnp.int32(b))


def _round_up(a, b):
    return _cdiv(a, b) * b


def _sublanes(dtype) -> int:
    """Rows of one (sublane x 128-lane) VMEM tile for dtype: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
    return 8 * max(1, 4 // jnp.dtype(dtype).itemsize)


def _tile_bytes(shape, dtype) -> int:
    """Bytes of a VMEM buffer of `shape`, its last two dims padded to the dtype's (sublane, 128) tile."""
    shape = tuple(shape)
    if len(shape) == 1:
        shape = (1,) + shape
    lead = math.prod(shape[:-2])
    return lead * _round_up(shape[-2], _sublanes(dtype)) * _round_up(shape[-1], 128) * jnp.dtype(dtype).itemsize


def _stored_dim(head_dim, kv_format):
    return head_dim // 2 if kv_format == "nvfp4" else head_dim


def vmem_bytes(*, num_heads, num_kv_heads, head_dim, block_size, pages_per_block, queries_per_block,
               q_dtype="bfloat16", kv_dtype=None, kv_format=None) -> int:
    """VMEM bytes the kernel uses for the given block params: KV slots + pipelined Q/O blocks + scratch.

      kv   = 2 slots x 2 (K, V) x ppb x Bs x pad(Hkv) x pad(Dk) x itemsize(kv)      (Dk = Dh/2 for nvfp4)
      sc   = nvfp4 only: 2 x 2 x ppb x Bs x pad(Hkv) x pad(Dh/16) x 1
      q,o  = 2 (double-buffered by the pipeline) x 2 x Hkv x G x pad(bq) x pad(Dh) x itemsize(q)
      m, l = 2 x Hkv x G*bq x 128 x 4   (a [rows, 1] f32 buffer occupies whole lanes)
      acc  = Hkv x G*bq x pad(Dh) x 4
    with pad() rounding the last two dims of each buffer to the (sublane, 128-lane) tile of its dtype.
    """
    kv_dtype = jnp.dtype(kv_dtype if kv_dtype is not None else
                         {"fp8": jnp.float8_e4m3fn, "nvfp4": jnp.uint8}.get(kv_format, q_dtype))
    group = num_heads // num_kv_heads
    bq = _round_up(queries_per_block, _sublanes(q_dtype))  # as the kernel rounds it
    ppb, bs = pages_per_block, block_size
    rows = group * bq
    total = 2 * 2 * _tile_bytes((ppb, bs, num_kv_heads, _stored_dim(head_dim, kv_format)), kv_dtype)
    if kv_format == "nvfp4":
        total += 2 * 2 * _tile_bytes((ppb, bs, num_kv_heads, head_dim // NVFP4_BLOCK), jnp.float8_e4m3fn)
    total += 2 * 2 * _tile_bytes((num_kv_heads, group, bq, head_dim), q_dtype)
    total += 2 * _tile_bytes((num_kv_heads, rows, 1), jnp.float32)
    total += _tile_bytes((num_kv_heads, rows, head_dim), jnp.float32)
    return int(total)


def _e2m1_value(code):
    """i32 E2M1 codes (0..15) -> f32 values, arithmetically (no table lookup in the kernel)."""
    mag = code & 7
    expo = mag >> 1
    half = (mag & 1).astype(jnp.float32) * 0.5
    pow2 = jnp.left_shift(jnp.int32(1), jnp.maximum(expo - 1, 0)).astype(jnp.float32)
    val = jnp.where(expo == 0, half, (1.0 + half) * pow2)
    return jnp.where((code & 8) != 0, -val, val)


def _dot_nt(a, b):
    # a [M, D] . b [N, D]^T -> f32 [M, N]
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _head_tile(buf, slot, head, kv_rows, dtype):
    """The [ppb*Bs, D] tile of one kv head from a KV slot buffer [2, ppb, Bs, Hkv, D], widened to 32 bits first
    (the head pick is a sublane-strided read of the (Hkv, D) tiles; merging the page and token dims is then a
    32-bit reshape, with no packed-dtype sublane shuffles)."""
    return buf[slot, :, :, head, :].astype(dtype).reshape(kv_rows, buf.shape[-1])


def _kernel(qs_ref, sl_ref, bt_ref, lo_ref, hi_ref, q_ref, k_hbm, v_hbm, *rest, num_kv_heads, group, head_dim,
            block_size, pages_per_block, queries_per_block, table_width, scale, kv_format, mxu_dtype, window):
    if kv_format == "nvfp4":
        ks_hbm, vs_hbm, kgs_ref, vgs_ref, o_ref, kbuf, vbuf, ksbuf, vsbuf, sem, m_ref, l_ref, acc_ref = rest
        srcs, bufs = (k_hbm, v_hbm, ks_hbm, vs_hbm), (kbuf, vbuf, ksbuf, vsbuf)
    elif kv_format == "fp8":
        kscale_ref, vscale_ref, o_ref, kbuf, vbuf, sem, m_ref, l_ref, acc_ref = rest
        srcs, bufs = (k_hbm, v_hbm), (kbuf, vbuf)
    else:
        o_ref, kbuf, vbuf, sem, m_ref, l_ref, acc_ref = rest
        srcs, bufs = (k_hbm, v_hbm), (kbuf, vbuf)

    bq, ppb, bs = queries_per_block, pages_per_block, block_size
    kvb = ppb * bs
    rows = group * bq
    num_ctx = table_width * bs
    half = head_dim // 2
    qb = pl.program_id(0)
    t0 = qb * bq

    m_ref[...] = jnp.full(m_ref.shape, _MASK, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def seq_info(s):
        """Scalars of sequence s for this query block: (q_begin, q_end, seq_len, kv_need, kv_from, n_blocks)."""
        q_begin = qs_ref[s]
        q_end = qs_ref[s + 1]
        seq_len = sl_ref[s]
        row_lo = jnp.maximum(q_begin, t0)
        row_hi = jnp.minimum(q_end, t0 + bq)
        has_rows = row_hi > row_lo
        # Context indices [kv_from, kv_need) cover every row of s inside this block (its last row here sits at
        # seq_len - (q_end - row_hi)), clipped to the table's width like the reference. kv_from is 0, or with a
        # sliding window the first index the block's first row of s sees: the pages wholly before it may be
        # freed (their table entries point anywhere) and are never copied.
        kv_need = jnp.where(has_rows, jnp.clip(seq_len - q_end + row_hi, 0, num_ctx), 0)
        kv_from = jnp.int32(0)
        if window is not None:
            kv_from = jnp.clip(seq_len - q_end + row_lo - (window - 1), 0, kv_need)
        return q_begin, q_end, seq_len, kv_need, kv_from, _cdiv_i32(kv_need, kvb)

    seq_end = hi_ref[qb]

    def first_block(s):
        """The first KV block to visit of sequence s (clamped into this block's range): the one holding kv_from."""
        if window is None:
            return jnp.int32(0)
        return lax.div(seq_info(jnp.maximum(jnp.minimum(s, seq_end - 1), 0))[4], jnp.int32(kvb))

    def first_busy_seq(s):
        """The first sequence >= s (or seq_end) that has KV blocks to visit in this query block."""
        def idle(x):
            return seq_info(jnp.maximum(jnp.minimum(x, seq_end - 1), 0))[5] <= first_block(x)

        return lax.while_loop(lambda x: (x < seq_end) & idle(x), lambda x: x + 1, s)

    def block_copies(s, blk, slot):
        """[(needed, [copies])] for each page of KV block blk of sequence s, into VMEM slot `slot`."""
        info = seq_info(s)
        n_pages = _cdiv_i32(info[3], bs)
        out = []
        for j in range(ppb):
            page = blk * ppb + j
            page_id = bt_ref[s * table_width + jnp.minimum(page, table_width - 1)]
            needed = page < n_pages
            if window is not None:
                needed = needed & (page >= lax.div(info[4], jnp.int32(bs)))  # not wholly before the window
            out.append((needed, [pltpu.make_async_copy(src.at[page_id], buf.at[slot, j], sem.at[slot, n])
                                 for n, (src, buf) in enumerate(zip(srcs, bufs))]))
        return out

    def start(s, blk, slot):
        for needed, copies in block_copies(s, blk, slot):
            @pl.when(needed)
            def _():
                for c in copies:
                    c.start()

    def wait(s, blk, slot):
        for needed, copies in block_copies(s, blk, slot):
            @pl.when(needed)
            def _():
                for c in copies:
                    c.wait()

    # One walk over the (sequence, KV block) pairs of this query block; the copy of the next pair (the next
    # KV block, or the first block of the next sequence with work) is in flight while the current one computes.
    s_first = first_busy_seq(lo_ref[qb])
    blk_first = first_block(s_first)

    @pl.when(s_first < seq_end)
    def _():
        start(s_first, blk_first, 0)

    def compute(blk, slot, q_begin, q_end, seq_len, kv_need, kv_from):
        c0 = blk * kvb
        t = t0 + lax.broadcasted_iota(jnp.int32, (group, bq, kvb), 1).reshape(rows, kvb)
        col = c0 + lax.broadcasted_iota(jnp.int32, (group, bq, kvb), 2).reshape(rows, kvb)
        pos = seq_len - (q_end - t)
        mask = (t >= q_begin) & (t < q_end) & (col <= pos) & (col < kv_need)
        v_row = c0 + lax.broadcasted_iota(jnp.int32, (kvb, 1), 0)
        v_ok = v_row < kv_need
        if window is not None:
            mask = mask & (col > pos - window)
            v_ok = v_ok & (v_row >= kv_from)  # pages before kv_from were not copied: stale VMEM
        if kv_format == "nvfp4":
            nb = head_dim // NVFP4_BLOCK
            expand = (lax.shift_right_logical(lax.broadcasted_iota(jnp.int32, (nb, half), 1), 3)
                      == lax.broadcasted_iota(jnp.int32, (nb, half), 0)).astype(jnp.float32)

        for h in range(num_kv_heads):
            q2 = q_ref[h].reshape(rows, head_dim)
            if kv_format == "nvfp4":
                q2 = q2.astype(jnp.float32)
                k_sc = _dot_nn(_head_tile(ksbuf, slot, h, kvb, jnp.float32), expand)
                v_sc = _dot_nn(_head_tile(vsbuf, slot, h, kvb, jnp.float32), expand)
                k_codes = _head_tile(kbuf, slot, h, kvb, jnp.int32)
                v_codes = _head_tile(vbuf, slot, h, kvb, jnp.int32)
                k_even, k_odd = _e2m1_value(k_codes & 15) * k_sc, _e2m1_value(k_codes >> 4) * k_sc
                v_even = jnp.where(v_ok, _e2m1_value(v_codes & 15) * v_sc, 0.0)
                v_odd = jnp.where(v_ok, _e2m1_value(v_codes >> 4) * v_sc, 0.0)
                s_ = _dot_nt(q2[:, :half], k_even) + _dot_nt(q2[:, half:], k_odd)
                s_ = s_ * (scale * kgs_ref[0])
            else:
                k = _head_tile(kbuf, slot, h, kvb, jnp.float32).astype(mxu_dtype)
                v = jnp.where(v_ok, _head_tile(vbuf, slot, h, kvb, jnp.float32), 0.0).astype(mxu_dtype)
                s_ = _dot_nt(q2.astype(mxu_dtype), k)
                s_ = s_ * (scale * kscale_ref[h] if kv_format == "fp8" else scale)
            s_ = jnp.where(mask, s_, _MASK)
            m_prev = m_ref[h]
            m_new = jnp.maximum(m_prev, jnp.max(s_, axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(s_ - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            m_ref[h] = m_new
            l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
            if kv_format == "nvfp4":
                gs = vgs_ref[0]
                acc_ref[h, :, :half] = alpha * acc_ref[h, :, :half] + _dot_nn(p, v_even) * gs
                acc_ref[h, :, half:] = alpha * acc_ref[h, :, half:] + _dot_nn(p, v_odd) * gs
            else:
                pv = _dot_nn(p.astype(mxu_dtype), v)
                if kv_format == "fp8":
                    pv = pv * vscale_ref[h]
                acc_ref[h] = alpha * acc_ref[h] + pv

    def walk_cond(state):
        return state[0] < seq_end

    def walk_body(state):
        s, blk, slot = state
        q_begin, q_end, seq_len, kv_need, kv_from, n_blocks = seq_info(s)
        more = blk + 1 < n_blocks
        s_next = jnp.where(more, s, first_busy_seq(s + 1))
        blk_next = jnp.where(more, blk + 1, first_block(s_next))

        @pl.when(s_next < seq_end)
        def _():
            start(s_next, blk_next, 1 - slot)

        wait(s, blk, slot)
        compute(blk, slot, q_begin, q_end, seq_len, kv_need, kv_from)
        return s_next, blk_next, 1 - slot

    lax.while_loop(walk_cond, walk_body, (s_first, blk_first, jnp.int32(0)))

    for h in range(num_kv_heads):
        l = l_ref[h]
        out = acc_ref[h] / jnp.where(l > 0, l, 1.0)
        o_ref[h] = out.reshape(group, bq, head_dim).astype(o_ref.dtype)


def _nvfp4_perm(head_dim):
    """head_dim order [even elements | odd elements] (the two nibble planes of the packed bytes)."""
    return jnp.concatenate([jnp.arange(0, head_dim, 2), jnp.arange(1, head_dim, 2)])


def ragged_paged_attention(q, k_pool, v_pool, query_start, seq_lens, block_tables, *kv_extras, num_heads,
                           num_kv_heads, head_dim, scale, kv_format=None, window=None, pages_per_block=None,
                           queries_per_block=None, interpret=None):
    """Drop-in for `lowering.ops.ref_paged_attention` on TPU; see the module docstring.

    q [T, Hq*Dh]; pools [N, Bs, Hkv, Dh] (nvfp4: u8 [N, Bs, Hkv, Dh/2]); query_start i32[S+1]; seq_lens
    i32[S]; block_tables i32[S, B]; kv_extras: () | (k_scale, v_scale) f32[Hkv] for "fp8" |
    (k_block_scale, v_block_scale, k_scale, v_scale) for "nvfp4". -> [T, Hq*Dh] in q.dtype.
    window: sliding-window attention (a row at context index p sees indices > p - window), None for full.
    interpret: None = interpret mode unless running on a TPU; True / pltpu.InterpretParams / False.
    """
    if kv_format not in (None, "fp8", "nvfp4"):
        raise ValueError(f"unknown kv_format {kv_format!r}")
    if window is not None and (not isinstance(window, numbers.Integral) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if kv_format == "nvfp4" and head_dim % NVFP4_BLOCK:
        raise ValueError(f"nvfp4 KV needs head_dim divisible by {NVFP4_BLOCK}, got {head_dim}")
    n_extras = {None: 0, "fp8": 2, "nvfp4": 4}[kv_format]
    if len(kv_extras) != n_extras:
        raise ValueError(f"kv_format {kv_format!r} takes {n_extras} kv_extras, got {len(kv_extras)}")
    defaults = tuning.block_sizes("ragged_paged_attention")
    ppb = int(pages_per_block or defaults["pages_per_block"])
    bq = int(queries_per_block or defaults["queries_per_block"])
    if interpret is None:
        interpret = jax.devices()[0].platform != "tpu"

    num_tokens = q.shape[0]
    num_seqs = seq_lens.shape[0]
    block_size = k_pool.shape[1]
    table_width = block_tables.shape[1]
    group = num_heads // num_kv_heads
    ppb = max(1, min(ppb, table_width))
    sub = _sublanes(q.dtype)
    bq = max(sub, min(_round_up(bq, sub), _round_up(num_tokens, sub)))
    t_pad = _round_up(max(num_tokens, 1), bq)
    num_q_blocks = t_pad // bq

    qh = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if kv_format == "nvfp4":
        qh = jnp.take(qh, _nvfp4_perm(head_dim), axis=3)
    qh = jnp.transpose(qh, (1, 2, 0, 3))
    qh = jnp.pad(qh, ((0, 0), (0, 0), (0, t_pad - num_tokens), (0, 0)))

    query_start = query_start.astype(jnp.int32)
    starts = jnp.arange(num_q_blocks, dtype=jnp.int32) * bq
    seq_lo = jnp.searchsorted(query_start[1:], starts, side="right").astype(jnp.int32)
    seq_hi = jnp.searchsorted(query_start[:num_seqs], starts + bq, side="left").astype(jnp.int32)
    seq_hi = jnp.maximum(seq_hi, seq_lo)
    scalars = (query_start, seq_lens.astype(jnp.int32), block_tables.astype(jnp.int32).reshape(-1), seq_lo, seq_hi)

    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    smem_spec = pl.BlockSpec(memory_space=pltpu.SMEM)
    q_spec = pl.BlockSpec((num_kv_heads, group, bq, head_dim), lambda i, *_: (0, 0, i, 0))
    page_shape = k_pool.shape[1:]
    inputs = [qh, k_pool, v_pool]
    in_specs = [q_spec, any_spec, any_spec]
    scratch = [pltpu.VMEM((2, ppb) + page_shape, k_pool.dtype), pltpu.VMEM((2, ppb) + page_shape, v_pool.dtype)]
    if kv_format == "fp8":
        inputs += [kv_extras[0].astype(jnp.float32).reshape(num_kv_heads),
                   kv_extras[1].astype(jnp.float32).reshape(num_kv_heads)]
        in_specs += [smem_spec, smem_spec]
    elif kv_format == "nvfp4":
        inputs += [kv_extras[0], kv_extras[1], kv_extras[2].astype(jnp.float32).reshape(1),
                   kv_extras[3].astype(jnp.float32).reshape(1)]
        in_specs += [any_spec, any_spec, smem_spec, smem_spec]
        scratch += [pltpu.VMEM((2, ppb) + kv_extras[0].shape[1:], kv_extras[0].dtype),
                    pltpu.VMEM((2, ppb) + kv_extras[1].shape[1:], kv_extras[1].dtype)]
    rows = group * bq
    scratch += [pltpu.SemaphoreType.DMA((2, len(scratch))),
                pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, 1), jnp.float32),
                pltpu.VMEM((num_kv_heads, rows, head_dim), jnp.float32)]

    # Ask Mosaic for more scoped VMEM only when the blocks need it (the default limit is 16-32 MiB by chip).
    need = vmem_bytes(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                      pages_per_block=ppb, queries_per_block=bq, q_dtype=q.dtype, kv_dtype=k_pool.dtype,
                      kv_format=kv_format)
    vmem_limit = None if need <= (12 << 20) else int(need * 1.25) + (4 << 20)
    # bf16 MXU operands (f32 accumulation) when q is bf16 and the pool is bf16, or fp8: an e4m3 value is exact
    # in bf16 (3 mantissa bits), so K costs nothing in precision and P@V rounds P as the bf16 path does; an
    # f32 x f32 matmul would take ~3 MXU passes. nvfp4 keeps f32 operands.
    plain_bf16 = q.dtype == jnp.bfloat16 and (kv_format == "fp8" or (kv_format is None and
                                                                     k_pool.dtype == jnp.bfloat16))
    kernel = functools.partial(
        _kernel, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, block_size=block_size,
        pages_per_block=ppb, queries_per_block=bq, table_width=table_width, scale=float(scale),
        kv_format=kv_format, mxu_dtype=jnp.bfloat16 if plain_bf16 else jnp.float32,
        window=None if window is None else int(window))
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(qh.shape, q.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=len(scalars), grid=(num_q_blocks,),
                                               in_specs=in_specs, out_specs=q_spec, scratch_shapes=scratch),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",), vmem_limit_bytes=vmem_limit),
        interpret=interpret,
        name="ragged_paged_attention",
    )(*scalars, *inputs)

    out = jnp.transpose(out[:, :, :num_tokens], (2, 0, 1, 3))  # [T, Hkv, G, Dh]
    if kv_format == "nvfp4":
        out = jnp.take(out, jnp.argsort(_nvfp4_perm(head_dim)), axis=3)
    return out.reshape(num_tokens, num_heads * head_dim)
