"""TPU backend: the Pallas program equals the CPU target (every kernel in Pallas' TPU interpret mode off-TPU)."""
import jax
import numpy as np
import pytest

from lowering import compile_model, ops
from lowering.backends import build_program
from lowering.models import llama
from runtime import Engine, SamplingParams
from tests.lowering.helpers import quantize_ir, relerr, run_decode_steps, run_steps, tiny_config


def small_config(**kw):
    return tiny_config(head_dim=32, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256, **kw)


@pytest.fixture(scope="module")
def models():
    cfg = small_config()
    model = llama.build_model(cfg, seed=3)
    return (compile_model(model, config=cfg, progress=False, max_model_len=64),
            compile_model(model, config=cfg, target="tpu", dtype="float32", progress=False, max_model_len=64))


def pallas_calls(program, inp) -> int:
    """How many pallas_call primitives the jitted step of `inp` contains."""
    from lowering.backends.cpu import pad_step

    padded = pad_step(inp, max_blocks_per_seq=program.max_blocks_per_seq)
    jaxpr = jax.make_jaxpr(lambda p, s, i: program._run(p, s, i, 0))(program.params, program.state, padded)
    return str(jaxpr).count("pallas_call")


def test_tpu_program_matches_cpu_target_on_ragged_steps(models):
    cpu_cm, tpu_cm = models
    assert tpu_cm.target == "tpu" and tpu_cm.make_program(num_blocks=8).interpret  # no TPU here
    cpu_prog = cpu_cm.make_program(num_blocks=24)
    tpu_prog = tpu_cm.make_program(num_blocks=24, pool_fill=float("nan"))  # unused pages NaN
    for want, got in zip(run_steps(cpu_prog, 1, 16, num_blocks=24), run_steps(tpu_prog, 1, 16, num_blocks=24)):
        assert np.isfinite(got).all()
        assert relerr(got, want) < 1e-4


def test_tpu_program_runs_qwen3_qk_norm():
    """Qwen3's per-head QK-norm (head_rms_norm) in the TPU program: its reference op between the Pallas kernels."""
    cfg = small_config(architecture="qwen3", qk_norm=True, tie_word_embeddings=True)
    model = llama.build_model(cfg, seed=5)
    cpu_prog = compile_model(model, config=cfg, progress=False, max_model_len=64).make_program(num_blocks=24)
    tpu_prog = compile_model(model, config=cfg, target="tpu", dtype="float32", progress=False,
                             max_model_len=64).make_program(num_blocks=24, pool_fill=float("nan"))
    for want, got in zip(run_steps(cpu_prog, 1, 16, num_blocks=24), run_steps(tpu_prog, 1, 16, num_blocks=24)):
        assert np.isfinite(got).all()
        assert relerr(got, want) < 1e-4


def test_tpu_program_lowers_moe_to_grouped_matmuls():
    """The TPU program's moe: the router in XLA, the experts as two Pallas grouped matmuls (interpret mode), equal to
    the op's reference. (The lowering alone: a whole interpreted step costs ~20 s here.)"""
    cfg = small_config(architecture="mixtral", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                       norm_topk_prob=True, num_layers=1)
    prog = compile_model(llama.build_model(cfg, seed=7), config=cfg, target="tpu", dtype="float32", progress=False,
                         max_model_len=64).make_program(num_blocks=8)
    node = next(n for n in prog.graph.nodes if n.op == "moe")
    x = jax.random.normal(jax.random.key(0), (21, cfg.hidden_size), jax.numpy.float32)
    args = [x] + [prog.params[name] for name in node.inputs[1:]]
    run = prog._impls(prog.params, 0)["moe"]
    assert str(jax.make_jaxpr(lambda *a: run(node, a, {}))(*args)).count("name=gmm") == 2
    (got,) = jax.jit(lambda *a: run(node, a, {}))(*args)
    want = ops.ref_moe(*args, **node.attrs)
    assert relerr(np.asarray(got), np.asarray(want)) < 1e-5


def test_tpu_program_runs_gemma3():
    """Gemma 3 in the TPU program: a sliding layer (window 8) beside a global one (two KV groups) in the ragged
    attention kernel, its (1 + w) norms and GeGLU on the XLA reference."""
    cfg = small_config(architecture="gemma3", qk_norm=True, tie_word_embeddings=True,
                       hidden_activation="gelu_pytorch_tanh", sliding_window=8, rope_local_theta=1000.0,
                       layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=24.0)
    model = llama.build_model(cfg, seed=6)
    cpu_prog = compile_model(model, config=cfg, progress=False, max_model_len=64).make_program(num_blocks=24)
    tpu_prog = compile_model(model, config=cfg, target="tpu", dtype="float32", progress=False,
                             max_model_len=64).make_program(num_blocks=24, pool_fill=float("nan"))
    for want, got in zip(run_steps(cpu_prog, 1, 16, num_blocks=24), run_steps(tpu_prog, 1, 16, num_blocks=24)):
        assert np.isfinite(got).all()
        assert relerr(got, want) < 1e-4


def test_tpu_program_runs_its_kernels(models):
    from tests.lowering.helpers import PagedLayout

    _, tpu_cm = models
    prog = tpu_cm.make_program(num_blocks=24)
    layers = small_config().num_layers
    # per layer: kv_write + attention + two residual add+norms; plus the first and the final norm
    calls = pallas_calls(prog, PagedLayout(24, 16).step([(0, [1, 2, 3], 0), (1, [4], 0)]))
    assert calls == layers * 2 + 2 * layers + 1, calls


def test_tpu_greedy_generation_equals_cpu_target(models):
    cpu_cm, tpu_cm = models
    prompts = [[1, 2, 3], [5, 9, 11, 13, 17, 19, 23, 29, 31], [40], list(range(30, 60))]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    want = Engine(cpu_cm, num_blocks=24, max_num_batched_tokens=16).generate(prompts, params)
    got = Engine(tpu_cm, num_blocks=24, max_num_batched_tokens=16,
                 program_options={"pool_fill": float("nan")}).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


QUANT_CASES = {  # id: (weights, kv, rotation)
    "w-int8+kv-fp8": ("int8", "fp8", False),
    "w-int4": ("int4", None, False),
    "w-nvfp4+kv-nvfp4-rot": ("nvfp4", "nvfp4", True),
    "w-fp8-w8a8": ("fp8", None, False),
}


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_ir_tpu_program_matches_cpu_program(models, case):
    weights, kv, rotation = QUANT_CASES[case]
    graph, params = quantize_ir(models[0], weights, kv, rotation)
    cpu = build_program("cpu", graph, params, num_blocks=24, max_model_len=64)
    tpu = build_program("tpu", graph, params, num_blocks=24, max_model_len=64, pool_fill=float("nan"))
    if kv == "fp8":
        assert str(tpu.state["kv.0.k"].dtype) == "float8_e4m3fn"
    # the prefill and a decode step: the quantized kernels on both kinds of step (the ragged mixed step is covered
    # by the unquantized tests above)
    for want, got in zip(run_decode_steps(cpu, 5, 24, full=False), run_decode_steps(tpu, 5, 24, full=False)):
        assert np.isfinite(got).all()
        assert relerr(got, want) < (2e-2 if weights == "fp8" else 1e-3), case


def test_tpu_program_rejects_bad_steps(models):
    from tests.lowering.helpers import PagedLayout

    prog = models[1].make_program(num_blocks=8)
    step = PagedLayout(8, 16).step([(0, [1, 2], 0)])
    step.slot_mapping[0] = 8 * 16  # past the pool
    with pytest.raises(ValueError, match="slot"):
        prog.step(step)
