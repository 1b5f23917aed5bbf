"""Prefix caching through the Scheduler and the Engine: admissions start after cached blocks, and the
tokens are the same as with caching off (toy numpy model, then a tiny compiled model), preempted or not."""
import numpy as np
import pytest

from runtime import Engine, SamplingParams
from runtime.engine import Request, Scheduler
from tests.runtime.toy_program import NUM_SPECIAL, ToyModel

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make_request(arrival, ids):
    return Request(request_id=str(arrival), arrival=arrival, prompt=None, prompt_token_ids=list(ids),
                   params=SamplingParams(), generator=None, detokenizer=None, token_ids=list(ids))


def step(sched, new_token=100):
    """Play the engine for one step: schedule, 'run' it (register filled blocks), sample for finished chunks."""
    out = sched.schedule()
    sched.update_after_step(out)
    for chunk in out.chunks:
        if chunk.wants_logits:
            chunk.request.token_ids.append(new_token)
    return out


def describe(out):
    return [(c.request.arrival, c.start, c.num_tokens, c.num_cached_tokens) for c in out.chunks]


def shared_prefix_prompts(prefix_len, suffix_lens, seed=0, vocab=(NUM_SPECIAL, 259)):
    rng = np.random.default_rng(seed)
    prefix = rng.integers(*vocab, size=prefix_len).tolist()
    return [prefix + rng.integers(*vocab, size=n).tolist() for n in suffix_lens]


# ---------------------------------------------------------------------------------------------
# Scheduler, exactly


def test_an_admission_starts_after_the_cached_prefix_and_computes_only_new_tokens():
    sched = Scheduler(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    a = make_request(0, range(10, 20))
    sched.add_request(a)
    assert describe(step(sched)) == [(0, 0, 10, 0)]
    assert a.block_ids == [0, 1, 2] and sched.allocator.num_cached_blocks == 2

    b = make_request(1, list(range(10, 18)) + [5, 6, 7])  # shares A's two full blocks
    c = make_request(2, list(range(10, 18)) + [8])
    sched.add_request(b)
    sched.add_request(c)
    out = step(sched)  # A decodes, B starts at token 8, C at token 8 too: 1 + 3 + 1 tokens
    assert describe(out) == [(0, 10, 1, 0), (1, 8, 3, 8), (2, 8, 1, 8)]
    assert out.num_cached_tokens == 16
    assert b.block_ids == [0, 1, 3] and c.block_ids == [0, 1, 4]
    assert [sched.allocator.ref_count(i) for i in range(5)] == [3, 3, 1, 1, 1]
    stats = sched.stats()
    assert (stats.prefix_cache.queried_tokens, stats.prefix_cache.hit_tokens) == (10 + 11 + 9, 16)
    assert stats.num_scheduled_tokens == 10 + 5 and stats.num_used_blocks == 5


def test_requests_admitted_in_the_same_step_do_not_share_unwritten_blocks():
    sched = Scheduler(num_blocks=8, block_size=4, max_num_seqs=8, max_num_batched_tokens=20)
    a, b = make_request(0, range(10, 19)), make_request(1, range(10, 19))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()  # A's blocks are registered only after the step wrote them
    assert describe(out) == [(0, 0, 9, 0), (1, 0, 9, 0)]
    assert sched.allocator.num_cached_blocks == 0
    sched.update_after_step(out)
    assert sched.allocator.num_cached_blocks == 2  # A's two full blocks; B's identical ones stay private
    assert [sched.allocator.block_hash(block) for block in b.block_ids] == [None, None, None]


def test_preemption_frees_blocks_but_keeps_them_cached_and_the_recompute_hits_them():
    sched = Scheduler(num_blocks=5, block_size=4, max_num_seqs=8, max_num_batched_tokens=16)
    a, b = make_request(0, range(10, 17)), make_request(1, range(30, 37))
    sched.add_request(a)
    sched.add_request(b)
    assert describe(step(sched)) == [(0, 0, 7, 0), (1, 0, 7, 0)]  # 2 blocks each, 1 free
    assert describe(step(sched)) == [(0, 7, 1, 0), (1, 7, 1, 0)]  # both now 9 tokens with 8 computed
    out = step(sched)  # A takes the last block, B needs one too: B (latest arrival) is preempted
    assert describe(out) == [(0, 8, 1, 0)] and out.preempted == [b]
    assert b.block_ids == [] and b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert sched.allocator.num_free_blocks == 2 and sched.allocator.num_evictable_blocks == 2
    assert sched.stats().num_preemptions == 1
    assert a.block_ids == [0, 1, 4]
    sched.finish_request(a)  # A's full blocks stay cached too; its partial block 4 is plain free
    out = step(sched)  # B comes back, hits its two cached blocks and recomputes only its last token
    assert describe(out) == [(1, 8, 1, 8)] and b.block_ids == [2, 3, 4]
    prefix_cache = sched.stats().prefix_cache
    assert (prefix_cache.recompute_queries, prefix_cache.recompute_queried_tokens) == (1, 9)
    assert prefix_cache.recompute_hit_tokens == 8 and prefix_cache.hit_tokens == 0


def test_waiting_requests_are_admitted_in_arrival_order_even_when_a_later_one_would_fit():
    sched = Scheduler(num_blocks=4, block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_request(0, range(10, 22))  # 3 blocks
    sched.add_request(a)
    step(sched)
    b, c = make_request(1, range(40, 48)), make_request(2, range(10, 14))  # B needs 2 blocks, C would fit in 1
    sched.add_request(b)
    sched.add_request(c)
    out = step(sched)  # only one block is free: B cannot be admitted, and C must not overtake it
    assert describe(out) == [(0, 12, 1, 0)] and sched.waiting == [b, c]
    sched.finish_request(a)
    out = step(sched)
    assert [ch.request for ch in out.chunks] == [b, c]


# ---------------------------------------------------------------------------------------------
# Engine on the toy numpy model (unwritten KV slots are NaN and fail loudly when read)


def toy_engine(caching, **kwargs):
    return Engine(ToyModel(block_size=4), enable_prefix_caching=caching, **kwargs)


@pytest.mark.parametrize("num_blocks, budget", [(200, 512), (200, 7), (14, 512), (14, 6)])
def test_toy_engine_tokens_are_the_same_with_caching_on_and_off(num_blocks, budget):
    prompts = shared_prefix_prompts(21, [0, 3, 9, 14, 1, 5])
    expected = [o.token_ids for o in toy_engine(False, num_blocks=200).generate(prompts, GREEDY)]
    engine = toy_engine(True, num_blocks=num_blocks, max_num_batched_tokens=budget)
    assert [o.token_ids for o in engine.generate(prompts[:2], GREEDY)] == expected[:2]
    assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected  # staggered: later ones hit
    stats = engine.scheduler.stats()
    assert stats.prefix_cache.hit_tokens >= 20 * 6
    assert stats.num_used_blocks == 0 and stats.num_free_blocks == num_blocks
    if num_blocks == 14:
        assert stats.num_preemptions > 0 and stats.prefix_cache.recompute_hit_tokens > 0


# ---------------------------------------------------------------------------------------------
# Engine on a tiny compiled model


@pytest.fixture(scope="module")
def tiny_cm():
    from lowering import compile_model
    from lowering.models import llama
    from tests.lowering.helpers import tiny_config

    model = llama.build_model(tiny_config(vocab_size=211, num_layers=2, max_position_embeddings=1024), seed=3)
    return compile_model(model, block_size=16, max_model_len=640, progress=False)


@pytest.fixture(scope="module")
def tiny_program(tiny_cm):
    """One Program (80 blocks, unwritten slots NaN) that every engine below runs, so jit compiles are shared."""
    return tiny_cm.make_program(num_blocks=80, max_model_len=640, pool_fill=float("nan"))


def tiny_engine(cm, program, caching, *, num_blocks, **kwargs):
    """An engine whose scheduler manages num_blocks blocks (ids 0..num_blocks-1) of the shared program's pool."""
    engine = Engine(cm, max_model_len=640, enable_prefix_caching=caching, num_blocks=num_blocks, **kwargs)
    engine.program = program
    return engine


def test_tiny_model_greedy_tokens_are_the_same_with_caching_on_and_off_staggered_and_preempted(tiny_cm, tiny_program):
    prompts = shared_prefix_prompts(40, [2, 17, 30, 9], seed=1, vocab=(0, 211))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    off = tiny_engine(tiny_cm, tiny_program, False, num_blocks=64)
    expected = [o.token_ids for o in off.generate(prompts, params)]

    engine = tiny_engine(tiny_cm, tiny_program, True, num_blocks=64)  # two calls: the second call's prompts hit
    got = [o.token_ids for o in engine.generate(prompts[:2], params) + engine.generate(prompts[2:], params)]
    assert got == expected
    assert engine.scheduler.stats().prefix_cache.hit_tokens == 2 * 32  # the 2 full blocks of the 40-token prefix

    # one call; each request needs up to 5 of the 7 blocks, so admissions are staggered (later ones hit the
    # prefix) and running requests get preempted (their recompute hits their own cached blocks)
    tight = tiny_engine(tiny_cm, tiny_program, True, num_blocks=7)
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    stats = tight.scheduler.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache.recompute_hit_tokens > 0
    assert stats.prefix_cache.hit_tokens > 0 and stats.num_used_blocks == 0


def test_a_second_request_sharing_a_512_token_prefix_computes_only_its_new_tokens(tiny_cm, tiny_program):
    prefix = np.random.default_rng(2).integers(0, 211, size=512).tolist()
    first, second = prefix + [1, 2, 3], prefix + [4, 5, 6, 7, 8]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    off = tiny_engine(tiny_cm, tiny_program, False, num_blocks=80)
    expected = [off.generate([p], params)[0].token_ids for p in (first, second)]

    engine = tiny_engine(tiny_cm, tiny_program, True, num_blocks=80)
    outputs = []
    real_schedule = engine.scheduler.schedule
    engine.scheduler.schedule = lambda: outputs.append(real_schedule()) or outputs[-1]
    assert engine.generate([first], params)[0].token_ids == expected[0]
    assert sum(o.num_tokens for o in outputs) == 515 + 3  # prompt (one chunk of 512, then 3) + 3 decodes
    outputs.clear()
    before = engine.scheduler.stats()

    assert engine.generate([second], params)[0].token_ids == expected[1]
    assert [(c.start, c.num_tokens, c.num_cached_tokens) for c in outputs[0].chunks] == [(512, 5, 512)]
    assert sum(o.num_tokens for o in outputs) == 5 + 3  # only the 5 new prompt tokens, then 3 decodes
    after = engine.scheduler.stats()
    assert after.num_scheduled_tokens - before.num_scheduled_tokens == 8
    assert after.prefix_cache.hit_tokens - before.prefix_cache.hit_tokens == 512
    assert after.prefix_cache.queried_tokens - before.prefix_cache.queried_tokens == 517
    assert (engine.scheduler.prefix_cache_queries, engine.scheduler.prefix_cache_hits) == (515 + 517, 512)
