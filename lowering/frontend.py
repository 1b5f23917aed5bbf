"""Frontend: trace a JAX/Flax forward with jax.make_jaxpr and symbolic dims into an llmc Graph."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from lowering import ops as ops_lib
from lowering.ir import (Graph, IRError, Node, TensorType, dim_symbols, dim_to_ir, encode_param, eval_dim,
                         generic_primitive)

# Call-like primitives whose body is inlined into the graph.
_INLINE_PARAM = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
                 "remat": "jaxpr", "checkpoint": "jaxpr", "custom_jvp_call": "call_jaxpr",
                 "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr"}

# The model forward's inputs before insert_paged_kv (see docs/architecture.md).
MODEL_INPUTS: dict[str, TensorType] = {
    "token_ids": TensorType(("T",), "int32"),
    "positions": TensorType(("T",), "int32"),
    "query_start": TensorType(("S + 1",), "int32"),
    "logit_rows": TensorType(("L",), "int32"),
}


class TraceError(ValueError):
    """The forward could not be traced into a graph (unsupported primitive, bad signature...)."""


class _Builder:
    def __init__(self, graph: Graph, param_values: dict[str, np.ndarray]):
        self.graph = graph
        self.param_values = param_values
        self.names: dict[Any, str] = {}

    def new_value(self, aval, hint="v") -> str:
        name = self.graph.fresh_name(hint)
        self.graph.types[name] = TensorType(tuple(dim_to_ir(d) for d in aval.shape), jnp.dtype(aval.dtype).name)
        return name

    def add_param(self, name: str, value) -> str:
        value = np.asarray(value)
        self.graph.params.append(name)
        self.graph.types[name] = TensorType(tuple(int(d) for d in value.shape), value.dtype.name)
        self.param_values[name] = value
        return name

    def read(self, atom) -> str:
        if isinstance(atom, jex_core.Literal):
            value = np.asarray(atom.val)
            if value.ndim:
                return self.add_param(f"const.{len(self.param_values)}", value)
            name = self.new_value(atom.aval, "c")
            scalar = value.item()
            self.graph.nodes.append(Node("constant", [], [name], {"value": scalar, "dtype": value.dtype.name}))
            return name
        return self.names[atom]

    def emit_jaxpr(self, jaxpr, consts, in_names: list[str]) -> list[str]:
        for var, value in zip(jaxpr.constvars, consts):
            self.names[var] = self.add_param(f"const.{len(self.param_values)}", value)
        for var, name in zip(jaxpr.invars, in_names):
            self.names[var] = name
        for eqn in jaxpr.eqns:
            self.emit(eqn)
        return [self.read(v) for v in jaxpr.outvars]

    def emit(self, eqn) -> None:
        prim_name = eqn.primitive.name
        in_names = [self.read(v) for v in eqn.invars]
        if prim_name in _INLINE_PARAM:
            sub = eqn.params[_INLINE_PARAM[prim_name]]
            inner, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
            outs = self.emit_jaxpr(inner, consts, in_names)
            for var, name in zip(eqn.outvars, outs):
                self.names[var] = name
            return
        out_names = [self.new_value(v.aval) for v in eqn.outvars]
        if prim_name == "dim_as_value":
            self.graph.nodes.append(Node("dim_as_value", [], out_names, {
                "dimension": encode_param(eqn.params["dim"]), "dtype": jnp.dtype(eqn.outvars[0].aval.dtype).name}))
            self.names[eqn.outvars[0]] = out_names[0]
            return
        semantic = ops_lib.semantic_op_for_primitive(eqn.primitive)
        if semantic is not None:
            attrs = {}
            for key, value in eqn.params.items():
                if key in ops_lib._DICT_ATTRS and value is not None:  # lists inside too, as after a JSON round trip
                    value = {k: list(v) if isinstance(v, tuple) else v for k, v in value}
                elif isinstance(value, tuple):
                    value = list(value)
                attrs[key] = value
            node = Node(semantic.name, in_names, out_names, attrs)
        else:
            try:
                generic_primitive(prim_name)
                attrs = {k: encode_param(v) for k, v in eqn.params.items()}
            except IRError as e:
                raise TraceError(f"cannot compile primitive {prim_name!r}: {e}") from None
            node = Node(prim_name, in_names, out_names, attrs)
        self.graph.nodes.append(node)
        for var, name in zip(eqn.outvars, out_names):
            self.names[var] = name


def trace(fn: Callable, params: Mapping[str, Any], inputs: Mapping[str, TensorType] = MODEL_INPUTS
          ) -> tuple[Graph, dict[str, np.ndarray]]:
    """Trace `fn(params: dict, *inputs)` into a Graph; returns (graph, param values by name).

    Input dims are IR dims (ints or symbol expressions); the graph keeps them symbolic.
    """
    symbols = sorted({s for t in inputs.values() for d in t.shape if isinstance(d, str)
                      for s in dim_symbols(d)})
    sym_dims = jax.export.symbolic_shape(",".join(symbols)) if symbols else ()
    env = dict(zip(symbols, sym_dims))
    in_specs = [jax.ShapeDtypeStruct(tuple(eval_dim(d, env) for d in t.shape), jnp.dtype(t.dtype))
                for t in inputs.values()]
    names = sorted(params)
    param_specs = {k: jax.ShapeDtypeStruct(np.shape(params[k]), _dtype_of(params[k])) for k in names}
    try:
        closed = jax.make_jaxpr(fn)(param_specs, *in_specs)
    except Exception as e:  # noqa: BLE001 - surface tracing failures with context
        raise TraceError(f"tracing the model failed: {type(e).__name__}: {e}") from e

    graph = Graph()
    param_values: dict[str, np.ndarray] = {}
    builder = _Builder(graph, param_values)
    for name, t in inputs.items():
        graph.inputs.append(name)
        graph.types[name] = t
    for name in names:
        graph.params.append(name)
        graph.types[name] = TensorType(tuple(int(d) for d in np.shape(params[name])), jnp.dtype(_dtype_of(params[name])).name)
        param_values[name] = params[name]
    # jaxpr invars: the params dict flattens in sorted-key order, then the inputs
    flat_in = names + list(inputs)
    outs = builder.emit_jaxpr(closed.jaxpr, closed.consts, flat_in)
    graph.outputs = outs
    return graph, param_values


def _dtype_of(value) -> Any:
    return value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype
