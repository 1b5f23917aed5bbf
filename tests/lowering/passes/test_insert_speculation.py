"""insert_speculation: the hidden-state output, the recorded options, and speculation through compile/export/load."""
import numpy as np
import pytest

from lowering import Speculative, compile_model, ir
from lowering.models import llama
from lowering.passes import insert_paged_kv, insert_speculation
from lowering.pipeline import OptionsError
from runtime import Engine, SamplingParams, load
from tests.lowering.helpers import PagedLayout, tiny_config


def test_before_after_ir(traced_tiny):
    before, _ = traced_tiny
    paged = insert_paged_kv(before, block_size=4)
    after = insert_speculation(paged, Speculative("medusa", num_tokens=3, heads="heads"))
    ir.verify(after, check_types=True)
    logits_node = next(n for n in after.nodes if n.op == "logits")
    assert after.outputs == [paged.outputs[0], logits_node.inputs[0]]  # logits, then the lm_head's input
    assert str(after.types[after.outputs[1]]) == "f32[T,48]"
    assert after.meta["speculative"]["method"] == "medusa" and after.meta["speculative"]["num_tokens"] == 3
    assert [n.op for n in after.nodes] == [n.op for n in paged.nodes]  # no node changes
    ngram = insert_speculation(paged, Speculative("ngram"))
    assert ngram.outputs == paged.outputs and ngram.meta["speculative"]["method"] == "ngram"
    with pytest.raises(ir.IRError, match="insert_paged_kv"):
        insert_speculation(before, Speculative("ngram"))
    assert ir.Graph.loads(after.dumps()).outputs == after.outputs  # JSON round trip


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config()
    return cfg, llama.build_model(cfg, seed=3)


def test_program_returns_hidden_states_that_make_the_logits(tiny):
    cfg, model = tiny
    cm = compile_model(model, config=cfg, progress=False, speculative=Speculative("eagle", heads="unused"))
    assert [r.name for r in cm.pass_records][-1] == "insert_speculation"
    program = cm.make_program(num_blocks=16)
    layout = PagedLayout(16, cm.block_size)
    step = layout.step([(0, [3, 14, 15, 92, 6], 0), (1, [5, 35, 8], 0)])
    step.logit_rows = np.arange(step.num_tokens, dtype=np.int32)
    logits, hidden = program.step(step, with_hidden=True)
    assert hidden.shape == (step.num_tokens, cfg.hidden_size) and hidden.dtype == np.float32
    head = np.asarray(cm.params["lm_head.weight"])
    np.testing.assert_allclose(logits, hidden @ head.T, rtol=1e-4, atol=1e-4)
    plain = compile_model(model, config=cfg, progress=False).make_program(num_blocks=16)
    with pytest.raises(ValueError, match="no hidden-state output"):
        plain.step(step, with_hidden=True)


def test_compile_options_are_checked(tiny):
    cfg, model = tiny
    with pytest.raises(OptionsError, match="num_tokens"):
        compile_model(model, config=cfg, progress=False, speculative=Speculative("ngram", num_tokens=99))
    with pytest.raises(OptionsError, match="speculative must be"):
        compile_model(model, config=cfg, progress=False, speculative="ngram")
    with pytest.raises(OptionsError, match="bad speculative options"):
        compile_model(model, config=cfg, progress=False, speculative={"method": "ngram", "k": 3})


def test_export_load_keeps_speculation_and_the_draft_model(tiny, tmp_path):
    """A target compiled with a draft model object exports the draft as a nested artifact; the loaded engine
    speculates with it and its greedy output equals the target alone."""
    cfg, model = tiny
    draft_cfg = tiny_config(num_layers=1)
    draft = compile_model(llama.build_model(draft_cfg, seed=4), config=draft_cfg, progress=False)
    cm = compile_model(model, config=cfg, progress=False,
                       speculative=Speculative("draft", num_tokens=3, adaptive=False, draft=draft))
    cm.export(tmp_path / "art")
    assert (tmp_path / "art" / "draft" / "manifest.json").is_file()
    loaded = load(tmp_path / "art")
    spec = loaded.speculative
    assert spec.method == "draft" and spec.num_tokens == 3 and hasattr(spec.draft, "make_program")
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    engine = Engine(loaded)
    outs = engine.generate(prompts, params)
    base = Engine(loaded, speculative=False).generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in base]
    assert engine.spec_stats.num_verifications > 0

    ngram = compile_model(model, config=cfg, progress=False, speculative={"method": "ngram", "num_tokens": 2})
    ngram.export(tmp_path / "ngram")
    assert load(tmp_path / "ngram").speculative == Speculative("ngram", num_tokens=2)
    with pytest.raises(FileNotFoundError, match="heads directory"):
        compile_model(model, config=cfg, progress=False,
                      speculative=Speculative("medusa", heads=str(tmp_path / "none"))).export(tmp_path / "m")
