"""CPU backend: its lowering table matches the references; a ragged engine batch equals each prompt alone."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import compile_model, ops
from lowering.backends import cpu
from lowering.models import llama
from runtime import Engine, SamplingParams
from tests.lowering.helpers import tiny_config


def random_paged_case(rng, block_size, ctx_lens, q_lens, hq=6, hkv=2, dh=8):
    num_blocks = 2 + sum(-(-c // block_size) for c in ctx_lens)
    k_pool = np.full((num_blocks, block_size, hkv, dh), np.nan, np.float32)
    v_pool = np.full_like(k_pool, np.nan)
    free = list(rng.permutation(np.arange(1, num_blocks)))
    width = max(-(-c // block_size) for c in ctx_lens)
    tables = np.zeros((len(ctx_lens), width), np.int32)
    for s, c in enumerate(ctx_lens):
        for j in range(-(-c // block_size)):
            tables[s, j] = free.pop()
            k_pool[tables[s, j]] = rng.normal(size=(block_size, hkv, dh))
            v_pool[tables[s, j]] = rng.normal(size=(block_size, hkv, dh))
        tail = c % block_size
        if tail:  # slots past the context stay NaN
            k_pool[tables[s, -(-c // block_size) - 1], tail:] = np.nan
            v_pool[tables[s, -(-c // block_size) - 1], tail:] = np.nan
    q = rng.normal(size=(sum(q_lens), hq * dh)).astype(np.float32)
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    attrs = dict(num_heads=hq, num_kv_heads=hkv, head_dim=dh, scale=1 / math.sqrt(dh))
    arrays = [jnp.asarray(a) for a in (q, k_pool, v_pool, starts, np.asarray(ctx_lens, np.int32), tables)]
    return arrays, attrs


@pytest.mark.parametrize("block_size", [1, 7, 16])
def test_paged_attention_by_sequence_matches_reference(block_size):
    rng = np.random.default_rng(block_size)
    arrays, attrs = random_paged_case(rng, block_size, ctx_lens=[13, 1, 40, 5], q_lens=[13, 1, 3, 2])
    want = ops.ref_paged_attention(*arrays, **attrs)
    got = cpu.paged_attention_by_sequence(*arrays, max_q_len=16, **attrs)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("block_size, window", [(7, 3), (7, 10), (7, 64)])
def test_paged_attention_by_sequence_sliding_window(block_size, window):
    # window < page, > page and not a multiple, >= every context; decodes and chunks with cached prefixes; the
    # table entries of pages wholly before each window point at a NaN page (freed)
    rng = np.random.default_rng(window)
    ctx_lens, q_lens = [13, 1, 40, 5, 30], [13, 1, 3, 2, 1]
    arrays, attrs = random_paged_case(rng, block_size, ctx_lens=ctx_lens, q_lens=q_lens)
    tables = np.array(arrays[5])
    for s, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        tables[s, :max(c - n - window + 1, 0) // block_size] = 0  # block 0 holds NaN
    arrays = [*arrays[:5], jnp.asarray(tables)]
    got = np.asarray(jax.jit(functools.partial(cpu.paged_attention_by_sequence, max_q_len=16, **attrs,
                                               window=window))(*arrays))
    want = np.asarray(jax.jit(functools.partial(ops.ref_paged_attention, **attrs, window=window))(*arrays))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # a float64 transcription of the window rule for one chunk row: keys pos - window + 1 .. pos
    s, t = 2, sum(q_lens[:2]) + 1  # the second new token of sequence 2
    pos = ctx_lens[s] - (sum(q_lens[:s + 1]) - t)
    idx = np.arange(max(pos - window + 1, 0), pos + 1)
    blocks = tables[s][idx // block_size]
    k = np.asarray(arrays[1], np.float64)[blocks, idx % block_size]  # [C, Hkv, D]
    v = np.asarray(arrays[2], np.float64)[blocks, idx % block_size]
    qh = np.asarray(arrays[0][t], np.float64).reshape(2, 3, 8)
    p = np.exp(np.einsum("kgd,ckd->kgc", qh, k) * attrs["scale"])
    ref_row = np.einsum("kgc,ckd->kgd", p / p.sum(-1, keepdims=True), v).reshape(-1)
    np.testing.assert_allclose(got[t], ref_row, rtol=2e-5, atol=2e-5)


def test_write_rows_in_place_matches_reference():
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.normal(size=(5, 3, 2, 4)).astype(np.float32))
    k, v = (jnp.asarray(rng.normal(size=(4, 8)).astype(np.float32)) for _ in range(2))
    slots = jnp.asarray([7, -1, 0, 14], jnp.int32)
    want = ops.ref_kv_write(k, v, slots, pool, pool + 1)
    got = cpu.write_rows_in_place(slots, [(k, pool), (v, pool + 1)])
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_buckets_bound_padding():
    sizes = [cpu._fine_bucket(n) for n in range(1, 5000)]
    assert all(s >= n and s <= max(8, 1.25 * n + 1) for n, s in zip(range(1, 5000), sizes))
    assert len(set(sizes)) < 60


@pytest.fixture(scope="module")
def tiny_model():
    return llama.build_model(tiny_config(vocab_size=211, num_layers=2), seed=3)


@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_ragged_batch_equals_each_prompt_alone(tiny_model, block_size):
    cm = compile_model(tiny_model, block_size=block_size, max_model_len=128)
    rng = np.random.default_rng(block_size)
    prompts = [rng.integers(0, 211, n).tolist() for n in (3, 17, 40, 9)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # a small token budget makes steps mix decodes with chunks of other prompts' prefills
    engine = Engine(cm, max_model_len=128, max_num_batched_tokens=16, max_num_seqs=4)
    batched = engine.generate(prompts, params)
    alone = [Engine(cm, max_model_len=128).generate([p], params)[0] for p in prompts]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert all(len(o.token_ids) == 12 for o in batched)


def test_program_reports_nan_free_logits_with_nan_pool(tiny_model):
    cm = compile_model(tiny_model, block_size=4, max_model_len=64)
    engine = Engine(cm, max_model_len=64)
    engine.program = cm.make_program(num_blocks=64, max_model_len=64, pool_fill=float("nan"))
    out = engine.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    reference = Engine(cm, max_model_len=64).generate([[5, 6, 7, 8, 9]],
                                                       SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert out.token_ids == reference.token_ids
