"""canonicalize: no-op casts/reshapes fold away, dead nodes and unused params go; numbers unchanged."""
import numpy as np

from lowering import ir
from lowering.ir import Node, TensorType
from lowering.passes import canonicalize

INPUTS = dict(token_ids=np.array([5, 6, 7, 8], np.int32), positions=np.array([0, 1, 2, 3], np.int32),
              query_start=np.array([0, 4], np.int32), logit_rows=np.array([3], np.int32))


def test_before_after(traced_tiny):
    graph, params = traced_tiny
    before = graph.copy()
    # Before: add a same-type cast feeding the final norm, and a dead node reading an otherwise unused param.
    final_norm = next(n for n in reversed(before.nodes) if n.op == "rms_norm")
    cast_out = before.fresh_name("cast")
    before.types[cast_out] = before.types[final_norm.inputs[0]]
    dead_out = before.fresh_name("dead")
    before.types[dead_out] = TensorType((4,), "float32")
    before.params.append("unused.weight")
    before.types["unused.weight"] = TensorType((4,), "float32")
    idx = before.nodes.index(final_norm)
    before.nodes.insert(idx, Node("convert_element_type", [final_norm.inputs[0]], [cast_out],
                                  {"new_dtype": {"$dtype": "float32"}, "weak_type": False, "sharding": None}))
    before.nodes.insert(idx, Node("neg", ["unused.weight"], [dead_out], {}))
    final_norm.inputs[0] = cast_out
    ir.verify(before, check_types=True)

    after = canonicalize(before)
    ir.verify(after, check_types=True)
    assert "convert_element_type" not in after.ops_count() and "neg" not in after.ops_count()
    assert "unused.weight" not in after.params
    assert after.ops_count() == graph.ops_count()
    params = dict(params, **{"unused.weight": np.zeros(4, np.float32)})
    (a,), _ = ir.interpret(before, INPUTS, params)
    (b,), _ = ir.interpret(after, INPUTS, params)
    np.testing.assert_array_equal(a, b)
