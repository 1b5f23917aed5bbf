"""A user's own Flax NNX model (plain jnp plus lowering.ops attention) compiles, runs paged, and generates."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowering import compile_model
from runtime import Engine, SamplingParams
from tests.lowering.test_ir import JnpBlockModel


def greedy_without_cache(model, prompt, num_new):
    """Re-run the whole sequence through the uncompiled model for every new token."""
    seq = list(prompt)
    for _ in range(num_new):
        n = len(seq)
        logits = model(jnp.asarray(seq, jnp.int32), jnp.arange(n, dtype=jnp.int32), jnp.asarray([0, n], jnp.int32),
                       jnp.asarray([n - 1], jnp.int32))
        seq.append(int(jnp.argmax(logits[0])))
    return seq[len(prompt):]


def test_user_model_generates_like_the_uncompiled_model():
    model = JnpBlockModel(nnx.Rngs(7))
    cm = compile_model(model, block_size=3, max_model_len=48)
    assert cm.config is None and "paged_attention" in cm.graph.ops_count()
    prompts = [[1, 2, 3], [10, 20, 30, 40, 45, 2, 7]]
    outs = Engine(cm, max_model_len=48).generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == greedy_without_cache(model, prompt, 8)
    assert np.all([o.text == "" for o in outs])  # no tokenizer: token ids only
