"""Tokenizer: GGUF-metadata construction, pre-tokenizer tables, save/load, chat template rendering and errors."""
import json

import pytest

from lowering.checkpoints import CheckpointError, Tokenizer
from lowering.checkpoints.tokenizer import ChatTemplateError


@pytest.fixture
def tok(ckb):
    tokens, merges, token_types = ckb.tiny_vocab()
    return Tokenizer.from_gguf_metadata({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": token_types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 0,
        "tokenizer.chat_template": ckb.CHAT_TEMPLATE,
    })


def test_properties(tok, ckb):
    assert tok.vocab_size == len(ckb.tiny_vocab()[0])
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (2, 0)
    assert tok.id_to_token(2) == "<|im_end|>" and tok.chat_template == ckb.CHAT_TEMPLATE


def test_special_tokens_whole_and_skipped(tok):
    ids = tok.encode("a<|im_start|>b<|im_end|>")
    assert 1 in ids and 2 in ids
    assert tok.decode(ids) == "ab"
    assert tok.decode(ids, skip_special_tokens=False) == "a<|im_start|>b<|im_end|>"


@pytest.mark.parametrize("pre, text, pieces", [
    ("gpt2", "a  12", ["a", "Ġ", "Ġ", "1", "2"]),
    ("smollm", "a  12", ["a", "ĠĠ", "1", "2"]),
    ("llama-bpe", "the  cat", ["t", "he", "Ġ", "Ġ", "c", "a", "t"]),
    ("qwen2", "x\n\n  y", ["x", "Ċ", "Ċ", "Ġ", "Ġ", "y"]),
])
def test_pre_tokenizers(ckb, pre, text, pieces):
    tokens, merges, token_types = ckb.tiny_vocab()
    tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
                                        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
                                        "tokenizer.ggml.token_type": token_types})
    assert [tok.id_to_token(i) for i in tok.encode(text)] == pieces
    assert tok.decode(tok.encode(text)) == text


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["llmc_tokenizer.json", "tokenizer.json"]
    again = Tokenizer.load(tmp_path / "t")
    for text in ["the cat<|im_end|>", "héllo  wörld\n\t", ""]:
        assert again.encode(text) == tok.encode(text)
    assert (again.bos_token_id, again.eos_token_ids, again.chat_template) == (1, (2, 0), tok.chat_template)
    messages = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(messages) == tok.apply_chat_template(messages)


def test_load_errors(tok, tmp_path):
    with pytest.raises(CheckpointError, match="llmc_tokenizer.json: file not found"):
        Tokenizer.load(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a valid tokenizers JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "llmc_tokenizer.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Tokenizer.load(tmp_path)
    (tmp_path / "llmc_tokenizer.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(CheckpointError, match="unknown tokenizer format 99"):
        Tokenizer.load(tmp_path)


def test_chat_template_variables_and_errors(tok):
    t = Tokenizer(tok.backend, chat_template="{{ bos_token }}|{{ eos_token }}|{{ add_generation_prompt }}|{{ extra }}",
                  bos_token_id=1, eos_token_ids=[2])
    assert t.apply_chat_template([], extra="x") == "<|im_start|>|<|im_end|>|True|x"
    t = Tokenizer(tok.backend, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        t.apply_chat_template([])
    t = Tokenizer(tok.backend, chat_template="{{ messages.append(1) }}")  # the sandbox is immutable
    with pytest.raises(ChatTemplateError):
        t.apply_chat_template([{"role": "user", "content": "x"}])
    t = Tokenizer(tok.backend, chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        t.apply_chat_template([])
    t = Tokenizer(tok.backend, chat_template="{{ messages | tojson }}{% for m in messages %}{% break %}{% endfor %}")
    assert t.apply_chat_template([{"role": "user", "content": "é"}]) == '[{"role": "user", "content": "é"}]'
    with pytest.raises(ChatTemplateError, match="no chat template"):
        Tokenizer(tok.backend).apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        Tokenizer(tok.backend, chat_template="{% for %}").apply_chat_template([])


def test_add_bos_from_metadata(ckb):
    tokens, merges, token_types = ckb.tiny_vocab()
    tok = Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
                                        "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": token_types,
                                        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.add_bos_token": True})
    assert tok.encode("the")[0] == 1
    assert tok.encode("the", add_special_tokens=False)[0] != 1


GEMMA_TEXTS = ["abc", "cab", "a bc", "  abc", "ab\n\nc", "a\n\n\nb", "xyz é 日", "<start_of_turn>ab<end_of_turn>", "a   b",
               "\u2581a", "dabc  d", "", " ", "    "]


def gemma_metadata(ckb, **extra):
    tokens, scores, types = ckb.gemma_vocab()
    return {"general.architecture": "gemma3", "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_space_prefix": False, **extra}


def test_gemma_sentencepiece_matches_transformers(ckb):
    """Gemma's SentencePiece from GGUF metadata: the tokenizer transformers builds from the same metadata encodes
    and decodes alike (merges ranked by file order, space runs, newline runs, byte fallback, control tokens)."""
    mapping = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    metadata = gemma_metadata(ckb)
    tok = Tokenizer.from_gguf_metadata(metadata)
    hf_dict = {name: metadata[f"tokenizer.{key}"] for key, name in mapping.GGUF_TOKENIZER_MAPPING["tokenizer"].items()
               if f"tokenizer.{key}" in metadata}
    hf, _ = mapping.convert_gguf_tokenizer("gemma3", hf_dict)  # a tokenizers.Tokenizer without BOS post-processing
    for text in GEMMA_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), text
    assert tok.encode("cab") == [2, tok.token_to_id("c"), tok.token_to_id("ab")]  # BOS by default; "ab" ranks first
    assert tok.encode("é", add_special_tokens=False) == [tok.token_to_id("<0xC3>"), tok.token_to_id("<0xA9>")]
    assert tok.encode("  a", add_special_tokens=False) == [tok.token_to_id("\u2581\u2581"), tok.token_to_id("a")]
    assert tok.decode(tok.encode("x  <start_of_turn>a\n\nb")) == "x  a\n\nb"


def test_sentencepiece_only_for_gemma(ckb):
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported for architecture 'llama'"):
        Tokenizer.from_gguf_metadata(gemma_metadata(ckb, **{"general.architecture": "llama"}))
    assert Tokenizer.from_gguf_metadata(gemma_metadata(ckb, **{"tokenizer.ggml.add_bos_token": False})).encode("a") == [
        ckb.gemma_vocab()[0].index("a")]
