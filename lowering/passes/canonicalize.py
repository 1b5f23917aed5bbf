"""canonicalize: fold no-op casts and reshapes, then remove dead nodes and unused params."""
from __future__ import annotations

from lowering.ir import Graph
from lowering.passes.rewrite import eliminate_dead_code, replace_uses

_NOOP_IF_SAME_TYPE = ("convert_element_type", "reshape", "copy", "copy_p", "squeeze", "expand_dims")


def canonicalize(graph: Graph) -> Graph:
    graph = graph.copy()
    mapping: dict[str, str] = {}
    kept = []
    for node in graph.nodes:
        if node.op in _NOOP_IF_SAME_TYPE and len(node.inputs) == 1 and len(node.outputs) == 1:
            src, dst = node.inputs[0], node.outputs[0]
            src = mapping.get(src, src)
            if graph.types[src] == graph.types[dst]:
                mapping[dst] = src
                continue
        kept.append(node)
    graph.nodes = kept
    replace_uses(graph, mapping)
    eliminate_dead_code(graph)
    return graph
