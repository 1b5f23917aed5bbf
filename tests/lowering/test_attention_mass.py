"""The attention_mass op (H2O accumulated attention): the jnp reference against float64 numpy loops, its
registration (attributes, shape rule) and a graph that runs it through lowering.ir.interpret."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import ops
from lowering.ir import Graph, IRError, Node, TensorType, encode_param, interpret, verify
from tests.lowering.attention_mass_cases import MIXED, check_mass, make_case, op_args, padded_case


@pytest.mark.parametrize("kv_format", [None, "fp8", "nvfp4"])
@pytest.mark.parametrize("block_size", [16, 5])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 2), (2, 2)])
def test_reference_matches_float64(kv_format, block_size, num_heads, num_kv_heads):
    case = make_case(block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads, kv_format=kv_format,
                     seed=block_size + num_heads)
    args, attrs = op_args(case)
    check_mass(ops.ref_attention_mass(*args, **attrs), case)


def test_reference_bf16_queries_and_pool():
    case = make_case(q_dtype=jnp.bfloat16, pool_dtype=jnp.bfloat16, block_size=8, seed=3)
    args, attrs = op_args(case)
    check_mass(ops.ref_attention_mass(*args, **attrs), case)


def test_reference_under_jit():
    case = make_case(block_size=5, kv_format="fp8", seed=4)
    args, attrs = op_args(case)
    check_mass(jax.jit(lambda *a: ops.ref_attention_mass(*a, **attrs))(*args), case)


def test_new_slots_start_from_zero():
    # a block that held another sequence: the new token's slot (garbage before) gets only this step's mass
    case = make_case([(1, 3)], block_size=4, num_heads=2, num_kv_heads=1, pad_rows=0, seed=5)
    slot = int(case["slot_mapping"][0])
    bs = case["k_f32"].shape[1]
    case["mass"][slot // bs, slot % bs] = 1e6
    args, attrs = op_args(case)
    got = np.asarray(ops.ref_attention_mass(*args, **attrs))
    assert got[slot // bs, slot % bs, 0] < 2.0  # at most G = 2 (one decode row, two query heads)
    check_mass(got, case)


@pytest.mark.parametrize("kv_format", [None, "nvfp4"])
def test_single_decode_row_adds_group_size_per_kv_head(kv_format):
    # softmax sums to 1 per query head: one decode row adds G to each kv head's total
    case = make_case([(1, 21)], block_size=8, num_heads=6, num_kv_heads=2, kv_format=kv_format, pad_rows=0, seed=6)
    tables, bs = case["block_tables"][0], 8
    ctx = np.arange(21)
    before = np.nan_to_num(case["mass"][tables[ctx // bs], ctx % bs]).sum(0)  # the new slot counts as 0
    args, attrs = op_args(case)
    got = np.asarray(ops.ref_attention_mass(*args, **attrs))
    after = got[tables[ctx // bs], ctx % bs].sum(0)  # f32[Hkv]
    np.testing.assert_allclose(after - before, [3.0, 3.0], rtol=1e-5)


def test_registration_and_shape_rule():
    op = ops.get_op("attention_mass")
    assert set(op.attrs) == {"num_heads", "num_kv_heads", "head_dim", "scale", "kv_format"}
    assert op.optional_attrs == {"kv_format"}
    ts = [((7, 32), "float32"), ((9, 16, 2, 16), "bfloat16"), ((3,), "int32"), ((2,), "int32"), ((2, 4), "int32"),
          ((7,), "int32"), ((9, 16, 2), "float32")]
    assert ops.output_types(op, ts, {}) == [((9, 16, 2), "float32")]
    with pytest.raises(ops.OpError, match="mass pool must be f32"):
        ops.output_types(op, ts[:6] + [((9, 16, 2), "bfloat16")], {})


def _graph(case):
    """One attention_mass node whose mass pool is graph state (updated through state_updates)."""
    attrs = {k: v for k, v in case["attrs"].items() if v is not None}
    g = Graph()
    names = ["q", "k_pool", "query_start", "seq_lens", "block_tables", "slot_mapping"]
    for name in names:
        g.types[name] = TensorType(tuple(case[name].shape), jnp.dtype(case[name].dtype).name)
        g.inputs.append(name)
    g.types["mass"] = TensorType(tuple(case["mass"].shape), "float32")
    g.state.append("mass")
    g.types["mass_out"] = g.types["mass"]
    g.nodes.append(Node("attention_mass", names + ["mass"], ["mass_out"], attrs))
    g.types["total"] = TensorType((), "float32")
    g.nodes.append(Node("reduce_sum", ["mass_out"], ["total"], {"axes": encode_param((0, 1, 2))}))
    g.outputs.append("total")
    g.state_updates["mass"] = "mass_out"
    return g, names


def test_graph_interpret_updates_state():
    case = make_case(MIXED[:3], block_size=5, kv_format=None, seed=8)
    case["mass"] = np.nan_to_num(case["mass"])  # a finite total
    g, names = _graph(case)
    verify(g, check_types=True)
    inputs = {n: jnp.asarray(case[n]) for n in names}
    (total,), state = interpret(g, inputs, {}, {"mass": jnp.asarray(case["mass"])})
    want = ops.ref_attention_mass(*op_args(case)[0], **case["attrs"])
    np.testing.assert_array_equal(np.asarray(state["mass"]), np.asarray(want))
    np.testing.assert_allclose(float(total), float(np.asarray(want).sum()), rtol=1e-5)
    check_mass(state["mass"], case)


def test_graph_rejects_unknown_attrs():
    case = make_case(MIXED[:2], seed=9)
    g, _ = _graph(case)
    g.nodes[0].attrs["window"] = 4
    with pytest.raises(IRError, match="unknown attributes"):
        verify(g)


def test_padding_rows_add_no_mass():
    case, padded = padded_case(block_size=4, seed=9)
    want = np.asarray(ops.ref_attention_mass(*op_args(case)[0], **op_args(case)[1]))
    got = np.asarray(ops.ref_attention_mass(*op_args(padded)[0], **op_args(padded)[1]))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
