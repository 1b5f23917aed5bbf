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


@pytest.mark.parametrize("fields, window", [
    ({"model_type": "mistral"}, 4096),  # transformers' default when config.json has no sliding_window
    ({"model_type": "mistral", "sliding_window": None}, None),
    ({"model_type": "phi3", "sliding_window": 2047}, 2047),
    ({"model_type": "qwen2", "sliding_window": 64}, None),  # use_sliding_window off
    ({"model_type": "qwen3", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}, 64),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}, None),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 5,
      "layer_types": ["sliding_attention"] * 2}, 64),  # layer_types (transformers v5) decides
])
def test_sliding_window_per_family(fields, window):
    assert config_from_hf({**TINY, **fields}, "test").sliding_window == window


@pytest.mark.parametrize("fields, match", [
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
     "only some layers"),
    ({"model_type": "phi3", "sliding_window": 0}, "sliding_window must be a positive integer"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 3}},
     "long_factor must be 4 positive numbers"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4,
                                             "short_mscale": 1.1, "long_mscale": 1.2}}, "short_mscale"),
    ({"model_type": "phi3", "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "unsupported rope scaling type"),
])
def test_unsupported_options_are_refused(fields, match):
    with pytest.raises(CheckpointError, match=match):
        config_from_hf({**TINY, **fields}, "test")


def test_phi3_longrope_config_v4_layout():
    """Phi-3.5-mini's layout: rope_scaling {"type": "longrope"} and original_max_position_embeddings at the top;
    Phi-4-mini adds partial_rotary_factor. The factor llmc keeps is max / original (transformers' default)."""
    short, long = [1.0, 1.05, 1.1], [1.5, 4.0, 30.0]
    cfg = {"model_type": "phi3", **TINY, "hidden_size": 48, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.5,
           "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}
    c = config_from_hf(cfg, "test")
    assert c.architecture == "phi3" and c.head_dim == 12
    assert c.rope_scaling == {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                              "original_max_position_embeddings": 4096, "factor": 32.0, "partial_rotary_factor": 0.5}


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


MOE_CONFIG = {**TINY, "num_hidden_layers": 1, "num_experts_per_tok": 2}


@pytest.mark.parametrize("names", ["mixtral", "qwen", "stacked"])
def test_moe_experts_load_stacked_from_per_expert_or_stacked_tensors(tmp_path, names):
    """Per-expert tensors (what save_pretrained writes: Mixtral's w1/w3/w2, Qwen-MoE's gate/up/down_proj) become
    mlp.experts.gate_up_proj [E, 2F, D] and .down_proj [E, D, F]; tensors already stacked pass through."""
    from safetensors.numpy import save_file

    e, d, f = 3, TINY["hidden_size"], 8
    rng = np.random.default_rng(0)
    gate, up, down = rng.normal(size=(e, f, d)), rng.normal(size=(e, f, d)), rng.normal(size=(e, d, f))
    cfg = {**MOE_CONFIG, "model_type": "mixtral" if names == "mixtral" else "qwen3_moe", "num_local_experts": e,
           "moe_intermediate_size": f, "norm_topk_prob": True, "head_dim": 8}
    if names == "mixtral":
        cfg["intermediate_size"] = f
    tensors = {"model.embed_tokens.weight": np.zeros((96, d)), "model.norm.weight": np.ones(d),
               "lm_head.weight": np.zeros((96, d))}
    p = "model.layers.0"
    for n, shape in (("q_proj", (32, d)), ("k_proj", (16, d)), ("v_proj", (16, d)), ("o_proj", (d, 32))):
        tensors[f"{p}.self_attn.{n}.weight"] = np.zeros(shape)
    tensors.update({f"{p}.input_layernorm.weight": np.ones(d), f"{p}.post_attention_layernorm.weight": np.ones(d)})
    if names != "mixtral":
        tensors.update({f"{p}.self_attn.q_norm.weight": np.ones(8), f"{p}.self_attn.k_norm.weight": np.ones(8)})
    moe = f"{p}.block_sparse_moe" if names == "mixtral" else f"{p}.mlp"
    tensors[f"{moe}.gate.weight"] = rng.normal(size=(e, d))
    roles = ("w1", "w3", "w2") if names == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    if names == "stacked":
        tensors[f"{moe}.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        tensors[f"{moe}.experts.down_proj"] = down
    else:
        for i in range(e):
            for role, w in zip(roles, (gate, up, down)):
                tensors[f"{moe}.experts.{i}.{role}.weight"] = w[i]
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ckpt = load_hf_dir(tmp_path, progress=False)
    assert ckpt.config.num_experts == e and ckpt.config.moe_intermediate_size == f and ckpt.config.norm_topk_prob
    np.testing.assert_array_equal(ckpt.weights[f"{p}.mlp.experts.gate_up_proj"],
                                  np.concatenate([gate, up], 1).astype(np.float32))
    np.testing.assert_array_equal(ckpt.weights[f"{p}.mlp.experts.down_proj"], down.astype(np.float32))
    assert f"{p}.mlp.gate.weight" in ckpt.weights and not any("block_sparse_moe" in k for k in ckpt.weights)
    if names == "qwen":  # one expert's tensor missing: named
        from safetensors.numpy import load_file

        kept = load_file(tmp_path / "model.safetensors")
        del kept[f"{p}.mlp.experts.1.up_proj.weight"]
        save_file(kept, tmp_path / "model.safetensors")
        with pytest.raises(CheckpointError, match=r"layer 0's up projections lacks expert\(s\) \[1\]"):
            load_hf_dir(tmp_path, progress=False)


def test_moe_configs_read_and_refuse_what_llmc_cannot_run():
    qwen3 = {**MOE_CONFIG, "model_type": "qwen3_moe", "num_local_experts": 4, "moe_intermediate_size": 8}
    cfg = config_from_hf(qwen3, "x")  # transformers 5 writes Qwen3-MoE's expert count as num_local_experts
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.qk_norm) == (4, 2, False, True)
    qwen2 = {**MOE_CONFIG, "model_type": "qwen2_moe", "num_experts": 4, "moe_intermediate_size": 8,
             "shared_expert_intermediate_size": 16}
    cfg = config_from_hf(qwen2, "x")
    assert cfg.shared_expert_intermediate_size == 16 and cfg.attention_bias and not cfg.norm_topk_prob
    with pytest.raises(CheckpointError, match="dense MLP layers between the MoE layers"):
        config_from_hf({**qwen3, "decoder_sparse_step": 2}, "x")
    with pytest.raises(CheckpointError, match="dense MLP layers between the MoE layers"):
        config_from_hf({**qwen3, "mlp_only_layers": [0]}, "x")
    with pytest.raises(CheckpointError, match="num_experts_per_tok must be in"):
        config_from_hf({**qwen3, "num_experts_per_tok": 5}, "x")
    with pytest.raises(CheckpointError, match="lacks its expert count"):
        config_from_hf({**MOE_CONFIG, "model_type": "mixtral"}, "x")


GEMMA3_V4 = {  # a transformers v4 config.json of a Gemma 3 text model (gemma-3-1b's layout, tiny sizes)
    **TINY, "model_type": "gemma3_text", "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
    "sliding_window_pattern": 3, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
    "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None, "attn_logit_softcapping": None, "num_hidden_layers": 6,
}


def test_gemma3_config_v4_and_v5_layouts_agree():
    v5 = transformers.Gemma3TextConfig(**{k: v for k, v in GEMMA3_V4.items() if k != "model_type"}).to_dict()
    assert "rope_parameters" in v5 and "rope_theta" not in v5  # the v5 layout: per-layer-type RoPE dicts
    want = dict(architecture="gemma3", layer_types=("sliding_attention",) * 2 + ("full_attention",)
                + ("sliding_attention",) * 2 + ("full_attention",), sliding_window=8, rope_theta=1000000.0,
                rope_local_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                query_pre_attn_scalar=16.0, head_dim=16, qk_norm=True, hidden_activation="gelu_pytorch_tanh",
                tie_word_embeddings=True)
    for cfg in (GEMMA3_V4, v5):
        c = config_from_hf(cfg, "test")
        assert {k: getattr(c, k) for k in want} == want


@pytest.mark.parametrize("fields, match", [
    ({"model_type": "gemma3"}, "multimodal Gemma 3"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"layer_types": ["sliding_attention"] * 5}, "layer_types must be a tuple of num_layers"),
])
def test_gemma3_configs_llmc_cannot_run_are_refused(fields, match):
    with pytest.raises(CheckpointError, match=match):
        config_from_hf({**GEMMA3_V4, **fields}, "test")


def test_gemma3_hf_directory_loads_with_its_four_norms(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(**{**{k: v for k, v in GEMMA3_V4.items() if k != "model_type"},
                                           "num_hidden_layers": 2})
    model = transformers.Gemma3ForCausalLM(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    ckpt = load_hf_dir(tmp_path, progress=False)
    assert "lm_head.weight" not in ckpt.weights and ckpt.config.architecture == "gemma3"
    assert {n for n in ckpt.weights if n.startswith("model.layers.1.") and n.endswith("norm.weight")} == {
        f"model.layers.1.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                               "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm")}
