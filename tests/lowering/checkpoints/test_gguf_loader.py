"""load_gguf on synthetic GGUF files: names, [out, in] layouts, q/k un-permutation, quant types, config, errors."""
import gguf
import ml_dtypes
import numpy as np
import pytest

from lowering.checkpoints import CheckpointError, load_gguf
from lowering.checkpoints.gguf_loader import permute_for_interleaved_rope, unpermute_from_interleaved_rope

Q = gguf.GGMLQuantizationType


def test_f32_round_trip_is_exact_and_undoes_qk_permutation(tiny_gguf):
    path, cfg, weights, _ = tiny_gguf
    ckpt = load_gguf(path, progress=False)
    assert set(ckpt.weights) == set(weights)
    for name, w in weights.items():
        got = ckpt.weights[name]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        np.testing.assert_array_equal(got, w, err_msg=name)
    # The file itself holds the permuted rows, so equality above is not an accident of no-op permutes.
    reader = gguf.GGUFReader(path)
    stored_q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    assert not np.array_equal(stored_q, weights["model.layers.0.self_attn.q_proj.weight"])


def test_permutation_helpers_are_inverse_and_match_llama_cpp(ckb):
    w = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of head_dim 8
    np.testing.assert_array_equal(permute_for_interleaved_rope(w, 4), ckb.llama_cpp_permute(w, 4))
    np.testing.assert_array_equal(unpermute_from_interleaved_rope(permute_for_interleaved_rope(w, 4), 4), w)
    bias = np.arange(16, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_from_interleaved_rope(ckb.llama_cpp_permute(bias, 2), 2), bias)


def test_config_from_metadata(tiny_gguf):
    path, cfg, _, _ = tiny_gguf
    c = load_gguf(path, progress=False).config
    assert c.architecture == "llama"
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (cfg.vocab_size, 64, 96)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 4, 2, 16)
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.rope_theta == 10000.0 and c.rope_scaling is None
    assert c.max_position_embeddings == 512
    assert not c.tie_word_embeddings and not c.attention_bias
    assert c.bos_token_id == 1 and c.eos_token_ids == (2,)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.F16, Q.BF16])
def test_quantized_tensors_dequantize_to_hf_layout(tmp_path, ckb, qtype):
    cfg = ckb.TinyLlama()
    weights = ckb.make_hf_weights(cfg, seed=1)
    expected = ckb.write_gguf(tmp_path / "q.gguf", cfg, weights, qtype=qtype)
    ckpt = load_gguf(tmp_path / "q.gguf", progress=False)
    want_dtype = {Q.F16: np.float16, Q.BF16: ml_dtypes.bfloat16}.get(qtype, np.float32)
    tolerance = {Q.Q8_0: 0.05, Q.F16: 2e-3, Q.BF16: 2e-2}.get(qtype, 0.5)  # of each tensor's max |w|
    for name, w in weights.items():
        got = ckpt.weights[name]
        assert got.shape == w.shape, name
        assert got.dtype == (want_dtype if w.ndim == 2 else np.float32), name
        # Exact against the file's own dequantization; close to the original float weights.
        np.testing.assert_array_equal(got, expected[name], err_msg=name)
        err = np.abs(got.astype(np.float32) - w).max() / np.abs(w).max()
        assert err < tolerance, (name, err)


def test_tied_embeddings_when_output_tensor_absent(tmp_path, ckb):
    cfg = ckb.TinyLlama(tie_word_embeddings=True)
    ckb.write_gguf(tmp_path / "t.gguf", cfg, ckb.make_hf_weights(cfg))
    ckpt = load_gguf(tmp_path / "t.gguf", progress=False)
    assert ckpt.config.tie_word_embeddings
    assert "lm_head.weight" not in ckpt.weights


def test_qwen2_has_biases_and_no_permutation(tmp_path, ckb):
    cfg = ckb.TinyLlama(attention_bias=True)
    weights = ckb.make_hf_weights(cfg, seed=2)
    ckb.write_gguf(tmp_path / "qw.gguf", cfg, weights, arch="qwen2", pre="qwen2")
    ckpt = load_gguf(tmp_path / "qw.gguf", progress=False)
    assert ckpt.config.architecture == "qwen2" and ckpt.config.attention_bias
    for name, w in weights.items():
        np.testing.assert_array_equal(ckpt.weights[name], w, err_msg=name)


def test_rope_scaling_metadata(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    ckb.write_gguf(
        tmp_path / "r.gguf", cfg, ckb.make_hf_weights(cfg),
        metadata={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
                  "llama.rope.scaling.original_context_length": 128},
    )
    c = load_gguf(tmp_path / "r.gguf", progress=False).config
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 128}


def test_tokenizer_from_synthetic_metadata(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    ckb.write_gguf(tmp_path / "b.gguf", cfg, ckb.make_hf_weights(cfg), add_bos_token=True)
    tok = load_gguf(tmp_path / "b.gguf", progress=False).tokenizer
    assert tok.vocab_size == cfg.vocab_size
    ids = tok.encode("<|im_start|>the  cat<|im_end|>")
    assert ids[:2] == [1, 1]  # BOS (add_bos_token) then <|im_start|> kept whole
    assert ids[-1] == 2
    assert tok.id_to_token(ids[2]) == "t" and tok.id_to_token(ids[3]) == "he"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|><|im_start|>the  cat<|im_end|>"
    assert tok.decode(ids) == "the  cat"
    assert tok.encode("the", add_special_tokens=False)[0] != 1
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<|im_start|>assistant\n")


def test_missing_tensor_is_named(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    ckb.write_gguf(tmp_path / "m.gguf", cfg, ckb.make_hf_weights(cfg), drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_gguf(tmp_path / "m.gguf", progress=False)


def test_shape_mismatch_is_named(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    weights = ckb.make_hf_weights(cfg)
    weights["model.layers.0.mlp.gate_proj.weight"] = weights["model.layers.0.mlp.gate_proj.weight"][:64]
    ckb.write_gguf(tmp_path / "s.gguf", cfg, weights)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight has shape \(64, 64\), expected \(96, 64\)"):
        load_gguf(tmp_path / "s.gguf", progress=False)


def test_unknown_tensor_is_named(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    extra = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 2), np.float32)}
    ckb.write_gguf(tmp_path / "u.gguf", cfg, ckb.make_hf_weights(cfg), extra_tensors=extra)
    with pytest.raises(CheckpointError, match="ffn_gate_exps"):
        load_gguf(tmp_path / "u.gguf", progress=False)


def test_unsupported_architecture(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    ckb.write_gguf(tmp_path / "f.gguf", cfg, ckb.make_hf_weights(cfg), arch="falcon")
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        load_gguf(tmp_path / "f.gguf", progress=False)


def test_unsupported_tokenizer_model(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    ckb.write_gguf(tmp_path / "spm.gguf", cfg, ckb.make_hf_weights(cfg), tokenizer_model="llama")
    with pytest.raises(CheckpointError, match="tokenizer model 'llama' is not supported"):
        load_gguf(tmp_path / "spm.gguf", progress=False)


def test_unknown_pre_tokenizer(tmp_path, ckb):
    cfg = ckb.TinyLlama()
    ckb.write_gguf(tmp_path / "p.gguf", cfg, ckb.make_hf_weights(cfg), pre="made-up")
    with pytest.raises(CheckpointError, match="pre-tokenizer 'made-up'"):
        load_gguf(tmp_path / "p.gguf", progress=False)


def test_bad_files(tmp_path, tiny_gguf):
    with pytest.raises(CheckpointError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a gguf file")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_gguf(fake)
    path = tiny_gguf[0]
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_gguf(truncated)


GEMMA3_BLOCK = {  # llama.cpp name -> (HF name, shape as [out, in]) for hidden 32, 2 heads of 16, 1 KV head, ffn 48
    "attn_norm": ("input_layernorm", (32,)), "attn_q": ("self_attn.q_proj", (32, 32)),
    "attn_k": ("self_attn.k_proj", (16, 32)), "attn_v": ("self_attn.v_proj", (16, 32)),
    "attn_output": ("self_attn.o_proj", (32, 32)), "attn_q_norm": ("self_attn.q_norm", (16,)),
    "attn_k_norm": ("self_attn.k_norm", (16,)), "post_attention_norm": ("post_attention_layernorm", (32,)),
    "ffn_norm": ("pre_feedforward_layernorm", (32,)), "ffn_gate": ("mlp.gate_proj", (48, 32)),
    "ffn_up": ("mlp.up_proj", (48, 32)), "ffn_down": ("mlp.down_proj", (32, 48)),
    "post_ffw_norm": ("post_feedforward_layernorm", (32,)),
}


def test_gemma3_gguf_names_norms_config_and_tokenizer(tmp_path, ckb):
    """A Gemma 3 GGUF as llama.cpp writes it: four norms a layer plus QK-norm, every norm stored as 1 + w, q/k rows
    not permuted; the layer pattern, local RoPE base and attention scale come from Gemma3TextConfig's defaults."""
    tokens, scores, types = ckb.gemma_vocab()
    writer = gguf.GGUFWriter(tmp_path / "g.gguf", "gemma3")
    for key, value in (("block_count", 6), ("context_length", 256), ("embedding_length", 32),
                       ("feed_forward_length", 48), ("attention.head_count", 2), ("attention.head_count_kv", 1),
                       ("attention.key_length", 16), ("attention.value_length", 16), ("attention.sliding_window", 8)):
        writer.add_uint32(f"gemma3.{key}", value)
    writer.add_float32("gemma3.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32("gemma3.rope.freq_base", 1e6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    stored = {"token_embd.weight": rng.normal(size=(len(tokens), 32)).astype(np.float32),
              "output_norm.weight": rng.normal(size=32).astype(np.float32)}
    for i in range(6):
        for short, (_, shape) in GEMMA3_BLOCK.items():
            stored[f"blk.{i}.{short}.weight"] = rng.normal(size=shape).astype(np.float32)
    for name, array in stored.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    ckpt = load_gguf(tmp_path / "g.gguf", progress=False)
    c = ckpt.config
    assert c.architecture == "gemma3" and c.tie_word_embeddings and c.qk_norm and c.sliding_window == 8
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention",)
    assert (c.rope_theta, c.rope_local_theta, c.query_pre_attn_scalar, c.head_dim) == (1e6, 1e4, 16.0, 16)
    assert (c.bos_token_id, c.eos_token_ids, c.vocab_size) == (2, (1,), len(tokens))
    for i in (0, 5):
        for short, (hf, _) in GEMMA3_BLOCK.items():
            want = stored[f"blk.{i}.{short}.weight"] - np.float32(1.0) * short.endswith("norm")
            np.testing.assert_array_equal(ckpt.weights[f"model.layers.{i}.{hf}.weight"], want, err_msg=short)
    np.testing.assert_array_equal(ckpt.weights["model.norm.weight"], stored["output_norm.weight"] - np.float32(1.0))
    assert ckpt.tokenizer.encode("cab") == [2, tokens.index("c"), tokens.index("ab")]
