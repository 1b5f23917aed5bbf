"""insert_speculation: make the step a speculative-decoding step and record how to speculate.

The ragged step contract already verifies drafts: a decoding sequence runs its last token and k draft
tokens as k+1 rows and asks logits for all of them (`logit_rows`). What a method still needs from the
graph is recorded here:
  - every method: `meta["speculative"]` (method, num_tokens, adaptive, n-gram sizes), which the runtime
    reads to build its proposer and accept rule (runtime/speculative.py);
  - "medusa" and "eagle" read the target's hidden states: the graph gets a second output `hidden`
    f32-or-model-dtype[T, D], the final-norm hidden state of every token row (the lm_head's input).

Before:  ... x = rms_norm(h, model.norm.weight); logits = logits(x, logit_rows, W)   return logits
After:   the same nodes                                                              return logits, x
"""
from __future__ import annotations

from lowering.ir import Graph, IRError
from lowering.speculation import Speculative

def insert_speculation(graph: Graph, spec: Speculative) -> Graph:
    spec.validate()
    if "block_size" not in graph.meta:
        raise IRError("insert_speculation needs the step contract: run insert_paged_kv first")
    graph = expose_hidden(graph, spec.method) if spec.needs_hidden else graph.copy()
    graph.meta["speculative"] = spec.to_json()
    return graph


def expose_hidden(graph: Graph, why: str = "hidden") -> Graph:
    """A copy of graph whose second output is the lm_head's input (the final-norm hidden state of every row)."""
    graph = graph.copy()
    if len(graph.outputs) == 1:
        heads = [n for n in graph.nodes if n.op in ("logits", "qlogits") and graph.outputs[0] in n.outputs]
        if not heads:
            raise IRError(f"{why}: reading the hidden states that feed the logits needs the graph's output to be made "
                          "by a logits op")
        graph.outputs = [graph.outputs[0], heads[0].inputs[0]]
    return graph
