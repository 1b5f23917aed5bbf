"""Quantization passes on a tiny model: rotation is exact, rewrites use the formats' encodings, KV memory
scales, the guard keeps a sensitive layer, the plan reaches the manifest, bad requests fail clearly."""
import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from lowering import compile_model
from lowering.ir import interpret
from lowering.models import llama
from lowering.pipeline import OptionsError
from lowering.quant import calibrate, formats, gptq, passes
from tests.lowering.helpers import PagedLayout, tiny_config

VOCAB = 211
CFG = tiny_config(head_dim=16, hidden_size=128, num_heads=8, num_kv_heads=2, intermediate_size=256,
                  vocab_size=VOCAB, tie_word_embeddings=True)
CALIB = [np.random.default_rng(i).integers(0, VOCAB, 64).astype(np.int32) for i in range(4)]
QUIET = dict(progress=False, calibration=CALIB, calibration_window=64)


@pytest.fixture(scope="module")
def model():
    return llama.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def base(model):
    return compile_model(model, progress=False)


def run_steps(cm, fill=0.0):
    """Logits of a ragged prefill of two sequences then two decode steps, on a 64-block pool."""
    prog = cm.make_program(num_blocks=64, max_num_seqs=4, pool_fill=fill)
    lay = PagedLayout(64, cm.block_size, seed=3)
    a, b = list(range(1, 30)), list(range(50, 57))
    outs = [prog.step(lay.step([(0, a, 0), (1, b, 0)]))]
    outs.append(prog.step(lay.step([(0, [7], len(a)), (1, [9], len(b))])))
    outs.append(prog.step(lay.step([(0, [11], len(a) + 1), (1, [13], len(b) + 1)])))
    return np.concatenate(outs)


def greedy_texts(cm, starts, length):
    """Greedy continuations of one start token each (decoded together, one step per token)."""
    prog = cm.make_program(num_blocks=8 * len(starts), max_num_seqs=len(starts) + 1)
    lay = PagedLayout(8 * len(starts), cm.block_size, seed=0)
    seqs = [[t] for t in starts]
    for pos in range(length - 1):
        logits = prog.step(lay.step([(i, [s[-1]], pos) for i, s in enumerate(seqs)]))
        for s, row in zip(seqs, logits):
            s.append(int(np.argmax(row)))
    return [np.asarray(s, np.int32) for s in seqs]


def test_rotation_leaves_the_model_unchanged(base, monkeypatch):
    graph, params = passes.rotate_kv(base.graph, base.params)
    counts = graph.ops_count()
    assert counts["rotate_heads"] == 2 * CFG.num_layers  # q and k; v and o folded into the weights
    rotated = type(base)(graph, params, base.options, base.config, base.tokenizer)
    np.testing.assert_allclose(run_steps(rotated), run_steps(base), rtol=1e-4, atol=1e-4)
    # without folding (e.g. a shared weight) the rotations become explicit ops and still cancel
    monkeypatch.setattr(passes, "_fold_v", lambda *a: False)
    monkeypatch.setattr(passes, "_fold_o", lambda *a: False)
    graph, params = passes.rotate_kv(base.graph, base.params)
    assert graph.ops_count()["rotate_heads"] == 4 * CFG.num_layers
    explicit = type(base)(graph, params, base.options, base.config, base.tokenizer)
    np.testing.assert_allclose(run_steps(explicit), run_steps(base), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", formats.WEIGHT_FORMATS)
def test_weight_rewrite_stores_the_format_encoding(model, base, fmt):
    cm = compile_model(model, weights=fmt, quant_method="rtn", max_ppl_increase=None, **QUIET)
    counts = cm.graph.ops_count()
    # every linear; the logits weight stays unquantized unless named ("lm_head")
    assert counts.get("linear", 0) == 0 and counts["qlinear"] == 4 * CFG.num_layers
    assert counts.get("qlogits", 0) == 0 and counts["logits"] == 1
    # each unit's parts are exactly formats.quantize_weight of the float weight
    unit = "model.layers.1.mlp.down_proj.weight"
    want = formats.quantize_weight(base.params[unit], fmt)
    for part, value in want.items():
        got = cm.params[f"{unit}.{part}"]
        assert got.dtype == value.dtype
        np.testing.assert_array_equal(got.view(np.uint8) if got.dtype == formats.FP8 else got,
                                      value.view(np.uint8) if value.dtype == formats.FP8 else value)
    assert "model.embed_tokens.weight" in cm.params  # tied: the embedding still reads the float table
    node = next(n for n in cm.graph.nodes if n.op == "qlinear")
    assert node.attrs["format"] == fmt and (node.attrs.get("act_format") == "fp8") == (fmt == "fp8")
    got, ref = run_steps(cm), run_steps(base)
    assert np.abs(got - ref).max() < {"int8": 0.05, "fp8": 0.2, "int4": 0.5, "nvfp4": 0.8}[fmt] * np.abs(ref).max()
    assert cm.quant_report.weights[unit.removesuffix(".weight")] == fmt
    assert cm.quant_report.weight_bytes["after"] < cm.quant_report.weight_bytes["before"]


def test_qlinear_reference_is_a_float_linear_on_dequantized_weights():
    import jax.numpy as jnp

    from lowering import ops

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 64)).astype(np.float32)
    w = rng.normal(size=(24, 64)).astype(np.float32)
    bias = rng.normal(size=(24,)).astype(np.float32)
    for fmt in formats.WEIGHT_FORMATS:
        parts = formats.quantize_weight(w, fmt)
        args = [jnp.asarray(parts[p]) for p in formats.WEIGHT_PARTS[fmt]]
        act = "fp8" if fmt == "fp8" else None
        got = ops.ref_qlinear(jnp.asarray(x), *args, jnp.asarray(bias), format=fmt, in_features=64, out_features=24,
                              act_format=act)
        xin = x if act is None else (lambda q, s: formats.dequantize_fp8(q, s))(*formats.quantize_fp8_tokens(x))
        want = xin.astype(np.float64) @ formats.dequantize_weight(parts, fmt).T.astype(np.float64) + bias
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_gptq_beats_round_to_nearest_on_correlated_inputs():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(1024, 16)) @ rng.normal(size=(16, 256)) + 0.3 * rng.normal(size=(1024, 256))).astype(np.float32)
    w = rng.normal(size=(48, 256)).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    for fmt in ("int4", "nvfp4"):
        g = gptq.gptq_quantize(w, hessian, fmt)
        r = formats.quantize_weight(w, fmt)
        assert {k: (v.shape, v.dtype) for k, v in g.items()} == {k: (v.shape, v.dtype) for k, v in r.items()}
        err = lambda parts: np.mean((x @ (formats.dequantize_weight(parts, fmt) - w).T) ** 2)  # noqa: E731
        assert err(g) < 0.5 * err(r), fmt


def test_gptq_fp8_keeps_the_round_to_nearest_encoding_and_beats_it():
    rng = np.random.default_rng(1)
    # correlated inputs with a few high-energy channels (act order visits them first)
    x = (rng.normal(size=(2048, 16)) @ rng.normal(size=(16, 256)) + 0.3 * rng.normal(size=(2048, 256)))
    x[:, [3, 77]] *= 20.0
    x = x.astype(np.float32)
    w = rng.normal(size=(48, 256)).astype(np.float32)
    hessian = x.T.astype(np.float64) @ x
    r = formats.quantize_weight(w, "fp8")
    err = lambda parts: np.mean((x @ (formats.dequantize_weight(parts, "fp8") - w).T) ** 2)  # noqa: E731
    for damp in (None, 0.01):
        g = gptq.gptq_quantize(w, hessian, "fp8", damp=damp)
        assert {k: (v.shape, v.dtype) for k, v in g.items()} == {k: (v.shape, v.dtype) for k, v in r.items()}
        np.testing.assert_array_equal(g["scale"], r["scale"])  # per-row scales as RTN: same format, same kernels
        assert err(g) < 0.5 * err(r), damp


def test_fp8_weights_use_gptq_under_auto_and_rtn_when_asked(model):
    auto = compile_model(model, weights="fp8", max_ppl_increase=None, **QUIET).quant_report
    rtn = compile_model(model, weights="fp8", quant_method="rtn", max_ppl_increase=None, **QUIET).quant_report
    int8 = compile_model(model, weights="int8", max_ppl_increase=None, **QUIET).quant_report
    assert set(auto.methods.values()) == {"gptq"} and auto.calibration["source"] == "user tokens"
    assert set(rtn.methods.values()) == {"rtn"} and set(int8.methods.values()) == {"rtn"}
    assert rtn.calibration["source"] == "none"


def test_collect_keeps_one_compiled_function_per_reducer(base):
    import jax.numpy as jnp

    runner = calibrate.GraphRunner(base.graph, base.params, CALIB[:2])
    name = next(n for n in base.graph.nodes if n.op == "linear").inputs[0]
    hess = runner.collect([name], lambda n, x: x.T @ x)[name]
    amax = runner.collect([name], lambda n, x: jnp.max(jnp.abs(x), axis=0), np.maximum)[name]
    assert hess.shape == (CFG.hidden_size, CFG.hidden_size) and amax.shape == (CFG.hidden_size,)


@pytest.mark.parametrize("kv,rotation", [("fp8", False), ("fp8", True), ("nvfp4", True), ("nvfp4", False)])
def test_quantized_kv_pools(model, base, kv, rotation):
    cm = compile_model(model, kv_cache=kv, kv_rotation=rotation, max_ppl_increase=None, **QUIET)
    pools = {s: cm.graph.types[s] for s in cm.graph.state}
    assert len(pools) == 2 * CFG.num_layers * (2 if kv == "nvfp4" else 1)
    scale = cm.params["kv.0.k_scale"]
    assert scale.shape == ((CFG.num_kv_heads,) if kv == "fp8" else ()) and (scale > 0).all()
    ref = run_steps(base)
    for fill in (0.0, float("nan")):  # unused pool pages full of NaN must not leak into the logits
        got = run_steps(cm, fill)
        assert np.isfinite(got).all()
        assert np.abs(got - ref).max() < (0.05 if kv == "fp8" else 0.3) * np.abs(ref).max()


def test_kv_scales_cover_the_calibration_values(model, base):
    cm = compile_model(model, kv_cache="fp8", max_ppl_increase=None, **QUIET)
    kvw = [n for n in base.graph.nodes if n.op == "kv_write"]
    runner = calibrate.GraphRunner(base.graph, base.params, CALIB)
    names = [n.inputs[0] for n in kvw]
    amax = runner.collect(names, lambda n, x: abs(x).reshape(x.shape[0], CFG.num_kv_heads, -1).max(axis=(0, 2)),
                          np.maximum)
    for layer, name in enumerate(names):
        np.testing.assert_allclose(cm.params[f"kv.{layer}.k_scale"] * 448, amax[name], rtol=1e-6)


def test_kv_bytes_and_tokens_in_a_fixed_budget(model):
    bf16 = compile_model(model, kv_cache_dtype="bfloat16", progress=False)
    fp8 = compile_model(model, kv_cache="fp8", max_ppl_increase=None, **QUIET)
    nvfp4 = compile_model(model, kv_cache="nvfp4", max_ppl_increase=None, **QUIET)
    per_token = {name: cm.quant_report.kv_bytes_per_token["after"] if cm.quant_report else None
                 for name, cm in (("fp8", fp8), ("nvfp4", nvfp4))}
    from lowering.quant.guard import kv_bytes_per_token

    per_token["bf16"] = kv_bytes_per_token(bf16.graph)
    assert per_token["bf16"] == 2 * CFG.num_layers * CFG.num_kv_heads * CFG.head_dim * 2
    assert per_token["fp8"] / per_token["bf16"] == 0.5
    assert per_token["nvfp4"] / per_token["bf16"] <= 0.282
    budget = 1 << 20
    tokens = {name: cm.make_program(kv_cache_bytes=budget, max_num_seqs=1 << 20, max_model_len=64).num_blocks
              * cm.block_size for name, cm in (("bf16", bf16), ("fp8", fp8), ("nvfp4", nvfp4))}
    assert tokens["fp8"] == pytest.approx(2 * tokens["bf16"], rel=0.01)
    assert tokens["nvfp4"] >= 3.5 * tokens["bf16"]


def test_guard_estimate_equals_the_real_quantized_graph(model):
    cm = compile_model(model, weights="fp8", kv_cache="fp8", max_ppl_increase=0.5, **QUIET)
    r = cm.quant_report
    assert r.kept == [] and r.full_plan_increase is not None
    assert r.measured_increase == pytest.approx(r.full_plan_increase, rel=1e-4, abs=1e-6)


def test_guard_keeps_an_injected_outlier_layer_and_the_manifest_records_it(tmp_path):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=False)
    random = llama.build_model(cfg, seed=1)
    weights = {llama.dotted(path): np.array(var.get_value() if hasattr(var, "get_value") else var.value)
               for path, var in nnx.to_flat_state(nnx.state(random, nnx.Param))}
    weights["lm_head.weight"] *= 4.0  # confident predictions, so that quantization error shows in the loss
    # an outlier input column of layer 1's gate/up projections that never sees a nonzero activation (its norm
    # weight is 0): the float model ignores it, but it sets every int4 group scale, so all other weights round to 0
    weights["model.layers.1.post_attention_layernorm.weight"][5] = 0.0
    for proj in ("gate_proj", "up_proj"):
        weights[f"model.layers.1.mlp.{proj}.weight"][:, 5] = 1000.0
    sharp = llama.build_model(cfg, weights)
    # calibration text the float model predicts well: its own greedy continuations
    texts = greedy_texts(compile_model(sharp, progress=False), starts=[3, 50, 101, 170], length=64)
    cm = compile_model(sharp, weights="int4", quant_method="rtn", max_ppl_increase=0.01, progress=False,
                       calibration=texts, calibration_window=64)
    r = cm.quant_report
    assert r.full_plan_increase > 0.01
    assert r.kept and r.kept[0] == "model.layers.1.mlp.gate_proj+up_proj"
    assert r.weights["model.layers.1.mlp.gate_proj+up_proj"] == "none"
    assert r.sensitivity[r.kept[0]] > 0.2 > 3 * sorted(r.sensitivity.values())[-2]
    assert r.measured_increase <= 0.01 + 1e-9
    assert any(n.op == "linear" and n.inputs[1] == "model.layers.1.mlp.gate_proj+up_proj.weight" for n in cm.graph.nodes)
    path = cm.export(tmp_path / "art")
    manifest = json.loads((path / "manifest.json").read_text())
    q = manifest["quantization"]
    assert q["kept"][0] == "model.layers.1.mlp.gate_proj+up_proj" and q["weights"]["model.layers.0.mlp.gate_proj+up_proj"] == "int4"
    assert q["sensitivity"]["model.layers.1.mlp.gate_proj+up_proj"] > 0.01
    from runtime import load

    loaded = load(path)
    assert loaded.quant_report["kept"] == q["kept"]
    np.testing.assert_array_equal(run_steps(loaded), run_steps(cm))


def test_overrides_and_lm_head():
    units = passes.weight_units(compile_model(llama.LlamaForCausalLM(CFG, rngs=nnx.Rngs(0)), progress=False).graph)
    passes.resolve_weight_plan(units, {"*": "int4", "*down_proj": "int8", "lm_head": None})
    plan = {u.name: u.format for u in units}
    assert plan["lm_head"] == "none" and plan["model.layers.0.mlp.down_proj"] == "int8"
    assert plan["model.layers.0.self_attn.q_proj+k_proj+v_proj"] == "int4"
    with pytest.raises(passes.QuantError, match="matches no linear"):
        passes.resolve_weight_plan(units, {"*no_such_layer": "int8"})
    with pytest.raises(passes.QuantError, match="unknown weight format"):
        passes.resolve_weight_plan(units, {"*": "int3"})


def test_bad_requests_fail_clearly(model):
    with pytest.raises(OptionsError, match="unknown weight format 'int2'"):
        compile_model(model, weights="int2", progress=False)
    with pytest.raises(OptionsError, match="kv_cache format"):
        compile_model(model, kv_cache="int4", progress=False)
    with pytest.raises(OptionsError, match="max_ppl_increase"):
        compile_model(model, weights="int8", max_ppl_increase=-1, progress=False)
    with pytest.raises(OptionsError, match="quant method"):
        compile_model(model, weights="int8", quant_method="awq", progress=False)
    with pytest.raises(calibrate.CalibrationError, match="at least 2 tokens"):
        compile_model(model, weights="int8", calibration=[[1]], progress=False)


def test_quantized_graph_runs_under_the_plain_interpreter(model):
    """The op references alone (no CPU impls) agree with the CPU program: every new op has a real reference."""
    cm = compile_model(model, weights="int4", kv_cache="nvfp4", kv_rotation=True, max_ppl_increase=None, **QUIET)
    import jax.numpy as jnp

    lay = PagedLayout(16, cm.block_size, seed=0)
    step = lay.step([(0, list(range(3, 20)), 0)])
    prog = cm.make_program(num_blocks=16, max_num_seqs=2)
    want = prog.step(step)
    state = {s: jnp.zeros([16 if d == "N" else d for d in cm.graph.types[s].shape], cm.graph.types[s].dtype)
             for s in cm.graph.state}
    inputs = {k: getattr(step, k) for k in cm.graph.inputs}
    got, _ = interpret(cm.graph, inputs, cm.params, state)
    np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4)


def test_kv_write_nvfp4_center_and_scale_rule_reference_and_cpu_backend_agree():
    import jax.numpy as jnp

    from lowering import ops
    from lowering.backends.cpu import cpu_impls
    from lowering.ir import Node

    rng = np.random.default_rng(4)
    t, h, d, n, bs = 6, 2, 32, 3, 4
    k = (rng.normal(size=(t, h * d)) * 3 + 5).astype(np.float32)
    v = rng.normal(size=(t, h * d)).astype(np.float32)
    center = rng.normal(size=(h, d)).astype(np.float32) + 5
    slots = np.array([0, 5, -1, 7, 2, 11], np.int32)
    gk = formats.nvfp4_global_scale(np.abs(k.reshape(t, h, d) - center).max())
    gv = formats.nvfp4_global_scale(np.abs(v).max())
    pools = [np.zeros((n, bs, h, d // 2), np.uint8)] * 2 + [np.zeros((n, bs, h, d // 16), formats.FP8)] * 2
    args = [jnp.asarray(a) for a in (k, v, slots, *pools, np.float32(gk), np.float32(gv), center)]
    ref = ops.ref_kv_write_nvfp4(*args, scale_rule="mse46")
    node = Node("kv_write_nvfp4", [f"x{i}" for i in range(10)], [f"y{i}" for i in range(4)], {"scale_rule": "mse46"})
    cpu = cpu_impls(8)["kv_write_nvfp4"](node, args, {})
    for a, b in zip(ref, cpu):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
    # the stored K rows are formats.quantize_nvfp4(k - center, "mse46") and V rows the same rule
    for i, (x, g) in enumerate(((k.reshape(t, h, d) - center, gk), (v.reshape(t, h, d), gv))):
        want = formats.quantize_nvfp4(x, g, "mse46")
        for row, slot in enumerate(slots):
            if slot >= 0:
                np.testing.assert_array_equal(np.asarray(ref[i])[slot // bs, slot % bs], want["q"][row])
                np.testing.assert_array_equal(np.asarray(ref[2 + i])[slot // bs, slot % bs].view(np.uint8),
                                              want["block_scale"][row].view(np.uint8))


def test_nvfp4_kv_centers_keys_on_their_calibration_mean(model, base):
    cm = compile_model(model, kv_cache="nvfp4", max_ppl_increase=None, **QUIET)
    kvw = [n for n in cm.graph.nodes if n.op == "kv_write_nvfp4"]
    assert all(n.attrs == {"scale_rule": "mse46"} and len(n.inputs) == 10 for n in kvw)
    runner = calibrate.GraphRunner(base.graph, base.params, CALIB)
    names = [n.inputs[0] for n in base.graph.nodes if n.op == "kv_write"]
    hd = CFG.hidden_size // CFG.num_heads
    stats = runner.collect(names, lambda n, x: x.reshape(x.shape[0], CFG.num_kv_heads, -1).sum(axis=0))
    for layer, name in enumerate(names):
        mean = stats[name] / runner.num_tokens
        np.testing.assert_allclose(cm.params[f"kv.{layer}.k_center"], mean, rtol=1e-5, atol=1e-6)
        assert cm.params[f"kv.{layer}.k_center"].shape == (CFG.num_kv_heads, hd)


def test_runner_on_a_graph_with_some_kv_layers_already_nvfp4(base):
    """The final measurement after a guard kept some KV layers unquantized: the graph's first pools are packed
    nvfp4 (head_dim / 2 bytes a row) while a later layer's kv_write is still plain; the runner's flags must
    take their shape from the plain layer's pool."""
    gs = formats.nvfp4_global_scale(8.0)
    graph, params = passes.apply_kv_quantization(base.graph, dict(base.params), {0: "nvfp4"}, {0: (gs, gs)})
    assert graph.types[graph.state[0]].shape[-1] == CFG.head_dim // 2
    runner = calibrate.GraphRunner(graph, params, CALIB[:2])
    flags = runner.no_flags()
    assert flags.kv_center.shape == (CFG.num_layers - 1, CFG.num_kv_heads, CFG.head_dim)
    loss = runner.loss()
    assert np.isfinite(loss)
    base_loss = calibrate.GraphRunner(base.graph, base.params, CALIB[:2]).loss()
    assert abs(loss - base_loss) < 0.5  # one 4-bit KV layer perturbs, but does not wreck, the tiny model


def test_weight_quantization_leaves_moe_experts_in_the_model_dtype():
    """A mixture of experts' router and experts are no weight units (only linear / logits nodes are): quantizing
    the weights rewrites the attention projections and keeps every moe node on its float params."""
    cfg = dataclasses.replace(CFG, architecture="mixtral", num_experts=4, num_experts_per_tok=2,
                              moe_intermediate_size=64, norm_topk_prob=True)
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    cm = compile_model(model, weights="int8", max_ppl_increase=None, **QUIET)
    moe_nodes = [n for n in cm.graph.nodes if n.op == "moe"]
    assert len(moe_nodes) == cfg.num_layers and any(n.op == "qlinear" for n in cm.graph.nodes)
    assert all(cm.graph.types[p].dtype == "float32" for n in moe_nodes for p in n.inputs[1:])
    assert sorted(cm.quant_report.methods) == [f"model.layers.{i}.self_attn.{p}" for i in range(cfg.num_layers)
                                               for p in ("o_proj", "q_proj+k_proj+v_proj")]
    step = PagedLayout(16, cm.block_size, seed=3).step([(0, list(range(1, 30)), 0), (1, [50, 51], 0)])
    assert np.isfinite(cm.make_program(num_blocks=16, max_num_seqs=4).step(step)).all()


def test_nvfp4_keys_are_rounded_for_the_calibration_queries(model):
    score = compile_model(model, kv_cache="nvfp4", kv_rotation=True, kv_rounding="score", max_ppl_increase=0.5,
                          **QUIET)
    nearest = compile_model(model, kv_cache="nvfp4", kv_rotation=True, max_ppl_increase=None, **QUIET)
    d = CFG.head_dim
    for layer in range(CFG.num_layers):
        u = score.params[f"kv.{layer}.k_feedback"]
        assert u.shape == (CFG.num_kv_heads, d, d) and np.allclose(np.tril(u, -1), 0)
        assert (np.diagonal(u, 0, 1, 2) > 0).all()
        node = next(n for n in score.graph.nodes if n.op == "kv_write_nvfp4" and f"kv.{layer}.k_feedback" in n.inputs)
        assert node.inputs[9:] == [f"kv.{layer}.k_center", f"kv.{layer}.k_feedback"]
    assert not any(name.endswith("k_feedback") for name in nearest.params)
    assert score.quant_report.kv_rounding == "score" and nearest.quant_report.kv_rounding == "nearest"
    assert "score-aware K rounding" in score.quant_report.format()
    # the guard's fake quantization rounds keys exactly as the compiled kv_write_nvfp4 does
    r = score.quant_report
    assert r.measured_increase == pytest.approx(r.full_plan_increase, rel=1e-4, abs=1e-6)
    ref = run_steps(score)
    got = run_steps(score, float("nan"))  # NaN-filled unused pages
    assert np.isfinite(got).all() and np.array_equal(got, ref)
    with pytest.raises(OptionsError, match="kv_rounding"):
        compile_model(model, kv_cache="nvfp4", kv_rounding="stochastic", **QUIET)
