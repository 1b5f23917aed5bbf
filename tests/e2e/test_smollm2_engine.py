"""End to end on the real SmolLM2-135M-Instruct checkpoint: compile, then Engine batching == one at a time."""
import pytest

from runtime import Engine, SamplingParams

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Count from one to ten."]


@pytest.fixture(scope="module")
def smollm2(smollm2_compiled):
    return smollm2_compiled


def test_smollm2_chat_batched_chunked_and_preempted_match_one_at_a_time(smollm2):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    engine = Engine(smollm2, max_model_len=256, max_num_seqs=4)
    batched = engine.generate(PROMPTS, params, chat=True)
    assert "Paris" in batched[0].text

    # 6 blocks of 16 tokens hold one request (<= 50 tokens) at a time plus a bit: forces preemption.
    def tight_engine():  # engines with one pool shape share their compiled steps
        return Engine(smollm2, max_model_len=256, max_num_seqs=4, num_blocks=6, max_num_batched_tokens=16)

    # each prompt alone, its prefill in 16-token chunks (the shapes the squeezed run below compiles anyway)
    one_at_a_time = tight_engine()
    alone = [one_at_a_time.generate([p], params, chat=True)[0] for p in PROMPTS]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert one_at_a_time.scheduler.num_preemptions == 0
    tight = tight_engine()  # no prefix cache filled by the runs above
    squeezed = tight.generate(PROMPTS, params, chat=True)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in batched]
    assert [o.text for o in squeezed] == [o.text for o in batched]


def test_smollm2_export_load_generate_is_identical(smollm2, tmp_path):
    from runtime import load

    params = SamplingParams(max_tokens=16, temperature=0.0)
    want = Engine(smollm2, max_model_len=256).generate(PROMPTS[:2], params, chat=True)
    loaded = load(smollm2.export(tmp_path / "smollm2"))
    got = Engine(loaded, max_model_len=256).generate(PROMPTS[:2], params, chat=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.text for o in got] == [o.text for o in want]
