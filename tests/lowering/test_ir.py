"""Graph IR: tracing keeps semantic ops whole, printer, verifier errors, JSON round trip, interpreter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowering import frontend, ir, ops
from lowering.models import llama, nnx_params
from tests.lowering.helpers import tiny_config

INPUTS = dict(token_ids=np.array([3, 1, 4, 1, 5, 9, 2], np.int32), positions=np.array([0, 1, 2, 0, 1, 2, 3], np.int32),
              query_start=np.array([0, 3, 7], np.int32), logit_rows=np.array([2, 6], np.int32))


@pytest.fixture(scope="module")
def traced():
    model = llama.build_model(tiny_config(attention_bias=True))
    fn, params = nnx_params.forward_fn(model)
    graph, values = frontend.trace(fn, params)
    return model, graph, values


def test_trace_keeps_semantic_ops_whole_with_symbolic_dims(traced):
    _, graph, _ = traced
    counts = graph.ops_count()
    assert counts["attention"] == 2 and counts["rope"] == 4 and counts["linear"] == 14
    assert counts["rms_norm"] == 5 and counts["embed"] == 1 and counts["logits"] == 1 and counts["add"] == 4
    assert graph.types["query_start"].shape == ("S + 1",)
    assert graph.types[graph.outputs[0]] == ir.TensorType(("L", 97), "float32")
    text = str(graph)
    assert "attention(" in text and "{num_heads=6, num_kv_heads=2, head_dim=8" in text
    ir.verify(graph, check_types=True)


def test_interpret_matches_the_flax_model(traced):
    model, graph, values = traced
    (got,), _ = ir.interpret(graph, {k: jnp.asarray(v) for k, v in INPUTS.items()}, values)
    want = model(*(jnp.asarray(INPUTS[k]) for k in ("token_ids", "positions", "query_start", "logit_rows")))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_json_round_trip_is_exact(traced):
    _, graph, values = traced
    again = ir.Graph.loads(graph.dumps())
    assert again.dumps() == graph.dumps()
    assert str(again) == str(graph)
    (a,), _ = ir.interpret(again, INPUTS, values)
    (b,), _ = ir.interpret(graph, INPUTS, values)
    np.testing.assert_array_equal(a, b)


def test_verify_names_the_fault(traced):
    _, graph, _ = traced
    g = graph.copy()
    g.nodes[3].inputs[0] = "%nowhere"
    with pytest.raises(ir.IRError, match="uses '%nowhere' before it is defined"):
        ir.verify(g)
    g = graph.copy()
    g.nodes[2].op = "no_such_op"
    with pytest.raises(ir.IRError, match="no_such_op"):
        ir.verify(g)
    g = graph.copy()
    out = g.nodes[1].outputs[0]
    g.types[out] = ir.TensorType(("T", 5), g.types[out].dtype)
    with pytest.raises(ir.IRError, match="declared"):
        ir.verify(g, check_types=True)
    g = graph.copy()
    g.nodes[1].attrs["eps"] = "tiny"
    with pytest.raises(ir.IRError, match="eps"):
        ir.verify(g)


@pytest.mark.parametrize("bad", [
    "not json", '{"format": "other"}', '{"format": "llmc.graph", "version": 99}',
])
def test_loads_refuses_bad_json(bad):
    with pytest.raises(ir.IRError):
        ir.Graph.loads(bad)


def test_loaded_graph_may_not_name_call_primitives(traced):
    _, graph, _ = traced
    data = graph.to_json()
    data["nodes"][1]["op"] = "pure_callback"
    with pytest.raises(ir.IRError, match="pure_callback"):
        ir.Graph.from_json(data)


def test_bind_symbols_solves_offsets():
    types = [ir.TensorType(("T",), "int32"), ir.TensorType(("S + 1",), "int32"), ir.TensorType(("S", "B"), "int32")]
    assert ir.bind_symbols(types, [(7,), (4,), (3, 5)]) == {"T": 7, "S": 3, "B": 5}
    with pytest.raises(ir.IRError):
        ir.bind_symbols(types, [(7,), (4,), (2, 5)])


class JnpBlockModel(nnx.Module):
    """A user's own model: LayerNorm, GELU MLP and a reshape in plain jnp, attention from lowering.ops."""

    def __init__(self, rngs):
        self.emb = nnx.Param(jax.random.normal(rngs.params(), (50, 16)))
        self.wqkv = nnx.Param(jax.random.normal(rngs.params(), (16, 48)) * 0.3)
        self.w1 = nnx.Param(jax.random.normal(rngs.params(), (16, 32)) * 0.3)
        self.w2 = nnx.Param(jax.random.normal(rngs.params(), (32, 16)) * 0.3)

    def __call__(self, token_ids, positions, query_start, logit_rows):
        x = self.emb[...][token_ids]  # [T, 16]
        mu = x.mean(-1, keepdims=True)
        h = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5)
        q, k, v = jnp.split(h @ self.wqkv[...], 3, axis=-1)
        x = x + ops.causal_attention(q, k, v, query_start, num_heads=2, num_kv_heads=2, head_dim=8)
        x = x + jax.nn.gelu(x @ self.w1[...]) @ self.w2[...]
        x = x.reshape(x.shape[0], 4, 4).sum(1)  # a reshape with a symbolic dim
        return (x[logit_rows] @ self.emb[...][:, :4].T).astype(jnp.float32)


def test_user_jnp_model_traces_to_generic_ops_and_matches():
    model = JnpBlockModel(nnx.Rngs(0))
    fn, params = nnx_params.forward_fn(model)
    graph, values = frontend.trace(fn, params)
    ops_used = set(graph.ops_count())
    assert {"attention", "reshape", "dot_general"} <= ops_used
    ir.verify(graph, check_types=True)
    again = ir.Graph.loads(graph.dumps())
    (got,), _ = ir.interpret(again, INPUTS, values)
    want = model(*(jnp.asarray(INPUTS[k]) for k in ("token_ids", "positions", "query_start", "logit_rows")))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
