"""insert_paged_kv: contiguous causal attention becomes kv_write + paged_attention over KV pool state.

Before (one layer):
  o = attention(q, k, v, query_start)
After:
  k_pool', v_pool' = kv_write(k, v, slot_mapping, kv.0.k, kv.0.v)        state kv.0.k <- k_pool'
  o = paged_attention(q, k_pool', v_pool', query_start, seq_lens, block_tables)
and the graph takes the step contract's inputs (docs/architecture.md):
  token_ids i32[T], positions i32[T], slot_mapping i32[T], query_start i32[S+1], seq_lens i32[S],
  block_tables i32[S,B], logit_rows i32[L]; each pool is [N, block_size, num_kv_heads, head_dim].
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

    new_nodes = []
    layer = 0
    for node in graph.nodes:
        if node.op != "attention":
            new_nodes.append(node)
            continue
        q, k, v, query_start = node.inputs
        if query_start != "query_start":
            raise IRError("attention must take the graph input query_start")
        heads = {key: node.attrs[key] for key in ("num_heads", "num_kv_heads", "head_dim")}
        dtype = kv_dtype or graph.types[k].dtype
        pool_type = TensorType(("N", block_size, heads["num_kv_heads"], heads["head_dim"]), dtype)
        k_pool, v_pool = f"kv.{layer}.k", f"kv.{layer}.v"
        new_k, new_v = graph.add_state(k_pool, pool_type, "kpool"), graph.add_state(v_pool, pool_type, "vpool")
        new_nodes.append(Node("kv_write", [k, v, "slot_mapping", k_pool, v_pool], [new_k, new_v], {}))
        new_nodes.append(Node("paged_attention", [q, new_k, new_v, "query_start", "seq_lens", "block_tables"],
                              list(node.outputs), dict(node.attrs)))
        layer += 1
    graph.nodes = new_nodes
    graph.inputs = list(STEP_INPUTS)
    graph.meta.update({"block_size": block_size, "num_kv_layers": layer, "step_contract": 1})
    return graph
