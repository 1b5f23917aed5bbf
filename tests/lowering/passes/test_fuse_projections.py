"""fuse_projections: q/k/v and gate/up linears become one linear + split each, with concatenated weights."""
import numpy as np

from lowering import ir
from lowering.params import materialize_params
from lowering.passes import fuse_projections

INPUTS = dict(token_ids=np.array([5, 6, 7, 8, 9], np.int32), positions=np.array([0, 1, 2, 0, 1], np.int32),
              query_start=np.array([0, 3, 5], np.int32), logit_rows=np.array([2, 4], np.int32))


def test_before_after(traced_tiny):
    before, params = traced_tiny
    after = fuse_projections(before)
    ir.verify(after, check_types=True)
    # Before: 7 linears a layer (q, k, v, o, gate, up, down). After: qkv, o, gate+up, down + 2 splits.
    assert before.ops_count()["linear"] == 14
    assert after.ops_count()["linear"] == 8 and after.ops_count()["split"] == 4
    text = str(after)
    assert "linear(%" in text and "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight, " \
           "model.layers.0.self_attn.q_proj+k_proj+v_proj.bias)" in text
    assert "model.layers.1.mlp.gate_proj+up_proj.weight" in after.params
    assert "model.layers.0.self_attn.q_proj.weight" not in after.params
    fused = materialize_params(after, params)
    assert fused["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"].shape == (48 + 16 + 16, 48)
    (a,), _ = ir.interpret(before, INPUTS, params)
    (b,), _ = ir.interpret(after, INPUTS, fused)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_linears_with_mixed_bias_are_left_alone(traced_tiny):
    graph, _ = traced_tiny
    g = graph.copy()
    first_q = next(n for n in g.nodes if n.op == "linear" and n.inputs[1].endswith("q_proj.weight"))
    first_q.inputs = first_q.inputs[:2]  # q without bias, k/v with bias: no fusion for that group
    after = fuse_projections(g)
    assert after.ops_count()["linear"] == 10
