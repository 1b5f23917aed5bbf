"""Speculative decoding in the engine: accept rules, proposers, exactness (greedy) and distribution (sampling)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from lowering.speculation import Speculative
from runtime import Engine, SamplingParams
from runtime.sampler import sampling_weights
from runtime.speculative import (Draft, DraftLengthController, NgramProposer, accept_greedy, accept_sampled,
                                 cost_bucket)
from runtime.step import StepInput
from tests.runtime.toy_program import ToyModel, reference_greedy

PROMPTS = ["abcabcabcabc", "hello hello hello", "xyz", "the cat the cat the", "a" * 40]


# -- accept rules -----------------------------------------------------------------------------------


def test_accept_greedy_prefix_then_target_token():
    assert accept_greedy([5, 6, 7, 8], [5, 6, 7]) == [5, 6, 7, 8]  # all accepted + bonus
    assert accept_greedy([5, 9, 7, 8], [5, 6, 7]) == [5, 9]  # first mismatch: the target's token
    assert accept_greedy([4, 6, 7, 8], [5, 6, 7]) == [4]
    assert accept_greedy([3], []) == [3]


def _toy_target(context: tuple[int, ...], vocab: int) -> np.ndarray:
    """A context-dependent distribution over a small vocabulary (f64[V], sums to 1)."""
    rng = np.random.default_rng(hash(context) % (2**32))
    logits = rng.normal(size=vocab) * 0.8
    return np.exp(logits) / np.exp(logits).sum()


@pytest.mark.parametrize("stochastic_draft", [False, True])
def test_rejection_sampling_matches_target_joint_distribution(stochastic_draft):
    """Chi-square: the first two emitted tokens of speculative sampling (k = 2 drafts) follow p(x1) p(x2 | x1)."""
    vocab, k, n = 4, 2, 12000
    params = SamplingParams(temperature=1.0)
    rng = np.random.default_rng(0)
    prompt = (1,)
    counts = np.zeros((vocab, vocab))
    for _ in range(n):
        ctx, out = prompt, []
        while len(out) < 2:
            tokens, probs = [], []
            c = ctx
            for _ in range(k):  # the draft: a different distribution (or a fixed guess), drawn with rng
                if stochastic_draft:
                    q = _toy_target(c + (99,), vocab) ** 0.5
                    q /= q.sum()
                    t = int(rng.choice(vocab, p=q))
                    probs.append(q)
                else:
                    t = (c[-1] + 1) % vocab
                tokens.append(t)
                c = c + (t,)
            # target rows: row j is the distribution after ctx + drafts[:j]; as log-probabilities (logits)
            logits = np.log(np.stack([_toy_target(ctx + tuple(tokens[:j]), vocab) for j in range(k + 1)]))
            draft = Draft(tokens, np.stack(probs).astype(np.float32) if stochastic_draft else None)
            emitted = accept_sampled(logits.astype(np.float32), draft, params, rng)
            assert 1 <= len(emitted) <= k + 1
            out += emitted
            ctx = ctx + tuple(emitted)
        counts[out[0], out[1]] += 1
    p1 = _toy_target(prompt, vocab)
    expected = np.stack([p1[a] * _toy_target(prompt + (a,), vocab) for a in range(vocab)]) * n
    assert expected.min() > 5
    _, p_value = stats.chisquare(counts.ravel(), expected.ravel())
    assert p_value > 1e-3, (counts, expected)


def test_accept_sampled_respects_top_k():
    """Tokens outside the target's top-k are never emitted, even when drafted."""
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.0, top_k=2)
    logits = np.array([[5.0, 4.0, 0.0, -1.0]] * 3, np.float32)
    for _ in range(200):
        out = accept_sampled(logits, Draft([3, 2]), params, rng)
        assert all(t in (0, 1) for t in out)


# -- proposers ----------------------------------------------------------------------------------------


class _Req:
    def __init__(self, tokens):
        self.token_ids = list(tokens)


def test_ngram_proposer_finds_longest_recent_match():
    p = NgramProposer(1, 3)
    r = _Req([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    assert p.propose([r], [2])[0].tokens == [7, 8]  # the most recent "1 2 3" was followed by 7 8
    r.token_ids += [7]
    assert p.propose([r], [3])[0].tokens == [8, 1, 2]  # "2 3 7" -> 8 1 2 (the index grows incrementally)
    assert p.propose([_Req([5, 6])], [3])[0].tokens == []  # nothing repeats
    p.release(r)
    assert r not in p._index


# -- the engine: greedy output is token-identical -------------------------------------------------------


def _greedy(max_tokens=40):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def baseline():
    return [o.token_ids for o in Engine(ToyModel(seed=3)).generate(PROMPTS, _greedy())]


@pytest.mark.parametrize("spec", [
    Speculative("ngram", num_tokens=4, adaptive=False),
    Speculative("ngram", num_tokens=3),
    Speculative("draft", num_tokens=4, adaptive=False, draft=ToyModel(seed=3)),  # always accepted
    Speculative("draft", num_tokens=3, adaptive=False, draft=ToyModel(seed=4)),  # (almost) never accepted
], ids=["ngram", "ngram-adaptive", "draft-same", "draft-other"])
def test_greedy_speculation_is_token_identical(spec, baseline):
    # a small token budget trims drafts and chunks prefills, so drafts, prefills and plain decodes share steps
    engine = Engine(ToyModel(seed=3), speculative=spec, max_num_batched_tokens=24)
    outs = engine.generate(PROMPTS, _greedy())
    assert [o.token_ids for o in outs] == baseline
    s = engine.spec_stats
    assert s.num_verifications > 0 and s.num_draft_tokens > 0
    assert s.num_emitted_tokens == s.num_accepted_tokens + s.num_verifications
    if spec.method == "draft" and spec.draft.seed == 3:
        assert s.acceptance_rate == 1.0
        assert engine.num_steps < 30  # 5 x 40 tokens in well under 40 steps
    # every draft token the engine kept past the accepted ones was rolled back: the pool holds no stale blocks
    assert engine.scheduler.stats().num_used_blocks == 0


def test_greedy_matches_reference_with_preemption_and_prefix_cache():
    """A pool too small for all requests forces preemptions; shared prefixes hit the cache; still identical."""
    prompts = ["shared prefix shared prefix " + c * 5 for c in "abcdef"]
    model = ToyModel(seed=5, default_num_blocks=14)
    spec = Speculative("ngram", num_tokens=4, adaptive=False)
    engine = Engine(model, speculative=spec, max_num_batched_tokens=64)
    outs = engine.generate(prompts, _greedy(30))
    ref_program = ToyModel(seed=5, default_num_blocks=64).make_program(max_model_len=256)
    for prompt, out in zip(prompts, outs):
        ids = model.tokenizer.encode(prompt)
        assert out.token_ids == reference_greedy(ref_program, ids, 30)
    st = engine.scheduler.stats()
    assert st.num_preemptions > 0
    assert st.prefix_cache.hit_tokens > 0
    assert engine.spec_stats.num_accepted_tokens > 0


def test_speculation_stops_exactly_at_eos_stop_strings_and_max_tokens():
    text = "one two three four five six"
    base_model = ToyModel(seed=1, script_text=text)  # "knows" the text, then EOS
    prompts = ["one two three four five six", "one two", "one two three"]
    cases = [SamplingParams(max_tokens=50, temperature=0.0),  # stops at EOS (inside an accepted draft)
             SamplingParams(max_tokens=50, temperature=0.0, stop=["five"]),
             SamplingParams(max_tokens=7, temperature=0.0)]
    for params in cases:
        base = Engine(base_model).generate(prompts, params)
        spec = Engine(ToyModel(seed=1, script_text=text),
                      speculative=Speculative("draft", num_tokens=5, adaptive=False,
                                              draft=ToyModel(seed=1, script_text=text)))
        outs = spec.generate(prompts, params)
        for a, b in zip(base, outs):
            assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
            assert len(b.token_ids) <= params.max_tokens
        assert spec.spec_stats.num_accepted_tokens > 0


def test_streaming_callback_sees_every_token_once():
    seen: dict[str, list[int]] = {}
    engine = Engine(ToyModel(seed=3), speculative=Speculative("draft", num_tokens=4, adaptive=False,
                                                              draft=ToyModel(seed=3)))
    outs = engine.generate(PROMPTS[:3], _greedy(20), on_token=lambda rid, t: seen.setdefault(rid, []).append(t))
    for o in outs:
        assert seen[o.request_id] == o.token_ids


# -- the engine: sampling has the target's distribution ---------------------------------------------------


def _exact_joint(model: ToyModel, prompt_ids: list[int], params: SamplingParams, vocab: int) -> np.ndarray:
    """p(x1, x2 | prompt) of the toy target under `params`, by running it (f64[V, V])."""
    program = model.make_program(max_model_len=model.max_model_len)

    def dist(ids):
        n = len(ids)
        program.reset_pool()
        inp = StepInput(token_ids=np.array(ids, np.int32), positions=np.arange(n, dtype=np.int32),
                        slot_mapping=np.arange(n, dtype=np.int32), query_start=np.array([0, n], np.int32),
                        seq_lens=np.array([n], np.int32),
                        block_tables=np.arange(program.max_blocks_per_seq, dtype=np.int32)[None, :],
                        logit_rows=np.array([n - 1], np.int32))
        w = sampling_weights(program.step(inp)[0], params)
        return w / w.sum()

    p1 = dist(prompt_ids)
    joint = np.zeros((vocab, vocab))
    for a in np.flatnonzero(p1):
        joint[a] = p1[a] * dist(prompt_ids + [int(a)])
    return joint


@pytest.mark.parametrize("method, draft_seed", [("ngram", None), ("draft", 4), ("draft", 3)],
                         ids=["ngram", "draft-other", "draft-same"])
def test_speculative_sampling_distribution_chi_square(method, draft_seed):
    """Many seeded requests of one prompt, top-k 3 (a small effective vocabulary): the joint distribution of
    the first two tokens equals the target's (chi-square), with drafts verified by rejection sampling. The
    ngram prompt holds every byte token, so prompt lookup always proposes (one-hot drafts, mostly rejected); a
    different draft model exercises the residual distribution, the target itself as draft the bonus token."""
    n = 1500
    prompt = [1] + list(range(3, 259)) if method == "ngram" else [1, 100, 101, 100, 101]
    params = [SamplingParams(max_tokens=3, temperature=1.3, top_k=3, seed=i, ignore_eos=True) for i in range(n)]
    draft = ToyModel(seed=draft_seed) if method == "draft" else None
    spec = Speculative(method, num_tokens=2, adaptive=False, draft=draft, ngram_min=1, ngram_max=2)
    model = ToyModel(seed=3, max_position_embeddings=512)
    engine = Engine(model, speculative=spec, max_num_seqs=64, max_num_batched_tokens=1024, num_blocks=1200)
    outs = engine.generate([prompt] * n, params)
    vocab = model.config.vocab_size
    counts = np.zeros((vocab, vocab))
    for o in outs:
        counts[o.token_ids[0], o.token_ids[1]] += 1
    expected = _exact_joint(ToyModel(seed=3, max_position_embeddings=512), prompt, params[0], vocab) * n
    s = engine.spec_stats
    assert s.num_verifications > n // 2
    if draft_seed == 3:
        assert s.acceptance_rate == 1.0  # q == p: every draft token is accepted
    keep = expected.ravel() > 0
    assert counts.ravel()[~keep].sum() == 0  # never a token the target could not sample
    obs, exp = counts.ravel()[keep], expected.ravel()[keep]
    small = exp < 5  # merge rare cells
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    _, p_value = stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert p_value > 1e-3


# -- adaptive draft length --------------------------------------------------------------------------------


def test_controller_speculates_at_low_load_and_not_at_high_load():
    """Step cost flat up to 64 rows then linear (a GPU-like roofline): with acceptance 0.7, batch 1 drafts the
    maximum, batch 64 drafts nothing."""
    def cost(t):
        return 0.01 * max(1.0, t / 64)

    for batch, want in ((1, 4), (64, 0)):
        ctl = DraftLengthController(4)
        reqs = [object() for _ in range(batch)]
        for _ in range(40):
            k = ctl.choose(reqs)
            ctl.record_step(batch * (k + 1), cost(batch * (k + 1)))
            for r in reqs:
                acc = min(k, np.random.default_rng(0).binomial(k, 0.7)) if k else 0
                ctl.record_acceptance(r, k, acc)
        assert ctl.choose(reqs) == want, (batch, ctl.step_cost)


def test_controller_needs_a_clear_gain_probes_and_forgets_stalls():
    """A predicted gain under GAIN_MARGIN is not taken; after PROBE_EVERY steps without drafts it drafts once
    (acceptance is only learned from verifications); a cost estimate that held a stall is replaced by a sample
    many times smaller."""
    reqs = [object() for _ in range(8)]
    ctl = DraftLengthController(1)
    # acceptance 0.5 (the prior): k=1 emits 1.5 tokens a step; a step of 16 rows costs 1.45x one of 8 rows,
    # so drafting is predicted ~3% faster: not enough
    ctl.step_cost = {cost_bucket(8): 1.0, cost_bucket(16): 1.45}
    ctl.draft_cost = {1: 0.0}
    ctl._explored = {(cost_bucket(8), 1): 2, (cost_bucket(8), 0): 2}
    picks = [ctl.choose(reqs) for _ in range(DraftLengthController.PROBE_EVERY + 1)]
    assert picks[:-1] == [0] * DraftLengthController.PROBE_EVERY and picks[-1] == 1  # the probe
    assert ctl.probing
    ctl.skip_probe()  # the engine skipped it (its shape would compile): a whole period passes before the next
    picks = [0 if ctl.hold_off() else ctl.choose(reqs) for _ in range(DraftLengthController.PROBE_EVERY)]
    assert picks == [0] * DraftLengthController.PROBE_EVERY and ctl.choose(reqs) == 1 and ctl.probing
    ctl.record_acceptance(reqs[0], 1, 0)  # the probe's draft was rejected (acceptance ~0.22); the counter resets
    assert ctl.choose(reqs) == 0
    ctl.step_cost[cost_bucket(16)] = 1.0  # verification rows now free: 1.22 tokens a step for the same cost
    assert ctl.choose(reqs) == 1
    # a stall: the first kept sample of a size was 100x the real cost; the next small one replaces it
    ctl = DraftLengthController(2)
    for seconds in (9.0, 5.0, 0.05):
        ctl.record_step(40, seconds)
    assert ctl.step_cost[cost_bucket(40)] == pytest.approx(0.05)
    ctl.record_draft(2, None, fill=0.5)  # a propose() that compiled: no cost sample, only the fill ratio
    assert 2 not in ctl.draft_cost and ctl.fill < 1.0


def test_controller_uniform_steps_pay_for_filled_rows():
    """Half-empty proposals: a ragged step runs only the drafted rows, a uniform (CUDA graph) step runs all
    B (k + 1); either way only the real half can be accepted. Verification rows cost as much as decode rows
    here, so drafting pays only on the ragged Program."""
    reqs = [object() for _ in range(16)]
    ctl = DraftLengthController(1)
    ctl.fill = 0.5
    for r in reqs:
        for _ in range(20):
            ctl.record_acceptance(r, 1, 1)  # acceptance ~1
    ctl.step_cost = {cost_bucket(16): 1.0, cost_bucket(24): 1.2, cost_bucket(32): 2.0}
    ctl.draft_cost = {1: 0.0}
    ctl._explored = {(cost_bucket(16), 1): 2, (cost_bucket(16), 0): 2}
    assert ctl.choose(reqs) == 1  # 16 + 8 rows emit ~24 tokens for 1.2: beats 16 for 1.0
    ctl._last_k = None
    assert ctl.choose(reqs, uniform=True) == 0  # 32 rows emit ~24 tokens for 2.0


def test_controller_non_adaptive_and_buckets():
    ctl = DraftLengthController(3, adaptive=False)
    assert ctl.choose([object()] * 100) == 3
    assert [cost_bucket(t) for t in (1, 8, 9, 17, 100)] == [1, 8, 10, 20, 112]


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="beam"), "method"),
    (dict(method="ngram", num_tokens=0), "num_tokens"),
    (dict(method="draft"), "draft="),
    (dict(method="medusa"), "heads="),
    (dict(method="ngram", ngram_min=3, ngram_max=2), "ngram_min"),
])
def test_bad_speculative_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Speculative(**kwargs).validate()


def test_engine_refuses_hidden_state_methods_without_hidden_output():
    class Handle(ToyModel):
        class graph:  # noqa: N801 - a stand-in with one output
            outputs = ["logits"]

    with pytest.raises(ValueError, match="hidden states"):
        Engine(Handle(), speculative=Speculative("medusa", heads="/nonexistent"))


def test_uniform_drafts_are_filled_and_still_exact(baseline):
    """A Program that prefers uniform steps (the CUDA program replays a graph per row count) gets every draft
    filled to the step's length with guesses; output stays identical and stats count only proposed tokens."""
    class UniformToy(ToyModel):
        def make_program(self, **kw):
            program = super().make_program(**kw)
            program.prefers_uniform_drafts = True
            return program

    engine = Engine(UniformToy(seed=3), speculative=Speculative("ngram", num_tokens=3, adaptive=False))
    outs = engine.generate(PROMPTS, _greedy())
    assert [o.token_ids for o in outs] == baseline
    program = engine.program
    q_lens = [s.num_tokens // s.num_seqs for s in program.steps if s.num_tokens == s.num_logit_rows]
    assert 4 in q_lens  # verification steps of 4 rows a sequence
    s = engine.spec_stats
    assert 0 < s.acceptance_rate <= 1 and s.num_emitted_tokens == s.num_accepted_tokens + s.num_verifications


def test_cpu_program_reports_which_uniform_shapes_would_compile():
    """Program.would_compile: the engine skips a probe whose step shape the Program has never run."""
    from lowering import compile_model
    from lowering.models import llama
    from tests.lowering.helpers import tiny_config

    cfg = tiny_config()
    cm = compile_model(llama.build_model(cfg, seed=0), config=cfg, progress=False, max_model_len=64)
    program = cm.make_program(num_blocks=16)
    assert program.would_compile(2, 3, 20)
    engine = Engine(cm, num_blocks=16, speculative=False)
    engine.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert not cm.make_program(num_blocks=16).would_compile(2, 1, 6)  # decodes of this engine (shared shapes)
    assert cm.make_program(num_blocks=16).would_compile(2, 5, 6)


def test_controller_does_not_probe_where_even_accepted_drafts_would_lose():
    """At high load a step of B (k + 1) rows costs ~k + 1 times one of B rows: drafts could not win even if every
    one were accepted, so the periodic probe (a verification of every request) is skipped; at low load it runs."""
    for batch, per_row, probes in ((64, True, False), (4, False, True)):
        reqs = [object() for _ in range(batch)]
        ctl = DraftLengthController(4)
        ctl.step_cost = {cost_bucket(batch * (k + 1)): (k + 1 if per_row else 1.0) * 1e-3 for k in range(5)}
        ctl.draft_cost = {k: 1e-3 for k in range(1, 5)}
        ctl._explored = {(cost_bucket(batch), 4): 2, (cost_bucket(batch), 0): 2}
        for r in reqs:
            ctl.record_acceptance(r, 4, 0)  # drafts were rejected so far: no drafts chosen
        picks = [0 if ctl.hold_off() else ctl.choose(reqs) for _ in range(3 * DraftLengthController.PROBE_EVERY)]
        assert any(picks) == probes, (batch, picks)
