"""Tests of runtime/sampler.py: parameter validation, greedy, top-k/top-p masks, seeded sampling."""
import numpy as np
import pytest

from runtime import sampler
from runtime.sampler import (
    SamplingParams,
    draw_token,
    filter_top_k_top_p,
    find_stop_string,
    make_generator,
    sample,
    top_token_ids,
)


def kept_ids(masked_row):
    return np.flatnonzero(np.isfinite(masked_row)).tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.0}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"seed": -1}, "seed"),
        ({"stop": 3}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [1, -1]}, "stop_token_ids"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_invalid_params_raise_value_error_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_validate_catches_fields_changed_after_construction():
    params = SamplingParams()
    params.top_p = 0
    with pytest.raises(ValueError, match="top_p"):
        params.validate()


def test_valid_params_and_stop_strings():
    assert SamplingParams(stop="x").stop_strings == ("x",)
    assert SamplingParams(stop=["a", "b"]).stop_strings == ("a", "b")
    assert SamplingParams().stop_strings == ()
    SamplingParams(top_k=-1, top_p=1, temperature=0, seed=np.int64(3), stop_token_ids=[0])


def test_greedy_picks_argmax_and_lowest_id_on_ties():
    logits = np.array([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -0.5, -0.5]], np.float32)
    params = [SamplingParams(temperature=0.0)] * 3
    tokens = sample(logits, params, [make_generator(0)] * 3)
    assert tokens.dtype == np.int32
    assert tokens.tolist() == [1, 0, 2]


def test_top_k_keeps_exactly_k_tokens_ties_by_lowest_id():
    row = np.array([0.1, 2.0, 2.0, 1.0, -1.0])
    assert kept_ids(filter_top_k_top_p(row, 2, 1.0)) == [1, 2]
    assert kept_ids(filter_top_k_top_p(row, 3, 1.0)) == [1, 2, 3]
    assert kept_ids(filter_top_k_top_p(np.array([1.0, 2.0, 2.0, 2.0, 0.0]), 2, 1.0)) == [1, 2]
    assert kept_ids(filter_top_k_top_p(row, 0, 1.0)) == [0, 1, 2, 3, 4]
    assert kept_ids(filter_top_k_top_p(row, -1, 1.0)) == [0, 1, 2, 3, 4]
    assert kept_ids(filter_top_k_top_p(row, 100, 1.0)) == [0, 1, 2, 3, 4]
    masked = filter_top_k_top_p(row, 3, 1.0)
    np.testing.assert_array_equal(masked[[1, 2, 3]], row[[1, 2, 3]])  # kept values untouched


def test_top_token_ids_is_a_prefix_of_a_stable_sort():
    rng = np.random.default_rng(0)
    row = rng.integers(0, 20, size=500).astype(np.float64)  # many ties
    full = np.argsort(-row, kind="stable")
    for n in (1, 7, 25, 26, 499, 500):
        assert top_token_ids(row, n).tolist() == full[:n].tolist()


@pytest.mark.parametrize(
    "top_p, expected", [(0.4, [0]), (0.6, [0, 1]), (0.8, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])]
)
def test_top_p_keeps_smallest_prefix_reaching_top_p(top_p, expected):
    row = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    assert kept_ids(filter_top_k_top_p(row, 0, top_p)) == expected


def test_top_p_applies_to_probabilities_renormalised_after_top_k():
    # After top_k=3 the probabilities are 4/7, 2/7, 1/7, so top_p=0.6 needs two tokens.
    row = np.log(np.array([0.4, 0.2, 0.1, 0.3]))
    assert kept_ids(filter_top_k_top_p(row, 3, 0.6)) == [0, 3]
    assert kept_ids(filter_top_k_top_p(row, 0, 0.6)) == [0, 3]
    assert kept_ids(filter_top_k_top_p(row, 0, 0.75)) == [0, 1, 3]


def test_top_p_always_keeps_the_best_token():
    assert kept_ids(filter_top_k_top_p(np.array([0.0, 10.0, 0.0]), 0, 1e-9)) == [1]


@pytest.mark.parametrize("top_k", [0, 300, 5000])
def test_top_p_over_a_large_vocab_matches_a_full_sort(monkeypatch, top_k):
    rng = np.random.default_rng(1)
    row = rng.normal(size=20000) * 2
    for top_p in (0.3, 0.9, 0.999):
        order = np.argsort(-row, kind="stable")[: top_k or None]
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        expected = sorted(order[(np.cumsum(probs) - probs) < top_p].tolist())
        monkeypatch.setattr(sampler, "NUM_TOP_P_CANDIDATES", 16)  # forces the widening loop
        assert kept_ids(filter_top_k_top_p(row, top_k, top_p)) == expected
        monkeypatch.setattr(sampler, "NUM_TOP_P_CANDIDATES", 1024)
        assert kept_ids(filter_top_k_top_p(row, top_k, top_p)) == expected


def test_sampling_matches_the_distribution():
    probs = np.array([0.1, 0.2, 0.3, 0.4])
    n = 8000
    logits = np.tile(np.log(probs).astype(np.float32), (n, 1))
    gen = make_generator(123)
    tokens = sample(logits, [SamplingParams(temperature=1.0)] * n, [gen] * n)
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n, probs, atol=0.02)

    tokens = sample(logits, [SamplingParams(temperature=0.5)] * n, [gen] * n)
    sharpened = probs**2 / np.sum(probs**2)
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n, sharpened, atol=0.02)

    tokens = sample(logits, [SamplingParams(top_k=2)] * n, [gen] * n)
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n, [0, 0, 3 / 7, 4 / 7], atol=0.02)

    tokens = sample(logits, [SamplingParams(top_p=0.65)] * n, [gen] * n)  # keeps 0.4 + 0.3
    np.testing.assert_allclose(np.bincount(tokens, minlength=4) / n, [0, 0, 3 / 7, 4 / 7], atol=0.02)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    params = [SamplingParams(seed=7), SamplingParams(temperature=0.0), SamplingParams(seed=8, top_k=10, top_p=0.9)]

    def run(rows):
        gens = {i: make_generator(params[i].seed) for i in rows}
        return [sample(logits[rows], [params[i] for i in rows], [gens[i] for i in rows]).tolist() for _ in range(20)]

    batched = np.array(run([0, 1, 2]))  # [20 draws, 3 rows]
    assert batched.tolist() == np.array(run([0, 1, 2])).tolist()
    assert batched[:, 0].tolist() == np.array(run([0]))[:, 0].tolist()
    assert batched[:, 2].tolist() == np.array(run([2]))[:, 0].tolist()
    assert len(set(batched[:, 0].tolist())) > 1  # it does sample


def test_unseeded_generators_differ():
    logits = np.zeros((200, 1000), np.float32)
    a = sample(logits, [SamplingParams()] * 200, [make_generator(None)] * 200)
    b = sample(logits, [SamplingParams()] * 200, [make_generator(None)] * 200)
    assert a.tolist() != b.tolist()


def test_draw_never_returns_a_zero_weight_token():
    weights = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    draws = [draw_token(weights, u) for u in (0.0, 0.4999999, 0.5, 0.9999999, np.nextafter(1.0, 0.0))]
    assert draws == [1, 1, 3, 3, 3]
    assert draw_token(np.array([0.0, 1e-300, 0.0]), 0.99) == 1


def test_sample_checks_row_counts():
    with pytest.raises(ValueError, match="2 logit rows"):
        sample(np.zeros((2, 4), np.float32), [SamplingParams()], [make_generator(0)])


def test_find_stop_string_finds_earliest_match_in_new_text():
    assert find_stop_string("hello world", ("wor", "o"), 0) == 4
    assert find_stop_string("hello world", ("wor",), 8) == 6  # match spans old and new text
    assert find_stop_string("hello world", ("hel",), 8) == -1  # ended before the new text
    assert find_stop_string("abc", (), 0) == -1


def test_min_p_keeps_tokens_near_the_best():
    from runtime.sampler import make_generator, sample_row

    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))
    params = SamplingParams(temperature=1.0, min_p=0.25)  # keeps p >= 0.125: tokens 0 and 1
    drawn = {sample_row(logits, params, make_generator(s)) for s in range(200)}
    assert drawn == {0, 1}


def test_presence_and_frequency_penalties_follow_openai():
    from runtime.sampler import apply_penalties, make_generator, sample

    logits = np.zeros(6)
    apply_penalties(logits, [2, 2, 2, 4], presence=0.5, frequency=0.25)
    np.testing.assert_allclose(logits, [0, 0, -1.25, 0, -0.75, 0])
    # greedy with a frequency penalty moves off the token it repeated
    row = np.array([[1.0, 0.9, 0.0]], np.float32)
    p = SamplingParams(temperature=0.0, frequency_penalty=0.2)
    assert sample(row, [p], [make_generator(0)], [[0]])[0] == 1
    assert sample(row, [p], [make_generator(0)], [[]])[0] == 0


def test_token_logprobs_are_normalised_and_ranked():
    from runtime.sampler import token_logprobs

    logits = np.array([2.0, 1.0, 0.0, 3.0])
    lp, top = token_logprobs(logits, 1, 2)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert abs(lp - np.log(probs[1])) < 1e-12
    assert [t for t, _ in top] == [3, 0] and abs(top[0][1] - np.log(probs[3])) < 1e-12


@pytest.mark.parametrize("kwargs, message", [
    ({"min_p": 1.5}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
])
def test_new_sampling_params_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    ({"logit_bias": [1, 2]}, "logit_bias"), ({"logit_bias": {"3": 1.0}}, "logit_bias keys"),
    ({"logit_bias": {-1: 1.0}}, "logit_bias keys"), ({"logit_bias": {3: 101}}, r"logit_bias\[3\]"),
    ({"logit_bias": {3: float("inf")}}, r"logit_bias\[3\]"), ({"logit_bias": {3: "1"}}, r"logit_bias\[3\]"),
    ({"logit_bias": dict.fromkeys(range(1025), 1.0)}, "at most 1024"),
    ({"min_tokens": -1}, "min_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
    ({"min_tokens": 17, "max_tokens": 16}, "must not exceed max_tokens"),
])
def test_logit_bias_and_min_tokens_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_logit_bias_adds_to_the_logits_before_sampling():
    row = np.array([[2.0, 1.0, 0.0, 1.5]], np.float32)
    greedy = SamplingParams(temperature=0.0, logit_bias={0: -100, 2: 1.75})
    assert greedy.needs_host_logits and sample(row, [greedy], [make_generator(0)], [[]])[0] == 2
    assert sample(row, [SamplingParams(temperature=0.0, logit_bias={0: -1.0})], [make_generator(0)], [[]])[0] == 3
    # with temperature: a -100 bias bans the best token in practice; the rest keep their relative odds
    p = SamplingParams(temperature=1.0, logit_bias={0: -100.0}, seed=3)
    gen = make_generator(3)
    draws = [sample(row, [p], [gen], [[]])[0] for _ in range(2000)]
    assert 0 not in draws
    w = np.exp([1.0, 0.0, 1.5])
    np.testing.assert_allclose([draws.count(t) / 2000 for t in (1, 2, 3)], w / w.sum(), atol=0.04)
    # ids past the logits row (the engine refuses ids outside the vocabulary; padded rows may be shorter) are skipped
    assert sample(row, [SamplingParams(temperature=0.0, logit_bias={9: 100})], [make_generator(0)], [[]])[0] == 0


def test_min_tokens_holds_back_eos_and_stop_token_ids_until_enough_tokens_are_out():
    row = np.array([[0.0, 5.0, 4.0, 3.0]], np.float32)  # token 1 (EOS here) is the best, 2 a stop token
    p = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2])
    assert sample(row, [p], [make_generator(0)], [[]], eos_token_ids=[1])[0] == 3
    assert sample(row, [p], [make_generator(0)], [[7]], eos_token_ids=[1])[0] == 3
    assert sample(row, [p], [make_generator(0)], [[7, 7]], eos_token_ids=[1])[0] == 1  # two out: anything goes
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True)  # EOS does not stop it: not held back
    assert sample(row, [ignore], [make_generator(0)], [[]], eos_token_ids=[1])[0] == 1


@pytest.mark.parametrize("value", [0, -1.0, 10.5, float("nan"), "2", True])
def test_repetition_penalty_is_validated(value):
    with pytest.raises(ValueError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=value)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    from runtime.sampler import apply_repetition_penalty

    logits = np.array([2.0, -1.0, 3.0, 0.5, -2.0], np.float32)
    apply_repetition_penalty(logits, [0, 1, 1, 4, 99], 2.0)  # 99: past the row, skipped
    np.testing.assert_allclose(logits, [1.0, -2.0, 3.0, 0.5, -4.0])
    row = np.array([[3.0, 2.0, 0.0]], np.float32)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    assert sample(row, [p], [make_generator(0)], [[]], prompt_tokens=[[0]])[0] == 1  # the prompt counts
    assert sample(row, [p], [make_generator(0)], [[0]], prompt_tokens=[[]])[0] == 1  # and the output
    assert sample(row, [p], [make_generator(0)], [[]], prompt_tokens=[[2]])[0] == 0
