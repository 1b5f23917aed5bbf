"""Device speculation (Engine._step_device_spec): n-gram drafts, verification and the accept rule of many steps run
on the Program (start_ngram_loop) and the engine collects their tokens a chunk later. On the toy program whose loop
follows CudaProgram's contract (tests/runtime/toy_program.py: SpecToyProgram, a NaN-paged pool that fails on a slot
outside the blocks given), the engine gives exactly the tokens, texts, finish reasons and streams of the engine
without speculation, and every block comes back."""
import asyncio

import numpy as np
import pytest

from lowering.speculation import Speculative
from runtime import Engine, SamplingParams
from runtime.engine import RequestStatus
from tests.runtime.test_async_scheduling import per_request
from tests.runtime.test_async_scheduling import run_engine as run
from tests.runtime.toy_program import NUM_SPECIAL, AsyncToyModel, SpecToyModel, ToyModel

SCRIPT = "the cat sat on the mat. the cat sat on the hat. the dog sat on the cat. the end"


@pytest.fixture
def multi_seq(monkeypatch):
    """Bursts over several requests (the engine's default takes one: DEVICE_SPEC_MAX_SEQS)."""
    monkeypatch.setattr(Engine, "DEVICE_SPEC_MAX_SEQS", 8)


def ngram(k=3, adaptive=False, **kw):
    return Speculative("ngram", num_tokens=k, adaptive=adaptive, **kw)


def repetitive_prompts(lengths=(9, 3, 17, 30), seed=0):
    """Prompts that repeat a short motif, so that prompt lookup finds drafts the toy model sometimes accepts."""
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        motif = rng.integers(NUM_SPECIAL, 40, size=int(rng.integers(2, 5))).tolist()
        out.append((motif * (n // len(motif) + 1))[:n])
    return out


def same_as_plain(prompts, params, model_kwargs=None, spec=None, **engine_kwargs):
    _, want, want_stream = run(ToyModel(**(model_kwargs or {})), prompts, params, speculative=False, **engine_kwargs)
    engine, got, got_stream = run(SpecToyModel(**(model_kwargs or {})), prompts, params,
                                  speculative=spec or ngram(), **engine_kwargs)
    assert got == want
    assert per_request(got_stream) == per_request(want_stream)
    assert engine.scheduler.allocator.num_free == engine.program.num_blocks
    assert engine._burst is None
    return engine


def test_one_request_runs_on_the_device_and_equals_the_plain_engine():
    engine = same_as_plain(repetitive_prompts((12,)), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
    assert engine.spec_on_device and engine.num_device_spec_bursts == 1
    assert engine.program.num_loop_iterations == engine.num_device_spec_iterations > 0
    assert engine.spec_stats.num_device_steps == engine.num_device_spec_iterations
    assert engine.spec_stats.to_json()["num_device_steps"] == engine.num_device_spec_iterations
    stats = engine.spec_stats
    assert stats.num_verifications > 0 and stats.num_accepted_tokens <= stats.num_draft_tokens
    # each iteration emits one to k + 1 tokens; the prefill step emitted the first
    assert engine.num_device_spec_iterations < 39
    # steps verify drafts (q = k + 1) while the last one found n-gram matches, else decode plainly (q = 1)
    assert set(engine.program.launched_q) <= {1, 4} and 4 in engine.program.launched_q


@pytest.mark.parametrize("block_size,budget", [(16, 512), (4, 7)])
def test_ragged_batch_with_chunked_prefill_and_mixed_max_tokens(multi_seq, block_size, budget):
    prompts = repetitive_prompts()
    params = [SamplingParams(max_tokens=5 + 9 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    engine = same_as_plain(prompts, params, model_kwargs={"block_size": block_size}, num_blocks=200,
                           max_num_batched_tokens=budget)
    # a finished request ends a burst; the others go on in a new one
    assert engine.num_device_spec_bursts >= 2 and engine.num_device_spec_iterations > 0


@pytest.mark.parametrize("stop", [None, "cat", ["mat.", "zz"]])
def test_eos_and_stop_strings_mid_chunk(multi_seq, stop):
    prompts = ["the cat sat", "the", "the dog sat on"]
    engine = same_as_plain(prompts, SamplingParams(max_tokens=200, temperature=0.0, stop=stop),
                           model_kwargs={"script_text": SCRIPT}, spec=ngram(k=4))
    assert engine.num_device_spec_iterations > 0
    assert engine.spec_stats.num_accepted_tokens > 0  # the script repeats its phrases: drafts are taken


def test_max_model_len_caps_generation_near_the_end_of_the_table(multi_seq):
    engine = same_as_plain(repetitive_prompts((30, 5)), SamplingParams(max_tokens=100, temperature=0.0,
                                                                       ignore_eos=True),
                           max_model_len=48, num_blocks=40)
    assert engine.num_device_spec_iterations > 0


def test_a_short_pool_stops_bursts_without_losing_tokens(multi_seq):
    """Bursts take blocks ahead for the iterations in flight; when the pool is short they stop (or never start) and
    the plain engine's preemption takes over."""
    prompts = repetitive_prompts((9, 14, 20))
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    same_as_plain(prompts, params, model_kwargs={"block_size": 4}, num_blocks=16)


def test_waiting_requests_end_a_burst_and_bursts_resume_once_all_decode(multi_seq):
    prompts = repetitive_prompts((9, 3, 17, 30, 6, 11))
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = same_as_plain(prompts, params, max_num_seqs=2, num_blocks=100)
    assert engine.num_device_spec_bursts >= 3


def test_sampling_and_host_logit_requests_do_not_burst():
    prompts = repetitive_prompts((9, 12))
    for params in (SamplingParams(max_tokens=12, temperature=0.8, seed=3, ignore_eos=True),
                   SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.2, ignore_eos=True),
                   [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                    SamplingParams(max_tokens=12, temperature=0.0, logprobs=2, ignore_eos=True)]):
        engine = Engine(SpecToyModel(), speculative=ngram())
        engine.generate(prompts, params)
        assert engine.num_device_spec_iterations == 0


def test_abort_mid_burst_frees_the_blocks_and_drops_the_tokens_in_flight(multi_seq):
    engine = Engine(SpecToyModel(), speculative=ngram(), num_blocks=64)
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    reqs = [engine._make_request(i, p, params, False) for i, p in enumerate(repetitive_prompts((9, 12)))]
    for r in reqs:
        engine.scheduler.add_request(r)
    while engine._burst is None or engine.num_device_spec_iterations < 2:
        engine._step()
    assert engine._burst.inflight  # a chunk in flight
    engine.scheduler.abort_request(reqs[0])
    n_out = len(reqs[0].output_token_ids)
    while engine.scheduler.has_unfinished_requests():
        engine._step()
    assert len(reqs[0].output_token_ids) == n_out and reqs[0].status is RequestStatus.FINISHED
    assert len(reqs[1].output_token_ids) == 60
    assert engine._burst is None and engine.scheduler.allocator.num_free == engine.program.num_blocks


def test_async_engine_streams_the_plain_engines_tokens(multi_seq):
    from runtime.async_engine import AsyncEngine

    prompts = ["the cat sat", "the dog", "the"]
    params = SamplingParams(max_tokens=60, temperature=0.0)
    want = Engine(ToyModel(script_text=SCRIPT), speculative=False).generate(prompts, params)
    engine = Engine(SpecToyModel(script_text=SCRIPT), speculative=ngram(), num_blocks=64)
    async_engine = AsyncEngine(engine)

    async def stream(prompt):
        tokens, text, reason = [], "", None
        async for event in async_engine.generate(prompt, params):
            tokens += event.token_ids
            text += event.text
            reason = event.finish_reason
        return tokens, text, reason

    async def main():
        return await asyncio.gather(*(stream(p) for p in prompts))

    try:
        got = asyncio.run(main())
    finally:
        async_engine.shutdown()
    assert [(t, x, r) for t, x, r in got] == [(o.token_ids, o.text, o.finish_reason) for o in want]
    assert engine.num_device_spec_iterations > 0
    assert engine.scheduler.allocator.num_free == engine.program.num_blocks


def test_adaptive_bursts_only_where_they_beat_plain_steps():
    """The choice compares tokens a request emits per second in bursts (measured per batch size) with plain steps
    (the controller's step cost); a burst that loses holds bursts off for DEVICE_SPEC_PROBE_EVERY steps."""
    engine = Engine(SpecToyModel(), speculative=ngram(adaptive=True), num_blocks=64)
    req = engine._make_request(0, repetitive_prompts((9,))[0], SamplingParams(max_tokens=50, temperature=0.0), False)
    engine.scheduler.add_request(req)
    engine._step()  # the prefill
    assert engine._burst is None and engine._device_spec_state() == "burst"  # nothing measured: explore
    engine._burst_rate[1] = 600.0  # tokens/s in bursts
    assert engine._device_spec_state() == "plain"  # plain steps not measured yet: measured first
    assert engine._burst_hold == engine.DEVICE_SPEC_PLAIN_PROBE - 1
    engine._burst_hold = 0
    engine.draft_controller.step_cost[1] = 1e-3  # plain: 1,000 tokens/s
    assert engine._device_spec_state() == "plain" and engine._burst_hold == engine.DEVICE_SPEC_PROBE_EVERY - 1
    engine._burst_hold = 0
    engine._burst_rate[1] = 1250.0  # beats plain by more than the margin
    assert engine._device_spec_state() == "burst"


def test_adaptive_engine_equals_the_plain_engine(multi_seq):
    prompts = repetitive_prompts((9, 12, 5))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine = same_as_plain(prompts, params, spec=ngram(adaptive=True))
    assert engine.num_device_spec_iterations > 0


def test_option_errors():
    with pytest.raises(ValueError, match="spec_on_device must be True, False or None"):
        Engine(SpecToyModel(), speculative=ngram(), spec_on_device="yes")
    with pytest.raises(ValueError, match="no start_ngram_loop"):
        Engine(AsyncToyModel(), speculative=ngram(), spec_on_device=True)
    with pytest.raises(ValueError, match="method='ngram'"):
        Engine(SpecToyModel(), speculative=False, spec_on_device=True)
    engine = Engine(SpecToyModel(), speculative=ngram(), spec_on_device=False)
    engine.generate(repetitive_prompts((9,)), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    assert not engine.spec_on_device and engine.num_device_spec_iterations == 0
    assert engine.spec_stats.num_verifications > 0  # host drafts, as before


def test_without_ngram_matches_bursts_decode_plainly():
    """Prompts with no repeated token: no draft is found, so once the first chunk is back (two are launched before)
    every step is a plain decode (q = 1) on the device, and nothing is counted as drafted."""
    prompts = [list(range(NUM_SPECIAL + 10, NUM_SPECIAL + 40))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    engine = same_as_plain(prompts, params, model_kwargs={"script_text": "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"})
    launched = engine.program.launched_q
    assert launched[:2] == [4, 4] and set(launched[2:]) == {1}
    assert engine.spec_stats.num_draft_tokens == 0


def test_by_default_only_a_lone_request_bursts():
    """DEVICE_SPEC_MAX_SEQS = 1: two decoding requests take the plain (host-drafted) path; the one left bursts."""
    prompts = repetitive_prompts((9, 12))
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 30)]
    engine = same_as_plain(prompts, params)
    assert engine.DEVICE_SPEC_MAX_SEQS == 1
    assert engine.num_device_spec_bursts == 1 and all(loop.tables.shape[0] == 1 for loop in engine.program.loops)
