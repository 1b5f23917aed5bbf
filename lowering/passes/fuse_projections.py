"""fuse_projections: linears that read the same activation (q/k/v, gate/up) become one linear + split.

Before:                                   After:
  q = linear(x, Wq)                         qkv = linear(x, Wq+Wk+Wv)
  k = linear(x, Wk)                         q, k, v = split(qkv) {sizes=(Nq,Nk,Nv), axis=1}   (the lax split primitive)
  v = linear(x, Wv)
The fused weight is a derived param (concatenation along the output axis), materialized by
lowering.params once the pipeline has run.
"""
from __future__ import annotations

from lowering.ir import Graph, Node, TensorType, encode_param
from lowering.params import add_derived_param


def _fused_name(names: list[str]) -> str:
    # "model.layers.0.self_attn.q_proj.weight" ... -> "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"
    parts = [n.split(".") for n in names]
    prefix = parts[0][:-2]
    leaf = parts[0][-1]
    if all(p[:-2] == prefix and p[-1] == leaf for p in parts):
        return ".".join(prefix + ["+".join(p[-2] for p in parts), leaf])
    return "fused(" + ",".join(names) + ")"


def fuse_projections(graph: Graph) -> Graph:
    graph = graph.copy()
    param_set = set(graph.params)
    groups: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "linear" and all(n in param_set for n in node.inputs[1:]):
            groups.setdefault(node.inputs[0], []).append(node)

    replaced: dict[int, list[Node]] = {}
    drop: set[int] = set()
    for x, nodes in groups.items():
        has_bias = {len(n.inputs) == 3 for n in nodes}
        dtypes = {graph.types[n.inputs[1]].dtype for n in nodes}
        if len(nodes) < 2 or len(has_bias) != 1 or len(dtypes) != 1:
            continue
        weights = [n.inputs[1] for n in nodes]
        sizes = [graph.types[w].shape[0] for w in weights]
        in_dim = graph.types[weights[0]].shape[1]
        fused_w = add_derived_param(graph, _fused_name(weights), "concat", weights, axis=0,
                                    type_=TensorType((sum(sizes), in_dim), dtypes.pop()))
        inputs = [x, fused_w]
        if has_bias.pop():
            biases = [n.inputs[2] for n in nodes]
            inputs.append(add_derived_param(graph, _fused_name(biases), "concat", biases, axis=0,
                                            type_=TensorType((sum(sizes),), graph.types[biases[0]].dtype)))
        out_type = graph.types[nodes[0].outputs[0]]
        fused_out = graph.fresh_name("fused")
        graph.types[fused_out] = TensorType((out_type.shape[0], sum(sizes)), out_type.dtype)
        first = graph.nodes.index(nodes[0])
        replaced[first] = [Node("linear", inputs, [fused_out], {}),
                           Node("split", [fused_out], [n.outputs[0] for n in nodes],
                                {"sizes": encode_param(tuple(sizes)), "axis": 1})]
        drop.update(id(n) for n in nodes)

    new_nodes = []
    for i, node in enumerate(graph.nodes):
        if i in replaced:
            new_nodes.extend(replaced[i])
        elif id(node) not in drop:
            new_nodes.append(node)
    graph.nodes = new_nodes
    graph.params = [p for p in graph.params if any(p in n.inputs for n in graph.nodes)]
    return graph
