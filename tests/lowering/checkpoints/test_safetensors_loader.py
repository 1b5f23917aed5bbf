"""load_hf_dir on tiny random Llama/Mistral/Qwen2 models saved by transformers: tensors, dtypes, config, shards."""
import json

import ml_dtypes
import numpy as np
import pytest

from lowering.checkpoints import CheckpointError, Tokenizer, load_checkpoint, load_hf_dir
from lowering.checkpoints.safetensors_loader import config_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}


def save_tiny(directory, family, dtype=torch.float32, seed=0, **overrides):
    """Save a random tiny model; returns its state dict as numpy (bf16 as raw uint16 bits)."""
    config_cls, model_cls = FAMILIES[family]
    max_shard_size = overrides.pop("max_shard_size", None)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).to(dtype)
    model.save_pretrained(directory, safe_serialization=True, **kwargs)
    state = {}
    for name, t in model.state_dict().items():
        t = t.detach().contiguous()
        state[name] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    return model.config, state


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tensors_and_config_match_transformers(tmp_path, family, dtype):
    hf_config, state = save_tiny(tmp_path, family, getattr(torch, dtype))
    ckpt = load_hf_dir(tmp_path, progress=False)
    assert set(ckpt.weights) == set(state)
    for name, want in state.items():
        got = ckpt.weights[name]
        assert got.shape == want.shape, name
        if dtype == "bfloat16":
            assert got.dtype == ml_dtypes.bfloat16, name
            np.testing.assert_array_equal(got.view(np.uint16), want, err_msg=name)
        else:
            assert got.dtype == np.dtype(dtype), name
            np.testing.assert_array_equal(got, want, err_msg=name)
    c = ckpt.config
    assert c.architecture == family
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (96, 32, 64, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim) == (4, 2, 8)
    assert c.rms_norm_eps == 1e-6 and c.max_position_embeddings == 256
    assert c.rope_theta == hf_config.rope_parameters["rope_theta"] and c.rope_scaling is None
    assert c.attention_bias == (family == "qwen2")
    assert c.sliding_window == (4096 if family == "mistral" else None)
    assert c.tie_word_embeddings is False
    assert ckpt.tokenizer is None


def test_sharded_checkpoint(tmp_path):
    _, state = save_tiny(tmp_path, "llama", max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ckpt = load_checkpoint(tmp_path, progress=False)
    for name, want in state.items():
        np.testing.assert_array_equal(ckpt.weights[name], want, err_msg=name)


def test_missing_shard(tmp_path):
    save_tiny(tmp_path, "llama", max_shard_size="20KB")
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard listed in model.safetensors.index.json is missing"):
        load_hf_dir(tmp_path)


def test_llama_options(tmp_path):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128, "rope_theta": 500000.0}
    save_tiny(tmp_path, "llama", rope_parameters=rope, head_dim=16, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=[2, 3])
    ckpt = load_hf_dir(tmp_path, progress=False)
    c = ckpt.config
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 128}
    assert c.head_dim == 16 and ckpt.weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 32)
    assert c.tie_word_embeddings and "lm_head.weight" not in ckpt.weights
    assert c.bos_token_id == 1 and c.eos_token_ids == (2, 3)


def test_llama_attention_bias_is_rejected(tmp_path):
    save_tiny(tmp_path, "llama", attention_bias=True)
    with pytest.raises(CheckpointError, match="attention_bias=true on a llama model"):
        load_hf_dir(tmp_path)


def test_qwen2_sliding_window_only_when_enabled(tmp_path):
    save_tiny(tmp_path, "qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=0)
    assert load_hf_dir(tmp_path, progress=False).config.sliding_window == 64


def test_transformers_v4_config_layout():
    cfg = {"model_type": "llama", **TINY, "rope_theta": 250000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
           "eos_token_id": 7}
    c = config_from_hf(cfg, "test", {"eos_token_id": [7, 9]})
    assert c.rope_theta == 250000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert c.eos_token_ids == (7, 9)


def test_tokenizer_files_are_loaded(tmp_path, ckb):
    save_tiny(tmp_path, "llama", eos_token_id=2)
    tokens, merges, token_types = ckb.tiny_vocab()
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
              "tokenizer.ggml.token_type": token_types}
    Tokenizer.from_gguf_metadata(fields).backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>",
        "eos_token": {"content": "<|endoftext|>", "special": True},
        "chat_template": [{"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}"}],
    }))
    tok = load_hf_dir(tmp_path, progress=False).tokenizer
    assert tok.bos_token_id == 1 and tok.eos_token_ids == (0, 2)
    assert tok.apply_chat_template([{"role": "user", "content": "the"}]) == "<|im_start|>the<|endoftext|>"
    (tmp_path / "chat_template.jinja").write_text("{{ messages | length }}")
    assert load_hf_dir(tmp_path, progress=False).tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "1"


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox", **TINY}))
    with pytest.raises(CheckpointError, match=r"model_type 'gpt_neox' is not supported; llmc loads llama, mistral, qwen2"):
        load_hf_dir(tmp_path)


def test_missing_and_corrupt_weights(tmp_path):
    save_tiny(tmp_path, "mistral")
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_hf_dir(tmp_path)
    weights.write_bytes(b"\xff" * 16)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_hf_dir(tmp_path)
    weights.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf_dir(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_tiny(tmp_path, "llama")
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mlp\.down_proj\.weight"):
        load_hf_dir(tmp_path)
