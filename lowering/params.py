"""Derived params: passes describe new weights (concatenations, later quantized packs); this makes them."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from lowering.ir import Graph, IRError, TensorType

DERIVED_KEY = "derived_params"


def add_derived_param(graph: Graph, name: str, kind: str, sources: list[str], *, type_: TensorType,
                      **attrs: Any) -> str:
    """Declare param `name` = kind(sources, **attrs) in the graph (in place); returns its name."""
    if name in graph.types:
        raise IRError(f"param {name!r} already exists")
    graph.params.append(name)
    graph.types[name] = type_
    graph.meta.setdefault(DERIVED_KEY, {})[name] = {"kind": kind, "sources": list(sources), **attrs}
    return name


def materialize_params(graph: Graph, base: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Values of exactly graph.params, computing derived ones from `base` (the traced weights)."""
    derived = graph.meta.get(DERIVED_KEY, {})
    cache: dict[str, np.ndarray] = {}

    def value(name: str) -> np.ndarray:
        if name in cache:
            return cache[name]
        if name in derived:
            spec = derived[name]
            parts = [value(s) for s in spec["sources"]]
            if spec["kind"] == "concat":
                out = np.concatenate(parts, axis=spec["axis"])
            else:
                raise IRError(f"unknown derived param kind {spec['kind']!r}")
        elif name in base:
            out = np.asarray(base[name])
        else:
            raise IRError(f"no value for param {name!r}")
        cache[name] = out
        return out

    result = {}
    for name in graph.params:
        result[name] = value(name)
        want = graph.types[name]
        if tuple(result[name].shape) != tuple(want.shape) or result[name].dtype.name != want.dtype:
            raise IRError(f"param {name} is {result[name].dtype}{list(result[name].shape)}, graph says {want}")
    return result


def finalize_params(graph: Graph, base: Mapping[str, Any]) -> tuple[Graph, dict[str, np.ndarray]]:
    """Materialize params and drop the derivation notes, so the graph names only stored params."""
    params = materialize_params(graph, base)
    graph = graph.copy()
    graph.meta.pop(DERIVED_KEY, None)
    return graph, params
