"""Tests of runtime/engine.py on a toy numpy Program: batching, chunked prefill, preemption, stops, detok."""
import numpy as np
import pytest

from runtime import Engine, RequestOutput, SamplingParams
from runtime.engine import IncrementalDetokenizer, Request, RequestStatus, ScheduledChunk, Scheduler, build_step_input
from tests.runtime.toy_program import BOS_ID, EOS_ID, NUM_SPECIAL, ByteTokenizer, ToyModel, reference_greedy

SCRIPT = "Hello wörld! The end. € 😀 done"
GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def make_prompts(lengths=(1, 7, 16, 17, 33, 4), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(NUM_SPECIAL, 259, size=n).tolist() for n in lengths]


def generate_alone(engine, prompts, params):
    return [engine.generate([p], params)[0] for p in prompts]


def token_ids(outputs):
    return [o.token_ids for o in outputs]


# ---------------------------------------------------------------------------------------------
# Step building and scheduling, exactly


def make_request(arrival, num_tokens):
    ids = list(range(NUM_SPECIAL, NUM_SPECIAL + num_tokens))
    return Request(
        request_id=str(arrival), arrival=arrival, prompt=None, prompt_token_ids=ids, params=SamplingParams(),
        generator=None, detokenizer=None, token_ids=list(ids),
    )


def test_build_step_input_lays_out_a_prefill_chunk_and_a_decode():
    a = make_request(0, 6)
    a.block_ids, a.num_computed_tokens = [7, 2], 5  # one decode token at position 5
    b = make_request(1, 9)
    b.block_ids = [4, 0, 3]  # prefill chunk of tokens 2..6, the prompt continues afterwards
    chunks = [ScheduledChunk(a, 5, 1), ScheduledChunk(b, 2, 5)]
    step, sampled = build_step_input(chunks, block_size=4, max_blocks_per_seq=4)
    assert step.token_ids.tolist() == [8, 5, 6, 7, 8, 9]
    assert step.positions.tolist() == [5, 2, 3, 4, 5, 6]
    assert step.slot_mapping.tolist() == [2 * 4 + 1, 4 * 4 + 2, 4 * 4 + 3, 0 * 4 + 0, 0 * 4 + 1, 0 * 4 + 2]
    assert step.query_start.tolist() == [0, 1, 6]
    assert step.seq_lens.tolist() == [6, 7]
    assert step.block_tables.tolist() == [[7, 2], [4, 0]]  # as wide as the longest context needs
    assert step.logit_rows.tolist() == [0]  # b's chunk does not reach its last token
    assert sampled == [a]
    for name in ("token_ids", "positions", "slot_mapping", "query_start", "seq_lens", "block_tables", "logit_rows"):
        assert getattr(step, name).dtype == np.int32, name
    step.validate(block_size=4, num_blocks=8)


def run_chunks(sched_out, new_token=100):
    """Play the engine: every chunk that reaches its request's end samples one token."""
    for chunk in sched_out.chunks:
        if chunk.wants_logits:
            chunk.request.token_ids.append(new_token)


def describe(sched_out):
    return [(c.request.arrival, c.start, c.num_tokens) for c in sched_out.chunks]


def test_scheduler_budget_chunking_decode_first_and_preemption_of_latest_arrival():
    sched = Scheduler(num_blocks=6, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    a, b, c = make_request(0, 6), make_request(1, 7), make_request(2, 3)
    for r in (a, b, c):
        sched.add_request(r)

    out = sched.schedule()  # A's prompt, then 4 of B's 7 tokens fill the budget
    assert describe(out) == [(0, 0, 6), (1, 0, 4)]
    assert a.block_ids == [0, 1] and b.block_ids == [2]
    run_chunks(out)

    out = sched.schedule()  # A decodes first, B finishes its prompt, C is admitted
    assert describe(out) == [(0, 6, 1), (1, 4, 3), (2, 0, 3)]
    assert b.block_ids == [2, 3] and c.block_ids == [4]
    run_chunks(out)

    out = sched.schedule()  # three decodes, no new blocks needed
    assert describe(out) == [(0, 7, 1), (1, 7, 1), (2, 3, 1)]
    run_chunks(out)

    out = sched.schedule()  # A takes the last free block; B must preempt C, the latest arrival
    assert describe(out) == [(0, 8, 1), (1, 8, 1)]
    assert out.preempted == [c] and sched.waiting == [c] and sched.num_preemptions == 1
    assert a.block_ids == [0, 1, 5] and b.block_ids == [2, 3, 4] and c.block_ids == []
    assert c.num_computed_tokens == 0 and c.num_tokens == 5  # recomputes prompt + its generated token


def test_scheduler_preempts_a_later_arrival_even_if_already_scheduled():
    sched = Scheduler(num_blocks=3, block_size=4, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make_request(0, 10), make_request(1, 5)
    a.block_ids, a.num_computed_tokens = sched.allocator.allocate(1), 4  # re-admitted, partly prefilled
    b.block_ids, b.num_computed_tokens = sched.allocator.allocate(2), 4  # decoding
    a.status = b.status = RequestStatus.RUNNING
    sched.running = [a, b]

    out = sched.schedule()  # B's decode is scheduled first, then A needs 2 blocks and takes B's
    assert describe(out) == [(0, 4, 6)]
    assert out.preempted == [b] and a.block_ids == [0, 1, 2] and b.block_ids == []


# ---------------------------------------------------------------------------------------------
# Batching, chunked prefill and preemption give the tokens of each prompt alone


@pytest.mark.parametrize("block_size", [1, 5, 16])
def test_batch_gives_same_tokens_as_each_prompt_alone_and_as_the_reference(block_size):
    model = ToyModel(block_size=block_size)
    engine = Engine(model, num_blocks=-(-400 // block_size))
    prompts = make_prompts()
    batched = engine.generate(prompts, GREEDY)
    assert max(s.num_seqs for s in engine.program.steps) == len(prompts)
    assert engine.scheduler.num_preemptions == 0
    alone = generate_alone(engine, prompts, GREEDY)
    reference = [reference_greedy(model.make_program(num_blocks=64), p, GREEDY.max_tokens) for p in prompts]
    assert token_ids(batched) == token_ids(alone) == reference
    assert all(o.finish_reason == "length" and len(o.token_ids) == 10 for o in batched)
    assert [o.prompt_token_ids for o in batched] == prompts
    assert engine.scheduler.allocator.num_free == engine.program.num_blocks


@pytest.mark.parametrize("budget", [1, 3, 8])
def test_chunked_prefill_with_tiny_token_budget_gives_same_tokens(budget):
    prompts = make_prompts()
    expected = token_ids(Engine(ToyModel(block_size=4), num_blocks=200).generate(prompts, GREEDY))
    engine = Engine(ToyModel(block_size=4), num_blocks=200, max_num_batched_tokens=budget)
    assert token_ids(engine.generate(prompts, GREEDY)) == expected
    steps = engine.program.steps
    assert max(s.num_tokens for s in steps) <= budget
    if budget > 1:
        assert any(s.num_logit_rows < s.num_seqs for s in steps)  # some chunk stopped mid-prompt


def test_max_num_seqs_limits_the_batch():
    engine = Engine(ToyModel(block_size=4), num_blocks=200, max_num_seqs=2)
    prompts = make_prompts()
    assert token_ids(engine.generate(prompts, GREEDY)) == token_ids(generate_alone(engine, prompts, GREEDY))
    assert max(s.num_seqs for s in engine.program.steps) == 2


@pytest.mark.parametrize("budget", [512, 5])
def test_preemption_by_recompute_gives_same_tokens(budget):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = make_prompts()
    expected = token_ids(Engine(ToyModel(block_size=4), num_blocks=200).generate(prompts, params))
    engine = Engine(ToyModel(block_size=4), num_blocks=12, max_num_batched_tokens=budget)  # one prompt alone needs 11
    assert token_ids(engine.generate(prompts, params)) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.scheduler.allocator.num_free == 12


def test_seeded_sampling_is_the_same_batched_alone_and_preempted():
    prompts = make_prompts()
    params = [
        SamplingParams(max_tokens=12, temperature=0.8, top_k=40, top_p=0.95, seed=100 + i) for i in range(len(prompts))
    ]
    engine = Engine(ToyModel(block_size=4), num_blocks=200)
    batched = token_ids(engine.generate(prompts, params))
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    tight = Engine(ToyModel(block_size=4), num_blocks=12)
    preempted = token_ids(tight.generate(prompts, params))
    assert tight.scheduler.num_preemptions > 0
    assert batched == alone == preempted
    greedy = token_ids(engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0)))
    assert batched != greedy


# ---------------------------------------------------------------------------------------------
# Stopping


def script_engine(**engine_kwargs):
    return Engine(ToyModel(script_text=SCRIPT), **engine_kwargs)


def test_script_model_runs_to_eos():
    tok = ByteTokenizer()
    out = script_engine().generate("Hello", SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert isinstance(out, RequestOutput)
    assert out.text == " wörld! The end. € 😀 done"
    assert out.token_ids == tok.encode(out.text, add_special_tokens=False) + [EOS_ID]
    assert out.finish_reason == "stop"


@pytest.mark.parametrize(
    "stop, text",
    [
        ("end", " wörld! The "),
        (["zzz", "ö"], " w"),
        (["The", "!"], " wörld"),
        ("€ 😀", " wörld! The end. "),
        ("Hello", " wörld! The end. € 😀 done"),
    ],
)
def test_stop_strings_cut_the_text(stop, text):
    out = script_engine().generate("Hello", SamplingParams(max_tokens=100, temperature=0.0, stop=stop))[0]
    assert out.text == text
    assert out.finish_reason == "stop"


def test_stop_string_ends_generation_at_the_token_that_completes_it():
    out = script_engine().generate("Hello", SamplingParams(max_tokens=100, temperature=0.0, stop="e"))[0]
    tok = ByteTokenizer()
    assert out.text == " wörld! Th"
    assert tok.decode(out.token_ids) == " wörld! The"


def test_stop_token_ids_and_eos():
    bang = NUM_SPECIAL + ord("!")
    out = script_engine().generate("Hello", SamplingParams(max_tokens=100, temperature=0.0, stop_token_ids=[bang]))[0]
    assert out.text == " wörld" and out.token_ids[-1] == bang and out.finish_reason == "stop"

    model = ToyModel(script_text=SCRIPT, eos_token_ids=(bang,))
    model.tokenizer.eos_token_ids = ()  # the config's eos ids count as well
    out = Engine(model).generate("Hello", SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert out.text == " wörld" and out.token_ids[-1] == bang and out.finish_reason == "stop"

    out = Engine(model).generate("Hello", SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, stop="."))[0]
    assert out.text == " wörld! The end"


def test_eos_on_a_random_model_stops_right_there():
    prompt = make_prompts([9])[0]
    free_run = Engine(ToyModel()).generate([prompt], GREEDY)[0].token_ids
    i = max(i for i, t in enumerate(free_run) if t not in free_run[:i])  # a token's first appearance
    engine = Engine(ToyModel(eos_token_ids=(free_run[i],)))
    out = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert out.token_ids == free_run[: i + 1] and out.finish_reason == "stop"


def test_max_tokens_and_max_model_len_finish_with_length():
    out = script_engine().generate("Hello", SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert out.text == " wö" and len(out.token_ids) == 4 and out.finish_reason == "length"

    out = script_engine(max_model_len=10).generate("Hello", SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert len(out.prompt_token_ids) + len(out.token_ids) == 10 and out.finish_reason == "length"
    assert out.text == " wö"

    out = script_engine().generate("Hello", SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 100 and out.token_ids[-1] == EOS_ID and out.finish_reason == "length"


def test_min_tokens_holds_back_eos_stop_ids_and_stop_strings():
    base = script_engine().generate("Hello", SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert len(base.token_ids) == 32 and base.token_ids[-1] == EOS_ID
    out = script_engine().generate("Hello", SamplingParams(max_tokens=60, temperature=0.0, min_tokens=40))[0]
    # the script's EOS (token 32) is held back; past the script the model asks for EOS, which ends token 41
    assert len(out.token_ids) == 41 and EOS_ID not in out.token_ids[:40] and out.token_ids[-1] == EOS_ID
    assert out.token_ids[:31] == base.token_ids[:31] and out.finish_reason == "stop"
    # "end" is complete at token 16, before min_tokens: it does not stop; "done" (token 31) does
    out = script_engine().generate("Hello", SamplingParams(max_tokens=60, temperature=0.0, min_tokens=20,
                                                           stop=["end", "done"]))[0]
    assert out.text == " wörld! The end. € 😀 " and out.finish_reason == "stop"
    bang = NUM_SPECIAL + ord("!")
    out = script_engine().generate("Hello", SamplingParams(max_tokens=60, temperature=0.0, min_tokens=10,
                                                           stop_token_ids=[bang]))[0]
    assert bang not in out.token_ids[:10] and len(out.token_ids) >= 10 and out.text.startswith(" wörld")
    out = script_engine().generate("Hello", SamplingParams(max_tokens=60, temperature=0.0, min_tokens=5,
                                                           stop_token_ids=[bang]))[0]
    assert out.text == " wörld" and out.token_ids[-1] == bang  # "!" is token 8: past min_tokens, it stops


def test_logit_bias_steers_decoding_and_is_checked_against_the_vocabulary():
    prompt = make_prompts([9])[0]
    free_run = Engine(ToyModel()).generate([prompt], GREEDY)[0].token_ids
    banned = Engine(ToyModel()).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={free_run[0]: -100}))[0].token_ids
    assert banned[0] != free_run[0]
    favourite = next(t for t in range(NUM_SPECIAL, 200) if t not in free_run)
    forced = Engine(ToyModel()).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0.0, logit_bias={favourite: 100}))[0].token_ids
    assert forced == [favourite] * 10
    with pytest.raises(ValueError, match="logit_bias names token ids outside the vocabulary"):
        Engine(ToyModel()).generate([prompt], SamplingParams(logit_bias={10**6: 1.0}))


# ---------------------------------------------------------------------------------------------
# Prompts: chat, strings, bad inputs


def test_string_prompts_get_bos_and_chat_prompts_are_not_given_a_second_one():
    engine = Engine(ToyModel())
    tok = engine.tokenizer
    plain, chat = engine.generate(["hi"], GREEDY)[0], engine.generate("hi", GREEDY, chat=True)[0]
    assert plain.prompt == "hi" and plain.prompt_token_ids == [BOS_ID] + tok.encode("hi", add_special_tokens=False)
    assert chat.prompt == "hi"
    assert chat.prompt_token_ids == tok.encode("<s>user: hi\nassistant:", add_special_tokens=False)
    assert chat.prompt_token_ids[:2] == [BOS_ID, NUM_SPECIAL + ord("u")]


def test_request_ids_are_unique_and_outputs_in_prompt_order():
    engine = Engine(ToyModel())
    outs = engine.generate(make_prompts([30, 2, 9]), GREEDY) + engine.generate(make_prompts([3]), GREEDY, use_tqdm=True)
    assert [o.request_id for o in outs] == ["0", "1", "2", "3"]
    assert [len(o.prompt_token_ids) for o in outs] == [30, 2, 9, 3]


@pytest.mark.parametrize(
    "prompts, params, kwargs, message",
    [
        ("", GREEDY, {}, "prompt 0 is empty"),
        ([[5], []], GREEDY, {}, "prompt 1 is empty"),
        ([[5] * 256], GREEDY, {}, "256 tokens, which leaves no room"),
        ([[5] * 100], SamplingParams(max_tokens=200), {}, "needs 16 KV blocks of 16 tokens, but the pool has only 8"),
        ([[5, 999]], GREEDY, {}, "outside the vocabulary"),
        ([[5, -1]], GREEDY, {}, "outside the vocabulary"),
        ([[5]], GREEDY, {"chat": True}, "chat=True needs string prompts"),
        ([5, 6], GREEDY, {}, "list of lists"),
        ([None], GREEDY, {}, "prompt 0 must be a string or a list of token ids"),
        (["a", "b"], [GREEDY], {}, "1 SamplingParams for 2 prompts"),
        (["a"], [object()], {}, "must be SamplingParams"),
    ],
)
def test_bad_inputs_raise_before_anything_runs(prompts, params, kwargs, message):
    engine = Engine(ToyModel(), num_blocks=8)
    with pytest.raises(ValueError, match=message):
        engine.generate(prompts, params, **kwargs)
    assert engine.program.steps == [] and not engine.scheduler.has_unfinished_requests()
    assert engine.generate("ok", GREEDY)[0].finish_reason == "length"  # still usable


def test_a_prompt_that_fits_only_because_max_model_len_caps_it_is_accepted():
    engine = Engine(ToyModel(block_size=4, max_position_embeddings=32), num_blocks=8)  # 32 slots
    out = engine.generate([[5] * 20], SamplingParams(max_tokens=1000, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 12 and out.finish_reason == "length"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_num_seqs": 0}, "max_num_seqs"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"num_blocks": 0}, "num_blocks"),
        ({"max_model_len": 1000}, "exceeds the model's max_position_embeddings=256"),
    ],
)
def test_bad_engine_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Engine(ToyModel(), **kwargs)


def test_program_errors_leave_the_engine_clean():
    engine = Engine(ToyModel(), num_blocks=16)
    engine.program.k_pool = None  # breaks the next step
    with pytest.raises(TypeError):
        engine.generate(make_prompts([3, 4]), GREEDY)
    assert not engine.scheduler.has_unfinished_requests()
    assert engine.scheduler.allocator.num_free == 16


# ---------------------------------------------------------------------------------------------
# Incremental detokenization


def test_incremental_detok_never_emits_half_a_character():
    tok = ByteTokenizer()
    text = "aé€😀b😀"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("x€"))  # prompt context ends in a multi-byte char
    deltas = [detok.add_token(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert deltas[1] == "" and deltas[2] == "é" and deltas[-2] == "" and deltas[-1] == "😀"


def test_incremental_detok_flush_shows_an_incomplete_character_as_replacement():
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, [BOS_ID])
    assert detok.add_token(NUM_SPECIAL + ord("a")) == "a"
    assert detok.add_token(NUM_SPECIAL + "é".encode()[0]) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


class SentencePieceLikeTokenizer:
    """Drops the leading space of a decode, as SentencePiece does for a leading '▁'."""

    pieces = ["▁Hello", "▁world", "!", "<s>"]

    def decode(self, ids, skip_special_tokens=True):
        text = "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 3)).replace("▁", " ")
        return text[1:] if text.startswith(" ") else text


def test_incremental_detok_keeps_the_space_before_the_first_generated_word():
    detok = IncrementalDetokenizer(SentencePieceLikeTokenizer(), [3, 0])
    assert [detok.add_token(1), detok.add_token(2), detok.add_token(1)] == [" world", "!", " world"]


def test_engine_text_is_exact_with_multi_byte_characters():
    model = ToyModel(script_text="ü€😀 ok 😀😀")
    out = Engine(model).generate([[BOS_ID]], SamplingParams(max_tokens=100, temperature=0.0))[0]
    assert out.text == "ü€😀 ok 😀😀"
    out = Engine(model).generate([[BOS_ID]], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert out.text == "ü\ufffd" and out.finish_reason == "length"  # max_tokens cut the euro sign


def test_a_model_without_tokenizer_or_config_takes_token_ids():
    model = ToyModel()
    reference = Engine(model).generate(make_prompts([5]), GREEDY)[0].token_ids
    model.tokenizer, model.config = None, None
    engine = Engine(model)
    assert engine.max_model_len == 256 and engine.vocab_size == 259
    out = engine.generate(make_prompts([5]), GREEDY)[0]
    assert out.token_ids == reference and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate("hi", GREEDY)
