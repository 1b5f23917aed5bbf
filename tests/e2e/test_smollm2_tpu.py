"""SmolLM2-135M's first 3 layers (real weights, its own final norm and head) with an FP8 KV cache compiled for
target="tpu" (Pallas kernels in TPU interpret mode on this CPU) give the logits (and next tokens) of target="cpu"
with the same FP8 KV cache."""
import numpy as np

from tests.lowering.helpers import PagedLayout


def test_smollm2_fp8_kv_tpu_target_matches_cpu_target(smollm2_gguf_path):
    from lowering import compile_model

    # NOTE: 3 of the 30 layers: every layer runs the same kernels, and interpret mode traces each one into XLA
    # (6 layers took 75-100 s of the suite's time)
    kw = dict(kv_cache="fp8", dtype="float32", max_model_len=64, progress=False, num_layers=3)
    cpu = compile_model(str(smollm2_gguf_path), target="cpu", **kw)
    tpu = compile_model(str(smollm2_gguf_path), target="tpu", **kw)
    # the same calibration gives the same KV scales: the two programs hold the same fp8 cache
    for name in ("kv.0.k_scale", "kv.2.v_scale"):
        np.testing.assert_array_equal(cpu.params[name], tpu.params[name])
    # NOTE: one ragged prefill step, on purpose: in interpret mode every Pallas kernel of the layers is traced
    # into XLA, so each step shape costs minutes of compilation on a 2-core machine (greedy generation over
    # prefill and decode steps is compared on the tiny model in tests/lowering/backends/test_tpu.py)
    prompts = [cpu.tokenizer.encode(p) for p in ("The capital of France is", "Red, green and blue are the")]
    steps = [PagedLayout(8, 16).step([(i, p, 0) for i, p in enumerate(prompts)]) for _ in range(2)]
    want = cpu.make_program(num_blocks=8).step(steps[0])
    got = tpu.make_program(num_blocks=8, pool_fill=float("nan")).step(steps[1])
    assert np.isfinite(got).all()
    # NOTE: the two targets' K / V differ by an ulp upstream of the cache (5.6e-7 apart without the fp8 cache), which
    # puts a few values on the other side of an e4m3 rounding boundary: 2.9e-4 apart with jax 0.10.2, < 1e-4 with
    # 0.10.1 (2026-11-29)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3
    assert (got.argmax(-1) == want.argmax(-1)).all()
