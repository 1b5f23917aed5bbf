"""Speculative decoding on the real SmolLM2-135M-Instruct: greedy output is token-identical to the target alone,
for a ragged batch with continuous batching (chunked prefills share steps with verification rows)."""
import pytest

from lowering import Speculative, compile_model
from runtime import Engine, SamplingParams

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Count from one to ten.",
    "Repeat after me three times: the quick brown fox jumps over the lazy dog.",
]
PARAMS = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


# NOTE: its own compiled SmolLM2 (not the session fixture), so under pytest-xdist this file is a work unit of its
# own and runs beside the other SmolLM2 files instead of after them.
@pytest.fixture(scope="module")
def smollm2_compiled(smollm2_gguf_path):
    return compile_model(str(smollm2_gguf_path), target="cpu", progress=False)


@pytest.fixture(scope="module")
def baseline(smollm2_compiled):
    engine = Engine(smollm2_compiled, max_model_len=512, speculative=False)
    return [o.token_ids for o in engine.generate(PROMPTS, PARAMS, chat=True)]


@pytest.fixture(scope="module")
def truncated_draft(smollm2_gguf_path):
    return compile_model(str(smollm2_gguf_path), target="cpu", num_layers=4, progress=False)


def _check(engine, baseline):
    outs = engine.generate(PROMPTS, PARAMS, chat=True)
    assert [o.token_ids for o in outs] == baseline
    s = engine.spec_stats
    assert s.num_verifications > 0
    return s


def test_ngram_is_token_identical(smollm2_compiled, baseline):
    # a 64-token budget: the prompts prefill in chunks, next to the verification rows of those already decoding
    engine = Engine(smollm2_compiled, max_model_len=512, max_num_batched_tokens=64,
                    speculative=Speculative("ngram", num_tokens=4, adaptive=False))
    s = _check(engine, baseline)
    assert s.num_accepted_tokens > 0  # the "repeat after me" prompt is made for prompt lookup


def test_layer_truncated_draft_is_token_identical(smollm2_compiled, truncated_draft, baseline):
    assert truncated_draft.config.num_layers == 4
    engine = Engine(smollm2_compiled, max_model_len=512,
                    speculative=Speculative("draft", num_tokens=4, adaptive=False, draft=truncated_draft))
    s = _check(engine, baseline)
    assert s.num_accepted_tokens > 0
