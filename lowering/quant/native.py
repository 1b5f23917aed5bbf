"""Keep a GGUF checkpoint's own quantized tensors (compile_model(weights="gguf")).

Each linear (and the logits weight) whose float32 param came from a Q4_1 / Q8_0 GGUF tensor becomes a
qlinear / qlogits over that tensor's blocks (lowering.quant.formats' GGUF formats), including the fused
projections (fuse_projections concatenates rows, so their blocks concatenate the same way). The values
are bit-identical to the float32 weights, so nothing is measured or guarded: the model is the same model,
stored in 5 (Q4_1) or 8.5 (Q8_0) bits per weight instead of 32.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from lowering.ir import Graph
from lowering.quant.passes import QuantError, apply_weight_quantization, weight_units


def native_weight_plan(graph: Graph, native: Mapping[str, tuple[str, dict]],
                       derived: Mapping[str, dict]) -> dict[str, tuple[str, dict]]:
    """unit name -> (format, parts) for every weight unit whose param is a native tensor or a row
    concatenation of native tensors of one format. `derived`: the graph's derived-param notes
    (lowering.params) before finalize_params drops them."""
    plan = {}
    for unit in weight_units(graph):
        if unit.param in native:
            plan[unit.name] = native[unit.param]
            continue
        spec = derived.get(unit.param)
        if not spec or spec.get("kind") != "concat" or spec.get("axis") != 0:
            continue
        sources = spec["sources"]
        if not all(s in native for s in sources) or len({native[s][0] for s in sources}) != 1:
            continue
        fmt = native[sources[0]][0]
        parts = {k: np.concatenate([native[s][1][k] for s in sources], axis=0) for k in native[sources[0]][1]}
        plan[unit.name] = (fmt, parts)
    return plan


def keep_native_weights(graph: Graph, params: dict, native: Mapping[str, tuple[str, dict]],
                        derived: Mapping[str, dict]) -> tuple[Graph, dict, dict[str, str]]:
    """(graph, params, {unit name: format}) with the native tensors in place of their float32 copies."""
    if not native:
        raise QuantError("weights='gguf' keeps a GGUF checkpoint's Q4_1 / Q8_0 tensors, and this checkpoint has "
                         "none (it is not a GGUF file, or its tensors are float)")
    plan = native_weight_plan(graph, native, derived)
    graph, params = apply_weight_quantization(graph, params, plan)
    return graph, params, {name: fmt for name, (fmt, _) in plan.items()}
