"""Unified paged attention over the ragged step (prefill chunks, decodes, verify rows) for bf16/fp8/nvfp4 KV."""
import torch
import triton
import triton.language as tl

# Tile sizes keyed by (target, head_dim bucket, phase): BLOCK_M is rows of a query tile (tokens x GQA heads),
# BLOCK_N is context positions per step. Phase "decode" is used when every sequence has at most
# DECODE_MAX_Q_LEN new tokens. "interpret" is the CPU Triton interpreter (tests only).
# Measured on H100 (Triton 3.6, Hq=32 Hkv=8 D=128, block_size 16); decode stages from
# benchmarks/tune_paged_attention.py (3 stages: 0.578 -> 0.470 ms for batch 64 x context 4096, bf16).
TILE_SIZES = {
    ("cuda", 64, "decode"): {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    ("cuda", 128, "decode"): {"BLOCK_M": 16, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    ("cuda", 256, "decode"): {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    ("cuda", 64, "prefill"): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ("cuda", 128, "prefill"): {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    ("cuda", 256, "prefill"): {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
    ("interpret", 64, "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 128, "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 256, "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 64, "prefill"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 128, "prefill"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    ("interpret", 256, "prefill"): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
}
DECODE_MAX_Q_LEN = 4
# Per-KV-format changes to the tiles above, keyed by (target, phase, kv_format); none measured yet.
FORMAT_OVERRIDES: dict = {}
# Split-KV (flash-decoding) heuristic: split while the grid has fewer than target_programs programs
# (about 4 per H100 SM), keeping at least min_tokens_per_split context positions per split.
SPLIT_KV = {"target_programs": 528, "min_tokens_per_split": 256, "max_splits": 32}

KV_FORMATS = {"bf16": 0, "fp8": 1, "nvfp4": 2}
NVFP4_BLOCK = 16


@triton.jit
def _e2m1_to_f32(code):
    """i32 nibble codes (0..15) -> f32 E2M1 values."""
    exp = (code >> 1) & 3
    mant = code & 1
    mag4 = tl.where(exp == 0, mant * 2, (2 + mant) << exp)  # 4 * |value| as an integer
    val = mag4.to(tl.float32) * 0.25
    return tl.where((code & 8) != 0, -val, val)


@triton.jit
def _load_nvfp4_tile(cache_ptr, block_scale_ptr, blk, off, n_valid, kv_head, head_dim,
                     stride_n, stride_b, stride_h, stride_d,
                     stride_sn, stride_sb, stride_sh, stride_sd,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gather and dequantize one NVFP4 tile -> f32[BLOCK_N, BLOCK_D], without the per-layer global scale.

    blk, off: i64[BLOCK_N] block id and offset in block of each context position.
    """
    offs_byte = tl.arange(0, BLOCK_D // 2)
    row = blk * stride_n + off * stride_b + kv_head * stride_h  # i64[BLOCK_N]
    mask = n_valid[:, None] & (offs_byte[None, :] < head_dim // 2)
    packed = tl.load(cache_ptr + row[:, None] + offs_byte[None, :] * stride_d, mask=mask, other=0).to(tl.int32)
    # element 2i is the low nibble of byte i: join(lo, hi) then flatten interleaves them back in order
    val = tl.reshape(tl.join(_e2m1_to_f32(packed & 15), _e2m1_to_f32(packed >> 4)), (BLOCK_N, BLOCK_D))
    offs_grp = tl.arange(0, BLOCK_D // 16)
    srow = blk * stride_sn + off * stride_sb + kv_head * stride_sh
    smask = n_valid[:, None] & (offs_grp[None, :] < head_dim // 16)
    bscale = tl.load(block_scale_ptr + srow[:, None] + offs_grp[None, :] * stride_sd, mask=smask,
                     other=0.0).to(tl.float32)  # f32[BLOCK_N, BLOCK_D // 16]
    bscale = tl.reshape(tl.broadcast_to(bscale[:, :, None], (BLOCK_N, BLOCK_D // 16, 16)), (BLOCK_N, BLOCK_D))
    return val * bscale


@triton.jit
def paged_attention_kernel(
    out_ptr,  # [T, Hq, D] q dtype (written when not SPLIT_KV)
    part_out_ptr,  # f32[num_splits, T, Hq, D] unnormalized partial outputs (SPLIT_KV)
    part_m_ptr,  # f32[num_splits, T, Hq] running max of log2-scaled scores (SPLIT_KV)
    part_l_ptr,  # f32[num_splits, T, Hq] running sum of exp2 (SPLIT_KV)
    q_ptr,  # [T, Hq, D]
    k_cache_ptr, v_cache_ptr,  # [N, block_size, Hkv, D] bf16/f32 | fp8 | u8[..., D//2] nvfp4
    k_block_scale_ptr, v_block_scale_ptr,  # fp8[N, block_size, Hkv, D//16] (nvfp4 only)
    k_scale_ptr, v_scale_ptr,  # f32[Hkv] (fp8) | f32[] (nvfp4)
    query_start_ptr,  # i32[S+1]
    seq_lens_ptr,  # i32[S]
    block_tables_ptr,  # i32[S, B]
    sm_scale, num_seqs, block_size, head_dim,
    stride_qt, stride_qh, stride_qd,
    stride_ot, stride_oh, stride_od,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_vn, stride_vb, stride_vh, stride_vd,
    stride_ksn, stride_ksb, stride_ksh, stride_ksd,
    stride_vsn, stride_vsb, stride_vsh, stride_vsd,
    stride_bts, stride_btb,
    stride_ps, stride_pt, stride_ph,  # part_out strides (last dim contiguous)
    stride_ms, stride_mt,  # part_m / part_l strides (last dim contiguous)
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KV_FORMAT: tl.constexpr, SPLIT_KV: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # Find the sequence of this tile: the largest s with query_start[s] // BLOCK_Q + s <= pid_tile.
    lo = pid_tile * 0
    hi = lo + num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        go = tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= pid_tile
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid - 1)
    seq = lo
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first_tok = (pid_tile - (q_start // BLOCK_Q + seq)) * BLOCK_Q
    if first_tok >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_offset = seq_len - q_len  # context index of this sequence's first new token

    # Rows of the tile: token-major, the GQA heads of this kv head packed inside each token.
    offs_m = tl.arange(0, BLOCK_M)
    tok_local = first_tok + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    row_valid = (offs_m // GROUP_PAD < BLOCK_Q) & (tok_local < q_len) & (head_in_group < GROUP)
    q_pos = ctx_offset + tok_local  # i32[BLOCK_M] last context index each row may see
    tok = (q_start + tok_local).to(tl.int64)
    head = kv_head * GROUP + head_in_group
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    q_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    k_scale = 1.0
    v_scale = 1.0
    if KV_FORMAT == 1:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    elif KV_FORMAT == 2:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)

    # Context range: causal bound of the tile's last row, cut to this split's slice.
    last_tok = tl.minimum(first_tok + BLOCK_Q, q_len) - 1
    kv_hi = ctx_offset + last_tok + 1
    kv_lo = kv_hi * 0
    if SPLIT_KV:
        num_splits = tl.num_programs(2)
        chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
        kv_lo = split * chunk
        kv_hi = tl.minimum(kv_hi, kv_lo + chunk)

    # NOTE: the fp8 per-head scale and the nvfp4 per-layer scale are constant in a program, so K's folds
    # into the score scale and V's into the final accumulator instead of multiplying every element.
    qk_scale = sm_scale * k_scale * 1.4426950408889634  # log2(e): softmax via exp2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts

    for start in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < kv_hi
        blk = tl.load(bt_row + (offs_n // block_size) * stride_btb, mask=n_valid, other=0).to(tl.int64)
        off = (offs_n % block_size).to(tl.int64)

        if KV_FORMAT == 2:
            k = tl.trans(_load_nvfp4_tile(k_cache_ptr, k_block_scale_ptr, blk, off, n_valid, kv_head, head_dim,
                                          stride_kn, stride_kb, stride_kh, stride_kd,
                                          stride_ksn, stride_ksb, stride_ksh, stride_ksd, BLOCK_N, BLOCK_D))
        else:
            k_ptrs = (k_cache_ptr + (blk * stride_kn + off * stride_kb + kv_head * stride_kh)[None, :]
                      + offs_d[:, None] * stride_kd)
            k = tl.load(k_ptrs, mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k.to(q.dtype))
        s = s * qk_scale
        visible = n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked rows stay NaN-free
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)

        if KV_FORMAT == 2:
            v = _load_nvfp4_tile(v_cache_ptr, v_block_scale_ptr, blk, off, n_valid, kv_head, head_dim,
                                 stride_vn, stride_vb, stride_vh, stride_vd,
                                 stride_vsn, stride_vsb, stride_vsh, stride_vsd, BLOCK_N, BLOCK_D)
        else:
            v_ptrs = (v_cache_ptr + (blk * stride_vn + off * stride_vb + kv_head * stride_vh)[:, None]
                      + offs_d[None, :] * stride_vd)
            v = tl.load(v_ptrs, mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype))
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    acc = acc * v_scale
    if SPLIT_KV:
        prow = split.to(tl.int64) * stride_ps + tok * stride_pt + head * stride_ph
        tl.store(part_out_ptr + prow[:, None] + offs_d[None, :], acc, mask=q_mask)
        mrow = split.to(tl.int64) * stride_ms + tok * stride_mt + head
        tl.store(part_m_ptr + mrow, m_i, mask=row_valid)
        tl.store(part_l_ptr + mrow, l_i, mask=row_valid)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def paged_attention_reduce_kernel(
    out_ptr,  # [T, Hq, D]
    part_out_ptr,  # f32[num_splits, T, Hq, D]
    part_m_ptr, part_l_ptr,  # f32[num_splits, T, Hq]
    num_splits, head_dim,
    stride_ot, stride_oh, stride_od,
    stride_ps, stride_pt, stride_ph,
    stride_ms, stride_mt,
    SPLITS_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_valid = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < head_dim

    mrow = offs_s * stride_ms + tok * stride_mt + head
    m = tl.load(part_m_ptr + mrow, mask=s_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + mrow, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # f32[SPLITS_PAD]
    denom = tl.sum(w * l, 0)
    prow = offs_s * stride_ps + tok * stride_pt + head * stride_ph
    part = tl.load(part_out_ptr + prow[:, None] + offs_d[None, :], mask=s_valid[:, None] & d_valid[None, :],
                   other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + offs_d * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=d_valid)


def _interpreting() -> bool:
    return triton.knobs.runtime.interpret if hasattr(triton, "knobs") else False


def _tile_sizes(device: torch.device, head_dim: int, max_q_len: int, kv_format: str = "bf16") -> dict:
    target = "cuda" if device.type == "cuda" and not _interpreting() else "interpret"
    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    phase = "decode" if max_q_len <= DECODE_MAX_Q_LEN else "prefill"
    return {**TILE_SIZES[(target, bucket, phase)], **FORMAT_OVERRIDES.get((target, phase, kv_format), {})}


def choose_num_splits(num_tiles: int, num_kv_heads: int, max_seq_len: int) -> int:
    """Split-KV count: more splits when few (sequence, kv head, tile) programs face long contexts."""
    programs = max(1, num_tiles * num_kv_heads)
    if programs >= SPLIT_KV["target_programs"]:
        return 1
    by_occupancy = triton.cdiv(SPLIT_KV["target_programs"], programs)
    by_length = max_seq_len // SPLIT_KV["min_tokens_per_split"]
    return max(1, min(by_occupancy, by_length, SPLIT_KV["max_splits"]))


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"paged_attention: {msg}")


def _validate(q, k_cache, v_cache, query_start, seq_lens, block_tables, kv_format, k_scale, v_scale,
              k_block_scale, v_block_scale, out):
    _check(kv_format in KV_FORMATS, f"kv_format must be one of {sorted(KV_FORMATS)}, got {kv_format!r}")
    _check(q.dim() == 3, f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    _check(q.dtype in (torch.bfloat16, torch.float16, torch.float32), f"q dtype {q.dtype} unsupported")
    num_tokens, num_q_heads, head_dim = q.shape
    _check(head_dim % 16 == 0 and 16 <= head_dim <= 256, f"head_dim must be a multiple of 16 in [16, 256], got {head_dim}")
    _check(k_cache.dim() == 4 and k_cache.shape == v_cache.shape,
           f"k_cache/v_cache must both be [N, block_size, Hkv, D*], got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    _check(k_cache.dtype == v_cache.dtype, f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    num_blocks, block_size, num_kv_heads, stored_dim = k_cache.shape
    _check(block_size >= 1, "block_size must be >= 1")
    _check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
           f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    if kv_format == "bf16":
        _check(k_cache.dtype in (torch.bfloat16, torch.float16, torch.float32),
               f"bf16 KV format needs a bf16/fp16/fp32 cache, got {k_cache.dtype}")
        _check(stored_dim == head_dim, f"cache head_dim {stored_dim} != q head_dim {head_dim}")
    elif kv_format == "fp8":
        _check(k_cache.dtype == torch.float8_e4m3fn, f"fp8 KV format needs float8_e4m3fn, got {k_cache.dtype}")
        _check(stored_dim == head_dim, f"cache head_dim {stored_dim} != q head_dim {head_dim}")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check(s is not None and s.dtype == torch.float32 and s.shape == (num_kv_heads,),
                   f"fp8 KV format needs {name} f32[{num_kv_heads}]")
    else:
        _check(k_cache.dtype == torch.uint8, f"nvfp4 KV format needs a uint8 packed cache, got {k_cache.dtype}")
        _check(stored_dim * 2 == head_dim, f"nvfp4 cache last dim must be D//2={head_dim // 2}, got {stored_dim}")
        bs_shape = (num_blocks, block_size, num_kv_heads, head_dim // NVFP4_BLOCK)
        for name, s in (("k_block_scale", k_block_scale), ("v_block_scale", v_block_scale)):
            _check(s is not None and s.dtype == torch.float8_e4m3fn and tuple(s.shape) == bs_shape,
                   f"nvfp4 KV format needs {name} float8_e4m3fn{list(bs_shape)}")
        for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            _check(s is not None and s.dtype == torch.float32 and s.numel() == 1,
                   f"nvfp4 KV format needs {name} as an f32 scalar tensor (the per-layer global scale)")
    _check(query_start.dim() == 1 and query_start.dtype == torch.int32 and query_start.numel() >= 2,
           "query_start must be i32[S+1] with S >= 1")
    num_seqs = query_start.numel() - 1
    _check(seq_lens.dtype == torch.int32 and tuple(seq_lens.shape) == (num_seqs,), f"seq_lens must be i32[{num_seqs}]")
    _check(block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == num_seqs,
           f"block_tables must be i32[{num_seqs}, B]")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("query_start", query_start),
                    ("seq_lens", seq_lens), ("block_tables", block_tables)):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")
    if out is not None:
        _check(out.shape == q.shape and out.dtype == q.dtype and out.device == q.device,
               f"out must match q: {tuple(q.shape)} {q.dtype}")


def paged_attention(
    q,  # [T, Hq, D] bf16/fp16/f32
    k_cache, v_cache,  # [N, block_size, Hkv, D] bf16/f32 | fp8 e4m3 | u8[N, block_size, Hkv, D//2] (nvfp4)
    query_start,  # i32[S+1]
    seq_lens,  # i32[S] context length after this step (includes the new tokens)
    block_tables,  # i32[S, B]
    *,
    scale: float,
    kv_format: str = "bf16",
    k_scale=None, v_scale=None,  # f32[Hkv] (fp8) | f32[] global scale (nvfp4)
    k_block_scale=None, v_block_scale=None,  # fp8[N, block_size, Hkv, D//16] (nvfp4)
    num_splits=None,
    max_q_len=None,
    max_seq_len=None,
    out=None,  # [T, Hq, D] q dtype
):
    """Causal attention of each new token over its own sequence's paged context; returns out [T, Hq, D].

    Pass max_q_len and max_seq_len (host ints) to avoid device syncs (and when capturing CUDA graphs);
    rows past query_start[S] are left unwritten.
    """
    _validate(q, k_cache, v_cache, query_start, seq_lens, block_tables, kv_format, k_scale, v_scale,
              k_block_scale, v_block_scale, out)
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if max_q_len is None:
        max_q_len = int((query_start[1:] - query_start[:-1]).max().item())
    max_q_len = max(1, int(max_q_len))

    tiles = _tile_sizes(q.device, head_dim, max_q_len, kv_format)
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, min(tiles["BLOCK_M"] // group_pad, triton.next_power_of_2(max_q_len)))
    block_m = max(16, block_q * group_pad)
    block_n = tiles["BLOCK_N"]
    block_d = triton.next_power_of_2(head_dim)
    num_tiles = num_tokens // block_q + num_seqs  # upper bound of sum_s cdiv(q_len_s, block_q)

    if num_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max().item())
        live_tiles = min(num_tiles, num_seqs * triton.cdiv(max_q_len, block_q))
        num_splits = choose_num_splits(live_tiles, num_kv_heads, int(max_seq_len))
    _check(int(num_splits) >= 1, f"num_splits must be >= 1, got {num_splits}")
    num_splits = int(num_splits)
    split_kv = num_splits > 1

    if split_kv:
        part_out = torch.empty((num_splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:
        part_out = part_m = part_l = out  # unused placeholders
    dummy = seq_lens
    k_bs = k_block_scale if k_block_scale is not None else dummy
    v_bs = v_block_scale if v_block_scale is not None else dummy
    ks = k_scale if k_scale is not None else dummy
    vs = v_scale if v_scale is not None else dummy
    k_bs_strides = k_bs.stride() if k_block_scale is not None else (0, 0, 0, 0)
    v_bs_strides = v_bs.stride() if v_block_scale is not None else (0, 0, 0, 0)
    part_strides = part_out.stride()[:3] if split_kv else (0, 0, 0)
    ml_strides = part_m.stride()[:2] if split_kv else (0, 0)
    dot_f32 = _interpreting() or q.dtype == torch.float32

    grid = (num_tiles, num_kv_heads, num_splits)
    paged_attention_kernel[grid](
        out, part_out, part_m, part_l,
        q, k_cache, v_cache, k_bs, v_bs, ks, vs,
        query_start, seq_lens, block_tables,
        float(scale), num_seqs, block_size, head_dim,
        *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(),
        *k_bs_strides, *v_bs_strides, *block_tables.stride(),
        *part_strides, *ml_strides,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        KV_FORMAT=KV_FORMATS[kv_format], SPLIT_KV=split_kv, DOT_F32=dot_f32,
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    if split_kv:
        paged_attention_reduce_kernel[(num_tokens, num_q_heads)](
            out, part_out, part_m, part_l,
            num_splits, head_dim,
            *out.stride(), *part_strides, *ml_strides,
            SPLITS_PAD=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out


def _dequantize_cache(cache, scale, block_scale, kv_format):
    """[N, block_size, Hkv, D*] stored cache -> f64[N, block_size, Hkv, D]."""
    from kernels_gpu.kv_formats import dequantize_fp8, dequantize_nvfp4

    if kv_format == "fp8":
        return dequantize_fp8(cache, scale).double()
    if kv_format == "nvfp4":
        return dequantize_nvfp4(cache, block_scale, scale).double()
    return cache.double()


def ref_paged_attention(
    q,  # [T, Hq, D]
    k_cache, v_cache,  # as paged_attention
    query_start,  # i32[S+1]
    seq_lens,  # i32[S]
    block_tables,  # i32[S, B]
    *,
    scale: float,
    kv_format: str = "bf16",
    k_scale=None, v_scale=None,
    k_block_scale=None, v_block_scale=None,
    **unused,
):
    """Float64 reference: dequantize the whole pool, gather each sequence through its block table, causal softmax."""
    k_all = _dequantize_cache(k_cache, k_scale, k_block_scale, kv_format)  # f64[N, bs, Hkv, D]
    v_all = _dequantize_cache(v_cache, v_scale, v_block_scale, kv_format)
    block_size = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)  # f64[T, Hq, D]
    qs = query_start.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        t0, t1 = qs[s], qs[s + 1]
        if t1 == t0:
            continue
        idx = torch.arange(seq_len, device=q.device)
        blocks = block_tables[s, idx // block_size].long()
        k = k_all[blocks, idx % block_size].repeat_interleave(group, dim=1)  # f64[ctx, Hq, D]
        v = v_all[blocks, idx % block_size].repeat_interleave(group, dim=1)
        qq = q[t0:t1].double()  # f64[q_len, Hq, D]
        scores = torch.einsum("thd,chd->htc", qq, k) * scale  # f64[Hq, q_len, ctx]
        pos = seq_len - (t1 - t0) + torch.arange(t1 - t0, device=q.device)
        scores = scores.masked_fill(idx[None, None, :] > pos[None, :, None], float("-inf"))
        out[t0:t1] = torch.einsum("htc,chd->thd", torch.softmax(scores, dim=-1), v)
    return out
