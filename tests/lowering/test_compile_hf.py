"""Each supported family, as a tiny random Hugging Face model saved as safetensors, compiles and matches HF."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lowering import compile_model  # noqa: E402
from tests.lowering.helpers import PagedLayout  # noqa: E402

COMMON = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
FAMILIES = {
    "llama3.1": lambda: transformers.LlamaConfig(**COMMON, rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None, head_dim=16),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=True),  # head_dim != D/H
}
MODEL_CLASSES = {"llama3.1": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_matches_hf_logits(family, tmp_path):
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config.initializer_range = 0.2  # larger random weights: logits far from uniform, a sharper test
    model = getattr(transformers, MODEL_CLASSES[family])(config).eval()
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
    assert cm.config.architecture == {"llama3.1": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}[family]
    program = cm.make_program(num_blocks=64, max_model_len=200)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 131, n).tolist() for n in (70, 9, 33)]  # llama3.1: beyond 32 positions
    step = PagedLayout(64, 5).step([(i, p, 0) for i, p in enumerate(prompts)])
    step.logit_rows = np.arange(step.num_tokens, dtype=np.int32)  # every row's logits
    got = program.step(step)
    with torch.no_grad():
        for i, p in enumerate(prompts):
            want = model(torch.tensor([p])).logits[0].float().numpy()
            rows = got[step.query_start[i]:step.query_start[i + 1]]
            assert rel_err(rows, want) < 1e-4, family


@pytest.mark.parametrize("family", ["qwen3"])
def test_family_greedy_tokens_match_hf(family, tmp_path):
    """Greedy continuation through llmc's Engine (paged KV, chunked prefill) equals transformers' generate."""
    from runtime import Engine, SamplingParams

    torch.manual_seed(1)
    config = FAMILIES[family]()
    config.initializer_range = 0.2
    model = getattr(transformers, MODEL_CLASSES[family])(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    prompts = [np.random.default_rng(i).integers(0, 131, n).tolist() for i, n in enumerate((12, 40))]
    engine = Engine(compile_model(str(tmp_path), target="cpu", block_size=8, progress=False), num_blocks=64,
                    max_num_batched_tokens=32)
    outs = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    with torch.no_grad():
        for p, o in zip(prompts, outs):
            want = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist()
            assert o.token_ids == want
