"""Speculative decoding on the device: n-gram drafting and the greedy accept rule as two small kernels, so that a
verification step, the accept rule and the next step's inputs all run on the GPU and the host never waits between
steps (lowering/backends/cuda_spec.py runs them around the verification CUDA graph; runtime/engine.py's device
speculation collects the tokens a step or two later).

Per sequence s, the device holds its tokens so far, hist[s, :n] (prompt and output; the last one, hist[s, n - 1],
has no K/V yet), and a uniform verification step of Q = k + 1 rows:

ngram_propose: the draft, by the rule of runtime.speculative.NgramProposer (prompt lookup): for n-gram sizes
  NMAX down to NMIN, the latest end e (size <= e <= n - 1) with hist[e - size: e] == hist[n - size: n]; the first
  size with a match gives draft = hist[e: min(e + k, n)] ("real" tokens, 0..k of them). A draft shorter than k is
  filled with its last token (with hist[n - 1] when empty), as the engine fills host drafts for uniform steps.
  It writes the step's rows s * Q + i: token_ids = [hist[n - 1], draft...], positions n - 1 + i, slot_mapping
  from the block table (block_tables[s, pos // B] * B + pos % B), seq_lens[s] = n - 1 + Q, and real[s] = how many
  real tokens a draft of KMAX (>= k) tokens would have: Q = 1 runs a plain decode step and still tells the host
  whether drafts are there to be had.
spec_accept_greedy: given the step's greedy targets t[0..Q) (the argmax of each row), a = the number of leading
  i < k with t[i] == draft[i] (token_ids[s * Q + i + 1]); the step emits t[0..a]: they are appended to hist,
  n += a + 1, and (t, a + 1, real) go to the output ring the host reads back (rows of ring_stride >= Q tokens). K/V
  written for rejected drafts lie past the new n - 1 and are overwritten by later steps.

Both are integer-exact, so the references below (numpy, on the host) must agree with them bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from kernels_gpu.triton_env import tile_target

# history positions one pass of the propose kernel compares at once (the cuda entry: a 4k-token history in 2 passes
# per n-gram size)
PROPOSE_BLOCK = {"cuda": 2048, "interpret": 64}


@triton.jit
def ngram_propose_kernel(hist_ptr, hist_stride, n_ptr, tok_ptr, pos_ptr, slot_ptr, seq_lens_ptr, bt_ptr, bt_stride,
                         real_ptr, block_size, Q: tl.constexpr, KMAX: tl.constexpr, NMIN: tl.constexpr,
                         NMAX: tl.constexpr, BLOCK: tl.constexpr, BLOCK_Q: tl.constexpr):
    s = tl.program_id(0)
    n = tl.load(n_ptr + s)
    row = hist_ptr + s.to(tl.int64) * hist_stride
    best = n * 0 - 1  # the chosen match's end, or -1
    for size in tl.static_range(NMAX, NMIN - 1, -1):
        found = n * 0 - 1
        for start in range(0, n, BLOCK):
            e = start + tl.arange(0, BLOCK)
            ok = (e >= size) & (e <= n - 1)
            ok = ok & (e * 0 + n >= size)
            for i in tl.static_range(size):
                a = tl.load(row + tl.where(ok, e - size + i, 0), mask=ok, other=-1)
                t = tl.load(row + tl.maximum(n - size + i, 0))
                ok = ok & (a == t)
            found = tl.maximum(found, tl.max(tl.where(ok, e, -1), axis=0))
        best = tl.where(best < 0, found, best)
    k = Q - 1
    avail = tl.where(best >= 0, tl.minimum(n - best, k), 0)
    i = tl.arange(0, BLOCK_Q)
    live = i < Q
    d = i - 1  # draft index of row i (row 0 is the last known token)
    fill = tl.where(avail > 0, best + avail - 1, n - 1)
    src = tl.where(i == 0, n - 1, tl.where(d < avail, best + d, fill))
    tokens = tl.load(row + src, mask=live, other=0)
    pos = n - 1 + i
    blocks = tl.load(bt_ptr + s.to(tl.int64) * bt_stride + pos // block_size, mask=live, other=0)
    out = s * Q + i
    tl.store(tok_ptr + out, tokens, mask=live)
    tl.store(pos_ptr + out, pos, mask=live)
    tl.store(slot_ptr + out, blocks * block_size + pos % block_size, mask=live)
    tl.store(seq_lens_ptr + s, n - 1 + Q)
    tl.store(real_ptr + s, tl.where(best >= 0, tl.minimum(n - best, KMAX), 0))


@triton.jit
def spec_accept_greedy_kernel(targets_ptr, tok_ptr, hist_ptr, hist_stride, n_ptr, real_ptr, ring_tok_ptr, ring_stride,
                              ring_count_ptr, ring_real_ptr, Q: tl.constexpr, BLOCK_Q: tl.constexpr):
    s = tl.program_id(0)
    i = tl.arange(0, BLOCK_Q)
    live = i < Q
    targets = tl.load(targets_ptr + s * Q + i, mask=live, other=0)
    drafts = tl.load(tok_ptr + s * Q + i + 1, mask=i < Q - 1, other=-1)
    match = (targets == drafts) & (i < Q - 1)
    a = tl.min(tl.where(match, BLOCK_Q, i), axis=0)  # the first row whose draft was rejected (or the bonus row)
    n = tl.load(n_ptr + s)
    tl.store(hist_ptr + s.to(tl.int64) * hist_stride + n + i, targets, mask=i <= a)
    tl.store(n_ptr + s, n + a + 1)
    tl.store(ring_tok_ptr + s * ring_stride + i, targets, mask=live)
    tl.store(ring_count_ptr + s, a + 1)
    tl.store(ring_real_ptr + s, tl.load(real_ptr + s))


def _check_i32(name: str, t, dim: int, device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != dim:
        got = f"{t.dtype}[{tuple(t.shape)}]" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an int32 tensor of {dim} dimension(s), got {got}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, the history on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _block_q(q: int) -> int:
    return max(2, triton.next_power_of_2(q))


def ngram_propose(hist: torch.Tensor, n: torch.Tensor, block_tables: torch.Tensor, *, q: int, block_size: int,
                  ngram_min: int, ngram_max: int, token_ids: torch.Tensor, positions: torch.Tensor,
                  slot_mapping: torch.Tensor, seq_lens: torch.Tensor, real: torch.Tensor,
                  max_draft: int | None = None) -> None:
    """Write one uniform verification step's per-row inputs for the sequences of hist (see the module docstring).

    hist i32[S, W], n i32[S] (1 <= n, n - 1 + q <= the block tables' reach and n + q <= W are the caller's to
    guarantee), block_tables i32[S', width] (S' >= S); outputs token_ids / positions / slot_mapping i32[>= S q],
    seq_lens / real i32[>= S], written in place, no sync. max_draft: the draft length real[] counts up to (default
    q - 1)."""
    device = hist.device
    _check_i32("hist", hist, 2, device)
    for name, t in (("n", n), ("token_ids", token_ids), ("positions", positions), ("slot_mapping", slot_mapping),
                    ("seq_lens", seq_lens), ("real", real)):
        _check_i32(name, t, 1, device)
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be an int32 [S, width] tensor with contiguous rows")
    s = hist.shape[0]
    if not 1 <= ngram_min <= ngram_max:
        raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
    kmax = q - 1 if max_draft is None else int(max_draft)
    if kmax < q - 1:
        raise ValueError(f"ngram_propose: max_draft={kmax} is shorter than the step's draft ({q - 1})")
    rows = min(token_ids.shape[0], positions.shape[0], slot_mapping.shape[0])
    per_seq = min(seq_lens.shape[0], real.shape[0])
    if q < 1 or n.shape[0] != s or block_tables.shape[0] < s or rows < s * q or per_seq < s:
        raise ValueError(f"ngram_propose: {s} sequences of q={q} rows do not fit the given buffers")
    if s == 0:
        return
    ngram_propose_kernel[(s,)](hist, hist.stride(0), n, token_ids, positions, slot_mapping, seq_lens, block_tables,
                               block_tables.stride(0), real, block_size, Q=q, KMAX=max(kmax, 1), NMIN=ngram_min,
                               NMAX=ngram_max,
                               BLOCK=PROPOSE_BLOCK[tile_target(device)], BLOCK_Q=_block_q(q), num_warps=4)


def spec_accept_greedy(targets: torch.Tensor, token_ids: torch.Tensor, hist: torch.Tensor, n: torch.Tensor,
                       real: torch.Tensor, ring_tokens: torch.Tensor, ring_counts: torch.Tensor,
                       ring_real: torch.Tensor, *, q: int) -> None:
    """The greedy accept rule of one uniform verification step on the device (see the module docstring).

    targets / token_ids i32[>= S q] (the step's argmax and its input rows), hist i32[S, W], n / real i32[S];
    out: ring_tokens i32[S, >= q] (rows contiguous), ring_counts / ring_real i32[S]. hist and n are updated in place,
    no sync."""
    device = hist.device
    _check_i32("hist", hist, 2, device)
    for name, t in (("targets", targets), ("token_ids", token_ids), ("n", n), ("real", real),
                    ("ring_counts", ring_counts), ("ring_real", ring_real)):
        _check_i32(name, t, 1, device)
    _check_i32("ring_tokens", ring_tokens, 2, device)
    s = hist.shape[0]
    if targets.shape[0] < s * q or token_ids.shape[0] < s * q or ring_tokens.shape[0] != s or ring_tokens.shape[1] < q \
            or n.shape[0] != s or real.shape[0] < s or ring_counts.shape[0] < s or ring_real.shape[0] < s:
        raise ValueError(f"spec_accept_greedy: {s} sequences of q={q} rows do not fit the given buffers")
    if s == 0:
        return
    spec_accept_greedy_kernel[(s,)](targets, token_ids, hist, hist.stride(0), n, real, ring_tokens,
                                    ring_tokens.stride(0), ring_counts, ring_real, Q=q, BLOCK_Q=_block_q(q),
                                    num_warps=1)


# -- references (numpy, host) --------------------------------------------------------------------------------------

def ref_ngram_draft(tokens, k: int, ngram_min: int, ngram_max: int) -> tuple[list[int], int]:
    """(the k-token uniform draft, how many of its tokens are real) for one sequence, by NgramProposer's rule with the
    engine's filler; a plain scan."""
    tokens = [int(t) for t in tokens]
    n = len(tokens)
    real: list[int] = []
    for size in range(ngram_max, ngram_min - 1, -1):
        if n < size:
            continue
        tail = tokens[n - size:]
        for e in range(n - 1, size - 1, -1):
            if tokens[e - size: e] == tail:
                real = tokens[e: e + k]
                break
        else:
            continue
        break
    filler = real[-1] if real else tokens[-1]
    return real + [filler] * (k - len(real)), len(real)


def ref_ngram_propose(hist: np.ndarray, n: np.ndarray, block_tables: np.ndarray, *, q: int, block_size: int,
                      ngram_min: int, ngram_max: int, max_draft: int | None = None) -> dict:
    """ngram_propose's outputs for S sequences: token_ids / positions / slot_mapping i32[S q], seq_lens / real
    i32[S]."""
    kmax = max(q - 1 if max_draft is None else max_draft, 1)
    s = hist.shape[0]
    out = {name: np.zeros(s * q, np.int32) for name in ("token_ids", "positions", "slot_mapping")}
    out.update(seq_lens=np.zeros(s, np.int32), real=np.zeros(s, np.int32))
    for i in range(s):
        m = int(n[i])
        draft = ref_ngram_draft(hist[i, :m], q - 1, ngram_min, ngram_max)[0]
        real = ref_ngram_draft(hist[i, :m], kmax, ngram_min, ngram_max)[1]
        rows = slice(i * q, (i + 1) * q)
        pos = np.arange(m - 1, m - 1 + q)
        out["token_ids"][rows] = [hist[i, m - 1]] + draft
        out["positions"][rows] = pos
        out["slot_mapping"][rows] = block_tables[i, pos // block_size] * block_size + pos % block_size
        out["seq_lens"][i] = m - 1 + q
        out["real"][i] = real
    return out


def ref_accept_greedy(targets: np.ndarray, drafts: np.ndarray) -> int:
    """How many leading drafts the greedy targets accept: a such that targets[:a] == drafts[:a] and a = len(drafts)
    or targets[a] != drafts[a]; the step emits targets[:a + 1]."""
    a = 0
    while a < len(drafts) and int(targets[a]) == int(drafts[a]):
        a += 1
    return a
