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


@pytest.mark.parametrize("partial", [1.0, 0.75])
def test_longrope_frequencies_match_transformers(partial):
    """Phi-3's LongRoPE: short / long inverse frequencies and the attention factor, as transformers computes them."""
    pytest.importorskip("transformers")
    from transformers import Phi3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    pairs = int(64 * partial) // 2
    scaling = {"rope_type": "longrope", "short_factor": np.linspace(1.0, 1.1, pairs).tolist(),
               "long_factor": np.linspace(1.0, 60.0, pairs).tolist(), "original_max_position_embeddings": 4096}
    cfg = Phi3Config(hidden_size=64 * 4, num_attention_heads=4, rope_theta=10000.0, rope_scaling=dict(scaling),
                     max_position_embeddings=131072, original_max_position_embeddings=4096,
                     partial_rotary_factor=partial)
    short, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](cfg, "cpu", seq_len=4097)
    freqs = ops.rope_frequencies(64, 10000.0, {**scaling, "factor": 32.0, "partial_rotary_factor": partial})
    assert freqs.rotary_dim == int(64 * partial) and freqs.long_from == 4096
    np.testing.assert_allclose(freqs.inv_freq, short.numpy(), rtol=1e-6)
    np.testing.assert_allclose(freqs.long_inv_freq, long.numpy(), rtol=1e-6)
    assert freqs.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    with pytest.raises(ops.OpError, match="needs rope_frequencies"):
        ops.rope_inv_freq(64, 10000.0, scaling | {"factor": 32.0, "partial_rotary_factor": partial})


def test_partial_rotation_leaves_the_other_features():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 2 * 16)), jnp.float32)
    pos = jnp.asarray([0, 5, 9], jnp.int32)
    half = ops.ref_rope(x, pos, num_heads=2, head_dim=16, theta=10000.0, rope_scaling={"partial_rotary_factor": 0.5})
    whole = ops.ref_rope(x.reshape(3, 2, 2, 8)[:, :, 0].reshape(3, 16), pos, num_heads=2, head_dim=8, theta=10000.0)
    halves = np.asarray(half).reshape(3, 2, 2, 8)  # [T, H, rotated | passed, 8]
    np.testing.assert_array_equal(halves[:, :, 1], np.asarray(x).reshape(3, 2, 2, 8)[:, :, 1])
    np.testing.assert_allclose(halves[:, :, 0].reshape(3, 16), whole, rtol=1e-6)
    with pytest.raises(ops.OpError, match="partial_rotary_factor"):
        ops.rope_frequencies(16, 10000.0, {"partial_rotary_factor": 1.5})


@pytest.mark.parametrize("top_k,norm", [(1, False), (2, True), (3, False)])
def test_moe_equals_each_tokens_top_k_experts_in_float64(top_k, norm):
    rng = np.random.default_rng(top_k)
    t, d, f, e = 6, 12, 10, 4
    x, router = rng.normal(size=(t, d)), rng.normal(size=(e, d))
    gate_up, down = rng.normal(size=(e, 2 * f, d)) / 3, rng.normal(size=(e, d, f)) / 3
    got = ops.ref_moe(*(jnp.asarray(a, jnp.float32) for a in (x, router, gate_up, down)), top_k=top_k,
                      norm_topk_prob=norm)
    logits = x @ router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.zeros((t, d))
    for i in range(t):
        best = np.argsort(-probs[i])[:top_k]
        w = probs[i, best] / (probs[i, best].sum() if norm else 1.0)
        for weight, j in zip(w, best):
            gate, up = gate_up[j, :f] @ x[i], gate_up[j, f:] @ x[i]
            want[i] += weight * (down[j] @ (gate / (1 + np.exp(-gate)) * up))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_moe_shape_rule_names_the_bad_weight():
    f32 = "float32"
    good = [(("T", 8), f32), ((4, 8), f32), ((4, 12, 8), f32), ((4, 8, 6), f32)]
    attrs = {"top_k": 2, "norm_topk_prob": True}
    assert ops.output_types(ops.moe, good, attrs) == [(("T", 8), f32)]
    with pytest.raises(ops.OpError, match="down has shape"):
        ops.output_types(ops.moe, good[:3] + [((4, 8, 5), f32)], attrs)
    with pytest.raises(ops.OpError, match="even 2F"):
        ops.output_types(ops.moe, good[:2] + [((4, 11, 8), f32), ((4, 8, 6), f32)], attrs)
    with pytest.raises(ops.OpError, match="top_k"):
        ops.output_types(ops.moe, good, {"top_k": 5, "norm_topk_prob": True})
    with pytest.raises(ops.OpError, match="top_k must be an integer"):
        ops.mixture_of_experts(*(jnp.zeros(s, jnp.float32) for s in ((3, 8), (4, 8), (4, 12, 8), (4, 8, 6))),
                               top_k=2.0, norm_topk_prob=True)


def test_gemma_ops_match_transformers():
    """Gemma 3's pieces as Hugging Face computes them: (1 + w) RMSNorm in float32 (rows and per head), GeGLU with
    torch's tanh GELU, embeddings times a scale rounded to the table's dtype (bf16: sqrt(640) becomes 25.25)."""
    torch = pytest.importorskip("torch")
    gemma3 = pytest.importorskip("transformers.models.gemma3.modeling_gemma3")
    rng = np.random.default_rng(7)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 0.0)):
        jdt = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
        x = torch.tensor(rng.normal(size=(5, 48)) * 3).to(dtype)
        w = torch.tensor(rng.normal(size=48) * 0.5).to(dtype)
        norm = gemma3.Gemma3RMSNorm(48, eps=1e-6).to(dtype)
        heads = gemma3.Gemma3RMSNorm(16, eps=1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
            heads.weight.copy_(w[:16])
            want, want_heads = norm(x), heads(x.view(5, 3, 16)).reshape(5, 48)
        as_j = lambda t: jnp.asarray(t.float().numpy(), jdt)  # noqa: E731
        got = ops.ref_rms_norm(as_j(x), as_j(w), eps=1e-6, weight_offset=1.0)
        got_heads = ops.ref_head_rms_norm(as_j(x), as_j(w[:16]), eps=1e-6, head_dim=16, weight_offset=1.0)
        for g, h in ((got, want), (got_heads, want_heads)):
            assert g.dtype == jdt
            np.testing.assert_allclose(np.asarray(g, np.float32), h.float().numpy(), rtol=tol, atol=tol)
        gate = torch.tensor(rng.normal(size=(4, 9)) * 3).to(dtype)
        up = torch.tensor(rng.normal(size=(4, 9))).to(dtype)
        got = ops.ref_gelu_tanh_mul(as_j(gate), as_j(up))
        want = torch.nn.functional.gelu(gate, approximate="tanh") * up
        np.testing.assert_allclose(np.asarray(got, np.float32), want.float().numpy(), rtol=max(tol, 1e-6), atol=1e-6)
    table = jnp.asarray(rng.normal(size=(11, 4)), jnp.bfloat16)
    rows = ops.ref_embed(jnp.array([3, 0, 10]), table, scale=640 ** 0.5)
    assert rows.dtype == jnp.bfloat16
    want = np.asarray(table[jnp.array([3, 0, 10])] * 25.25, np.float32)
    np.testing.assert_array_equal(np.asarray(rows, np.float32), want)


def test_gemma_op_attributes_are_checked():
    x, w = jnp.ones((2, 8)), jnp.ones((8,))
    with pytest.raises(ops.OpError, match="weight_offset"):
        ops.rms_norm.check_attrs({"eps": 1e-6, "weight_offset": 1})
    with pytest.raises(ops.OpError, match="scale"):
        ops.embed.check_attrs({"scale": "8"})
    assert ops.rms_normalize(x, w, 1e-6, weight_offset=1.0).shape == (2, 8)
    assert ops.gelu_tanh_and_mul(x, x).shape == (2, 8)
