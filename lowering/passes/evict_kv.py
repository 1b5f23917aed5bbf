"""evict_kv: record a KV eviction policy in the graph, after checking it composes with everything else.

Runs after quantization (it must see the KV formats) and before insert_speculation. For H2O every layer gets
an attention-mass pool (state `kv.<i>.mass` f32[N, Bs, Hkv], one float per cached token and KV head) and an
`attention_mass` node after its paged_attention that zeroes the new tokens' slots and adds what this step's
queries gave each cached key:

  k', v' = kv_write(k, v, slot_mapping, kv.i.k, kv.i.v)
  o      = paged_attention(q, k', v', query_start, seq_lens, block_tables)
  m'     = attention_mass(q, k', query_start, seq_lens, block_tables, slot_mapping, kv.i.mass)   state kv.i.mass <- m'

StreamingLLM needs no new nodes: the runtime compacts the pools. With positions="cache" it re-rotates moved
keys, so the pass records each layer's RoPE (graph.meta["kv_policy_rope"]) and refuses what re-rotation
cannot do exactly.

`check_kv_policy` is the compatibility matrix (docs/architecture.md lists it): every combination of policy,
KV format, sliding windows, cross-layer sharing and speculation is either supported or refused here with the
reason. Prefix caching is an engine option; runtime.Engine checks it against graph.meta["kv_policy"].
"""
from __future__ import annotations

from lowering.ir import Graph, IRError, Node, TensorType
from lowering.kv_policy import H2O, KVPolicyError, StreamingLLM, policy_from_json

MODEL_SPECULATION = ("draft", "medusa", "eagle")


def _kv_writes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op in ("kv_write", "kv_write_nvfp4", "kv_merge")]


def _kv_format(node: Node) -> str | None:
    return "nvfp4" if node.op == "kv_write_nvfp4" else node.attrs.get("kv_format")


def check_kv_policy(graph: Graph, policy, *, speculative: dict | None = None) -> None:
    """Raise KVPolicyError naming why `policy` cannot run on this graph with these options; None if it can."""
    policy = policy_from_json(policy)
    if policy is None:
        return
    name = type(policy).__name__
    if graph.meta.get("kv_window") is not None or graph.meta.get("kv_window_w") is not None:
        raise KVPolicyError(f"{name} is refused on a model with sliding-window attention layers: its windowed KV "
                            "group already frees blocks by position, and llmc does not combine the two policies")
    method = (speculative or {}).get("method")
    if method in MODEL_SPECULATION:
        raise KVPolicyError(f"{name} with speculative method {method!r} is refused: the drafter keeps its own view "
                            "of the full context (its KV cache / the target's hidden states by position), which "
                            "eviction would desynchronize; use method='ngram', which composes with eviction")
    writes = _kv_writes(graph)
    if isinstance(policy, H2O):
        if graph.meta.get("kv_shared_layers"):
            raise KVPolicyError("H2O with share_kv_layers is refused: layers that share one pool would need one "
                                "heavy-hitter choice for two layers' attention; use StreamingLLM, or no sharing")
        return
    assert isinstance(policy, StreamingLLM)
    if policy.positions != "cache":
        return
    fmts = sorted({str(_kv_format(n)) for n in writes if _kv_format(n) is not None})
    if fmts:
        raise KVPolicyError(f"StreamingLLM(positions='cache') with quantized KV ({', '.join(fmts)}) is refused: "
                            "re-rotating the moved keys at every compaction would re-quantize them each time and "
                            "compound the rounding error; use StreamingLLM(positions='original') (no re-rotation) "
                            "or an unquantized KV cache")
    if graph.meta.get("kv_rotation"):
        raise KVPolicyError("StreamingLLM(positions='cache') with kv_rotation is refused: keys are stored "
                            "Hadamard-rotated after RoPE, and a RoPE re-rotation does not commute with it; use "
                            "positions='original'")
    kv_rope(graph)  # raises for keys that do not come straight from a re-rotatable RoPE


def kv_rope(graph: Graph) -> dict[str, dict]:
    """{k pool state name: the attrs of the rope op that rotated the keys written there}."""
    producers = {out: n for n in graph.nodes for out in n.outputs}
    out = {}
    for w in _kv_writes(graph):
        if w.op == "kv_merge":
            continue
        rope = producers.get(w.inputs[0])
        if rope is None or rope.op != "rope":
            raise KVPolicyError(f"StreamingLLM(positions='cache') re-rotates cached keys, but the keys written to "
                                f"{w.inputs[3]} do not come straight from a rope op; use positions='original'")
        scaling = rope.attrs.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "linear", "llama3") or scaling.get("attention_factor") not in (None, 1.0):
            raise KVPolicyError(f"StreamingLLM(positions='cache') cannot re-rotate keys under rope scaling {kind!r} "
                                "(its frequencies or attention factor depend on the position itself); use "
                                "positions='original'")
        out[w.inputs[3]] = {k: rope.attrs[k] for k in ("num_heads", "head_dim", "theta")} | (
            {"rope_scaling": rope.attrs["rope_scaling"]} if rope.attrs.get("rope_scaling") else {})
    return out


def evict_kv(graph: Graph, policy, *, speculative: dict | None = None) -> Graph:
    policy = policy_from_json(policy)
    if policy is None:
        return graph
    if "block_size" not in graph.meta:
        raise IRError("evict_kv needs the paged KV cache: run insert_paged_kv first")
    check_kv_policy(graph, policy, speculative=speculative)
    graph = graph.copy()
    graph.meta["kv_policy"] = policy.to_json()
    if isinstance(policy, StreamingLLM):
        if policy.positions == "cache":
            graph.meta["kv_policy_rope"] = kv_rope(graph)
        return graph

    producers = {out: n for n in graph.nodes for out in n.outputs}
    new_nodes = []
    for node in graph.nodes:
        new_nodes.append(node)
        if node.op != "paged_attention":
            continue
        q, k_pool_value = node.inputs[0], node.inputs[1]
        writer = producers.get(k_pool_value)
        if writer is None or writer.op not in ("kv_write", "kv_write_nvfp4"):
            raise IRError(f"evict_kv: the K pool read by paged_attention ({k_pool_value}) is not a kv_write output")
        pool_name = writer.inputs[3]  # kv.<i>.k
        if not (pool_name.startswith("kv.") and pool_name.endswith(".k")):
            raise IRError(f"evict_kv: unexpected K pool name {pool_name!r}")
        layer = pool_name[len("kv."):-len(".k")]
        pool_t = graph.types[pool_name]
        heads = node.attrs["num_kv_heads"]
        mass = f"kv.{layer}.mass"
        new_mass = graph.add_state(mass, TensorType((pool_t.shape[0], pool_t.shape[1], heads), "float32"), "mass")
        attrs = {k: node.attrs[k] for k in ("num_heads", "num_kv_heads", "head_dim", "scale")}
        if node.attrs.get("kv_format") is not None:
            attrs["kv_format"] = node.attrs["kv_format"]
        new_nodes.append(Node("attention_mass", [q, k_pool_value, "query_start", "seq_lens", node.inputs[5],
                                                 writer.inputs[2], mass, *node.inputs[6:]], [new_mass], attrs))
    graph.nodes = new_nodes
    return graph
