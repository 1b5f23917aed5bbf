"""Pallas grouped matmul (megablox style) and the MoE expert MLPs, in TPU interpret mode, vs float32 references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import moe
from lowering import ops

TOLERANCES = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (3e-2, 3e-2)}  # (atol, rtol)


def test_group_metadata_visits_straddling_tiles_once_per_group():
    # rows: g0 x6, g1 x0, g2 x7, g3 x1 over tiles of 4 rows (16 rows padded)
    offsets, group, tile, num_visits = moe.group_metadata(jnp.array([6, 0, 7, 1]), num_rows=16, block_m=4)
    assert offsets.tolist() == [0, 6, 6, 13, 14]
    assert int(num_visits[0]) == 6  # (g0, 0) (g0, 1) (g2, 1) (g2, 2) (g2, 3) (g3, 3)
    assert group.tolist()[:6] == [0, 0, 2, 2, 2, 3] and tile.tolist()[:6] == [0, 1, 1, 2, 3, 3]
    assert len(group) == 16 // 4 + 4 - 1  # padded visits repeat the last real one
    assert group.tolist()[6:] == [3] and tile.tolist()[6:] == [3]


# (dtype, M, K, N, group sizes, blocks (bm, bn, bk)): ragged M / N, empty groups, rows past the groups, K steps
GMM_CASES = [
    (jnp.float32, 37, 256, 300, (5, 0, 13, 0, 11), (8, 128, 128)),  # tiles straddle groups; 2 K and 3 N steps
    (jnp.bfloat16, 40, 32, 16, (0, 7, 3, 0), (16, None, None)),    # first group empty; rows 10.. in no group
]


@pytest.mark.parametrize("dtype,m,k,n,sizes,blocks", GMM_CASES, ids=[f"M{c[1]}-K{c[2]}-N{c[3]}" for c in GMM_CASES])
def test_gmm_matches_reference(dtype, m, k, n, sizes, blocks):
    rng = np.random.default_rng(m)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    rhs = jnp.asarray(rng.standard_normal((len(sizes), n, k)) / np.sqrt(k), dtype)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    bm, bn, bk = blocks
    got = moe.gmm(lhs, rhs, group_sizes, block_m=bm, block_n=bn, block_k=bk, interpret=True)
    assert got.shape == (m, n) and got.dtype == dtype
    used = sum(sizes)  # rows past the groups are unspecified
    want = moe.ref_gmm(lhs, rhs, group_sizes)
    atol, rtol = TOLERANCES[dtype]
    np.testing.assert_allclose(np.asarray(got[:used], np.float32), np.asarray(want[:used]), atol=atol, rtol=rtol)


def test_moe_experts_with_the_router_equals_the_op_reference():
    """Routing (lowering.ops.route_tokens) then moe_experts is the moe op (lowering.ops.ref_moe)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((11, 32)), jnp.float32)
    router = jnp.asarray(rng.standard_normal((5, 32)), jnp.float32)
    gate_up = jnp.asarray(rng.standard_normal((5, 48, 32)) / 6, jnp.float32)
    down = jnp.asarray(rng.standard_normal((5, 32, 24)) / 5, jnp.float32)
    weights, experts = ops.route_tokens(x, router, top_k=2, norm_topk_prob=True)
    got = moe.moe_experts(x, gate_up, down, weights, experts, block_m=8, interpret=True)
    want = ops.ref_moe(x, router, gate_up, down, top_k=2, norm_topk_prob=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)


def test_gmm_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="rhs \\[G, N, K\\]"):
        moe.gmm(jnp.zeros((4, 8)), jnp.zeros((2, 3, 6)), jnp.array([2, 2]), interpret=True)
    with pytest.raises(ValueError, match="group_sizes"):
        moe.gmm(jnp.zeros((4, 8)), jnp.zeros((2, 3, 8)), jnp.array([4]), interpret=True)


def test_gmm_lowers_for_tpu():
    """The Pallas -> Mosaic lowering at a Mixtral-like layer shape (no TPU needed to lower)."""
    lhs = jax.ShapeDtypeStruct((512, 4096), jnp.bfloat16)
    rhs = jax.ShapeDtypeStruct((8, 2 * 14336, 4096), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)
    jax.export.export(jax.jit(lambda a, b, s: moe.gmm(a, b, s, interpret=False)), platforms=["tpu"])(lhs, rhs, sizes)
