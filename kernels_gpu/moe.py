"""Mixture-of-experts MLP in Triton (Mixtral, Qwen-MoE): top-k routing, then grouped GEMMs over expert-sorted rows.

    out[t] = sum over the top_k experts e of token t:  w[t, e] * down_e( silu(gate_e x_t) * up_e x_t )

Weights: gate_up [E, 2F, D] (each expert's F gate rows, then its F up rows), down [E, D, F] -- transformers 5's
stacked expert layout. A token-expert pair p = t * top_k + k is one row of work. Steps, all on the device with
no host sync (so a decode step can be captured in a CUDA graph; every size below follows from T, K, E, BLOCK_M):

  route_topk        logits = x @ router^T (x's dtype), softmax in f32 over all E, top-k, optional renormalisation
  align_by_expert   pairs sorted by expert, each expert's run padded to a multiple of BLOCK_M:

                      sorted_pairs  | e0 p p p - | e0 p - - - | e2 p p p p | e2 - - - - |  ...  (- = P: no pair)
                      block_expert  |     0      |     0      |     2      |     2      |  E E  (E: unused block)

                    so every BLOCK_M-row block belongs to exactly one expert (expert 1 got no pair: no block).
  moe_gate_up_kernel  per (row block, F tile): x rows gathered by token, h = silu(x Wg^T) * (x Wu^T) in f32,
                      stored in sorted order: h[P_pad, F]
  moe_down_kernel     per (row block, D tile): y = h Wd^T times the pair's routing weight, stored by pair: [P, D] f32
  combine             out[t] = sum_k y[t * top_k + k], cast to x's dtype

Blocks of unused padding (block_expert == E) return at once. Under TRITON_INTERPRET=1 (tests on the CPU) every
dot runs in f32 (DOT_F32): the interpreter mis-rounds bf16 dots.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels_gpu.triton_env import interpreting as _interpreting
from kernels_gpu.triton_env import tile_target as _target

# Tile sizes keyed by (target, phase); the phase follows from the average rows per expert (T * top_k / E):
# "decode" up to DECODE_ROWS_PER_EXPERT (short row blocks waste little padding; the weights stream once),
# "prefill" up to PREFILL_ROWS_PER_EXPERT, "prefill_large" beyond (taller blocks reuse each weight tile more).
# "interpret" is Triton's CPU interpreter (tests only): small tiles so that several tiles run on tiny shapes.
# CUDA values: benchmarks/gpu_moe.py --sweep on an H200 (Triton 3.6, 2026-11-27), Mixtral-8x7B and Qwen3-30B-A3B
# layer shapes at T = 1, 8 (decode), 512, 4096 (prefill).
TILE_SIZES = {
    ("cuda", "decode"): {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4},
    ("cuda", "prefill"): {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
    ("cuda", "prefill_large"): {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
    ("interpret", "decode"): {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    ("interpret", "prefill"): {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1},
    ("interpret", "prefill_large"): {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1},
}
DECODE_ROWS_PER_EXPERT = 16
PREFILL_ROWS_PER_EXPERT = 64
SHARED_MEMORY_BYTES = 224 << 10  # what one program's pipelined tiles may take (H100/H200: 227 KiB per block)


def fit_shared_memory(tiles: dict, itemsize: int) -> dict:
    """tiles with BLOCK_K, then num_stages, lowered until the gate|up kernel's pipelined tiles fit
    SHARED_MEMORY_BYTES, so the tables tuned for 2-byte inputs also serve float32 programs. Triton keeps
    num_stages - 1 buffers of x [BM, BK] and two weight tiles [BK, BN] (checked against its out-of-resources
    report on an H200: f32 decode tiles at BK 256 asked 3 x 144 x 256 x 4 bytes)."""
    t = dict(tiles)

    def need():
        return (t["num_stages"] - 1) * (t["BLOCK_M"] + 2 * t["BLOCK_N"]) * t["BLOCK_K"] * itemsize

    while need() > SHARED_MEMORY_BYTES and t["BLOCK_K"] > 32:
        t["BLOCK_K"] //= 2
    while need() > SHARED_MEMORY_BYTES and t["num_stages"] > 2:
        t["num_stages"] -= 1
    return t


def pick_phase(num_pairs: int, num_experts: int) -> str:
    """The TILE_SIZES phase for num_pairs token-expert pairs over num_experts experts."""
    rows_per_expert = num_pairs / num_experts
    if rows_per_expert <= DECODE_ROWS_PER_EXPERT:
        return "decode"
    return "prefill" if rows_per_expert <= PREFILL_ROWS_PER_EXPERT else "prefill_large"


@triton.jit
def moe_gate_up_kernel(
    x_ptr,  # [T, D]
    w_ptr,  # [E, 2F, D]: gate rows 0..F-1, up rows F..2F-1
    h_ptr,  # [P_pad, F] out, rows in sorted order
    sorted_pairs_ptr,  # i32[P_pad]: the pair in each sorted row (num_pairs = none)
    block_expert_ptr,  # i32[P_pad / BLOCK_M]: each row block's expert (num_experts = unused block)
    num_pairs, num_experts, top_k, num_features, hidden,
    stride_xt, stride_xd, stride_we, stride_wf, stride_wd, stride_hp, stride_hf,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One program per (BLOCK_M sorted rows, BLOCK_N of F): h = silu(x Wg^T) * (x Wu^T) for one expert's rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # i32[BM] sorted rows
    pairs = tl.load(sorted_pairs_ptr + rows)  # i32[BM]
    row_mask = pairs < num_pairs
    tokens = (pairs // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # i32[BN] feature columns
    n_mask = offs_n < num_features
    w_gate = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wf  # [1, BN] gate rows
    w_up = w_gate + num_features * stride_wf
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden
        a = tl.load(x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
        w_mask = k_mask[:, None] & n_mask[None, :]
        bg = tl.load(w_gate + offs_k[:, None] * stride_wd, mask=w_mask, other=0.0)  # [BK, BN]
        bu = tl.load(w_up + offs_k[:, None] * stride_wd, mask=w_mask, other=0.0)  # [BK, BN]
        if DOT_F32:
            a = a.to(tl.float32)
            acc_gate = tl.dot(a, bg.to(tl.float32), acc_gate, input_precision="ieee")
            acc_up = tl.dot(a, bu.to(tl.float32), acc_up, input_precision="ieee")
        else:
            acc_gate = tl.dot(a, bg.to(a.dtype), acc_gate)
            acc_up = tl.dot(a, bu.to(a.dtype), acc_up)
    h = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # f32[BM, BN]
    out = h_ptr + rows.to(tl.int64)[:, None] * stride_hp + offs_n[None, :] * stride_hf
    tl.store(out, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_down_kernel(
    h_ptr,  # [P_pad, F], rows in sorted order
    w_ptr,  # [E, D, F]
    y_ptr,  # f32[P, D] out, rows by pair
    sorted_pairs_ptr,  # i32[P_pad]
    block_expert_ptr,  # i32[P_pad / BLOCK_M]
    weights_ptr,  # f32[P]: each pair's routing weight
    num_pairs, num_experts, hidden, num_features,
    stride_hp, stride_hf, stride_we, stride_wd, stride_wf, stride_yp, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
):
    """One program per (BLOCK_M sorted rows, BLOCK_N of D): y[pair] = weight[pair] * (h Wd^T) for one expert."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= num_experts:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + rows)
    row_mask = pairs < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns (of D)
    n_mask = offs_n < hidden
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hp
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wd
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, num_features, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < num_features
        a = tl.load(h_rows + offs_k[None, :] * stride_hf, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_cols + offs_k[:, None] * stride_wf, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
    weight = tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)  # f32[BM]
    acc = acc * weight[:, None]
    out = y_ptr + pairs.to(tl.int64)[:, None] * stride_yp + offs_n[None, :] * stride_yd
    tl.store(out, acc, mask=row_mask[:, None] & n_mask[None, :])


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"fused_moe: {msg}")


def _validate(x, gate_up, down):
    _check(x.dim() == 2, f"x must be [T, D], got shape {tuple(x.shape)}")
    _check(x.dtype in (torch.bfloat16, torch.float16, torch.float32),
           f"x dtype {x.dtype} unsupported (bf16, fp16, fp32)")
    _check(gate_up.dim() == 3 and down.dim() == 3, f"gate_up must be [E, 2F, D] and down [E, D, F], got "
           f"{tuple(gate_up.shape)} and {tuple(down.shape)}")
    num_experts, two_f, hidden = gate_up.shape
    _check(two_f % 2 == 0, f"gate_up's second dim must be 2F (gate rows then up rows), got {two_f}")
    _check(hidden == x.shape[1], f"x has {x.shape[1]} features, gate_up expects {hidden}")
    _check(tuple(down.shape) == (num_experts, hidden, two_f // 2),
           f"down must be [E, D, F] = {[num_experts, hidden, two_f // 2]}, got {list(down.shape)}")
    for name, t in (("gate_up", gate_up), ("down", down)):
        _check(t.device == x.device, f"{name} is on {t.device}, x on {x.device}")


def route_topk(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool):
    """x [T, D], router [E, D] -> (weights f32[T, K], experts i32[T, K]), as Hugging Face routes: logits in x's
    dtype, softmax in float32 over all E experts, the top k, renormalised to sum to one when asked."""
    _check(router.dim() == 2 and router.shape[1] == x.shape[1],
           f"router must be [E, {x.shape[1]}], got {tuple(router.shape)}")
    _check(1 <= top_k <= router.shape[0], f"top_k must be in [1, {router.shape[0]}], got {top_k}")
    probs = torch.softmax(F.linear(x, router.to(x.dtype)).float(), dim=-1)  # f32[T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts.to(torch.int32)


def align_by_expert(experts: torch.Tensor, num_experts: int, block_m: int):
    """experts i32[T, K] -> (sorted_pairs i32[P_pad], block_expert i32[P_pad / block_m]), P = T * K.

    sorted_pairs lists the pairs p = t * K + k expert by expert (each expert's in token order), every expert's
    run padded with P to a multiple of block_m; block_expert[b] is the expert of rows b*block_m.., or num_experts
    past the last run. P_pad = P + E * (block_m - 1) rounded up to block_m bounds any routing, so the sizes follow
    from the shapes alone (no host sync)."""
    num_pairs = experts.numel()
    padded_rows = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    device = experts.device
    flat = experts.reshape(-1).to(torch.int64)  # i64[P]
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m  # i64[E] rows of each expert's run
    run_end = torch.cumsum(padded, 0)
    run_start = run_end - padded
    order = torch.argsort(flat, stable=True)  # i64[P] pairs by expert
    sorted_expert = flat[order]
    rank = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_expert]
    sorted_pairs = torch.full((padded_rows,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs[run_start[sorted_expert] + rank] = order.to(torch.int32)
    block_rows = torch.arange(0, padded_rows, block_m, device=device)
    block_expert = torch.searchsorted(run_end, block_rows, right=True).to(torch.int32)  # E past the last run
    return sorted_pairs, block_expert


def fused_experts(x, gate_up, down, weights, experts, *, tiles: dict | None = None):
    """The expert MLPs of routed tokens: x [T, D], gate_up [E, 2F, D], down [E, D, F], weights f32[T, K],
    experts i32[T, K] -> [T, D] in x's dtype."""
    _validate(x, gate_up, down)
    num_tokens, hidden = x.shape
    num_experts, two_f, _ = gate_up.shape
    num_features = two_f // 2
    top_k = experts.shape[1]
    _check(tuple(experts.shape) == (num_tokens, top_k) and tuple(weights.shape) == (num_tokens, top_k),
           f"weights and experts must be [T={num_tokens}, K], got {tuple(weights.shape)} and {tuple(experts.shape)}")
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_pairs = num_tokens * top_k
    t = tiles
    if t is None:
        t = TILE_SIZES[(_target(x.device), pick_phase(num_pairs, num_experts))]
        t = t if _interpreting() else fit_shared_memory(t, x.element_size())
    bm, bn, bk = t["BLOCK_M"], t["BLOCK_N"], t["BLOCK_K"]
    launch = {"num_warps": t["num_warps"], "num_stages": t["num_stages"]}
    dot_f32 = _interpreting() or x.dtype == torch.float32
    sorted_pairs, block_expert = align_by_expert(experts, num_experts, bm)
    num_blocks = block_expert.numel()

    h = torch.empty((sorted_pairs.numel(), num_features), dtype=x.dtype, device=x.device)  # [P_pad, F]
    moe_gate_up_kernel[(num_blocks, triton.cdiv(num_features, bn))](
        x, gate_up, h, sorted_pairs, block_expert,
        num_pairs, num_experts, top_k, num_features, hidden,
        x.stride(0), x.stride(1), gate_up.stride(0), gate_up.stride(1), gate_up.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=dot_f32, **launch,
    )
    y = torch.empty((num_pairs, hidden), dtype=torch.float32, device=x.device)  # f32[P, D]
    moe_down_kernel[(num_blocks, triton.cdiv(hidden, bn))](
        h, down, y, sorted_pairs, block_expert, weights.reshape(-1).float().contiguous(),
        num_pairs, num_experts, hidden, num_features,
        h.stride(0), h.stride(1), down.stride(0), down.stride(1), down.stride(2), y.stride(0), y.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_F32=dot_f32, **launch,
    )
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def fused_moe(x, router, gate_up, down, *, top_k: int, renormalize: bool, tiles: dict | None = None):
    """Mixture-of-experts MLP: x [T, D], router [E, D], gate_up [E, 2F, D], down [E, D, F] -> [T, D] x.dtype."""
    _validate(x, gate_up, down)
    _check(router.shape[0] == gate_up.shape[0], f"router has {router.shape[0]} experts, gate_up {gate_up.shape[0]}")
    weights, experts = route_topk(x, router, top_k, renormalize)
    return fused_experts(x, gate_up, down, weights, experts, tiles=tiles)


def ref_fused_experts(x, gate_up, down, weights, experts) -> torch.Tensor:
    """float32 reference of fused_experts (same routing in): a plain loop over each token's experts -> f32[T, D]."""
    x32, gu32, dn32 = x.float(), gate_up.float(), down.float()
    num_features = gate_up.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            e = int(experts[t, k])
            gate, up = gu32[e, :num_features] @ x32[t], gu32[e, num_features:] @ x32[t]  # f32[F]
            out[t] += float(weights[t, k]) * (dn32[e] @ (gate * torch.sigmoid(gate) * up))
    return out
