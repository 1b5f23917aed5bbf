"""Per-row token sampling on the GPU: temperature, top-k, top-p, min-p, then a Gumbel-max draw.

No sort and no host sync: the top-k and top-p cut-offs are found by threshold search over the row's
values (each search pass counts tokens, or sums probability mass, above 8 candidate thresholds at
once), and the draw is an argmax of `scaled logit + Gumbel noise` over the surviving tokens, with
counter-based random numbers (Philox keyed by the row's seed, counters = (column, step offset)), so
the same (seed, offset) always gives the same token and a call can be captured in a CUDA graph.

Semantics (those of runtime/sampler.py, plus min-p), per row with temperature T:
- T == 0: greedy, the argmax of the raw logits, lowest token id on ties (numpy/torch argmax).
- T > 0: scaled logits s = (x - max(x)) / T, weights w = exp(s).
  1. top-k (0 < k < V): order tokens best first by logit, ties by lowest token id; keep the first k.
     On a tie at the k-th value exactly k tokens survive: every token above that value, then the
     lowest-id tokens at that value.
  2. top-p (p < 1): in that same order, over the top-k survivors, keep token i when the mass of the
     tokens before it is < p * (total mass of the top-k survivors). The kept set is a best-first
     prefix, so on a tie at the cut-off value the lowest-id tokens at that value survive, as many as
     the rule admits. The best token always survives.
  3. min-p (m > 0): then keep only tokens with w >= m, i.e. probability >= m * (the best token's
     probability); this ratio does not depend on renormalisation, so min-p is an intersection.
  4. draw: token = argmax over survivors of s + g, g = -log(-log(u)) with u uniform (clamped to
     [UNIFORM_MIN, UNIFORM_MAX]); lowest id on ties. This draws from softmax(s) renormalised over
     the survivors (the Gumbel-max trick), the same distribution as runtime/sampler.py's
     inverse-CDF draw, though not the same token for the same seed.
  A row whose logits are all -inf returns its argmax (token 0). NaN and +inf logits are unsupported.

Random numbers: Philox-4x32-10 keyed by the seed, counters (c, offset low, offset high, 0); its 4
words serve 4 columns of a tile (column start + q * BLOCK / 4 + i gets word q of counter
start / 4 + i). BLOCK depends only on V, so a row samples the same token alone or in any batch.

Kernel and reference differ only by rounding: the kernel computes s, w and the masses in float32
(the top-p comparisons and the tie counting in float64) while ref_sample is float64 throughout, so
they agree token for token unless a mass or a score lands within ~1e-6 of a cut-off.
"""
import torch
import triton
import triton.language as tl

from kernels_gpu.triton_env import tile_target

# Tuning data. A program handles SAMPLE_ROW_ELEMS // tile rows (at least 1) in tiles of at most
# SAMPLE_MAX_BLOCK columns. Each threshold-search pass tests SAMPLE_NUM_CANDIDATES thresholds:
# SAMPLE_NUM_KEY_CANDIDATES split the range of float32 keys evenly (at most 21 passes whatever the
# values), the others split the range of values evenly (5-9 passes on 128k random logits).
SAMPLE_MAX_BLOCK = 512
SAMPLE_MIN_BLOCK = 16
SAMPLE_ROW_ELEMS = 512
SAMPLE_NUM_CANDIDATES = 8
SAMPLE_NUM_KEY_CANDIDATES = 2
SAMPLE_NUM_WARPS = 8
GREEDY_MAX_BLOCK = 2048
GREEDY_ROW_ELEMS = 2048
GREEDY_NUM_WARPS = 8
# Greedy over few rows (<= GREEDY_SPLIT_MAX_ROWS, batch-1 decode): each row is cut into chunks of GREEDY_SPLIT_CHUNK
# columns reduced by programs of their own, then one program per row reduces the chunks' (max, first index).
# NOTE: one program (or torch's one block) per row reads a 128k-entry row at a few percent of the memory rate:
# torch.argmax took 38 us for one row on the H100 (2026-11-28).
GREEDY_SPLIT_MAX_ROWS = 8
GREEDY_SPLIT_CHUNK = {"cuda": 2048, "interpret": 256}

# Uniforms are clamped into [UNIFORM_MIN, UNIFORM_MAX] (both exact float32) before -log(-log(u)),
# so the Gumbel noise is finite; ref_sample clamps the same way.
UNIFORM_MIN = 2.0 ** -33
UNIFORM_MAX = 1.0 - 2.0 ** -24

_KEY_NONE = tl.constexpr(-2147483648)  # below every float's key: padding columns, "no threshold"
_INT32_MAX = tl.constexpr(2147483647)
_UNIFORM_MIN = tl.constexpr(UNIFORM_MIN)
_UNIFORM_MAX = tl.constexpr(UNIFORM_MAX)


@triton.jit
def _float_key(x):
    """f32 -> i32 key whose signed order is the float order (sign-magnitude -> two's complement);
    -0.0 and +0.0 share key 0, so equal floats have equal keys."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == _KEY_NONE, 0, bits)  # -0.0 -> +0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """Inverse of _float_key."""
    bits = key ^ ((key >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _load_tile(logits_ptr, rows, row_mask, stride_lr, cols, vocab):
    """(valid mask, f32 logits with -inf padding, i32 keys with _KEY_NONE padding), all [ROWS, cols]."""
    mask = row_mask[:, None] & (cols < vocab)[None, :]
    x = tl.load(logits_ptr + rows[:, None] * stride_lr + cols[None, :], mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    return mask, x, tl.where(mask, _float_key(x), _KEY_NONE)


@triton.jit
def _row_stats(logits_ptr, rows, row_mask, stride_lr, vocab, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One pass: (row max f32, argmax i32 with lowest id on ties, min key, max key)."""
    best = tl.full([ROWS], float("-inf"), tl.float32)
    best_idx = tl.full([ROWS], _INT32_MAX, tl.int32)
    key_min = tl.full([ROWS], _INT32_MAX, tl.int32)
    key_max = tl.full([ROWS], _KEY_NONE, tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask, x, key = _load_tile(logits_ptr, rows, row_mask, stride_lr, cols, vocab)
        tile_best = tl.max(x, axis=1)
        tile_idx = tl.min(tl.where(mask & (x == tile_best[:, None]), cols[None, :], _INT32_MAX), axis=1)
        # tiles go in column order, so an equal later maximum only replaces the "none yet" index
        better = (tile_best > best) | ((tile_best == best) & (tile_idx < best_idx))
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
        key_min = tl.minimum(key_min, tl.min(tl.where(mask, key, _INT32_MAX), axis=1))
        key_max = tl.maximum(key_max, tl.max(key, axis=1))
    best_idx = tl.where(best_idx == _INT32_MAX, 0, best_idx)  # empty or NaN row
    return best, best_idx, key_min, key_max


@triton.jit
def _candidates(lo, hi, NUM_CANDIDATES: tl.constexpr, NUM_KEY_CANDIDATES: tl.constexpr):
    """i64[ROWS, NC] thresholds in [lo, hi) (all lo where lo == hi): NC - NK of them evenly spaced
    in value between the floats of lo and hi (fast on real logits), NK evenly spaced in key order (a
    worst-case bound: each pass cuts the key range by NK + 1 at least)."""
    NUM_VALUE: tl.constexpr = NUM_CANDIDATES - NUM_KEY_CANDIDATES
    j = tl.arange(0, NUM_CANDIDATES)[None, :]
    by_key = lo[:, None] + (hi - lo)[:, None] * (j - NUM_VALUE + 1).to(tl.int64) // (NUM_KEY_CANDIDATES + 1)
    v_lo = _key_value(lo.to(tl.int32))[:, None]
    v_hi = _key_value(hi.to(tl.int32))[:, None]
    by_value = _float_key(v_lo + (v_hi - v_lo) * ((j + 1).to(tl.float32) / (NUM_VALUE + 1))).to(tl.int64)
    by_value = tl.maximum(tl.minimum(by_value, hi[:, None] - 1), lo[:, None])  # also tames inf / NaN
    return tl.where(j < NUM_VALUE, by_value, by_key)


@triton.jit
def _narrow(lo, hi, cand, ok, snap_lo, snap_hi):
    """One step of the search for the smallest existing key c in [lo, hi] where a predicate holds;
    it is monotone, constant between existing keys, and holds at hi. hi <- the smallest candidate
    where it holds, lo <- the largest where it fails, plus 1; and snap_hi (the largest existing
    key <= the old hi) and snap_lo (the smallest existing key >= the old lo) bound them too, which
    ends the search once [lo, hi] holds a single existing key."""
    active = hi > lo
    new_hi = tl.minimum(tl.min(tl.where(ok, cand, hi[:, None]), axis=1), snap_hi.to(tl.int64))
    new_lo = tl.maximum(tl.max(tl.where(ok, lo[:, None], cand + 1), axis=1), snap_lo.to(tl.int64))
    return tl.where(active, new_lo, lo), tl.where(active, new_hi, hi)


@triton.jit
def _weights(x, mask, row_max, t_safe):
    """(s, w): s = (x - max) / T and w = exp(s), w = 0 on padding."""
    s = (x - row_max[:, None]) / t_safe[:, None]
    return s, tl.where(mask, tl.exp(s), 0.0)


@triton.jit
def _survivors(logits_ptr, rows, row_mask, stride_lr, cols, vocab, row_max, t_safe, sampling,
               thr, tie_cap, tie_mass, tie_w, tie_limit, min_p, seen):
    """Survivors of top-k/top-p/min-p in one tile: token i survives if key > thr, or key == thr and
    its rank r among the row's tokens at thr (in id order) has r < tie_cap and
    tie_mass + r * tie_w < tie_limit; and w >= min_p. Returns (keep, s, seen + ties in this tile)."""
    mask, x, key = _load_tile(logits_ptr, rows, row_mask, stride_lr, cols, vocab)
    s = (x - row_max[:, None]) / t_safe[:, None]
    tie = (mask & (key == thr[:, None])).to(tl.int32)
    rank = seen[:, None] + tl.cumsum(tie, axis=1) - tie  # ties before this token
    tie_ok = (rank < tie_cap[:, None]) & (tie_mass[:, None] + rank.to(tl.float64) * tie_w[:, None] < tie_limit[:, None])
    keep = (key > thr[:, None]) | ((tie > 0) & tie_ok)
    keep = keep & mask & sampling[:, None] & (tl.exp(s) >= min_p[:, None])
    return keep, s, seen + tl.sum(tie, axis=1)


@triton.jit
def _race(best_score, best_idx, keep, s, cols, u):
    """Gumbel-max over one tile: score s - log(-log(u)); the running best, lowest id on ties."""
    u = tl.minimum(tl.maximum(u, _UNIFORM_MIN), _UNIFORM_MAX)
    score = tl.where(keep, s - tl.log(-tl.log(u)), float("-inf"))
    tile_best = tl.max(score, axis=1)
    tile_idx = tl.min(tl.where(keep & (score == tile_best[:, None]), cols[None, :], _INT32_MAX), axis=1)
    better = tile_best > best_score  # strict: earlier columns win ties
    return tl.where(better, tile_best, best_score), tl.where(better, tile_idx, best_idx)


@triton.jit
def sample_kernel(
    logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seeds_ptr, offsets_ptr, uniforms_ptr, out_ptr,
    num_rows, vocab,
    stride_lr, stride_ur,
    HAS_UNIFORMS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    NUM_CANDIDATES: tl.constexpr, NUM_KEY_CANDIDATES: tl.constexpr,
):
    """One program per ROWS rows, all passes over the row in BLOCK-column tiles:
    stats (max, argmax, key range) | top-k search | top-k mass | top-p search | survivors + draw."""
    QB: tl.constexpr = BLOCK // 4
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # i64[ROWS]
    row_mask = rows < num_rows
    row_max, argmax, key_min, key_max = _row_stats(logits_ptr, rows, row_mask, stride_lr, vocab, ROWS, BLOCK)
    temperature = tl.load(temperature_ptr + rows, mask=row_mask, other=0.0)
    sampling = row_mask & (temperature > 0.0) & (row_max > float("-inf"))
    token = argmax
    if tl.max(sampling.to(tl.int32), axis=0) > 0:
        t_safe = tl.where(sampling, temperature, 1.0)
        row_max = tl.where(sampling, row_max, 0.0)  # finite, so padding rows make no NaN
        top_k = tl.load(top_k_ptr + rows, mask=row_mask, other=0)
        top_p = tl.load(top_p_ptr + rows, mask=row_mask, other=1.0)
        min_p = tl.load(min_p_ptr + rows, mask=row_mask, other=0.0)
        use_k = sampling & (top_k > 0) & (top_k < vocab)
        use_p = sampling & (top_p < 1.0)

        # top-k: thr_k = the k-th largest key = the smallest c with count(key > c) < k.
        lo = tl.where(use_k, key_min, key_max).to(tl.int64)
        hi = key_max.to(tl.int64)
        while tl.max(hi - lo, axis=0) > 0:
            cand = _candidates(lo, hi, NUM_CANDIDATES, NUM_KEY_CANDIDATES)  # i64[ROWS, NC]
            cand32 = cand.to(tl.int32)
            count = tl.zeros([ROWS, NUM_CANDIDATES], tl.int32)
            snap_lo = tl.full([ROWS], _INT32_MAX, tl.int32)
            snap_hi = tl.full([ROWS], _KEY_NONE, tl.int32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask, _, key = _load_tile(logits_ptr, rows, row_mask, stride_lr, cols, vocab)
                count += tl.sum((key[:, :, None] > cand32[:, None, :]).to(tl.int32), axis=1)
                snap_lo = tl.minimum(snap_lo, tl.min(tl.where(mask & (key >= lo[:, None]), key, _INT32_MAX), axis=1))
                snap_hi = tl.maximum(snap_hi, tl.max(tl.where(key <= hi[:, None], key, _KEY_NONE), axis=1))
            lo, hi = _narrow(lo, hi, cand, count < top_k[:, None], snap_lo, snap_hi)
        thr_k = tl.where(use_k, hi.to(tl.int32), _KEY_NONE)

        # Mass of the top-k survivors: the tokens above thr_k, plus (k - their count) ties at thr_k.
        count_gt = tl.zeros([ROWS], tl.int32)
        mass_gt = tl.zeros([ROWS], tl.float32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask, x, key = _load_tile(logits_ptr, rows, row_mask, stride_lr, cols, vocab)
            w = tl.where(mask, tl.exp((x - row_max[:, None]) / t_safe[:, None]), 0.0)
            gt = key > thr_k[:, None]
            count_gt += tl.sum(gt.to(tl.int32), axis=1)
            mass_gt += tl.sum(tl.where(gt, w, 0.0), axis=1)
        ties_k = top_k - count_gt  # >= 1 where use_k
        _, w_k = _weights(_key_value(thr_k)[:, None], use_k[:, None], row_max, t_safe)
        w_k = w_k.reshape([ROWS]).to(tl.float64)
        mass_k = mass_gt.to(tl.float64) + tl.where(use_k, ties_k.to(tl.float64) * w_k, 0.0)
        p_mass = top_p.to(tl.float64) * mass_k  # f64[ROWS]  the top-p budget

        # top-p: thr = the smallest c >= thr_k with mass(key > c) < p_mass (above thr_k that mass
        # only counts top-k survivors); mass_hi tracks mass(key > hi).
        lo = tl.where(use_p, tl.maximum(thr_k, key_min), key_max).to(tl.int64)
        hi = key_max.to(tl.int64)
        mass_hi = tl.zeros([ROWS], tl.float64)
        while tl.max(hi - lo, axis=0) > 0:
            cand = _candidates(lo, hi, NUM_CANDIDATES, NUM_KEY_CANDIDATES)
            cand32 = cand.to(tl.int32)
            mass = tl.zeros([ROWS, NUM_CANDIDATES], tl.float32)
            snap_lo = tl.full([ROWS], _INT32_MAX, tl.int32)
            snap_hi = tl.full([ROWS], _KEY_NONE, tl.int32)
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask, x, key = _load_tile(logits_ptr, rows, row_mask, stride_lr, cols, vocab)
                w = tl.where(mask, tl.exp((x - row_max[:, None]) / t_safe[:, None]), 0.0)
                mass += tl.sum(tl.where(key[:, :, None] > cand32[:, None, :], w[:, :, None], 0.0), axis=1)
                snap_lo = tl.minimum(snap_lo, tl.min(tl.where(mask & (key >= lo[:, None]), key, _INT32_MAX), axis=1))
                snap_hi = tl.maximum(snap_hi, tl.max(tl.where(key <= hi[:, None], key, _KEY_NONE), axis=1))
            mass64 = mass.to(tl.float64)
            ok = mass64 < p_mass[:, None]
            # mass(key > c) falls as c grows, so the smallest passing candidate has the largest passing mass
            ok_mass = tl.max(tl.where(ok, mass64, -1.0), axis=1)
            mass_hi = tl.where((hi > lo) & (ok_mass >= 0.0), ok_mass, mass_hi)
            lo, hi = _narrow(lo, hi, cand, ok, snap_lo, snap_hi)
        thr = tl.where(use_p, hi.to(tl.int32), thr_k)

        # Ties at thr: the first ties_k of them if thr is the top-k cut-off; top-p admits rank r
        # while (mass above thr) + r * w(thr) < p_mass.
        tie_cap = tl.where(use_k & (thr == thr_k), ties_k, _INT32_MAX)
        tie_mass = tl.where(use_p, mass_hi, 0.0)
        _, tie_w = _weights(_key_value(thr)[:, None], sampling[:, None], row_max, t_safe)
        tie_w = tie_w.reshape([ROWS]).to(tl.float64)
        tie_limit = tl.where(use_p, p_mass, float("inf"))

        # Survivors and the Gumbel-max draw (random numbers as in the module docstring); tiles
        # without survivors draw nothing.
        seed = tl.load(seeds_ptr + rows, mask=row_mask, other=0)
        offset = tl.load(offsets_ptr + rows, mask=row_mask, other=0)
        zero = tl.zeros([ROWS, QB], tl.uint32)
        off_lo = (offset & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
        off_hi = ((offset >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None] + zero
        word = tl.arange(0, 4)[None, :, None]
        best_score = tl.full([ROWS], float("-inf"), tl.float32)
        best_idx = tl.zeros([ROWS], tl.int32)
        seen = tl.zeros([ROWS], tl.int32)
        for start in range(0, vocab, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            keep, s, seen = _survivors(logits_ptr, rows, row_mask, stride_lr, cols, vocab, row_max, t_safe, sampling,
                                       thr, tie_cap, tie_mass, tie_w, tie_limit, min_p, seen)
            if tl.max(tl.max(keep.to(tl.int32), axis=1), axis=0) > 0:
                if HAS_UNIFORMS:
                    u = tl.load(uniforms_ptr + rows[:, None] * stride_ur + cols[None, :], mask=keep, other=0.5)
                else:
                    counter = (start // 4 + tl.arange(0, QB)).to(tl.uint32)[None, :] + zero
                    r0, r1, r2, r3 = tl.philox(seed[:, None], counter, off_lo, off_hi, zero)
                    r = tl.where(word == 0, r0[:, None, :], tl.where(word == 1, r1[:, None, :],
                                 tl.where(word == 2, r2[:, None, :], r3[:, None, :])))  # [ROWS, 4, QB]
                    u = tl.uint_to_uniform_float(tl.reshape(r, [ROWS, BLOCK]))
                best_score, best_idx = _race(best_score, best_idx, keep, s, cols, u)
        token = tl.where(sampling & (best_score > float("-inf")), best_idx, argmax)
    tl.store(out_ptr + rows, token, mask=row_mask)


@triton.jit
def greedy_kernel(logits_ptr, out_ptr, num_rows, vocab, stride_lr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per ROWS rows: out = argmax, lowest id on ties."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < num_rows
    best = tl.full([ROWS], float("-inf"), tl.float32)
    best_idx = tl.full([ROWS], _INT32_MAX, tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = row_mask[:, None] & (cols < vocab)[None, :]
        x = tl.load(logits_ptr + rows[:, None] * stride_lr + cols[None, :], mask=mask, other=float("-inf"))
        x = x.to(tl.float32)
        tile_best = tl.max(x, axis=1)
        tile_idx = tl.min(tl.where(mask & (x == tile_best[:, None]), cols[None, :], _INT32_MAX), axis=1)
        better = (tile_best > best) | ((tile_best == best) & (tile_idx < best_idx))
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(out_ptr + rows, tl.where(best_idx == _INT32_MAX, 0, best_idx), mask=row_mask)


@triton.jit
def greedy_chunk_kernel(logits_ptr, best_ptr, idx_ptr, vocab, stride_lr, num_chunks, CHUNK: tl.constexpr):
    """Program (row, chunk): the chunk's max f32 and its first column (the chunk's first column for an all -inf
    chunk) into best / idx [L, num_chunks]."""
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = cols < vocab
    x = tl.load(logits_ptr + row * stride_lr + cols, mask=mask, other=float("-inf")).to(tl.float32)
    best = tl.max(x, axis=0)
    idx = tl.min(tl.where(mask & (x == best), cols, _INT32_MAX), axis=0)
    tl.store(best_ptr + row * num_chunks + chunk, best)
    tl.store(idx_ptr + row * num_chunks + chunk, idx)


@triton.jit
def greedy_reduce_kernel(best_ptr, idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    """One program per row: the lowest column among the chunks holding the row's maximum."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    mask = c < num_chunks
    best = tl.load(best_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    idx = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=_INT32_MAX)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(mask & (best == top), idx, _INT32_MAX), axis=0)
    tl.store(out_ptr + row, tl.where(first == _INT32_MAX, 0, first))


@triton.jit
def feed_tokens_kernel(dst_ptr, src_ptr, index_ptr, count, BLOCK: tl.constexpr):
    """dst[index[i]] = src[index[count + i]] for i < count."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < count
    rows = tl.load(index_ptr + i, mask=mask, other=0)
    sources = tl.load(index_ptr + count + i, mask=mask, other=0)
    tl.store(dst_ptr + rows, tl.load(src_ptr + sources, mask=mask, other=0), mask=mask)


_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _validate_logits(fn, logits):
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"{fn}: logits must be [L, V], got {shape}")
    if logits.dtype not in _LOGIT_DTYPES:
        raise ValueError(f"{fn}: unsupported logits dtype {logits.dtype} (fp32, bf16, fp16)")
    if logits.shape[1] == 0:
        raise ValueError(f"{fn}: logits have an empty vocabulary (V = 0)")
    if logits.shape[1] >= 2 ** 31 - 1:
        raise ValueError(f"{fn}: vocabulary of {logits.shape[1]} does not fit int32 token ids")


def _validate_out(fn, out, num_rows, device):
    if out is None:
        return torch.empty(num_rows, dtype=torch.int32, device=device)
    if not isinstance(out, torch.Tensor) or out.shape != (num_rows,) or out.dtype != torch.int32:
        raise ValueError(f"{fn}: out must be int32[{num_rows}], got "
                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else out!r} "
                         f"{getattr(out, 'dtype', '')}")
    if out.device != device:
        raise ValueError(f"{fn}: out is on {out.device}, logits on {device}")
    if num_rows > 1 and out.stride(0) != 1:
        raise ValueError(f"{fn}: out must be contiguous")
    return out


def _row_view(logits):
    return logits if logits.shape[1] <= 1 or logits.stride(1) == 1 else logits.contiguous()


def _validate_params(logits, params, uniforms):
    num_rows, vocab = logits.shape
    for name, t, dtype in params:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"sample: {name} must be a {dtype} tensor of shape [{num_rows}], got {type(t).__name__}")
        if t.shape != (num_rows,):
            raise ValueError(f"sample: {name} must have shape [{num_rows}] (one per logits row), got {tuple(t.shape)}")
        if t.dtype != dtype:
            raise ValueError(f"sample: {name} must be {dtype}, got {t.dtype}")
        if t.device != logits.device:
            raise ValueError(f"sample: {name} is on {t.device}, logits on {logits.device}")
    if uniforms is not None:
        if not isinstance(uniforms, torch.Tensor) or uniforms.shape != (num_rows, vocab):
            raise ValueError(f"sample: uniforms must be [{num_rows}, {vocab}] like logits, got "
                             f"{tuple(uniforms.shape) if isinstance(uniforms, torch.Tensor) else uniforms!r}")
        if uniforms.dtype != torch.float32:
            raise ValueError(f"sample: uniforms must be float32, got {uniforms.dtype}")
        if uniforms.device != logits.device:
            raise ValueError(f"sample: uniforms is on {uniforms.device}, logits on {logits.device}")


def check_sampling_values(temperature, top_k, top_p, min_p) -> None:
    """Raise ValueError naming the first bad row. Reads the tensors, so it syncs with a GPU."""
    checks = (
        ("temperature", temperature, ~torch.isfinite(temperature) | (temperature < 0), "a finite number >= 0"),
        ("top_k", top_k, top_k < -1, "an integer >= -1 (0, -1 or >= V = off)"),
        ("top_p", top_p, ~((top_p > 0) & (top_p <= 1)), "in (0, 1]"),
        ("min_p", min_p, ~((min_p >= 0) & (min_p <= 1)), "in [0, 1]"),
    )
    bad_any = torch.stack([bad.any() for _, _, bad, _ in checks]).tolist()  # the one host sync
    for (name, t, bad, what), is_bad in zip(checks, bad_any):
        if is_bad:
            row = int(torch.nonzero(bad)[0, 0])
            raise ValueError(f"sample: {name} must be {what}, got {t[row].item()!r} in row {row}")


def _tiles(vocab, max_block, row_elems, min_block=1):
    block = max(min_block, min(max_block, triton.next_power_of_2(vocab)))
    return max(1, row_elems // block), block


def sample(
    logits: torch.Tensor,  # f32[L, V] (bf16/fp16 are read as f32)
    *,
    temperature: torch.Tensor,  # f32[L]  0 = greedy
    top_k: torch.Tensor,  # i32[L]  0, -1 or >= V = off
    top_p: torch.Tensor,  # f32[L]  1 = off
    min_p: torch.Tensor,  # f32[L]  0 = off
    seeds: torch.Tensor,  # i64[L]
    offsets: torch.Tensor,  # i64[L]  per-row step counter
    out: torch.Tensor | None = None,  # i32[L]
    uniforms: torch.Tensor | None = None,  # f32[L, V]  test hook: replaces the random numbers
    check_values: bool | None = None,
) -> torch.Tensor:  # i32[L]
    """One token per row with per-row parameters (see the module docstring for the exact rules).

    The same (seed, offset, logits row) gives the same token in any batch. Shapes, dtypes and devices
    are always checked (host metadata only). Parameter values are checked (ValueError) when
    check_values is True, or when it is None and the tensors are on the CPU; on a GPU that check
    syncs, so by default it is skipped there and the call never syncs (CUDA-graph capturable). An
    unchecked bad row degrades to greedy (T <= 0 or NaN, top_p <= 0, min_p > 1 leave no survivors).
    """
    _validate_logits("sample", logits)
    params = (("temperature", temperature, torch.float32), ("top_k", top_k, torch.int32),
              ("top_p", top_p, torch.float32), ("min_p", min_p, torch.float32),
              ("seeds", seeds, torch.int64), ("offsets", offsets, torch.int64))
    _validate_params(logits, params, uniforms)
    if check_values or (check_values is None and logits.device.type == "cpu"):
        check_sampling_values(temperature, top_k, top_p, min_p)
    num_rows, vocab = logits.shape
    out = _validate_out("sample", out, num_rows, logits.device)
    if num_rows == 0:
        return out
    logits = _row_view(logits)
    if uniforms is not None:
        uniforms = _row_view(uniforms)
    temperature, top_k, top_p, min_p, seeds, offsets = (t.contiguous() for _, t, _ in params)
    rows, block = _tiles(vocab, SAMPLE_MAX_BLOCK, SAMPLE_ROW_ELEMS, SAMPLE_MIN_BLOCK)
    sample_kernel[(triton.cdiv(num_rows, rows),)](
        logits, temperature, top_k, top_p, min_p, seeds, offsets,
        uniforms if uniforms is not None else logits, out,
        num_rows, vocab,
        logits.stride(0), uniforms.stride(0) if uniforms is not None else 0,
        HAS_UNIFORMS=uniforms is not None, ROWS=rows, BLOCK=block, NUM_CANDIDATES=SAMPLE_NUM_CANDIDATES,
        NUM_KEY_CANDIDATES=SAMPLE_NUM_KEY_CANDIDATES,
        num_warps=SAMPLE_NUM_WARPS,
    )
    return out


def greedy(logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:  # f32[L, V] -> i32[L]
    """argmax per row, lowest token id on ties (a row of all -inf gives 0); never syncs."""
    _validate_logits("greedy", logits)
    num_rows, vocab = logits.shape
    out = _validate_out("greedy", out, num_rows, logits.device)
    if num_rows == 0:
        return out
    logits = _row_view(logits)
    if num_rows <= GREEDY_SPLIT_MAX_ROWS:
        chunk = min(GREEDY_SPLIT_CHUNK[tile_target(logits.device)], triton.next_power_of_2(max(vocab, 1)))
        num_chunks = triton.cdiv(vocab, chunk)
        best = torch.empty((num_rows, num_chunks), dtype=torch.float32, device=logits.device)  # f32[L, C]
        idx = torch.empty((num_rows, num_chunks), dtype=torch.int32, device=logits.device)  # i32[L, C]
        greedy_chunk_kernel[(num_rows, num_chunks)](logits, best, idx, vocab, logits.stride(0), num_chunks,
                                                    CHUNK=chunk, num_warps=4)
        greedy_reduce_kernel[(num_rows,)](best, idx, out, num_chunks, BLOCK_C=triton.next_power_of_2(num_chunks),
                                          num_warps=4)
        return out
    rows, block = _tiles(vocab, GREEDY_MAX_BLOCK, GREEDY_ROW_ELEMS)
    greedy_kernel[(triton.cdiv(num_rows, rows),)](
        logits, out, num_rows, vocab, logits.stride(0), ROWS=rows, BLOCK=block, num_warps=GREEDY_NUM_WARPS,
    )
    return out


FEED_BLOCK = 256


def feed_tokens(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, count: int) -> None:
    """dst[index[:count]] = src[index[count:2 * count]], in place on the device, no sync (async scheduling: a step's
    input token ids taken from the tokens the previous step picked, before the host has seen them).

    dst, src: i32 vectors; index: i32[>= 2 * count], the destination rows then their source rows. The rows are the
    caller's to check (runtime/engine.py builds them; CudaProgram.step_async checks them on the host)."""
    for name, t in (("dst", dst), ("src", src), ("index", index)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype != torch.int32:
            got = f"{t.dtype}[{tuple(t.shape)}]" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"feed_tokens: {name} must be an int32 vector, got {got}")
        if t.device != dst.device:
            raise ValueError(f"feed_tokens: {name} is on {t.device}, dst on {dst.device}")
    if count < 0 or index.shape[0] < 2 * count:
        raise ValueError(f"feed_tokens: count {count} needs an index of >= {2 * max(count, 0)} entries, "
                         f"got {index.shape[0]}")
    if count == 0:
        return
    if not (dst.is_contiguous() and src.is_contiguous() and index.is_contiguous()):
        raise ValueError("feed_tokens: dst, src and index must be contiguous")
    feed_tokens_kernel[(triton.cdiv(count, FEED_BLOCK),)](dst, src, index, count, BLOCK=FEED_BLOCK, num_warps=4)


def ref_feed_tokens(dst: torch.Tensor, src: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """feed_tokens' reference: a new tensor (int64 indexing on the host)."""
    out = dst.detach().cpu().clone()
    idx = index.detach().cpu().long()
    out[idx[:count]] = src.detach().cpu()[idx[count:2 * count]]
    return out


def ref_filter(logits, temperature, top_k, top_p, min_p):
    """float64 reference of the filters -> (keep bool[L, V], s f64[L, V] = (x - max) / T).

    keep is the set a sampling row draws from; a greedy row (T == 0) or one with all logits -inf
    keeps just its argmax. Built on a stable sort, independently of the kernel's threshold search.
    """
    x = logits.double()  # f64[L, V]
    num_rows, vocab = x.shape
    order = torch.sort(x, dim=1, descending=True, stable=True).indices  # best first, ties by lowest id
    xs = torch.gather(x, 1, order)  # f64[L, V]
    row_max = xs[:, :1]
    temp = temperature.double()[:, None]
    sampling = (temp > 0) & (row_max > float("-inf"))  # bool[L, 1]
    s = (xs - row_max) / torch.where(sampling, temp, torch.ones_like(temp))
    w = torch.exp(s)  # f64[L, V]
    rank = torch.arange(vocab, device=x.device)[None, :]
    k = top_k.long()[:, None]
    keep = ~((k > 0) & (k < vocab)) | (rank < k)
    w_k = torch.where(keep, w, torch.zeros_like(w))
    before = torch.cumsum(w_k, dim=1) - w_k  # mass of the better top-k survivors
    p = top_p.double()[:, None]
    keep &= (p >= 1) | (before < p * w_k.sum(dim=1, keepdim=True))
    keep &= w >= min_p.double()[:, None]
    keep &= sampling
    keep[:, 0] |= ~sampling[:, 0]  # greedy: the argmax (first in the stable order)
    keep_out = torch.zeros_like(keep).scatter_(1, order, keep)
    s_out = torch.empty_like(s).scatter_(1, order, s)
    return keep_out, s_out


def ref_probs(logits, temperature, top_k, top_p, min_p) -> torch.Tensor:  # -> f64[L, V]
    """float64 probabilities sample() draws from: softmax(s) renormalised over ref_filter's set."""
    keep, s = ref_filter(logits, temperature, top_k, top_p, min_p)
    w = torch.where(keep, torch.exp(torch.where(keep, s, torch.zeros_like(s))), torch.zeros_like(s))
    return w / w.sum(dim=1, keepdim=True)


def ref_sample(logits, *, temperature, top_k, top_p, min_p, seeds=None, offsets=None, uniforms=None):
    """float64 reference of sample() -> i32[L]: Gumbel-max over ref_filter's set with the given
    uniforms f32[L, V]; with the same uniforms passed to sample(), the tokens match (up to rounding,
    see the module docstring). Without uniforms it draws its own, from a torch generator per row
    seeded by (seed, offset): deterministic, but not the kernel's Philox stream."""
    num_rows, vocab = logits.shape
    if uniforms is None:
        seeds = torch.zeros(num_rows, dtype=torch.int64) if seeds is None else seeds
        offsets = torch.zeros(num_rows, dtype=torch.int64) if offsets is None else offsets
        rows = []
        for seed, offset in zip(seeds.tolist(), offsets.tolist()):
            gen = torch.Generator().manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % 2 ** 63)
            rows.append(torch.rand(vocab, generator=gen, dtype=torch.float32))
        uniforms = torch.stack(rows).to(logits.device) if rows else torch.zeros(0, vocab)
    keep, s = ref_filter(logits, temperature, top_k, top_p, min_p)
    u = uniforms.float().clamp(UNIFORM_MIN, UNIFORM_MAX).double()
    score = torch.where(keep, s - torch.log(-torch.log(u)), torch.full_like(s, float("-inf")))
    best = torch.argmax(score, dim=1)  # first maximum
    fallback = torch.argmax(logits.double(), dim=1)
    ok = score.gather(1, best[:, None])[:, 0] > float("-inf")
    return torch.where(ok, best, fallback).to(torch.int32)
