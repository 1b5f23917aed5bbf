"""Graph patterns the backends fuse (shared by the CUDA and TPU lowerings)."""
from __future__ import annotations

from lowering.ir import Graph, Node

NORM_DTYPES = ("bfloat16", "float16", "float32")


def fusable_norm(graph: Graph, add: Node, users, position) -> Node | None:
    """The rms_norm that reads the output of the residual `add` and can run fused with it, or None.

    users: graph.users(); position: id(node) -> index in graph.nodes. Fusable when the add is a plain
    2-D same-shape, same-dtype float add, the norm normalizes exactly the sum, and every other user
    of the sum comes after the norm (the fused kernel produces the sum there).
    """
    if add.op != "add" or len(add.inputs) != 2:
        return None
    out = add.outputs[0]
    t = graph.types[out]
    if len(t.shape) != 2 or t.dtype not in NORM_DTYPES:
        return None
    if any(graph.types[x].dtype != t.dtype or graph.types[x].shape != t.shape for x in add.inputs):
        return None
    norms = [u for u in users.get(out, []) if u.op == "rms_norm" and u.inputs[0] == out]
    if not norms:
        return None
    norm = norms[0]
    if graph.types[norm.inputs[1]].dtype not in NORM_DTYPES:
        return None
    if any(position[id(u)] < position[id(norm)] for u in users.get(out, []) if u is not norm):
        return None
    return norm


def check_hidden_output(graph) -> None:
    """Raise ValueError unless the graph returns hidden states after its logits (insert_speculation)."""
    if len(graph.outputs) < 2:
        raise ValueError("this program has no hidden-state output: compile with "
                         "speculative=Speculative(method='medusa' | 'eagle', ...) to get one")
