"""Mixture-of-experts MLP on TPU, megablox style: a grouped matmul (gmm) over rows sorted by expert.

gmm(lhs [M, K], rhs [G, N, K], group_sizes i32[G]) -> [M, N]: rows group_offsets[g] .. group_offsets[g+1] of lhs
(groups sorted, contiguous from row 0) are multiplied by rhs[g]^T. Rows past sum(group_sizes) come out
unspecified. rhs is "NT" ([out, in] per group), the layout of Hugging Face's stacked experts: gate_up [E, 2F, D]
and down [E, D, F].

Grid (N / bn, V, K / bk), K innermost. The middle axis walks "visits": a visit is one (group, row tile) pair,
in row order, so a row tile that straddles a group boundary is visited once per group it holds:

    rows     | g0 g0 g0 g0 | g0 g0 g2 g2 | g2 g2 g2 g2 |      (g1 empty: no visit)
    visits     (g0, 0)       (g0, 1) (g2, 1)   (g2, 2)

Visit metadata (group, tile per visit, the number of real visits, the group offsets) is computed in XLA and
reaches the kernel by scalar prefetch, so the index maps pick the lhs row tile and the group's rhs tile. V is
bounded by the shapes (row tiles + G - 1); visits past the real count repeat the last one and do nothing. An
f32 VMEM accumulator gathers the K steps; at the last K step the visit's own rows of the output tile are written
(a mask on the row index), the others kept: the output block stays in VMEM while consecutive visits share
its tile, so every row ends up written by its own group's visit.

moe_experts(x, gate_up, down, weights, experts) runs the expert MLPs of routed tokens with two gmms (gate|up,
then down), SiLU-and-mul in between, the routing weights and the per-token sum in XLA, rounding where
lowering.ops.ref_moe rounds. The router itself (softmax / top-k) is XLA in the caller.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import tuning
from kernels_pallas.norms import resolve_interpret, vmem_limit_bytes


def group_metadata(group_sizes, num_rows: int, block_m: int):
    """group_sizes i32[G], rows padded to num_rows (a multiple of block_m) -> (group_offsets i32[G+1],
    visit_group i32[V], visit_tile i32[V], num_visits i32[1]) with V = num_rows / block_m + G - 1."""
    num_groups = group_sizes.shape[0]
    num_visits_max = num_rows // block_m + num_groups - 1
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_tile = starts // block_m
    tiles = jnp.where(sizes > 0, (ends - 1) // block_m - first_tile + 1, 0)  # i32[G] row tiles each group touches
    visit_end = jnp.cumsum(tiles)
    num_visits = visit_end[-1]
    v = jnp.arange(num_visits_max, dtype=jnp.int32)
    # visits past the real ones repeat the last real visit (same output block: nothing is written back twice)
    v = jnp.minimum(v, jnp.maximum(num_visits - 1, 0))
    group = jnp.minimum(jnp.searchsorted(visit_end, v, side="right"), num_groups - 1).astype(jnp.int32)
    tile = first_tile[group] + v - (visit_end[group] - tiles[group])
    # NOTE: clamped so that group sizes summing past the rows (a caller's bug) cannot index past the arrays
    tile = jnp.minimum(tile, num_rows // block_m - 1).astype(jnp.int32)
    offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
    return offsets, group, tile, num_visits.reshape(1).astype(jnp.int32)


def gmm_kernel(offsets_ref, group_ref, tile_ref, num_visits_ref,  # scalar prefetch (SMEM)
               lhs_ref,  # [bm, bk]
               rhs_ref,  # [bn, bk] of the visit's group
               out_ref,  # [bm, bn]
               acc_ref,  # f32[bm, bn] VMEM scratch
               *, n_k: int, block_m: int):
    v, k = pl.program_id(1), pl.program_id(2)
    active = v < num_visits_ref[0]

    @pl.when(k == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        acc_ref[...] += jax.lax.dot_general(lhs_ref[...], rhs_ref[...], (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)

    @pl.when(active & (k == n_k - 1))
    def _store():
        g = group_ref[v]
        rows = tile_ref[v] * block_m + jax.lax.broadcasted_iota(jnp.int32, out_ref.shape, 0)
        mine = (rows >= offsets_ref[g]) & (rows < offsets_ref[g + 1])
        out_ref[...] = jnp.where(mine, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def _pick_block(dim: int, block: int, unit: int) -> int:
    """block rounded down to `unit`, or the whole dim when it fits in one block (a full dim is always legal)."""
    if dim <= block:
        return dim
    return max(unit, block // unit * unit)


def _pick_block_k(k: int, block: int) -> int:
    """A K tile must divide K exactly (padding would enter the sums): the largest multiple of 128 <= block that
    divides K, else K."""
    for bk in range(block // 128 * 128, 0, -128):
        if k % bk == 0:
            return bk
    return k


def gmm(lhs, rhs, group_sizes, *, block_m=None, block_n=None, block_k=None, interpret=None):
    """lhs [M, K] (rows sorted by group), rhs [G, N, K], group_sizes i32[G] (non-negative, summing to at most M)
    -> [M, N] in lhs.dtype (f32 sums)."""
    if lhs.ndim != 2 or rhs.ndim != 3 or rhs.shape[2] != lhs.shape[1]:
        raise ValueError(f"gmm: lhs must be [M, K] and rhs [G, N, K], got {lhs.shape} and {rhs.shape}")
    if group_sizes.shape != (rhs.shape[0],):
        raise ValueError(f"gmm: group_sizes must be i32[G={rhs.shape[0]}], got shape {group_sizes.shape}")
    m, kdim = lhs.shape
    num_groups, n, _ = rhs.shape
    blocks = tuning.block_sizes("gmm")
    sub = 8 * max(1, 4 // lhs.dtype.itemsize)  # sublane tiling of lhs rows
    bm = max(sub, (block_m or blocks["block_m"]) // sub * sub)
    bn = _pick_block(n, block_n or blocks["block_n"], 128)
    bk = block_k or _pick_block_k(kdim, blocks["block_k"])
    if kdim % bk:
        raise ValueError(f"gmm: block_k={bk} must divide K={kdim}")
    num_rows = pl.cdiv(m, bm) * bm
    lhs_p = jnp.pad(lhs, ((0, num_rows - m), (0, 0)))  # [M_pad, K]
    rhs = rhs.astype(lhs.dtype)
    offsets, group, tile, num_visits = group_metadata(group_sizes, num_rows, bm)
    n_k = kdim // bk
    itemsize = lhs.dtype.itemsize
    vmem = 2 * (bm * bk + bn * bk + bm * bn) * itemsize + bm * bn * 4
    out = pl.pallas_call(
        functools.partial(gmm_kernel, n_k=n_k, block_m=bm),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(pl.cdiv(n, bn), group.shape[0], n_k),
            in_specs=[pl.BlockSpec((bm, bk), lambda j, v, k, offs, grp, til, nv: (til[v], k)),
                      pl.BlockSpec((None, bn, bk), lambda j, v, k, offs, grp, til, nv: (grp[v], j, k))],
            out_specs=pl.BlockSpec((bm, bn), lambda j, v, k, offs, grp, til, nv: (til[v], j)),
            scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((num_rows, n), lhs.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit_bytes(vmem)),
        interpret=resolve_interpret(interpret),
        name="gmm",
    )(offsets, group, tile, num_visits, lhs_p, rhs)
    return out[:m]


def ref_gmm(lhs, rhs, group_sizes):
    """float32 reference of gmm: each row times its group's rhs^T (rows past sum(group_sizes) are 0)."""
    m = lhs.shape[0]
    group_of_row = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")  # G past the end
    w = jnp.take(rhs.astype(jnp.float32), jnp.minimum(group_of_row, rhs.shape[0] - 1), axis=0)  # f32[M, N, K]
    out = jnp.einsum("mk,mnk->mn", lhs.astype(jnp.float32), w)
    return jnp.where((group_of_row < rhs.shape[0])[:, None], out, 0.0)


def moe_experts(x, gate_up, down, weights, experts, *, block_m=None, block_n=None, block_k=None, interpret=None):
    """x [T, D], gate_up [E, 2F, D], down [E, D, F], weights f32[T, K], experts i32[T, K] -> [T, D] x.dtype:
    sum_k weights[t, k] * down_e(silu(gate_e x_t) * up_e x_t) with e = experts[t, k]."""
    num_tokens, top_k = experts.shape
    num_experts, two_f, hidden = gate_up.shape
    if x.shape != (num_tokens, hidden) or down.shape != (num_experts, hidden, two_f // 2):
        raise ValueError(f"moe_experts: x {x.shape}, gate_up {gate_up.shape} and down {down.shape} do not agree "
                         f"(want x [T={num_tokens}, D], gate_up [E, 2F, D], down [E, D, F])")
    blocks = dict(block_m=block_m, block_n=block_n, block_k=block_k, interpret=interpret)
    flat = experts.reshape(-1)  # i32[P], pair p = t * K + k
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # i32[E]
    rows = jnp.take(x, order // top_k, axis=0)  # [P, D] sorted by expert
    h = gmm(rows, gate_up, group_sizes, **blocks)  # [P, 2F]
    g32 = h[:, : two_f // 2].astype(jnp.float32)
    act = (g32 * jax.nn.sigmoid(g32)).astype(x.dtype) * h[:, two_f // 2:]  # [P, F]
    y = gmm(act, down, group_sizes, **blocks).astype(jnp.float32)  # [P, D]
    y = y * jnp.take(weights.reshape(-1).astype(jnp.float32), order)[:, None]
    return jax.ops.segment_sum(y, order // top_k, num_segments=num_tokens).astype(x.dtype)


def ref_moe_experts(x, gate_up, down, weights, experts):
    """float32 reference of moe_experts: each token's k experts, one at a time."""
    num_f = gate_up.shape[1] // 2
    xs = x.astype(jnp.float32)
    out = jnp.zeros(x.shape, jnp.float32)
    for k in range(experts.shape[1]):
        gu = jnp.take(gate_up.astype(jnp.float32), experts[:, k], axis=0)  # f32[T, 2F, D]
        h = jnp.einsum("td,tfd->tf", xs, gu)
        act = jax.nn.silu(h[:, :num_f]) * h[:, num_f:]
        y = jnp.einsum("tf,tdf->td", act, jnp.take(down.astype(jnp.float32), experts[:, k], axis=0))
        out = out + weights[:, k, None].astype(jnp.float32) * y
    return out
