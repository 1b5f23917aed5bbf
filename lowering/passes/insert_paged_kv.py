"""insert_paged_kv: contiguous causal attention becomes kv_write + paged_attention over KV pool state.

Before (one layer):
  o = attention(q, k, v, query_start)
After:
  k_pool', v_pool' = kv_write(k, v, slot_mapping, kv.0.k, kv.0.v)        state kv.0.k <- k_pool'
  o = paged_attention(q, k_pool', v_pool', query_start, seq_lens, block_tables)
and the graph takes the step contract's inputs (docs/architecture.md):
  token_ids i32[T], positions i32[T], slot_mapping i32[T], query_start i32[S+1], seq_lens i32[S],
  block_tables i32[S,B], logit_rows i32[L]; each pool is [N, block_size, num_kv_heads, head_dim].

Sliding windows (attention attr `window`) form KV groups. When every layer has the same window (or none has
one) there is one group, and graph.meta["kv_window"] is that window (or None): the runtime frees blocks
that fall out of it. When only some layers are windowed (Gemma 3: local layers beside global ones), the
windowed layers form a second group with pools of their own ([NW, ...]: a separate, smaller pool) and the
graph takes two more inputs, block_tables_w i32[S,B] and slot_mapping_w i32[T] (graph.meta["kv_window_w"]).
"""
from __future__ import annotations

from lowering.ir import Graph, IRError, Node, TensorType

STEP_INPUTS: dict[str, TensorType] = {
    "token_ids": TensorType(("T",), "int32"),
    "positions": TensorType(("T",), "int32"),
    "slot_mapping": TensorType(("T",), "int32"),
    "query_start": TensorType(("S + 1",), "int32"),
    "seq_lens": TensorType(("S",), "int32"),
    "block_tables": TensorType(("S", "B"), "int32"),
    "logit_rows": TensorType(("L",), "int32"),
}
WINDOW_GROUP_INPUTS: dict[str, TensorType] = {
    "block_tables_w": TensorType(("S", "B"), "int32"),
    "slot_mapping_w": TensorType(("T",), "int32"),
}


def insert_paged_kv(graph: Graph, *, block_size: int = 16, kv_dtype: str | None = None) -> Graph:
    if not isinstance(block_size, int) or block_size < 1:
        raise IRError(f"block_size must be a positive integer, got {block_size!r}")
    graph = graph.copy()
    attention_nodes = [n for n in graph.nodes if n.op == "attention"]
    if not attention_nodes:
        raise IRError("insert_paged_kv found no attention op: the model must call lowering.ops.causal_attention")
    for name, t in STEP_INPUTS.items():
        if name in graph.types and graph.types[name] != t and name in graph.inputs:
            raise IRError(f"graph input {name} is {graph.types[name]}, the step contract needs {t}")
        graph.types[name] = t
    missing = [n for n in ("token_ids", "positions", "query_start", "logit_rows") if n not in graph.inputs]
    if missing:
        raise IRError(f"graph lacks step inputs {missing}")

    windows = sorted({n.attrs.get("window") for n in attention_nodes}, key=lambda w: (w is not None, w or 0))
    if len(windows) > 2 or (len(windows) == 2 and windows[0] is not None):
        raise IRError(f"attention layers use sliding windows {windows}: llmc supports one window size, alone or beside "
                      f"full-attention layers")
    two_groups = len(windows) == 2
    new_nodes = []
    layer = 0
    for node in graph.nodes:
        if node.op != "attention":
            new_nodes.append(node)
            continue
        q, k, v, query_start = node.inputs
        if query_start != "query_start":
            raise IRError("attention must take the graph input query_start")
        second = two_groups and node.attrs.get("window") is not None
        suffix = "_w" if second else ""
        heads = {key: node.attrs[key] for key in ("num_heads", "num_kv_heads", "head_dim")}
        dtype = kv_dtype or graph.types[k].dtype
        pool_type = TensorType(("NW" if second else "N", block_size, heads["num_kv_heads"], heads["head_dim"]), dtype)
        k_pool, v_pool = f"kv.{layer}.k", f"kv.{layer}.v"
        new_k, new_v = graph.add_state(k_pool, pool_type, "kpool"), graph.add_state(v_pool, pool_type, "vpool")
        new_nodes.append(Node("kv_write", [k, v, "slot_mapping" + suffix, k_pool, v_pool], [new_k, new_v], {}))
        new_nodes.append(Node("paged_attention", [q, new_k, new_v, "query_start", "seq_lens", "block_tables" + suffix],
                              list(node.outputs), dict(node.attrs)))
        layer += 1
    graph.nodes = new_nodes
    graph.inputs = list(STEP_INPUTS)
    meta = {"block_size": block_size, "num_kv_layers": layer, "step_contract": 1,
            "kv_window": None if two_groups else windows[0]}
    if two_groups:
        graph.types.update(WINDOW_GROUP_INPUTS)
        graph.inputs += list(WINDOW_GROUP_INPUTS)
        meta["kv_window_w"] = windows[1]
    graph.meta.update(meta)
    return graph
