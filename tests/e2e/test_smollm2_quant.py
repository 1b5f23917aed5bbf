"""SmolLM2-135M quantized on the CPU: perplexity on a shorter tinyshakespeare text stays within slightly looser
bounds than the acceptance targets measured by benchmarks/quant_accuracy.py (BENCHMARKS.md), KV memory per token
is 50% (fp8) / <= 28.2% (nvfp4) of a bf16 cache, and the report of what quantization did is complete."""
import pytest

from runtime.evaluate import default_data_dir, perplexity

TEXT = default_data_dir() / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} (the evaluation text) is not here")

# config -> (compile options, bound on the relative perplexity increase over 4 windows of 256 tokens)
CASES = {
    # target 0.5% met over 16 windows (+0.35%, 2026-11-28); these first 4 windows measure +0.81% (jax 0.10.2 on
    # x86-64): a regression guard above that
    "kv-fp8": (dict(kv_cache="fp8"), 0.0125),
    "w-int8": (dict(weights="int8"), 0.0075),  # target 0.5%
    # W8A8 with GPTQ weights: target 1% met over 16 windows (+0.81%), but these first 4 windows are harder
    # (measured +2.1%; RTN W8A8 +4.7% here, +3.5% over 16): a regression guard at the measured level
    "w-fp8": (dict(weights="fp8"), 0.03),
    # target 1% (16 windows): measured +1.05% with K centering + "mse46" block scales (was +5.8%); +1.85% on
    # these 4 windows with 8 calibration windows: a regression guard near the measured level
    "kv-nvfp4-rot": (dict(kv_cache="nvfp4", kv_rotation=True), 0.03),
}


@pytest.fixture(scope="module")
def text():
    return TEXT.read_text(encoding="utf-8")[:60000]


@pytest.fixture(scope="module")
def base(smollm2_compiled, text):
    return perplexity(smollm2_compiled, text, window=256, num_windows=4).ppl


@pytest.fixture(scope="module")
def smollm2_compiled():
    from lowering import compile_model

    return compile_model("smollm2-135m", progress=False)


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_perplexity_within_bound(case, base, text):
    from lowering import compile_model
    from lowering.quant.guard import kv_bytes_per_token

    options, bound = CASES[case]
    cm = compile_model("smollm2-135m", progress=False, max_ppl_increase=None, calibration_windows=4, **options)
    ppl = perplexity(cm, text, window=256, num_windows=4).ppl
    assert ppl / base - 1 <= bound, f"{case}: ppl {ppl:.4f} vs {base:.4f}"
    r = cm.quant_report
    if "kv_cache" in options:  # KV scales come from calibration, and the final graph is measured on it
        assert r.measured_increase is not None and r.calibration["source"] == "bundled text"
        bf16 = r.kv_bytes_per_token["before"] / 2  # the float32 pools at 2 bytes per value
        want = 0.5 if options["kv_cache"] == "fp8" else 0.28125
        assert kv_bytes_per_token(cm.graph) == want * bf16
        assert all(fmt == options["kv_cache"] for fmt in r.kv.values())
    else:  # RTN int8 with the guard off needs no calibration at all; fp8 (GPTQ) needs Hessians
        fmt = options["weights"]
        if fmt == "int8":
            assert r.calibration["source"] == "none" and r.measured_increase is None
        else:
            assert r.calibration["source"] == "bundled text" and set(r.methods.values()) == {"gptq"}
        assert r.weight_bytes["after"] < 0.45 * r.weight_bytes["before"]
        assert r.weights["lm_head"] == "none" and sum(f == fmt for f in r.weights.values()) == 30 * 4
