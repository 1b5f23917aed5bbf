"""share_kv_layers: kv_merge against float64 numpy, the rewrite on a tiny model (program == interpret, merged
pools hold the SLERP midpoint, fewer bytes per block), pair selection (int / list / "auto"), refusals, export,
and the cuda lowering (TRITON_INTERPRET=1 on a torch CPU device without a GPU) against the cpu target."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:
    import torch
except ImportError:  # the cuda test is skipped then
    torch = None
if torch is not None and not torch.cuda.is_available():  # NOTE: before kernels_gpu is imported (see test_cuda.py)
    os.environ["TRITON_INTERPRET"] = "1"
if torch is not None and torch.cuda.is_available():  # the cpu target then runs through XLA on the GPU: exact f32 dots
    jax.config.update("jax_default_matmul_precision", "highest")

from lowering import compile_model, ir, ops  # noqa: E402
from lowering.backends.cpu import cpu_impls  # noqa: E402
from lowering.models import llama  # noqa: E402
from lowering.passes.share_kv_layers import (apply_share_kv_layers, measure_kv_similarity,  # noqa: E402
                                             rank_pairs, share_kv_layers, window_loss)
from lowering.pipeline import CompileOptions, OptionsError  # noqa: E402
from tests.lowering.helpers import PagedLayout, quantize_ir, relerr, run_steps, tiny_config  # noqa: E402

CFG4 = tiny_config(num_layers=4)


def np_merge(a, b, eps=1e-12):
    """float64 reference: normalize(a/|a| + b/|b|) * (|a| + |b|) / 2 over the last axis."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    s = a / np.maximum(na, eps) + b / np.maximum(nb, eps)
    return s / np.maximum(np.linalg.norm(s, axis=-1, keepdims=True), eps) * (na + nb) / 2


def test_np_merge_is_the_slerp_midpoint_with_mean_magnitude():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 8)), rng.normal(size=(5, 8)) * 3
    ua, ub = a / np.linalg.norm(a, axis=-1, keepdims=True), b / np.linalg.norm(b, axis=-1, keepdims=True)
    theta = np.arccos(np.sum(ua * ub, axis=-1, keepdims=True))
    slerp = (np.sin(theta / 2) * ua + np.sin(theta / 2) * ub) / np.sin(theta)  # t = 1/2
    mag = (np.linalg.norm(a, axis=-1, keepdims=True) + np.linalg.norm(b, axis=-1, keepdims=True)) / 2
    np.testing.assert_allclose(np_merge(a, b), slerp * mag, rtol=1e-12, atol=1e-12)


def merge_case(dtype=np.float32):
    """Pools [6, 4, 2, 8] of NaN with the partner layer's rows written at the slots; new rows; slot -1 rows."""
    rng = np.random.default_rng(1)
    n, bs, h, d = 6, 4, 2, 8
    slots = np.array([5, 9, -1, 21, 0, 14, -1], np.int32)
    t = slots.size
    k_old, v_old = rng.normal(size=(t, h, d)), rng.normal(size=(t, h, d)) * 2
    k_new, v_new = rng.normal(size=(t, h, d)) * 0.5, rng.normal(size=(t, h, d))
    k_old[1, 0] = 0.0  # zero partner row: the new direction at half its magnitude
    k_new[3, 1] = 0.0  # zero new row
    v_old[4, 1] = v_new[4, 1] = 0.0  # both zero: zero
    pools = []
    for old in (k_old, v_old):
        pool = np.full((n, bs, h, d), np.nan)
        for i, s in enumerate(slots):
            if s >= 0:
                pool[s // bs, s % bs] = old[i]
        pools.append(pool.astype(dtype))
    return slots, (k_old, v_old), (k_new.reshape(t, h * d).astype(dtype), v_new.reshape(t, h * d).astype(dtype)), pools


@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_kv_merge_matches_float64_numpy(impl):
    slots, olds, news, pools = merge_case()
    args = [jnp.asarray(news[0]), jnp.asarray(news[1]), jnp.asarray(slots), jnp.asarray(pools[0]),
            jnp.asarray(pools[1])]
    attrs = {"num_kv_heads": 2, "head_dim": 8}
    if impl == "reference":
        got = ops.ref_kv_merge(*args, **attrs)
    else:
        got = cpu_impls(1)["kv_merge"](ir.Node("kv_merge", [], [], attrs), args, {})
    for out, old, new, pool in zip(got, olds, news, pools):
        out = np.asarray(out)
        want = np.array(pool, np.float64)
        for i, s in enumerate(slots):
            if s >= 0:
                want[s // 4, s % 4] = np_merge(old[i], new.reshape(-1, 2, 8)[i])
        np.testing.assert_allclose(out, want, rtol=2e-6, atol=2e-7)  # NaN rows (untouched slots) equal NaN
        assert np.isnan(out).sum() == np.isnan(pool).sum()  # slot -1 rows wrote nothing
    k_new = news[0].reshape(-1, 2, 8)
    np.testing.assert_allclose(np.asarray(got[0])[2, 1, 0], k_new[1, 0] / 2, rtol=1e-6)  # zero partner row
    np.testing.assert_allclose(np.asarray(got[1])[0, 0, 1], 0.0)  # both zero


class Interpreted:
    """A Program stand-in: ir.interpret (references only) under jax.jit, keeping the pools after every step."""

    def __init__(self, graph, params, num_blocks=48):
        self.graph, self.params = graph, {k: jnp.asarray(v) for k, v in params.items()}
        self.fn = jax.jit(lambda p, s, i: ir.interpret(graph, i, p, s))
        self.state = {s: jnp.zeros((num_blocks,) + tuple(graph.types[s].shape[1:]), graph.types[s].dtype)
                      for s in graph.state}
        self.states = []

    def step(self, inp):
        (logits,), self.state = self.fn(self.params, self.state, {k: getattr(inp, k) for k in self.graph.inputs})
        self.states.append({k: np.asarray(v, np.float64) for k, v in self.state.items()})
        return np.asarray(logits)


def first_step():
    """run_steps' first step: a ragged prefill of 3 prompts (5, 23 and 1 tokens)."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 23, 1)]
    return prompts, PagedLayout(48, 16, seed=1).step([(i, p, 0) for i, p in enumerate(prompts)])


@pytest.fixture(scope="module")
def tiny4():
    model = llama.build_model(CFG4, seed=3)
    base = compile_model(model, config=CFG4, progress=False, max_model_len=64)
    shared = compile_model(model, config=CFG4, progress=False, max_model_len=64, share_kv_layers=[[2, 3]])
    return model, base, shared


def test_rewrite_drops_the_partner_pools_and_merges_into_the_first(tiny4):
    _, base, shared = tiny4
    g = shared.graph
    ir.verify(g, check_types=True)
    assert g.state == ["kv.0.k", "kv.0.v", "kv.1.k", "kv.1.v", "kv.2.k", "kv.2.v"]
    assert "kv.3.k" not in g.types and "kv.3.v" not in g.types
    assert g.ops_count()["kv_write"] == 3 and g.ops_count()["kv_merge"] == 1
    merge = next(n for n in g.nodes if n.op == "kv_merge")
    writer2 = next(n for n in g.nodes if n.op == "kv_write" and n.inputs[3] == "kv.2.k")
    assert merge.inputs[3:] == writer2.outputs and merge.attrs == {"num_kv_heads": 2, "head_dim": 8}
    assert [g.state_updates["kv.2.k"], g.state_updates["kv.2.v"]] == merge.outputs
    attention = [n for n in g.nodes if n.op == "paged_attention"]
    assert attention[2].inputs[1:3] == writer2.outputs and attention[3].inputs[1:3] == merge.outputs
    assert g.meta["num_kv_layers"] == 3 and g.meta["kv_shared_layers"] == [[2, 3]]
    per = ir.state_bytes_per_block(base.graph)
    assert ir.kv_bytes_per_block(g) == ir.kv_bytes_per_block(base.graph) - per["kv.3.k"] - per["kv.3.v"]
    assert ir.kv_bytes_per_block(g) * 4 == ir.kv_bytes_per_block(base.graph) * 3
    assert "= kv_merge(" in ir.format_graph(g)
    assert ir.Graph.loads(g.dumps()).dumps() == g.dumps()


def test_program_equals_interpret_pool_holds_the_slerp_midpoint_and_similarity(tiny4):
    _, base, shared = tiny4
    got = run_steps(shared.make_program(num_blocks=48), 1, 16)
    interp = Interpreted(shared.graph, shared.params)
    want = run_steps(interp, 1, 16)
    for a, b in zip(got, want):
        assert relerr(a, b) < 1e-5
    # the first step (a fresh prefill) computes layers 2 and 3's K/V exactly as the unshared graph does: the
    # merged pool holds their merge at every written slot, layers 0-1 are untouched, layer 3's attention changed
    prompts, step = first_step()
    unshared = Interpreted(base.graph, base.params)
    base_logits = unshared.step(step)
    assert relerr(want[0], base_logits) > 1e-4
    before, after = unshared.states[0], interp.states[0]
    rows = {name: pool[step.slot_mapping // 16, step.slot_mapping % 16] for name, pool in before.items()}
    for which in ("k", "v"):
        np.testing.assert_allclose(after[f"kv.2.{which}"][step.slot_mapping // 16, step.slot_mapping % 16],
                                   np_merge(rows[f"kv.2.{which}"], rows[f"kv.3.{which}"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(after[f"kv.1.{which}"], before[f"kv.1.{which}"])
    # measure_kv_similarity over the same prompts: mean cosine of the rows the unshared graph cached
    sims = measure_kv_similarity(base.graph, base.params, [np.array(p) for p in prompts])
    assert [s["pair"] for s in sims] == [[0, 1], [1, 2], [2, 3]]
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    for s in sims:
        i, j = s["pair"]
        for which in ("k", "v"):
            cos = np.mean(np.sum(unit(rows[f"kv.{i}.{which}"]) * unit(rows[f"kv.{j}.{which}"]), axis=-1))
            assert abs(s[which] - cos) < 1e-5
    # a traced graph (before insert_paged_kv) measures the same
    from lowering import frontend
    from lowering.models import nnx_params

    fn, weights = nnx_params.forward_fn(tiny4[0])
    traced, values = frontend.trace(fn, weights)
    again = measure_kv_similarity(traced, {k: np.asarray(v) for k, v in values.items()}, [np.array(p) for p in prompts])
    assert np.allclose([[s["k"], s["v"]] for s in again], [[s["k"], s["v"]] for s in sims], atol=1e-5)


def test_count_takes_the_most_similar_pairs_of_the_deeper_half(tiny4):
    cfg = tiny_config(num_layers=8)
    cm = compile_model(llama.build_model(cfg, seed=4), config=cfg, progress=False, max_model_len=64,
                       share_kv_layers=2, calibration=[np.arange(i, i + 24) % 97 for i in range(3)])
    sharing = cm.graph.meta["kv_sharing"]
    sims = sharing["similarity"]
    assert [s["pair"] for s in sims] == [[i, i + 1] for i in range(7)]
    assert sharing["pairs"] == sorted(rank_pairs(sims, 8)[:2]) == cm.graph.meta["kv_shared_layers"]
    assert all(i >= 4 for i, _ in sharing["pairs"]) and len(sharing["pairs"]) == 2
    assert cm.graph.meta["num_kv_layers"] == 6 and len(cm.graph.state) == 12
    _, base, _ = tiny4
    with pytest.raises(ir.IRError, match="asks for 2 pairs.*4-layer model.*has 1"):
        apply_share_kv_layers(base.graph, base.params, 2, windows=[np.arange(16) % 97])


def test_rank_pairs_is_greedy_over_the_deeper_half():
    sims = [{"pair": [i, i + 1], "k": k, "v": v} for i, (k, v) in
            enumerate([(0.99, 0.99), (0.1, 0.1), (0.2, 0.3), (0.9, 0.8), (0.95, 0.9), (0.5, 0.5), (0.6, 0.2)])]
    # candidates i >= 4: (4,5) 0.925, (5,6) 0.5, (6,7) 0.4 -> (4,5), then (6,7) ((5,6) overlaps)
    assert rank_pairs(sims, 8) == [[4, 5], [6, 7]]
    # 6 layers: (3,4) 0.85 and (4,5) 0.925 overlap -> only (4,5); the very similar (0,1) is never a candidate
    assert rank_pairs(sims[:5], 6) == [[4, 5]]
    assert rank_pairs(sims[:1], 2) == []


def test_auto_respects_the_budget(tiny4):
    from runtime import Engine, SamplingParams

    model, base, _ = tiny4
    # calibration: the model's own greedy continuations (on a random model's random tokens, any perturbation that
    # flattens the logits lowers the loss; on its own predictions sharing can only cost)
    params = SamplingParams(max_tokens=45, temperature=0.0, ignore_eos=True)
    calib = [[1, 2, 3] + o.token_ids for o in Engine(base, max_model_len=64).generate([[1, 2, 3], [9, 8, 7]], params)]
    kw = dict(config=CFG4, progress=False, max_model_len=64, share_kv_layers="auto", calibration=calib)
    tight = compile_model(model, max_ppl_increase=1e-9, **kw)
    loose = compile_model(model, max_ppl_increase=10.0, **kw)
    assert tight.graph.meta["kv_shared_layers"] == [] and "kv_merge" not in tight.graph.ops_count()
    assert tight.graph.state == base.graph.state
    assert tight.graph.meta["kv_sharing"]["ppl"]["evaluations"][-1][1] > 1e-9
    assert loose.graph.meta["kv_shared_layers"] == [[2, 3]]  # the only candidate of the deeper half
    ppl = loose.graph.meta["kv_sharing"]["ppl"]
    assert 0 < ppl["increase"] <= 10.0 and ppl["evaluations"] == tight.graph.meta["kv_sharing"]["ppl"]["evaluations"]
    assert ppl["tokens"] == 96 and ppl["source"] == "user tokens"


def test_window_loss_in_chunks_equals_one_prefill_without_sharing(tiny4):
    # (with sharing they differ: layer 2 reads merged K/V of earlier chunks, which one prefill never shows it)
    _, base, _ = tiny4
    windows = [np.arange(32) % 97, (np.arange(32) * 7) % 97]
    one = window_loss(base.graph, base.params, windows, chunk=None)
    assert abs(window_loss(base.graph, base.params, windows, chunk=16) - one) < 1e-5


@pytest.mark.parametrize("value,match", [
    ("yes", "must be None, 'auto'"), (-1, ">= 0"), (True, "must be None"), (1.5, "must be None"),
    ([[1, 3]], "not two adjacent"), ([[2, 3], [3, 4]], "overlap"), ([[2, 3], [2, 3]], "repeated"),
    ([[2]], "two layer indices"), ([["2", "3"]], "two layer indices")])
def test_bad_option_values_are_refused(value, match):
    with pytest.raises(OptionsError, match=match):
        compile_model(llama.build_model(CFG4, seed=0), config=CFG4, progress=False, share_kv_layers=value)
    with pytest.raises(OptionsError, match=match):
        CompileOptions(share_kv_layers=value).validate()


def test_quantized_kv_windows_and_bad_pairs_are_refused(tiny4):
    model, base, shared = tiny4
    with pytest.raises(OptionsError, match="unquantized KV only.*fp8"):
        compile_model(model, config=CFG4, progress=False, kv_cache="fp8", share_kv_layers=[[2, 3]])
    graph, _ = quantize_ir(base, kv="fp8")
    with pytest.raises(ir.IRError, match="KV cache is quantized \\(fp8\\)"):
        share_kv_layers(graph, [[2, 3]])
    with pytest.raises(ir.IRError, match="names layer 4"):
        share_kv_layers(base.graph, [[3, 4]])
    with pytest.raises(ir.IRError, match="already ran"):
        share_kv_layers(shared.graph, [[0, 1]])
    cfg = tiny_config(num_layers=2, sliding_window=8)
    with pytest.raises(ir.IRError, match="sliding-window"):
        compile_model(llama.build_model(cfg, seed=0), config=cfg, progress=False, share_kv_layers=[[0, 1]])


def test_options_round_trip_and_export(tiny4, tmp_path):
    from runtime import load

    for value in ("auto", 2, [[2, 3], [4, 5]], ((0, 1),)):
        opts = CompileOptions(share_kv_layers=value)
        back = CompileOptions.from_json(json.loads(json.dumps(opts.to_json())))
        assert back.kv_sharing() == opts.validate().kv_sharing()
    _, _, shared = tiny4
    assert shared.options.share_kv_layers == [[2, 3]]
    loaded = load(shared.export(tmp_path / "art"))
    assert loaded.options == shared.options and loaded.graph.dumps() == shared.graph.dumps()
    assert loaded.graph.meta["kv_sharing"]["pairs"] == [[2, 3]]


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_cuda_lowering_equals_cpu_target():
    from lowering.backends.cuda import _lower_kv_merge

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the lowering alone: slot -1 skipped, NaN slots untouched, a step with no valid slot changes nothing
    slots, _, news, pools = merge_case()
    graph = ir.Graph(types={"kp": ir.TensorType((6, 4, 2, 8), "float32")})
    fn = _lower_kv_merge(ir.Node("kv_merge", ["k", "v", "s", "kp", "vp"], ["a", "b"],
                                 {"num_kv_heads": 2, "head_dim": 8}), graph, None, {}, {})
    want = ops.ref_kv_merge(*(jnp.asarray(x) for x in (*news, slots, *pools)), num_kv_heads=2, head_dim=8)
    tk, tv = (torch.tensor(p, device=device) for p in pools)
    args = [torch.tensor(x, device=device) for x in (*news, slots)]
    out = fn(None, *args, tk, tv)
    assert out[0] is tk and out[1] is tv  # in place
    for a, b in zip(out, want):
        np.testing.assert_allclose(a.cpu().numpy(), np.asarray(b), rtol=1e-5, atol=1e-6)
    before = tk.clone()
    fn(None, args[0], args[1], torch.full_like(args[2], -1), tk, tv)
    assert torch.equal(torch.nan_to_num(before, 7.0), torch.nan_to_num(tk, 7.0))
    # the whole program: ragged steps on the cuda target (head_dim 16) equal the cpu target
    cfg = tiny_config(num_layers=4, head_dim=16, hidden_size=96)
    model = llama.build_model(cfg, seed=6)
    kw = dict(config=cfg, progress=False, max_model_len=128, share_kv_layers=[[2, 3]])
    cpu_cm = compile_model(model, **kw)
    cuda_cm = compile_model(model, target="cuda", dtype="float32", **kw)
    cuda_prog = cuda_cm.make_program(num_blocks=48, device=device, pool_fill=float("nan"))
    assert "kv_merge" in cuda_prog.launch_plan
    for want, got in zip(run_steps(cpu_cm.make_program(num_blocks=48), 1, 16), run_steps(cuda_prog, 1, 16)):
        assert np.isfinite(got).all()
        assert relerr(got, want) < 1e-4


def test_cli_flag_reaches_compile_model():
    from runtime import cli

    parser = cli.build_parser()
    for spec, want in (("auto", "auto"), ("2", 2), ("10-11,12-13", [[10, 11], [12, 13]])):
        args = parser.parse_args(["compile", "smollm2-135m", "-o", "out", "--share-kv-layers", spec])
        assert cli.compile_kwargs(args)["share_kv_layers"] == want
    assert "share_kv_layers" not in cli.compile_kwargs(parser.parse_args(["compile", "smollm2-135m", "-o", "out"]))
