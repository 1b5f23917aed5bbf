"""Speculative decoding on the real SmolLM2-135M-Instruct: greedy output is token-identical to the target alone,
for a ragged batch (prompts of different lengths decoding together) with each proposer."""
import numpy as np
import pytest

from lowering import Speculative, compile_model
from runtime import Engine, SamplingParams

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Count from one to ten.",
    "Repeat after me three times: the quick brown fox jumps over the lazy dog.",
]
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def head_dirs(smollm2_checkpoint_small, tmp_path_factory):
    """Untrained Medusa and EAGLE heads for SmolLM2 (greedy exactness does not depend on their quality)."""
    from runtime.draft_heads import init_eagle, init_medusa, save_heads

    cfg, embed = smollm2_checkpoint_small
    root = tmp_path_factory.mktemp("heads")
    save_heads(str(root / "medusa"), init_medusa(cfg, embed, 3, seed=1))
    save_heads(str(root / "eagle"), init_eagle(cfg, embed, seed=1))
    return {"medusa": str(root / "medusa"), "eagle": str(root / "eagle")}


@pytest.fixture(scope="module")
def smollm2_checkpoint_small(smollm2_gguf_path):
    from lowering.checkpoints import load_checkpoint

    ckpt = load_checkpoint(str(smollm2_gguf_path), progress=False)
    return ckpt.config, np.asarray(ckpt.weights["model.embed_tokens.weight"], np.float32)


# NOTE: its own compiled SmolLM2 (not the session fixture), so under pytest-xdist this file is a work unit of its
# own and runs beside the other SmolLM2 files instead of after them. Compiled for medusa, so the graph also returns
# the hidden states the head methods read; every other method (and no speculation) runs on the same graph.
@pytest.fixture(scope="module")
def smollm2_compiled(smollm2_gguf_path, head_dirs):
    return compile_model(str(smollm2_gguf_path), target="cpu", progress=False,
                         speculative=Speculative("medusa", num_tokens=3, heads=head_dirs["medusa"]))


@pytest.fixture(scope="module")
def baseline(smollm2_compiled):
    engine = Engine(smollm2_compiled, max_model_len=512, speculative=False)
    return [o.token_ids for o in engine.generate(PROMPTS, PARAMS, chat=True)]


@pytest.fixture(scope="module")
def truncated_draft(smollm2_gguf_path):
    return compile_model(str(smollm2_gguf_path), target="cpu", num_layers=4, progress=False)


def _check(engine, baseline):
    outs = engine.generate(PROMPTS, PARAMS, chat=True)
    assert [o.token_ids for o in outs] == baseline
    s = engine.spec_stats
    assert s.num_verifications > 0
    return s


def test_ngram_is_token_identical(smollm2_compiled, baseline):
    # (chunked prefills beside verification rows are covered on the toy model: each new step shape compiles
    # SmolLM2 again here)
    engine = Engine(smollm2_compiled, max_model_len=512,
                    speculative=Speculative("ngram", num_tokens=4, adaptive=False))
    s = _check(engine, baseline)
    assert s.num_accepted_tokens > 0  # the "repeat after me" prompt is made for prompt lookup


def test_layer_truncated_draft_is_token_identical(smollm2_compiled, truncated_draft, baseline):
    assert truncated_draft.config.num_layers == 4
    engine = Engine(smollm2_compiled, max_model_len=512,
                    speculative=Speculative("draft", num_tokens=4, adaptive=False, draft=truncated_draft))
    s = _check(engine, baseline)
    assert s.num_accepted_tokens > 0


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_draft_heads_are_token_identical(smollm2_compiled, head_dirs, baseline, method):
    engine = Engine(smollm2_compiled, max_model_len=512,
                    speculative=Speculative(method, num_tokens=3, adaptive=False, heads=head_dirs[method]))
    _check(engine, baseline)
