"""Run by test_tensor_parallel.py in a fresh process with XLA_FLAGS=--xla_force_host_platform_device_count=4 (JAX
reads it once, at start-up): the CPU mesh program at TP=1, 2, 4 through the Engine. Prints one JSON line."""
import json
import sys

import numpy as np

from lowering import compile_model
from lowering.models import llama
from runtime import Engine, SamplingParams
from tests.lowering.helpers import tiny_config

CONFIGS = {
    "llama": dict(),
    "gemma3": dict(architecture="gemma3", qk_norm=True, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", sliding_window=8, rope_local_theta=1000.0,
                   layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=12.0),
}


def main():
    import jax

    out = {"devices": len(jax.devices()), "models": {}}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 40, 1, 23, 17)]
    prompts.append(prompts[1][:32] + [3, 4])  # shares two full blocks with prompt 1: prefix caching
    for name, extra in CONFIGS.items():
        cfg = tiny_config(**{"num_heads": 8, "num_kv_heads": 4, "hidden_size": 64, "intermediate_size": 96, **extra})
        model = llama.random_model(cfg, seed=7)
        runs = {}
        for tp in (1, 2, 4):
            cm = compile_model(model, progress=False, max_model_len=128, tensor_parallel=tp)
            # the same KV budget per device: a rank's block holds 1/tp of the KV heads
            engine = Engine(cm, max_num_seqs=64, max_num_batched_tokens=48, max_model_len=128,
                            program_options={"kv_cache_bytes": 1 << 20})
            outs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
            runs[tp] = {"tokens": [o.token_ids for o in outs], "num_blocks": engine.program.num_blocks,
                        "program": type(engine.program).__name__,
                        "kv_bytes": engine.program.kv_cache_bytes()}
        out["models"][name] = runs
    try:
        cm = compile_model(llama.random_model(tiny_config(num_heads=8, num_kv_heads=8, hidden_size=64,
                                                          intermediate_size=96), seed=1),
                           progress=False, tensor_parallel=8)
        cm.make_program(num_blocks=8)
        out["too_many"] = None
    except RuntimeError as e:
        out["too_many"] = str(e)
    print("RESULT " + json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
