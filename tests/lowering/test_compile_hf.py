"""Each supported family, as a tiny random Hugging Face model saved as safetensors, compiles and matches HF."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lowering import compile_model  # noqa: E402
from tests.lowering.helpers import PagedLayout  # noqa: E402

COMMON = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
PHI3_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)  # the defaults lie outside the tiny vocabulary
FAMILIES = {
    "llama3.1": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),  # head_dim != D/H
    # window 8: every prompt but the 9-token one reaches past it
    "mistral-swa": lambda: transformers.MistralConfig(**COMMON, sliding_window=8, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**COMMON, **PHI3_IDS),
    # Phi-4-mini's shape: LongRoPE, 3/4 of each head rotated, tied embeddings; original length 16, so prompts
    # longer than 16 tokens use both factor sets (positions 0..15 short, 16.. long: see ops.RopeFrequencies)
    "phi3-longrope": lambda: transformers.Phi3Config(
        **COMMON, **PHI3_IDS, tie_word_embeddings=True, partial_rotary_factor=0.75, original_max_position_embeddings=16,
        rope_scaling={"rope_type": "longrope", "short_factor": np.linspace(1.0, 1.4, 6).tolist(),
                      "long_factor": np.linspace(1.5, 9.0, 6).tolist()}),
}
MODEL_CLASSES = {"llama3.1": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mistral-swa": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
                 "phi3-longrope": "Phi3ForCausalLM"}
ARCHITECTURES = {"llama3.1": "llama", "mistral-swa": "mistral", "phi3-longrope": "phi3"}

# Mixtures of experts (the moe op): 4-5 experts, top-2 routing; Qwen2-MoE adds its sigmoid-gated shared expert,
# no renormalisation of the top-k weights and top-3
FAMILIES.update({
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, head_dim=24, num_experts=5, num_experts_per_tok=2,
                                                     moe_intermediate_size=40, norm_topk_prob=True),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, num_experts=5, num_experts_per_tok=3,
                                                     moe_intermediate_size=40, shared_expert_intermediate_size=56,
                                                     norm_topk_prob=False, tie_word_embeddings=True),
})
MODEL_CLASSES.update({"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                      "qwen2_moe": "Qwen2MoeForCausalLM"})

# Gemma 3: sliding layers (window 8, their own RoPE base) beside a global one (linear RoPE scaling), head_dim != D/H,
# query_pre_attn_scalar != head_dim; every prompt but the 9-token one reaches past the window
FAMILIES["gemma3"] = lambda: transformers.Gemma3TextConfig(
    **{**COMMON, "num_hidden_layers": 3}, head_dim=24, sliding_window=8, query_pre_attn_scalar=20,
    layer_types=["sliding_attention", "full_attention", "sliding_attention"], rope_theta=50000.0,
    rope_local_base_freq=5000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
MODEL_CLASSES["gemma3"] = "Gemma3ForCausalLM"


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def hf_model(family, seed):
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    config.initializer_range = 0.2  # larger random weights: logits far from uniform, a sharper test
    model = getattr(transformers, MODEL_CLASSES[family])(config).eval()
    if family == "gemma3":  # HF initialises Gemma's norm weights (it scales by 1 + w) to zero: make them matter
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.uniform_(-0.5, 0.5)
    return model


def rotate_longrope_per_position(model):
    """Make HF's Phi-3 pick LongRoPE's factor set per position (long from original_max_position_embeddings on), as
    llmc does, instead of one set for the whole forward pass; HF's own frequencies and attention factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rotary = model.model.rotary_emb
    old_len = model.config.rope_parameters["original_max_position_embeddings"]
    short = rotary.original_inv_freq.clone()
    long, scale = ROPE_INIT_FUNCTIONS["longrope"](model.config, None, seq_len=old_len + 1)
    assert not torch.equal(short, long) and scale > 1.0

    def forward(x, position_ids):  # position_ids: [B, T] -> cos, sin [B, T, R]
        inv_freq = torch.where((position_ids >= old_len)[..., None], long, short)  # f32[B, T, R/2]
        angles = position_ids[..., None].float() * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return (emb.cos() * scale).to(x.dtype), (emb.sin() * scale).to(x.dtype)

    rotary.forward = forward


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_hf_logits(family, tmp_path):
    model = hf_model(family, seed=0)
    if family == "qwen2":  # HF initialises biases to zero: make the qkv bias matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if family == "qwen3":  # HF initialises the QK-norm weights to one: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.uniform_(0.5, 1.5)
                layer.self_attn.k_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path, safe_serialization=True)

    cm = compile_model(str(tmp_path), target="cpu", block_size=5, progress=False)
    assert cm.config.architecture == ARCHITECTURES.get(family, family)
    program = cm.make_program(num_blocks=64, max_model_len=200)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 131, n).tolist() for n in (70, 9, 33)]  # llama3.1: beyond 32 positions
    step = PagedLayout(64, 5).step([(i, p, 0) for i, p in enumerate(prompts)])
    step.logit_rows = np.arange(step.num_tokens, dtype=np.int32)  # every row's logits
    if program.num_blocks_w is not None:  # gemma3's sliding layers: their own pool, here with the same block ids
        step.block_tables_w, step.slot_mapping_w = step.block_tables.copy(), step.slot_mapping.copy()
    got = program.step(step)
    if family == "phi3-longrope":  # below the original length llmc equals HF as it is: the 9-token prompt
        with torch.no_grad():
            want = model(torch.tensor([prompts[1]])).logits[0].float().numpy()
        assert rel_err(got[step.query_start[1]:step.query_start[2]], want) < 1e-4
        rotate_longrope_per_position(model)  # beyond it, HF with llmc's rule
    with torch.no_grad():
        for i, p in enumerate(prompts):
            want = model(torch.tensor([p])).logits[0].float().numpy()
            rows = got[step.query_start[i]:step.query_start[i + 1]]
            assert rel_err(rows, want) < 1e-4, family


@pytest.mark.parametrize("family", ["qwen3", "mistral-swa", "phi3-longrope", "mixtral", "qwen3_moe", "qwen2_moe",
                                    "gemma3"])
def test_family_greedy_tokens_match_hf(family, tmp_path):
    """Greedy continuation through llmc's Engine (paged KV, chunked prefill) equals transformers' generate.

    mistral-swa: the 40-token prompt (two chunks) and both continuations run past the 8-token window.
    phi3-longrope: both sequences cross the original length 16 (the 12-token one while decoding).
    gemma3: as mistral-swa, its sliding layers beside a global one (two KV groups).
    """
    from runtime import Engine, SamplingParams

    model = hf_model(family, seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    if family == "phi3-longrope":
        rotate_longrope_per_position(model)
    prompts = [np.random.default_rng(i).integers(0, 131, n).tolist() for i, n in enumerate((12, 40))]
    engine = Engine(compile_model(str(tmp_path), target="cpu", block_size=8, progress=False), num_blocks=64,
                    max_num_batched_tokens=32)
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            want = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist()
            assert o.token_ids == want
