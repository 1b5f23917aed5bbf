"""H2O accumulated attention (the attention_mass op) over the ragged step for bf16/fp8/nvfp4 K pools, in place.

Semantics are those of `lowering.ops.ref_attention_mass`: the slots of this step's new tokens (slot_mapping) are
set to 0, then every cached key j of sequence s gains, per kv head, the float32 softmax probability of every
query row t of s (keys 0..pos(t), pos(t) = seq_len - (query_start[s+1] - t)) summed over the query heads of the
kv head's group. Only the K pool is read.

Design: zero_slots_kernel (one program per token row) clears the new slots; then attention_mass_kernel runs one
program per (query tile, kv head), a tile being BLOCK_Q rows of one sequence times the G query heads of the kv
head (as paged_attention_kernel lays its tiles out). It walks the sequence's keys twice in BLOCK_N steps through
the block table: pass 1 keeps each row's running max and sum of exp, pass 2 recomputes the scores, turns them
into probabilities exp(s - m) / l, sums each key's column over the tile's rows and atomically adds it to the key's
slot. K is dequantized exactly as paged_attention does (the nvfp4 tile loader is shared). The grid depends only
on shapes and max_q_len, so a launch is CUDA-graph capturable.
"""
import torch
import triton
import triton.language as tl

from kernels_gpu.paged_attention import KV_FORMATS, NVFP4_BLOCK, _load_nvfp4_tile
from kernels_gpu.triton_env import interpreting as _interpreting
from kernels_gpu.triton_env import tile_target

# Tile sizes keyed by (target, head_dim bucket): BLOCK_M rows (tokens x padded GQA heads) per program, BLOCK_N
# context positions per step. NOTE: not tuned on a GPU yet (a first guess sized like paged_attention's decode
# tiles); "interpret" is the CPU Triton interpreter (tests only).
TILE_SIZES = {
    ("cuda", 64): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ("cuda", 128): {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    ("cuda", 256): {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    **{("interpret", b): {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1} for b in (64, 128, 256)},
}


@triton.jit
def zero_slots_kernel(mass_ptr, slot_mapping_ptr, num_kv_heads, stride_slot, stride_mh, BLOCK_H: tl.constexpr):
    """mass[slot_mapping[t], :] = 0 for one token row t (slot -1: nothing). mass is viewed as [N * Bs, Hkv]."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t)
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        ptrs = mass_ptr + slot.to(tl.int64) * stride_slot + offs_h * stride_mh
        tl.store(ptrs, tl.zeros([BLOCK_H], dtype=tl.float32), mask=offs_h < num_kv_heads)


@triton.jit
def _scores(q, q_odd, q_pos, row_valid, start, kv_hi, qk_scale, bt_row, k_head, kv_head,
            k_cache_ptr, k_block_scale_ptr, block_size, head_dim,
            stride_kn, stride_kb, stride_kd, stride_ksn, stride_ksb, stride_ksh, stride_ksd, stride_btb,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KV_FORMAT: tl.constexpr, DOT_F32: tl.constexpr,
            NVFP4_ASM: tl.constexpr):
    """log2-scaled scores [BLOCK_M, BLOCK_N] of context positions start .. start + BLOCK_N - 1 (-inf where a row
    may not see a position), with the positions' validity (< kv_hi) and their block / offset in the pool."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_valid = offs_n < kv_hi
    page = offs_n // block_size
    off = offs_n % block_size
    blk = tl.load(bt_row + page * stride_btb, mask=n_valid, other=0).to(tl.int64)
    k_row = blk * stride_kn + off * stride_kb + k_head  # i64[BLOCK_N]
    if KV_FORMAT == 2:
        k_srow = blk * stride_ksn + off * stride_ksb + kv_head * stride_ksh
        k, k_odd = _load_nvfp4_tile(k_cache_ptr, k_block_scale_ptr, k_row, k_srow, n_valid, head_dim,
                                    stride_kd, stride_ksd, BLOCK_N, BLOCK_D, NVFP4_ASM, True, False)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            s = tl.dot(q_odd, tl.trans(k_odd.to(tl.float32)), s, input_precision="ieee")
        else:
            # NOTE: e2m1 x e4m3 (x 2**-8 on the asm path) has <= 6 significant bits: exact in bf16 and f16
            s = tl.dot(q, tl.trans(k.to(q.dtype)))
            s = tl.dot(q_odd, tl.trans(k_odd.to(q.dtype)), s)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        k_ptrs = k_cache_ptr + k_row[None, :] + offs_d[:, None] * stride_kd
        k = tl.load(k_ptrs, mask=n_valid[None, :] & (offs_d < head_dim)[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if DOT_F32:
            s = tl.dot(q, k.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, k.to(q.dtype))  # fp8 -> bf16 / f16 is exact; a plain pool has q's dtype here
    visible = row_valid[:, None] & n_valid[None, :] & (offs_n[None, :] <= q_pos[:, None])
    s = tl.where(visible, s * qk_scale, float("-inf"))
    return s, n_valid, blk, off


@triton.jit
def attention_mass_kernel(
    mass_ptr,  # f32[N, block_size, Hkv], updated in place
    q_ptr,  # [T, Hq, D]
    k_cache_ptr,  # [N, block_size, Hkv, D] bf16/f16/f32 | fp8 | u8[..., D//2] nvfp4
    k_block_scale_ptr,  # fp8[N, block_size, Hkv, D//16] (nvfp4 only)
    k_scale_ptr,  # f32[Hkv] (fp8) | f32[] (nvfp4)
    query_start_ptr,  # i32[S+1]
    seq_lens_ptr,  # i32[S]
    block_tables_ptr,  # i32[S, B]
    slot_mapping_ptr,  # i32[T]: rows with slot -1 are padding and add no mass
    sm_scale, num_seqs, block_size, head_dim,
    stride_mn, stride_mb, stride_mh,
    stride_qt, stride_qh, stride_qd,
    stride_kn, stride_kb, stride_kh, stride_kd,
    stride_ksn, stride_ksb, stride_ksh, stride_ksd,
    stride_bts, stride_btb,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KV_FORMAT: tl.constexpr, DOT_F32: tl.constexpr,
    NVFP4_ASM: tl.constexpr,
):
    pid_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    # The sequence of this tile: the largest s with query_start[s] // BLOCK_Q + s <= pid_tile (as paged_attention)
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

    # Rows: token-major, the GQA heads of this kv head packed inside each token.
    offs_m = tl.arange(0, BLOCK_M)
    tok_local = first_tok + offs_m // GROUP_PAD
    head_in_group = offs_m % GROUP_PAD
    row_valid = (offs_m // GROUP_PAD < BLOCK_Q) & (tok_local < q_len) & (head_in_group < GROUP)
    q_pos = ctx_offset + tok_local  # i32[BLOCK_M] last context index each row sees
    tok = (q_start + tok_local).to(tl.int64)
    row_slot = tl.load(slot_mapping_ptr + tok, mask=row_valid, other=-1)
    row_valid = row_valid & (row_slot >= 0)
    head = kv_head * GROUP + head_in_group
    q_row = q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh
    if KV_FORMAT == 2:
        # nvfp4 tiles come as even / odd halves of D (see _load_nvfp4_tile): split q the same way
        offs_h = tl.arange(0, BLOCK_D // 2)
        h_mask = row_valid[:, None] & (offs_h < head_dim // 2)[None, :]
        q = tl.load(q_row + (2 * offs_h)[None, :] * stride_qd, mask=h_mask, other=0.0)
        q_odd = tl.load(q_row + (2 * offs_h + 1)[None, :] * stride_qd, mask=h_mask, other=0.0)
    else:
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(q_row + offs_d[None, :] * stride_qd, mask=row_valid[:, None] & (offs_d < head_dim)[None, :],
                    other=0.0)
        q_odd = q
    if DOT_F32:
        q = q.to(tl.float32)
        q_odd = q_odd.to(tl.float32)

    k_scale = 1.0
    if KV_FORMAT == 1:
        k_scale = tl.load(k_scale_ptr + kv_head)
    elif KV_FORMAT == 2:
        k_scale = tl.load(k_scale_ptr)
        if NVFP4_ASM:
            k_scale = k_scale * 256.0  # paged_attention.NVFP4_ASM_FACTOR: the asm tiles hold value * 2**-8
    qk_scale = sm_scale * k_scale * 1.4426950408889634  # log2(e): softmax via exp2

    kv_hi = ctx_offset + tl.minimum(first_tok + BLOCK_Q, q_len)  # the tile's last row sees positions < kv_hi
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
    k_head = kv_head.to(tl.int64) * stride_kh

    # Pass 1: each row's max and sum of exp2 over the positions it sees.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, kv_hi, BLOCK_N):
        s, n_valid, blk, off = _scores(q, q_odd, q_pos, row_valid, start, kv_hi, qk_scale, bt_row, k_head, kv_head,
                                       k_cache_ptr, k_block_scale_ptr, block_size, head_dim,
                                       stride_kn, stride_kb, stride_kd, stride_ksn, stride_ksb, stride_ksh,
                                       stride_ksd, stride_btb, BLOCK_N, BLOCK_D, KV_FORMAT, DOT_F32, NVFP4_ASM)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet stay NaN-free
        l_i = l_i * tl.math.exp2(m_i - m_safe) + tl.sum(tl.math.exp2(s - m_safe[:, None]), 1)
        m_i = m_new

    # Pass 2: probabilities, summed over the tile's rows, added to each position's slot.
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = 1.0 / tl.where(l_i == 0.0, 1.0, l_i)
    mass_head = mass_ptr + kv_head.to(tl.int64) * stride_mh
    for start in range(0, kv_hi, BLOCK_N):
        s, n_valid, blk, off = _scores(q, q_odd, q_pos, row_valid, start, kv_hi, qk_scale, bt_row, k_head, kv_head,
                                       k_cache_ptr, k_block_scale_ptr, block_size, head_dim,
                                       stride_kn, stride_kb, stride_kd, stride_ksn, stride_ksb, stride_ksh,
                                       stride_ksd, stride_btb, BLOCK_N, BLOCK_D, KV_FORMAT, DOT_F32, NVFP4_ASM)
        p = tl.math.exp2(s - m_safe[:, None]) * inv_l[:, None]  # masked scores give exactly 0
        col = tl.sum(p, 0)  # f32[BLOCK_N]
        tl.atomic_add(mass_head + blk * stride_mn + off * stride_mb, col, mask=n_valid, sem="relaxed")


def _check(cond: bool, msg: str):
    if not cond:
        raise ValueError(f"attention_mass: {msg}")


def _validate(q, k_cache, query_start, seq_lens, block_tables, slot_mapping, mass_pool, kv_format, k_scale,
              k_block_scale):
    _check(kv_format in KV_FORMATS, f"kv_format must be None or one of {sorted(KV_FORMATS)}, got {kv_format!r}")
    _check(q.dim() == 3, f"q must be [T, Hq, D], got shape {tuple(q.shape)}")
    _check(q.dtype in (torch.bfloat16, torch.float16, torch.float32), f"q dtype {q.dtype} unsupported")
    num_tokens, num_q_heads, head_dim = q.shape
    _check(head_dim % 16 == 0 and 16 <= head_dim <= 256,
           f"head_dim must be a multiple of 16 in [16, 256], got {head_dim}")
    _check(k_cache.dim() == 4, f"k_cache must be [N, block_size, Hkv, D*], got {tuple(k_cache.shape)}")
    num_blocks, block_size, num_kv_heads, stored_dim = k_cache.shape
    _check(block_size >= 1, "block_size must be >= 1")
    _check(num_kv_heads >= 1 and num_q_heads % num_kv_heads == 0,
           f"Hq={num_q_heads} must be a multiple of Hkv={num_kv_heads}")
    if kv_format == "bf16":
        _check(k_cache.dtype in (torch.bfloat16, torch.float16, torch.float32),
               f"a plain K pool must be bf16/fp16/fp32, got {k_cache.dtype}")
        _check(stored_dim == head_dim, f"cache head_dim {stored_dim} != q head_dim {head_dim}")
    elif kv_format == "fp8":
        _check(k_cache.dtype == torch.float8_e4m3fn, f"fp8 KV format needs float8_e4m3fn, got {k_cache.dtype}")
        _check(stored_dim == head_dim, f"cache head_dim {stored_dim} != q head_dim {head_dim}")
        _check(k_scale is not None and k_scale.dtype == torch.float32 and tuple(k_scale.shape) == (num_kv_heads,),
               f"fp8 KV format needs k_scale f32[{num_kv_heads}]")
    else:
        _check(k_cache.dtype == torch.uint8, f"nvfp4 KV format needs a uint8 packed cache, got {k_cache.dtype}")
        _check(stored_dim * 2 == head_dim, f"nvfp4 cache last dim must be D//2={head_dim // 2}, got {stored_dim}")
        bs_shape = (num_blocks, block_size, num_kv_heads, head_dim // NVFP4_BLOCK)
        _check(k_block_scale is not None and k_block_scale.dtype == torch.float8_e4m3fn
               and tuple(k_block_scale.shape) == bs_shape,
               f"nvfp4 KV format needs k_block_scale float8_e4m3fn{list(bs_shape)}")
        _check(k_scale is not None and k_scale.dtype == torch.float32 and k_scale.numel() == 1,
               "nvfp4 KV format needs k_scale as an f32 scalar tensor (the per-layer global scale)")
        _check(head_dim >= 32 or q.device.type != "cuda" or _interpreting(),
               f"nvfp4 K needs head_dim >= 32 on the GPU (the even / odd half dots need K >= 16), got {head_dim}")
    _check(query_start.dim() == 1 and query_start.dtype == torch.int32 and query_start.numel() >= 2,
           "query_start must be i32[S+1] with S >= 1")
    num_seqs = query_start.numel() - 1
    _check(seq_lens.dtype == torch.int32 and tuple(seq_lens.shape) == (num_seqs,), f"seq_lens must be i32[{num_seqs}]")
    _check(block_tables.dtype == torch.int32 and block_tables.dim() == 2 and block_tables.shape[0] == num_seqs,
           f"block_tables must be i32[{num_seqs}, B]")
    _check(slot_mapping.dtype == torch.int32 and tuple(slot_mapping.shape) == (num_tokens,),
           f"slot_mapping must be i32[{num_tokens}]")
    _check(mass_pool.dtype == torch.float32 and tuple(mass_pool.shape) == (num_blocks, block_size, num_kv_heads),
           f"mass_pool must be f32[{num_blocks}, {block_size}, {num_kv_heads}], got {mass_pool.dtype} "
           f"{list(mass_pool.shape)}")
    _check(mass_pool.stride(0) == block_size * mass_pool.stride(1),
           "mass_pool's slots must be evenly strided (a [N * block_size, Hkv] view)")
    for name, t in (("k_cache", k_cache), ("query_start", query_start), ("seq_lens", seq_lens),
                    ("block_tables", block_tables), ("slot_mapping", slot_mapping), ("mass_pool", mass_pool)):
        _check(t.device == q.device, f"{name} is on {t.device}, q on {q.device}")


def attention_mass(
    q,  # [T, Hq, D] bf16/fp16/f32
    k_cache,  # [N, block_size, Hkv, D] bf16/f16/f32 | fp8 e4m3 | u8[N, block_size, Hkv, D//2] (nvfp4)
    query_start,  # i32[S+1]
    seq_lens,  # i32[S] context length after this step (includes the new tokens)
    block_tables,  # i32[S, B]
    slot_mapping,  # i32[T] cache slot of each new token (-1: none)
    mass_pool,  # f32[N, block_size, Hkv], updated in place
    *,
    scale: float,
    max_q_len=None,
    max_seq_len=None,
    kv_format: str | None = None,
    k_scale=None,  # f32[Hkv] (fp8) | f32[] global scale (nvfp4)
    k_block_scale=None,  # fp8[N, block_size, Hkv, D//16] (nvfp4)
    v_scale=None, v_block_scale=None,  # accepted (paged_attention's keyword set) and ignored: V is never read
):
    """Zero the new tokens' slots of mass_pool, then add every query row's softmax over its causal context
    (summed over each kv head's query heads) to the keys' slots; returns mass_pool (updated in place).

    kv_format: None or "bf16" (plain pool), "fp8", "nvfp4". Pass max_q_len (a host int bounding every sequence's
    new tokens) to avoid a device sync, as when capturing CUDA graphs; max_seq_len is accepted for symmetry with
    paged_attention and unused (each program reads its sequence's length on the device).
    """
    del max_seq_len, v_scale, v_block_scale
    kv_format = "bf16" if kv_format is None else kv_format
    _validate(q, k_cache, query_start, seq_lens, block_tables, slot_mapping, mass_pool, kv_format, k_scale,
              k_block_scale)
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0:
        return mass_pool
    zero_slots_kernel[(num_tokens,)](mass_pool, slot_mapping, num_kv_heads, mass_pool.stride(1),
                                     mass_pool.stride(2), BLOCK_H=max(16, triton.next_power_of_2(num_kv_heads)))
    if max_q_len is None:
        max_q_len = int((query_start[1:] - query_start[:-1]).max().item())
    max_q_len = max(1, int(max_q_len))

    bucket = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    tiles = TILE_SIZES[(tile_target(q.device), bucket)]
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, min(tiles["BLOCK_M"] // group_pad, triton.next_power_of_2(max_q_len)))
    block_m = max(16, block_q * group_pad)
    num_tiles = num_tokens // block_q + num_seqs  # upper bound of sum_s cdiv(q_len_s, block_q)
    dummy = seq_lens
    k_bs = k_block_scale if kv_format == "nvfp4" else dummy
    ks = k_scale if kv_format != "bf16" else dummy
    k_bs_strides = k_bs.stride() if kv_format == "nvfp4" else (0, 0, 0, 0)
    dot_f32 = _interpreting() or q.dtype == torch.float32 or (kv_format == "bf16" and k_cache.dtype != q.dtype)
    attention_mass_kernel[(num_tiles, num_kv_heads)](
        mass_pool, q, k_cache, k_bs, ks, query_start, seq_lens, block_tables, slot_mapping,
        float(scale), num_seqs, block_size, head_dim,
        *mass_pool.stride(), *q.stride(), *k_cache.stride(), *k_bs_strides, *block_tables.stride(),
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=tiles["BLOCK_N"],
        BLOCK_D=triton.next_power_of_2(head_dim), KV_FORMAT=KV_FORMATS[kv_format], DOT_F32=dot_f32,
        NVFP4_ASM=not _interpreting() and q.device.type == "cuda",
        num_warps=tiles["num_warps"], num_stages=tiles["num_stages"],
    )
    return mass_pool

