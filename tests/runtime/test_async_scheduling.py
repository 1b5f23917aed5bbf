"""Async scheduling (Engine._step_async): step t+1 launched before step t's tokens are back gives exactly the tokens,
texts, finish reasons and streaming callbacks of the synchronous engine, on a toy Program whose step_async feeds the
in-flight tokens the way CudaProgram does (tests/runtime/toy_program.py: AsyncToyProgram)."""
import asyncio
import time

import numpy as np
import pytest

from runtime import Engine, SamplingParams
from runtime.engine import PLACEHOLDER, RequestStatus
from tests.runtime.toy_program import NUM_SPECIAL, AsyncToyModel, ToyModel

SCRIPT = "Hello wörld! The end. € 😀 done"


def make_prompts(lengths=(1, 7, 16, 17, 33, 4, 2, 9), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(NUM_SPECIAL, 259, size=n).tolist() for n in lengths]


def run_engine(model, prompts, params, **engine_kwargs):
    """-> (engine, [(token_ids, text, finish_reason)] per prompt, the (request id, token) callbacks in order)."""
    engine = Engine(model, **engine_kwargs)
    streamed = []
    outs = engine.generate(prompts, params, on_token=lambda rid, tok: streamed.append((rid, tok)))
    return engine, [(o.token_ids, o.text, o.finish_reason) for o in outs], streamed


def run(async_scheduling, prompts, params, *, model_kwargs=None, **engine_kwargs):
    return run_engine(AsyncToyModel(**(model_kwargs or {})), prompts, params, async_scheduling=async_scheduling,
                      **engine_kwargs)


def per_request(stream):
    out = {}
    for rid, tok in stream:
        out.setdefault(rid, []).append(tok)
    return out


def both(prompts, params, **kwargs):
    sync_engine, want, want_stream = run(False, prompts, params, **kwargs)
    engine, got, got_stream = run(None, prompts, params, **kwargs)
    assert sync_engine.num_async_steps == 0
    assert got == want
    # each request's tokens reach the callback in order (across requests the order may differ where the two engines
    # preempt at different steps)
    assert per_request(got_stream) == per_request(want_stream)
    assert engine.scheduler.allocator.num_free == engine.program.num_blocks  # every block back
    assert engine._inflight is None  # nothing left in flight
    return engine, sync_engine


@pytest.mark.parametrize("block_size,budget", [(16, 512), (4, 7)])
def test_greedy_batch_with_chunked_prefill_equals_the_sync_engine(block_size, budget):
    engine, _ = both(make_prompts(), SamplingParams(max_tokens=11, temperature=0.0, ignore_eos=True),
                     model_kwargs={"block_size": block_size}, num_blocks=200, max_num_batched_tokens=budget)
    assert engine.num_async_steps > 0.8 * engine.num_steps
    assert engine.program.num_fed_rows > 0


def test_mixed_max_tokens_finish_without_an_extra_step_for_the_request():
    """max_tokens is known ahead: a request's last token is launched, and no further row is scheduled for it."""
    prompts = make_prompts()
    params = [SamplingParams(max_tokens=1 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    engine, sync_engine = both(prompts, params, num_blocks=200)
    assert sum(s.num_tokens for s in engine.program.steps) == sum(s.num_tokens for s in sync_engine.program.steps)


def test_eos_and_stop_strings_are_seen_a_step_late_and_the_extra_token_is_dropped():
    prompts = ["Hello", "Hello w", "Hel"]
    for stop in (None, "end", ["ö", "zz"]):
        params = SamplingParams(max_tokens=100, temperature=0.0, stop=stop)
        engine, sync_engine = both(prompts, params, model_kwargs={"script_text": SCRIPT})
        # each request that stopped on its own ran one row the sync engine did not
        extra = sum(s.num_tokens for s in engine.program.steps) - sum(s.num_tokens for s in sync_engine.program.steps)
        assert 0 < extra <= len(prompts)


def test_max_model_len_caps_generation():
    both(make_prompts((30, 5)), SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True),
         max_model_len=40, num_blocks=40)


def test_preemption_with_tokens_in_flight_gives_the_same_tokens():
    prompts = make_prompts()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for budget in (512, 5):
        engine, sync_engine = both(prompts, params, model_kwargs={"block_size": 4}, num_blocks=14,
                                   max_num_batched_tokens=budget)
        assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_on_the_device_equals_the_sync_engine():
    prompts = make_prompts()
    params = [SamplingParams(max_tokens=9, temperature=0.9 if i % 3 else 0.0, seed=7 + i, ignore_eos=True)
              for i in range(len(prompts))]
    engine, _ = both(prompts, params, num_blocks=200)
    assert engine.num_async_steps > 0


def test_prefix_cache_hits_after_async_steps_see_real_tokens():
    """Blocks are registered in the prefix cache after the previous step's tokens replaced the placeholders."""
    shared = make_prompts((40,))[0]
    prompts = [shared + [10 + i] for i in range(3)]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = Engine(AsyncToyModel(block_size=4), num_blocks=200)
    first = engine.generate(prompts[:1], params)[0]
    # the first request's prompt + output as a prompt: its blocks, output included, come from the cache
    again = prompts[0] + first.token_ids[:-1]
    follow = engine.generate([again], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert engine.scheduler.prefix_cache_hits == 4 * ((len(again) - 1) // 4)  # every full block but the last token's
    sync = Engine(AsyncToyModel(block_size=4), num_blocks=200, async_scheduling=False)
    assert sync.generate([again], SamplingParams(max_tokens=5, temperature=0.0,
                                                 ignore_eos=True))[0].token_ids == follow[0].token_ids


def test_host_logit_requests_drain_the_pipeline_and_still_agree():
    """A request with logprobs needs each step's logits on the host: the engine collects the step in flight and
    runs synchronously while it is there."""
    prompts = make_prompts((5, 9, 3))
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2),
              SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)]
    engine, _ = both(prompts, params, num_blocks=200)
    assert 0 < engine.num_async_steps < engine.num_steps


def test_abort_with_a_token_in_flight_leaves_no_placeholder():
    engine = Engine(AsyncToyModel(), num_blocks=64)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    reqs = [engine._make_request(i, p, params, False) for i, p in enumerate(make_prompts((6, 8)))]
    for req in reqs:
        engine.scheduler.add_request(req)
    for _ in range(4):
        engine._step()
    assert engine._inflight is not None and reqs[0].token_ids[-1] == PLACEHOLDER
    engine.scheduler.abort_request(reqs[0])  # what the server does for a client that went away
    assert PLACEHOLDER not in reqs[0].token_ids and reqs[0].status is RequestStatus.FINISHED
    kept = list(reqs[0].output_token_ids)
    while engine.scheduler.has_unfinished_requests():
        engine._step()
    assert reqs[0].output_token_ids == kept  # the in-flight token of the aborted request was dropped
    alone = Engine(AsyncToyModel(), num_blocks=64, async_scheduling=False).generate([reqs[1].prompt_token_ids], params)
    assert reqs[1].output_token_ids == alone[0].token_ids
    assert engine.scheduler.allocator.num_free == 64


def test_a_failed_step_leaves_nothing_in_flight():
    engine = Engine(AsyncToyModel(), num_blocks=16)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    engine.generate(make_prompts((3,)), params)
    engine.program.k_pool = None  # breaks the next step
    with pytest.raises(TypeError):
        engine.generate(make_prompts((3, 4)), params)
    assert engine._inflight is None and not engine.scheduler.has_unfinished_requests()
    engine.program.k_pool = engine.program.v_pool.copy()
    engine.program.reset_pool()
    want = Engine(AsyncToyModel(), num_blocks=16, async_scheduling=False).generate(make_prompts((5,)), params)
    assert [o.token_ids for o in engine.generate(make_prompts((5,)), params)] == [o.token_ids for o in want]


@pytest.mark.parametrize("model,kwargs,message", [
    (ToyModel, {"async_scheduling": True}, "needs a Program with step_async"),
    (AsyncToyModel, {"async_scheduling": "yes"}, "must be True, False or None"),
])
def test_bad_async_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(model(), **kwargs)


def test_programs_without_step_async_run_synchronously():
    engine = Engine(ToyModel(), num_blocks=64)
    assert not engine.async_scheduling
    engine.generate(make_prompts((4,)), SamplingParams(max_tokens=5, temperature=0.0))
    assert engine.num_async_steps == 0


def test_adaptive_speculation_launches_early_while_drafts_are_held_off(monkeypatch):
    """With adaptive speculation, the steps during which the controller holds drafts off (its choice of none, for
    RECHECK_EVERY steps) are launched early; when it decides again the engine collects the step in flight and
    proposes. Greedy output stays that of the engine without speculation."""
    from lowering.speculation import Speculative
    from runtime.speculative import DraftLengthController

    calls = []

    def choose(self, requests, prefill_tokens=0, max_tokens=None, uniform=False):  # drafts at every third decision
        calls.append(len(requests))
        k = self.max_len if len(calls) % 3 == 0 else 0
        if k == 0:
            self._hold = self.RECHECK_EVERY - 1
        return k

    monkeypatch.setattr(DraftLengthController, "choose", choose)
    prompts = make_prompts((5, 12, 3, 30))
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    want = Engine(AsyncToyModel(), async_scheduling=False).generate(prompts, params)
    engine = Engine(AsyncToyModel(), speculative=Speculative("ngram", num_tokens=3, ngram_min=1, ngram_max=2),
                    max_num_batched_tokens=32)
    assert engine.async_scheduling
    decided = []
    propose = engine._propose

    def spy(k=None):
        decided.append(k)
        return propose(k)

    engine._propose = spy
    got = engine.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert engine.num_async_steps > 10 and engine.spec_stats.num_verifications > 0 and len(calls) >= 3
    assert any(k for k in decided)  # a length chosen during an async step, drafted after collecting it
    assert engine._inflight is None and engine.scheduler.stats().num_used_blocks == 0


def test_fixed_length_speculation_runs_synchronously():
    from lowering.speculation import Speculative

    engine = Engine(AsyncToyModel(), speculative=Speculative("ngram", num_tokens=3, adaptive=False))
    assert not engine.async_scheduling
    with pytest.raises(ValueError, match="fixed draft length"):
        Engine(AsyncToyModel(), speculative=Speculative("ngram", num_tokens=3, adaptive=False), async_scheduling=True)


def test_async_engine_streams_what_generate_returns_and_abort_frees_blocks():
    """The serving loop (AsyncEngine) over an engine that launches early: each stream carries exactly the tokens and
    text of the sync engine's generate(); a stream left early aborts its request, whose blocks come back."""
    from runtime.async_engine import AsyncEngine

    prompts = ["Hello", "Hello w", "The end"]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    want = Engine(AsyncToyModel(script_text=SCRIPT), async_scheduling=False).generate(prompts, params)
    engine = Engine(AsyncToyModel(script_text=SCRIPT), num_blocks=64)
    async_engine = AsyncEngine(engine)

    async def stream(prompt, leave_after=None):
        tokens, text, reason = [], "", None
        async for event in async_engine.generate(prompt, params):
            tokens += event.token_ids
            text += event.text
            reason = event.finish_reason
            if leave_after is not None and len(tokens) >= leave_after:
                break
        return tokens, text, reason

    async def main():
        return await asyncio.gather(*(stream(p) for p in prompts), stream("Hello", leave_after=3))

    try:
        *got, left = asyncio.run(main())
        assert got == [(o.token_ids, o.text, o.finish_reason) for o in want]
        assert PLACEHOLDER not in left[0] and len(left[0]) >= 3 and left[2] is None
        deadline = time.time() + 10
        while engine.scheduler.has_unfinished_requests() and time.time() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.allocator.num_free == 64 and engine.num_async_steps > 0
    finally:
        async_engine.shutdown()
