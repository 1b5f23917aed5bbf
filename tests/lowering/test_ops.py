"""Semantic op references against plain float64 numpy: attention, paged attention, kv_write, rope, norms."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from lowering import ops
from tests.lowering.helpers import np_attention_f64

TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def test_rms_norm_matches_float64():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(7, 33)).astype(np.float32), rng.normal(size=33).astype(np.float32)
    want = x.astype(np.float64) / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(ops.ref_rms_norm(jnp.asarray(x), jnp.asarray(w), eps=1e-6), want, rtol=1e-5, atol=1e-5)


def test_linear_with_bias_and_silu_mul():
    rng = np.random.default_rng(1)
    x, w, b = rng.normal(size=(5, 12)), rng.normal(size=(7, 12)), rng.normal(size=7)
    got = ops.ref_linear(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, x @ w.T + b, rtol=1e-5, atol=1e-5)
    g, u = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
    np.testing.assert_allclose(ops.ref_silu_mul(jnp.asarray(g, jnp.float32), jnp.asarray(u, jnp.float32)),
                               g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q_lens", [[5], [3, 1, 7], [1, 1, 1, 1]])
def test_attention_is_causal_per_sequence(q_lens):
    rng = np.random.default_rng(2)
    hq, hkv, dh = 6, 2, 8
    t = sum(q_lens)
    q, k, v = (rng.normal(size=(t, h * dh)).astype(np.float32) for h in (hq, hkv, hkv))
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    got = np.asarray(ops.ref_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(starts),
                                       num_heads=hq, num_kv_heads=hkv, head_dim=dh, scale=1 / math.sqrt(dh)))
    for s in range(len(q_lens)):
        a, b = starts[s], starts[s + 1]
        want = np_attention_f64(q[a:b], k[a:b], v[a:b], hq, hkv, dh)
        np.testing.assert_allclose(got[a:b], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_size", [1, 5, 16])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_paged_attention_ragged_with_nan_pages(block_size, dtype):
    """Prefill chunks, a decode and a chunk in the middle of a context, read through shuffled blocks."""
    rng = np.random.default_rng(3)
    hq, hkv, dh = 4, 2, 8
    ctx_lens = [9, 1, 23, 6]  # context after the step
    q_lens = [9, 1, 4, 2]  # new tokens this step (the rest is already cached)
    num_blocks = 1 + sum(-(-c // block_size) for c in ctx_lens) + 3
    k_pool = np.full((num_blocks, block_size, hkv, dh), np.nan, np.float32)
    v_pool = np.full_like(k_pool, np.nan)
    free = list(rng.permutation(np.arange(1, num_blocks)))
    width = max(-(-c // block_size) for c in ctx_lens) + 1  # one spare column, left as block 0 (NaN)
    tables = np.zeros((len(ctx_lens), width), np.int32)
    ks, vs = [], []
    for s, c in enumerate(ctx_lens):
        kk, vv = rng.normal(size=(c, hkv, dh)).astype(np.float32), rng.normal(size=(c, hkv, dh)).astype(np.float32)
        ks.append(kk), vs.append(vv)
        for j in range(-(-c // block_size)):
            tables[s, j] = free.pop()
        for i in range(c):
            k_pool[tables[s, i // block_size], i % block_size] = kk[i]
            v_pool[tables[s, i // block_size], i % block_size] = vv[i]
    q = rng.normal(size=(sum(q_lens), hq * dh)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    cast = lambda a: jnp.asarray(a, dtype)  # noqa: E731
    got = ops.ref_paged_attention(cast(q), cast(k_pool), cast(v_pool), jnp.asarray(starts),
                                  jnp.asarray(ctx_lens, jnp.int32), jnp.asarray(tables), num_heads=hq,
                                  num_kv_heads=hkv, head_dim=dh, scale=1 / math.sqrt(dh))
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all()
    for s, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        want = np_attention_f64(q[starts[s]:starts[s + 1]], ks[s].reshape(c, -1), vs[s].reshape(c, -1), hq, hkv, dh,
                                q_offset=c - n)
        np.testing.assert_allclose(got[starts[s]:starts[s + 1]], want, rtol=TOL[dtype], atol=TOL[dtype])


def test_kv_write_scatters_and_skips_negative_slots():
    pool = jnp.full((3, 4, 1, 2), jnp.nan)
    k = jnp.arange(6, dtype=jnp.float32).reshape(3, 2)
    new_k, new_v = ops.ref_kv_write(k, k + 100, jnp.asarray([5, -1, 11], jnp.int32), pool, pool)
    new_k = np.asarray(new_k).reshape(12, 2)
    np.testing.assert_array_equal(new_k[5], [0, 1])
    np.testing.assert_array_equal(new_k[11], [4, 5])
    np.testing.assert_array_equal(np.asarray(new_v).reshape(12, 2)[11], [104, 105])
    assert np.isnan(np.delete(new_k, [5, 11], axis=0)).all()


def test_rope_matches_rotate_half_float64_and_llama3_scaling():
    rng = np.random.default_rng(4)
    h, dh = 3, 16
    x = rng.normal(size=(5, h * dh)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 3000], np.int32)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    for sc in (None, scaling):
        inv = ops.rope_inv_freq(dh, 500000.0, sc).astype(np.float64)
        ang = pos[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        xh = x.reshape(5, h, dh).astype(np.float64)
        rot = np.concatenate([-xh[..., dh // 2:], xh[..., : dh // 2]], -1)
        want = (xh * cos[:, None] + rot * sin[:, None]).reshape(5, -1)
        got = ops.ref_rope(jnp.asarray(x), jnp.asarray(pos), num_heads=h, head_dim=dh, theta=500000.0, rope_scaling=sc)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_llama3_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=64 * 4, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling,
                      max_position_embeddings=131072)
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(ops.rope_inv_freq(64, 500000.0, scaling), inv.numpy(), rtol=1e-6)
    del transformers


def test_unknown_rope_scaling_is_refused():
    with pytest.raises(ops.OpError, match="unsupported rope scaling"):
        ops.rope_inv_freq(8, 10000.0, {"rope_type": "yarn", "factor": 2.0})
