"""Acceptance on the real SmolLM2-135M-Instruct GGUF: logits and greedy tokens equal HF transformers'."""
import numpy as np
import pytest

from runtime import Engine, SamplingParams
from tests.lowering.helpers import PagedLayout

torch = pytest.importorskip("torch")

CHAT_PROMPTS = ["What is the capital of France?", "Give me three tips for staying healthy.",
                "Explain in one sentence what a compiler does."]


def shakespeare_ids(tokenizer, num_tokens):
    from pathlib import Path

    text = (Path(__file__).parents[2] / ".." / "shared" / "data" / "tinyshakespeare.txt").resolve()
    source = text.read_text()[:4000] if text.exists() else "First Citizen: Before we proceed any further, hear me speak. " * 20
    return tokenizer.encode(source, add_special_tokens=False)[:num_tokens]


def test_logits_over_64_token_prompt_match_hf(smollm2_compiled, hf_smollm2):
    hf_model, _ = hf_smollm2
    ids = shakespeare_ids(smollm2_compiled.tokenizer, 64)
    assert len(ids) == 64
    program = smollm2_compiled.make_program(num_blocks=16, max_model_len=256)
    step = PagedLayout(16, 16).step([(0, ids, 0)])
    step.logit_rows = np.arange(64, dtype=np.int32)
    got = program.step(step)
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].float().numpy()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel


def test_greedy_chat_generation_is_token_identical_to_hf(smollm2_compiled, hf_smollm2):
    hf_model, hf_tok = hf_smollm2
    engine = Engine(smollm2_compiled, max_model_len=512, max_num_seqs=4)
    outs = engine.generate(CHAT_PROMPTS, SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=False), chat=True)
    for prompt, out in zip(CHAT_PROMPTS, outs):
        hf_ids = hf_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        if isinstance(hf_ids, dict):
            hf_ids = hf_ids["input_ids"]
        assert out.prompt_token_ids == list(hf_ids)
        with torch.no_grad():
            gen = hf_model.generate(torch.tensor([hf_ids]), max_new_tokens=32, do_sample=False,
                                    attention_mask=torch.ones(1, len(hf_ids), dtype=torch.long))
        hf_new = gen[0, len(hf_ids):].tolist()
        assert out.token_ids == hf_new, prompt
    assert "Paris" in outs[0].text


@pytest.fixture(scope="module")
def smollm2_gguf_native(smollm2_gguf_path):
    from lowering import compile_model

    return compile_model(str(smollm2_gguf_path), weights="gguf", progress=False)


def test_gguf_native_weights_are_the_same_model(smollm2_gguf_native, smollm2_compiled, hf_smollm2):
    """weights="gguf" keeps the Q4_1 / Q8_0 blocks (5 / 8.5 bits a weight) and gives HF's logits and tokens."""
    cm = smollm2_gguf_native
    ops = cm.graph.ops_count()
    assert ops.get("qlinear") == 4 * cm.config.num_layers and ops.get("qlogits") == 1 and "linear" not in ops
    fmts = [n.attrs["format"] for n in cm.graph.nodes if n.op in ("qlinear", "qlogits")]
    assert fmts.count("q4_1") == 4 * cm.config.num_layers and fmts.count("q8_0") == 1  # Q8_0: the tied embedding
    scales = [v for n, v in cm.params.items() if n.endswith(".d")]
    assert len(scales) == len(fmts) and all(v.dtype == np.float16 for v in scales)
    assert cm.params["lm_head.q"].dtype == np.int8  # q8_0 codes; q4_1 codes are packed nibbles
    assert all(cm.params[n].dtype == np.uint8 for n in cm.params if n.endswith(".q") and n != "lm_head.q")
    float_bytes = sum(v.nbytes for v in smollm2_compiled.params.values())
    assert sum(v.nbytes for v in cm.params.values()) < 0.45 * float_bytes  # the f32 embedding table stays (embed)
    hf_model, _ = hf_smollm2
    ids = shakespeare_ids(cm.tokenizer, 64)
    for rows in (64, 1):  # a prefill (dequantize + XLA GEMM) and a single row (the native kernel when built)
        step = PagedLayout(16, 16).step([(0, ids[:rows], 0)])
        step.logit_rows = np.arange(rows, dtype=np.int32)
        got = cm.make_program(num_blocks=16, max_model_len=256).step(step)
        with torch.no_grad():
            want = hf_model(torch.tensor([ids[:rows]])).logits[0].float().numpy()
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-4, (rows, rel)
    engine = Engine(cm, max_model_len=512, max_num_seqs=4)
    want_engine = Engine(smollm2_compiled, max_model_len=512, max_num_seqs=4)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    got = engine.generate(CHAT_PROMPTS, params, chat=True)  # batched decode: native kernel at M = 3
    want = want_engine.generate(CHAT_PROMPTS, params, chat=True)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
