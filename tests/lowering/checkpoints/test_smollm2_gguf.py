"""The real SmolLM2-135M GGUF against transformers' own GGUF loader: tokenizer, chat template, config, weights."""
import json
import re
from pathlib import Path

import numpy as np
import pytest

from lowering.checkpoints import load_checkpoint

DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return smollm2_checkpoint


@pytest.fixture(scope="module")
def hf_reference(request, smollm2_gguf_path):
    """(model, tokenizer) from transformers' own GGUF loader; shares the session's copy when one exists."""
    try:
        return request.getfixturevalue("hf_smollm2")
    except pytest.FixtureLookupError:
        transformers = pytest.importorskip("transformers")
        path = smollm2_gguf_path
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        return model, tokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(hf_reference):
    return hf_reference[1]


@pytest.fixture(scope="module")
def hf_state_dict(hf_reference):
    model = hf_reference[0]
    return model.config, {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def corpus() -> list[str]:
    texts = []
    shakespeare = DATA / "tinyshakespeare.txt"
    if shakespeare.is_file():
        lines = shakespeare.read_text(encoding="utf-8").splitlines()[:300]
        texts += lines + ["\n".join(lines[i : i + 25]) for i in range(0, 300, 25)]
    mt_bench = DATA / "mt_bench_questions.jsonl"
    if mt_bench.is_file():
        for line in mt_bench.read_text(encoding="utf-8").splitlines():
            texts += json.loads(line)["turns"]
    texts += [
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "text<|endoftext|>more<|im_end|><|im_start|>",
        "héllo wörld — ünïcödé, 日本語のテキスト, emoji 🤗🚀, Ελληνικά, русский",
        "  leading spaces, trailing spaces   ",
        "tabs\t\tand\nnewlines\n\n\nand \r\n crlf",
        "it's we're I'LL they've you'd",
        "",
        " ",
        "x = [1, 22, 333, 4444]; y = 3.14159",
    ]
    return texts


def test_tokenizer_matches_transformers(smollm2, hf_tokenizer):
    tok = smollm2.tokenizer
    texts = corpus()
    assert len(texts) > 300
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(ids) == hf_tokenizer.decode(ids, skip_special_tokens=True), text
        assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert tok.vocab_size == len(hf_tokenizer) == 49152
    assert tok.bos_token_id == hf_tokenizer.bos_token_id == 1
    assert tok.eos_token_ids == (hf_tokenizer.eos_token_id,) == (2,)


def test_digits_follow_llama_cpp_smollm_pre_tokenizer(smollm2, hf_tokenizer):
    # NOTE: llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) isolates every digit
    # before the GPT-2 split; transformers' GGUF converter has no "smollm" entry and uses the plain
    # GPT-2 split. Results differ only for a whitespace run before a digit ("a  12") and for a space
    # before a non-ASCII numeral (" ½"), because SmolLM2's merges never join a space to a digit.
    tok = smollm2.tokenizer
    pieces = [tok.id_to_token(i) for i in tok.encode("a  12")]
    assert pieces == ["a", "ĠĠ", "1", "2"]
    assert [hf_tokenizer.convert_ids_to_tokens(i) for i in hf_tokenizer("a  12")["input_ids"]] == ["a", "Ġ", "Ġ", "1", "2"]
    assert [tok.id_to_token(i) for i in tok.encode("x ½")] == ["x", "Ġ", "Â½"]
    # Single spaces before digits and digits inside words agree.
    for text in ["in 1990 and 2024", "abc123def", "v2.0.1"]:
        assert tok.encode(text) == hf_tokenizer(text)["input_ids"]
    # On digit-heavy text every disagreement is that case (a whitespace run right before a digit).
    gsm8k = DATA / "gsm8k_train.jsonl"
    if gsm8k.is_file():
        lines = gsm8k.read_text(encoding="utf-8").splitlines()[:400]
        texts = [t for line in lines for t in json.loads(line).values()]
        differing = [t for t in texts if tok.encode(t) != hf_tokenizer(t)["input_ids"]]
        assert len(differing) < len(texts) // 20
        assert all(re.search(r"\s\s\d", t) for t in differing)


def test_chat_template_matches_transformers(smollm2, hf_tokenizer):
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}],
    ]
    for messages in conversations:
        for add in (True, False):
            ours = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=add)
            ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert ours == ref


def test_config_matches_transformers(smollm2, hf_state_dict):
    hf_config, _ = hf_state_dict
    c = smollm2.config
    assert c.architecture == "llama"
    assert c.vocab_size == hf_config.vocab_size == 49152
    assert c.hidden_size == hf_config.hidden_size == 576
    assert c.intermediate_size == hf_config.intermediate_size
    assert c.num_layers == hf_config.num_hidden_layers == 30
    assert c.num_heads == hf_config.num_attention_heads == 9
    assert c.num_kv_heads == hf_config.num_key_value_heads == 3
    assert c.head_dim == 64
    assert c.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)
    assert c.rope_theta == 100000.0
    assert c.tie_word_embeddings and hf_config.tie_word_embeddings
    assert c.max_position_embeddings == 8192


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.29.self_attn.q_proj.weight",
        "model.layers.29.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.17.mlp.gate_proj.weight",
        "model.norm.weight",
    ],
)
def test_weights_match_transformers(smollm2, hf_state_dict, name):
    _, state = hf_state_dict
    ours = smollm2.weights[name]
    assert ours.dtype == np.float32 and ours.shape == state[name].shape
    np.testing.assert_allclose(ours, state[name], rtol=0, atol=1e-6)


def test_all_weights_present(smollm2, hf_state_dict):
    _, state = hf_state_dict
    assert set(smollm2.weights) == set(state) - {"lm_head.weight"}  # tied: transformers lists the alias


def test_registry_name_dispatches_to_load_gguf(smollm2_gguf_path, monkeypatch):
    import lowering.checkpoints as checkpoints

    assert checkpoints.resolve_model("smollm2-135m") == smollm2_gguf_path
    assert smollm2_gguf_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(checkpoints, "load_gguf", lambda path, progress, keep_native=False: ("loaded", path))
    assert load_checkpoint("smollm2-135m") == ("loaded", smollm2_gguf_path)
