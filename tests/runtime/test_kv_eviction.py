"""KV eviction (compile_model(kv_policy=H2O(...) | StreamingLLM(...))): exact equivalences with models that need no
eviction, the paper's position rule against the unpaged model, the compaction rule itself, pool consistency
under a random workload with preemption and prefix caching, and the compile-time compatibility matrix."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from lowering import H2O, StreamingLLM, compile_model
from lowering.kv_policy import KVPolicyError, resolve_plan
from lowering.models import llama
from lowering.pipeline import OptionsError
from runtime import Engine, SamplingParams
from runtime.block_pool import blocks_needed
from runtime.step import KVCompaction
from tests.lowering.helpers import tiny_config

W = 12  # the window the equivalence tests keep
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, logprobs=1)


def _prompts(lengths=(5, 30, 17), seed=0):
    return [np.random.default_rng(seed + i).integers(1, 90, size=n).tolist() for i, n in enumerate(lengths)]


def _generate(cm, prompts, params=GREEDY, **engine_kw):
    kw = dict(max_num_seqs=4, max_num_batched_tokens=16) | engine_kw
    engine = Engine(cm, **kw)
    return engine, engine.generate(prompts, params)


def _logprobs(out):
    return np.array([lp for lp, _ in out.logprobs])


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_layers=2, max_position_embeddings=256)
    return cfg, llama.build_model(cfg, seed=3)


@pytest.fixture(scope="module")
def windowed_reference(tiny):
    """The same weights as a sliding-window model whose window (W + 1: the W kept tokens and the query) never
    changes: what a cache that always keeps the W newest tokens computes."""
    cfg, _ = tiny
    cfg_w = dataclasses.replace(cfg, sliding_window=W + 1)
    cm = compile_model(llama.build_model(cfg_w, seed=3), config=cfg_w, block_size=4, max_model_len=128, progress=False)
    return _generate(cm, _prompts())[1]


def _compile(tiny, policy, **kw):
    cfg, model = tiny
    return compile_model(model, config=cfg, block_size=4, max_model_len=128, progress=False, kv_policy=policy, **kw)


@pytest.mark.parametrize("policy", [
    StreamingLLM(sinks=0, window=W, positions="original", evict_every=1),
    StreamingLLM(sinks=0, window=W, positions="cache", evict_every=1),  # re-rotated keys: the same relative positions
    H2O(budget=W, recent=W, evict_every=1),  # no heavy hitters: only the recent window
], ids=["streaming-original", "streaming-cache", "h2o-recent-only"])
def test_keeping_the_newest_tokens_equals_a_sliding_window_model(tiny, windowed_reference, policy):
    """Compacted every token (evict_every=1), each query sees exactly the W newest tokens and itself."""
    engine, outs = _generate(_compile(tiny, policy), _prompts())
    assert engine.num_compactions > 0
    for out, ref in zip(outs, windowed_reference):
        assert out.token_ids == ref.token_ids
        np.testing.assert_allclose(_logprobs(out), _logprobs(ref), atol=2e-5)


def test_streaming_cache_positions_follow_the_paper(tiny):
    """One layer (its keys depend only on token and position): every token's logits equal the unpaged model over
    the kept tokens (sinks + window) and the query, at positions 0, 1, 2, ... (their indices in the cache)."""
    cfg = dataclasses.replace(tiny[0], num_layers=1)
    model = llama.build_model(cfg, seed=5)
    sinks, window = 2, 6
    for positions in ("cache", "original"):
        cm = compile_model(model, config=cfg, block_size=4, max_model_len=128, progress=False,
                           kv_policy=StreamingLLM(sinks=sinks, window=window, positions=positions, evict_every=1))
        prompt = _prompts((11,), seed=7)[0]
        engine, (out,) = _generate(cm, [prompt], SamplingParams(max_tokens=12, temperature=0.0, logprobs=1))
        seq = prompt + out.token_ids
        budget = sinks + window
        for i, tok in enumerate(out.token_ids):
            p = len(prompt) - 1 + i  # the query that produced token i
            kept = list(range(p)) if p <= budget else list(range(sinks)) + list(range(p - window, p))
            idx = kept + [p]
            pos = np.arange(len(idx)) if positions == "cache" else np.asarray(idx)
            logits = np.asarray(model(jnp.asarray([seq[j] for j in idx], jnp.int32), jnp.asarray(pos, jnp.int32),
                                      jnp.asarray([0, len(idx)], jnp.int32), jnp.asarray([len(idx) - 1], jnp.int32)))[0]
            ref = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            assert tok == int(np.argmax(logits))
            assert abs(out.logprobs[i][0] - ref[tok]) < 2e-5, (positions, i)


def test_compaction_keeps_heavy_hitters_per_layer_and_head():
    """compact_jax and compact_torch against a numpy statement of the rule, on a random pool (NaN elsewhere)."""
    torch = pytest.importorskip("torch")
    from lowering.backends.kv_compact import compact_jax, compact_torch
    from lowering.ir import Graph, TensorType

    bs, nb, hkv, d = 4, 16, 2, 8
    graph = Graph()
    for layer in range(2):
        for part in ("k", "v"):
            graph.types[f"kv.{layer}.{part}"] = TensorType(("N", bs, hkv, d), "float32")
            graph.state.append(f"kv.{layer}.{part}")
        graph.types[f"kv.{layer}.mass"] = TensorType(("N", bs, hkv), "float32")
        graph.state.append(f"kv.{layer}.mass")
    rng = np.random.default_rng(0)
    state = {n: np.full((nb, bs, hkv, d) if not n.endswith("mass") else (nb, bs, hkv), np.nan, np.float32)
             for n in graph.state}
    old_len, new_len, recent = 22, 9, 3
    src_table, dst_table = np.array([5, 2, 9, 11, 3, 7]), np.array([2, 12, 5])  # overlapping blocks
    src_slots = (src_table[:, None] * bs + np.arange(bs)).reshape(-1)[:old_len]
    for n in graph.state:
        flat = state[n].reshape(nb * bs, *state[n].shape[2:])
        flat[src_slots] = rng.standard_normal((old_len, *flat.shape[1:])).astype(np.float32)
    plan = resolve_plan(H2O(budget=new_len, recent=recent, evict_every=4), max_model_len=64, block_size=bs)
    comp = KVCompaction(src_table, dst_table, old_len, new_len)
    expect = {}
    for layer in range(2):
        mass = state[f"kv.{layer}.mass"].reshape(-1, hkv)[src_slots]  # [old_len, H]
        for h in range(hkv):
            heavy = np.sort(np.argsort(-mass[: old_len - recent, h], kind="stable")[: new_len - recent])
            keep = np.concatenate([heavy, np.arange(old_len - recent, old_len)])
            for part in ("k", "v", "mass"):
                flat = state[f"kv.{layer}.{part}"].reshape(nb * bs, hkv, -1)
                expect[(layer, part, h)] = flat[src_slots[keep], h]
    dst_slots = (dst_table[:, None] * bs + np.arange(bs)).reshape(-1)[:new_len]
    out_jax = compact_jax({k: jnp.asarray(v) for k, v in state.items()}, graph, plan, [comp], bs)
    out_torch = {k: torch.tensor(v) for k, v in state.items()}
    compact_torch(out_torch, graph, plan, [comp], bs)
    for result in ({k: np.asarray(v) for k, v in out_jax.items()}, {k: v.numpy() for k, v in out_torch.items()}):
        for (layer, part, h), want in expect.items():
            got = result[f"kv.{layer}.{part}"].reshape(nb * bs, hkv, -1)[dst_slots, h]
            np.testing.assert_array_equal(got, want)


# ---- the block pool under eviction ---------------------------------------------------------------------------


def _check_pool(engine, plan):
    kv = engine.scheduler.kv
    pool = kv.pool
    holders = {}
    for req in engine.scheduler.running:
        assert len(req.block_ids) <= plan.max_blocks(kv.block_size), "a request holds more blocks than its budget"
        assert kv.cache_len(req) <= plan.capacity
        assert len(req.block_ids) == blocks_needed(kv.cache_len(req), kv.block_size) or req.spec_token_ids
        for b in req.block_ids:
            holders[b] = holders.get(b, 0) + 1
    for b, n in holders.items():  # a shared block is held once per holder; none is free while held
        assert pool.ref_count(b) == n
    assert sum(pool.ref_count(b) > 0 for b in range(pool.num_blocks)) == len(holders)
    assert pool.num_free_blocks + len(holders) == pool.num_blocks


@pytest.mark.parametrize("policy,prefix", [
    (StreamingLLM(sinks=4, window=10, evict_every=4), True),
    (H2O(budget=12, recent=0.5, evict_every=4), False),
], ids=["streaming+prefix-cache", "h2o"])
def test_pool_stays_consistent_under_random_load(tiny, policy, prefix):
    """Random prompts (half sharing a long prefix), a pool too small for all of them (preemption), checked after
    every step: no leaked, double-held or freed-while-held block; nobody over budget; all blocks back at the end."""
    cm = _compile(tiny, policy)
    engine = Engine(cm, num_blocks=11, max_num_seqs=3, max_num_batched_tokens=8, enable_prefix_caching=prefix)
    plan = engine.eviction
    rng = np.random.default_rng(1)
    shared = rng.integers(1, 90, 20).tolist()
    for i in range(5):
        tail = rng.integers(1, 90, int(rng.choice([3, 11, 22]))).tolist()
        prompt = shared + tail if i % 2 else tail
        params = SamplingParams(max_tokens=int(rng.integers(4, 16)), temperature=0.0)
        engine.scheduler.add_request(engine._make_request(i, prompt, params, False))
    steps = 0
    while engine.scheduler.has_unfinished_requests():
        engine._step()
        _check_pool(engine, plan)
        steps += 1
        assert steps < 2000
    assert engine.num_compactions > 0 and engine.scheduler.num_preemptions > 0
    assert engine.scheduler.kv.pool.num_free_blocks == 11
    if prefix:
        stats = engine.scheduler.kv.stats  # prefix hits happened (here mostly recomputes of preempted requests)
        assert stats.hit_tokens + stats.recompute_hit_tokens > 0


def test_eviction_bounds_blocks_so_more_sequences_fit(tiny):
    """The program sizes its pool for the budget: with the same KV bytes, every request's blocks stay within
    blocks_needed(budget + evict_every), and the default pool is that much smaller."""
    full = Engine(_compile(tiny, None), max_num_seqs=8, max_model_len=128)
    evict = Engine(_compile(tiny, StreamingLLM(sinks=4, window=12, evict_every=4)), max_num_seqs=8, max_model_len=128)
    assert evict.program.num_blocks == 8 * blocks_needed(20, 4) < full.program.num_blocks == 8 * 32


# ---- compatibility -------------------------------------------------------------------------------------------


def test_policy_options_are_checked():
    for bad, msg in [(H2O(budget=1.5), "fraction"), (H2O(budget=1), "at least 2"), (StreamingLLM(window=0), "window"),
                     (StreamingLLM(positions="text"), "positions"), ({"kind": "lru"}, "kv_policy must be")]:
        with pytest.raises(OptionsError, match=msg):
            compile_model(llama.build_model(tiny_config()), config=tiny_config(), kv_policy=bad, progress=False)


CALIB = [list(range(1, 33)), list(range(40, 72))]


@pytest.mark.parametrize("policy,options,reason", [
    (StreamingLLM(), {"kv_cache": "fp8"}, "re-quantize"),
    (StreamingLLM(), {"kv_rotation": True}, "does not commute"),
    (H2O(), {"speculative": {"method": "draft", "draft": "x"}}, "desynchronize"),
    (H2O(), {"config_override": {"sliding_window": 8}}, "sliding-window"),
    (StreamingLLM(), {"config_override": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 64}}}, "yarn"),
    (H2O(), {"share_kv_layers": [[0, 1]]}, "share_kv_layers"),
])
def test_unsupported_combinations_are_refused_at_compile_time(policy, options, reason):
    options = dict(options)
    cfg = tiny_config(**options.pop("config_override", {}))
    if "speculative" in options:
        pytest.importorskip("lowering.passes.evict_kv")
    with pytest.raises((KVPolicyError, OptionsError), match=reason):
        compile_model(llama.build_model(cfg), config=cfg, kv_policy=policy, progress=False, max_ppl_increase=None,
                      calibration=CALIB, **options)


@pytest.mark.parametrize("policy,options", [
    (H2O(budget=10, evict_every=4), {"kv_cache": "fp8"}),
    (H2O(budget=10, evict_every=4), {"kv_cache": "nvfp4"}),
    (H2O(budget=10, evict_every=4), {"speculative": {"method": "ngram", "num_tokens": 3}}),
    (StreamingLLM(sinks=2, window=8, positions="original", evict_every=4), {"kv_cache": "fp8"}),
    (StreamingLLM(sinks=2, window=8, evict_every=4), {"speculative": {"method": "ngram", "num_tokens": 3}}),
    (StreamingLLM(sinks=2, window=8, evict_every=4), {"share_kv_layers": [[0, 1]]}),
], ids=["h2o+fp8", "h2o+nvfp4", "h2o+ngram", "streaming-original+fp8", "streaming+ngram", "streaming+sharing"])
def test_supported_combinations_generate_within_budget(policy, options):
    cfg = tiny_config(head_dim=16, hidden_size=64, num_heads=4, num_kv_heads=2)  # nvfp4 needs head_dim % 16 == 0
    cm = compile_model(llama.build_model(cfg, seed=2), config=cfg, block_size=4, max_model_len=64, kv_policy=policy,
                       progress=False, max_ppl_increase=None, calibration=CALIB, **options)
    engine = Engine(cm, max_num_seqs=1, max_num_batched_tokens=8)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]]  # repetitive: n-gram drafts get accepted
    outs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    assert engine.num_compactions > 0 and all(len(o.token_ids) == 8 for o in outs)
    assert engine.scheduler.kv.pool.num_free_blocks == engine.program.num_blocks


def test_h2o_refuses_explicit_prefix_caching(tiny):
    cm = _compile(tiny, H2O(budget=16))
    assert not Engine(cm).scheduler.kv.enable_prefix_caching  # off by default under H2O
    with pytest.raises(ValueError, match="prefix caching"):
        Engine(cm, enable_prefix_caching=True)


@pytest.mark.parametrize("policy", [H2O(budget=16, evict_every=8), StreamingLLM(sinks=4, window=12, evict_every=8)],
                         ids=["h2o", "streaming"])
def test_cuda_program_with_graphs_evicts_like_the_cpu_target(policy):
    """On a GPU: the CUDA program (decode steps replaying CUDA graphs, the attention_mass Triton kernel, torch
    compaction) and the CPU target give the same greedy tokens under eviction, and the same blocks end free."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU (the Triton kernels and the compaction are tested apart under the interpreter)")
    cfg = tiny_config(head_dim=16, hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=256)
    model = llama.build_model(cfg, seed=6)
    outs = []
    for target in ("cpu", "cuda"):
        cm = compile_model(model, config=cfg, target=target, dtype="float32", block_size=4, max_model_len=128,
                           progress=False, kv_policy=policy)
        engine = Engine(cm, max_num_seqs=4, max_num_batched_tokens=16, num_blocks=64)
        outs.append(engine.generate(_prompts(), SamplingParams(max_tokens=20, temperature=0.0, logprobs=1)))
        assert engine.num_compactions > 0 and engine.scheduler.kv.pool.num_free_blocks == 64
        if target == "cuda":
            assert engine.program.num_graph_replays > 0
    for a, b in zip(*outs):  # TF32-free float32 on both; near-ties could differ, so compare the picked logprobs
        np.testing.assert_allclose(_logprobs(a)[:8], _logprobs(b)[:8], atol=1e-3)
        assert a.token_ids[:8] == b.token_ids[:8]
