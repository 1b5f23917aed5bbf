"""Small helpers shared by passes: renaming uses, dead-code elimination."""
from __future__ import annotations

from lowering.ir import Graph


def replace_uses(graph: Graph, mapping: dict[str, str]) -> None:
    """Point every use of a value in `mapping` at its replacement (in place)."""
    if not mapping:
        return

    def resolve(name: str) -> str:
        while name in mapping:
            name = mapping[name]
        return name

    for node in graph.nodes:
        node.inputs = [resolve(n) for n in node.inputs]
    graph.outputs = [resolve(n) for n in graph.outputs]
    graph.state_updates = {s: resolve(v) for s, v in graph.state_updates.items()}


def eliminate_dead_code(graph: Graph) -> None:
    """Drop nodes none of whose outputs reach a graph output or state update, and unused params."""
    live = set(graph.outputs) | set(graph.state_updates.values())
    kept = []
    for node in reversed(graph.nodes):
        if any(o in live for o in node.outputs):
            kept.append(node)
            live.update(node.inputs)
    graph.nodes = list(reversed(kept))
    graph.params = [p for p in graph.params if p in live]
    defined = set(graph.inputs) | set(graph.params) | set(graph.state)
    for node in graph.nodes:
        defined.update(node.outputs)
    graph.types = {k: v for k, v in graph.types.items() if k in defined}
