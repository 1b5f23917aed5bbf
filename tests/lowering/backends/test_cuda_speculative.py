"""Speculative decoding on the CUDA program (Triton's interpreter without a GPU): the hidden-state output, and
greedy / sampled verification rows through step_greedy and step, token-identical to no speculation."""
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:  # NOTE: must be set before kernels_gpu is imported (triton reads it at decoration time)
    os.environ["TRITON_INTERPRET"] = "1"

from lowering import Speculative, compile_model  # noqa: E402
from lowering.models import llama  # noqa: E402
from runtime import Engine, SamplingParams  # noqa: E402
from tests.lowering.helpers import PagedLayout, tiny_config  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
TOL = 1e-2 if HAS_GPU else 1e-4  # on a GPU both targets' float32 matmuls may round differently (TF32, XLA)


@pytest.fixture(scope="module")
def models():
    cfg = tiny_config(head_dim=16, hidden_size=96, num_heads=6, num_kv_heads=2)
    model = llama.build_model(cfg, seed=7)
    spec = Speculative("eagle", heads="unused")
    return (cfg, compile_model(model, config=cfg, progress=False, max_model_len=128, speculative=spec),
            compile_model(model, config=cfg, target="cuda", dtype="float32", progress=False, max_model_len=128,
                          speculative=spec))


def test_cuda_hidden_states_match_cpu_target(models):
    cfg, cpu_cm, cuda_cm = models
    cpu = cpu_cm.make_program(num_blocks=16)
    cuda = cuda_cm.make_program(num_blocks=16, device=DEVICE, cuda_graphs=False)
    layout = PagedLayout(16, cpu_cm.block_size)
    step = layout.step([(0, [3, 14, 15, 92, 6], 0), (1, [5, 35, 8], 0)])
    step.logit_rows = np.array([1, 4, 7], np.int32)
    want_logits, want_hidden = cpu.step(step, with_hidden=True)
    logits, hidden = cuda.step(step, with_hidden=True)
    np.testing.assert_allclose(hidden, want_hidden, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(logits, want_logits, rtol=TOL, atol=TOL)
    tokens, hidden2 = cuda.step_greedy(layout.step([(0, [7], 5), (1, [9], 3)]), with_hidden=True)
    assert tokens.shape == (2,) and hidden2.shape == (2, cfg.hidden_size)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cuda_engine_with_drafts_matches_plain_engine(models, temperature):
    """Greedy: identical tokens (step_greedy checks k+1 rows on the device). Sampling with a seed: every token
    is one the target could sample (its distribution is checked on the CPU target in tests/runtime)."""
    cfg, _, cuda_cm = models
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 9, 10]]
    params = SamplingParams(max_tokens=10, temperature=temperature, top_k=5, seed=1, ignore_eos=True)
    opts = {"device": DEVICE, "cuda_graphs": False}
    base = Engine(cuda_cm, num_blocks=40, program_options=opts, speculative=False).generate(prompts, params)
    engine = Engine(cuda_cm, num_blocks=40, program_options=opts,
                    speculative=Speculative("ngram", num_tokens=3, adaptive=False))
    outs = engine.generate(prompts, params)
    assert engine.spec_stats.num_verifications > 0
    if temperature == 0.0:
        assert [o.token_ids for o in outs] == [o.token_ids for o in base]
    else:
        assert all(len(o.token_ids) == 10 for o in outs)


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_uniform_verification_steps_replay_cuda_graphs(models):
    """With CUDA graphs the engine fills drafts to one length, so verification steps (q = k + 1 rows a
    sequence) replay captured graphs; greedy output equals the eager program's, hidden states included."""
    cfg, _, cuda_cm = models
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 9, 10], [3, 4]]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    spec = Speculative("ngram", num_tokens=3, adaptive=False)
    eager = Engine(cuda_cm, num_blocks=40, program_options={"cuda_graphs": False}, speculative=spec)
    graphs = Engine(cuda_cm, num_blocks=40, program_options={"cuda_graphs": True}, speculative=spec)
    want = eager.generate(prompts, params)
    got = graphs.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert any(q == 4 for (_, q, _) in graphs.program._graphs)
    layout = PagedLayout(40, cuda_cm.block_size)
    prog = graphs.program
    step = layout.step([(0, [3, 14, 15, 92], 4), (1, [5, 35, 8, 9], 2)])
    step.logit_rows = np.arange(8, dtype=np.int32)
    assert prog._uniform_query(step) == 4


def _eagle_heads(tmp_path, cfg, cm):
    from runtime import draft_heads as dh

    embed = np.asarray(cm.params["model.embed_tokens.weight"], np.float32)
    heads = dh.init_eagle(cfg, embed, seed=3)
    rng = np.random.default_rng(0)  # non-zero everywhere: drafts that depend on every weight
    heads = dh.DraftHeads("eagle", heads.config, {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
                                                  for k, v in heads.params.items()})
    dh.save_heads(str(tmp_path / "eagle"), heads)
    return str(tmp_path / "eagle")


def test_cuda_engine_eagle_head_runs_in_torch(models, tmp_path):
    """On a CUDA Program the EAGLE head runs in torch on the Program's device (CUDA graphs on a GPU); greedy output
    equals the target alone."""
    from runtime.eagle_torch import TorchEagleBackend

    cfg, _, cuda_cm = models
    heads = _eagle_heads(tmp_path, cfg, cuda_cm)
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    opts = {"device": DEVICE, "cuda_graphs": HAS_GPU}
    base = Engine(cuda_cm, num_blocks=60, program_options=opts, speculative=False).generate(prompts, params)
    engine = Engine(cuda_cm, num_blocks=60, program_options=opts,
                    speculative=Speculative("eagle", num_tokens=3, heads=heads, adaptive=False))
    assert isinstance(engine.proposer._backend, TorchEagleBackend)
    outs = engine.generate(prompts, params)
    assert engine.spec_stats.num_draft_tokens > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in base]


@pytest.mark.skipif(not HAS_GPU, reason="CUDA graphs need a GPU")
def test_torch_eagle_graph_replay_matches_eager(models, tmp_path):
    """A greedy proposal replayed from a CUDA graph drafts what the eager torch head drafts."""
    from runtime import draft_heads as dh
    from runtime.speculative import StepRows

    cfg, _, cuda_cm = models
    heads = dh.load_heads(_eagle_heads(tmp_path, cfg, cuda_cm))
    embed = np.asarray(cuda_cm.params["model.embed_tokens.weight"], np.float32)
    rng = np.random.default_rng(1)

    class Req:
        def __init__(self, ids):
            self.token_ids = list(ids)
            self.params = SamplingParams(max_tokens=8, temperature=0)

    props = [dh.EagleProposer(heads, embed=embed, lm_head=embed, config=cfg, device="cuda") for _ in range(2)]
    props[1]._backend.use_graphs = False  # the same arithmetic, eager
    seqs = [rng.integers(1, cfg.vocab_size, 30) for _ in range(3)]
    feats = [rng.normal(0, 1, (30, cfg.hidden_size)).astype(np.float32) for _ in range(3)]
    reqs = [[Req(s[:10]) for s in seqs] for _ in props]
    for p, rs in zip(props, reqs):
        p.observe([StepRows(r, 0, s[:9], f[:9], 9, int(s[9])) for r, s, f in zip(rs, seqs, feats)])
    for rnd in range(4):  # the first round captures, later rounds replay
        drafts = [[d.tokens for d in p.propose(rs, [3, 3, 3])] for p, rs in zip(props, reqs)]
        assert drafts[0] == drafts[1]
        for p, rs in zip(props, reqs):
            for r, s, f in zip(rs, seqs, feats):
                n = len(r.token_ids)
                r.token_ids = list(s[:n + 1])
                p.observe([StepRows(r, n - 1, s[n - 1:n], f[n - 1:n], 1, int(s[n]))])
    assert props[0]._backend.graphs


@pytest.mark.parametrize("k", [3])  # (k = 2 and 4 ran on the H200 too; the toy program's tests cover the rest)
def test_device_ngram_loop_engine_matches_plain_engine(models, k, monkeypatch):
    """n-gram speculation run on the device (CudaProgram.start_ngram_loop: propose and accept kernels around the
    verification step; CUDA graphs on a GPU, the eager plan here): greedy tokens equal the engine without
    speculation for a ragged batch with mixed max_tokens, and every block comes back."""
    cfg, _, cuda_cm = models
    prompts = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 9, 10], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (20, 9, 14)]
    opts = {"device": DEVICE, "cuda_graphs": HAS_GPU}
    base = Engine(cuda_cm, num_blocks=40, program_options=opts, speculative=False).generate(prompts, params)
    monkeypatch.setattr(Engine, "DEVICE_SPEC_MAX_SEQS", 4)  # bursts over several sequences (default: one)
    engine = Engine(cuda_cm, num_blocks=40, program_options=opts,
                    speculative=Speculative("ngram", num_tokens=k, adaptive=False))
    assert engine.spec_on_device
    outs = engine.generate(prompts, params)
    assert engine.num_device_spec_iterations > 0 and engine.spec_stats.num_verifications > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in base]
    assert engine.scheduler.allocator.num_free == engine.program.num_blocks


def test_ngram_loop_checks_its_arguments(models):
    _, _, cuda_cm = models
    prog = cuda_cm.make_program(num_blocks=16, device=DEVICE, cuda_graphs=False)
    tables = np.arange(4, dtype=np.int32)[None]
    assert prog.supports_ngram_loop
    with pytest.raises(ValueError, match="k must be in"):
        prog.start_ngram_loop([[1, 2, 3]], tables, k=20)
    with pytest.raises(ValueError, match="do not fit a capacity"):
        prog.start_ngram_loop([[1, 2, 3]], tables, k=3, capacity=5)
    with pytest.raises(ValueError, match="a block outside"):
        prog.start_ngram_loop([[1, 2, 3]], tables + 100, k=3)
    loop = prog.start_ngram_loop([[1, 2, 3, 1, 2]], tables, k=3, max_chunk=2)
    with pytest.raises(ValueError, match="1 to 2 iterations"):
        loop.launch(3, 16)
    with pytest.raises(ValueError, match="past the loop's capacity"):
        loop.launch(1, 10_000)
    res = loop.launch(2, 5 + 2 * 4).result()
    assert res.tokens.shape == (2, 1, 4) and res.counts.shape == (2, 1) and (res.counts >= 1).all() and res.q == 4
    with pytest.raises(ValueError, match="q must be in"):
        loop.launch(1, 20, q=5)
    plain = loop.launch(2, 5 + 2 * 4 + 2, q=1).result()  # plain decode steps: one token each
    assert plain.q == 1 and (plain.counts == 1).all()
