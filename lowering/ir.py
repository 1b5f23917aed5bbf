"""Graph IR: SSA values with symbolic dims, nodes naming registered ops, printer, verifier, JSON, interpreter."""
from __future__ import annotations

import ast
import copy
import dataclasses
import enum
import json
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from lowering import ops as ops_lib

GRAPH_FORMAT = "llmc.graph"
GRAPH_VERSION = 1

Dim = int | str


class IRError(ValueError):
    """A graph is malformed: the message names the node or value at fault."""


@dataclasses.dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{short_dtype(self.dtype)}[{','.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype}


_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64", "int32": "i32",
          "int64": "i64", "int8": "i8", "uint8": "u8", "bool": "bool", "float8_e4m3fn": "f8e4m3"}


def short_dtype(dtype: str) -> str:
    return _SHORT.get(dtype, dtype)


@dataclasses.dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Graph:
    """A step function: inputs + params + state -> outputs (+ new state), as an ordered node list.

    `state` values persist across steps (the KV pools); `state_updates[s]` names the value that
    holds state `s` after the step. `meta` carries JSON facts passes leave for backends.
    """

    types: dict[str, TensorType] = dataclasses.field(default_factory=dict)
    inputs: list[str] = dataclasses.field(default_factory=list)
    params: list[str] = dataclasses.field(default_factory=list)
    state: list[str] = dataclasses.field(default_factory=list)
    nodes: list[Node] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    state_updates: dict[str, str] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def copy(self) -> "Graph":
        return copy.deepcopy(self)

    def fresh_name(self, hint: str = "v") -> str:
        counter = self.meta.get("_next_id", len(self.types))
        while f"%{hint}{counter}" in self.types:
            counter += 1
        self.meta["_next_id"] = counter + 1
        return f"%{hint}{counter}"

    def producers(self) -> dict[str, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def users(self) -> dict[str, list[Node]]:
        result: dict[str, list[Node]] = {}
        for node in self.nodes:
            for name in node.inputs:
                result.setdefault(name, []).append(node)
        return result

    def add_state(self, name: str, type_: TensorType, hint: str) -> str:
        """Declare persistent state `name` of `type_` (in place); returns the fresh value that holds it after
        the step (named from `hint`), which the caller's node must produce."""
        updated = self.fresh_name(hint)
        self.types[name] = self.types[updated] = type_
        self.state.append(name)
        self.state_updates[name] = updated
        return updated

    def ops_count(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op] = counts.get(node.op, 0) + 1
        return counts

    def symbols(self) -> list[str]:
        names: set[str] = set()
        for t in self.types.values():
            for d in t.shape:
                if isinstance(d, str):
                    names |= dim_symbols(d)
        return sorted(names)

    # ---- text -------------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_graph(self)

    # ---- JSON -------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "format": GRAPH_FORMAT,
            "version": GRAPH_VERSION,
            "types": {k: v.to_json() for k, v in self.types.items()},
            "inputs": list(self.inputs),
            "params": list(self.params),
            "state": list(self.state),
            "nodes": [{"op": n.op, "inputs": n.inputs, "outputs": n.outputs, "attrs": n.attrs} for n in self.nodes],
            "outputs": list(self.outputs),
            "state_updates": dict(self.state_updates),
            "meta": {k: v for k, v in self.meta.items() if not k.startswith("_")},
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=None, separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_json(cls, data: Any) -> "Graph":
        """Rebuild a graph from JSON; every field is type-checked and every op must be registered."""
        if not isinstance(data, dict) or data.get("format") != GRAPH_FORMAT:
            raise IRError(f"not an llmc graph (expected format {GRAPH_FORMAT!r})")
        if data.get("version") != GRAPH_VERSION:
            raise IRError(f"graph version {data.get('version')!r} is not supported (expected {GRAPH_VERSION})")
        expected = {"format", "version", "types", "inputs", "params", "state", "nodes", "outputs", "state_updates", "meta"}
        if set(data) != expected:
            raise IRError(f"graph JSON has fields {sorted(data)}, expected {sorted(expected)}")
        types = {}
        for name, t in _check(data["types"], dict, "types").items():
            shape = _check(t.get("shape"), list, f"type of {name}")
            for d in shape:
                if not (isinstance(d, int) and not isinstance(d, bool)) and not isinstance(d, str):
                    raise IRError(f"bad dim {d!r} in the type of {name}")
                if isinstance(d, str):
                    _parse_dim(d)
            types[name] = TensorType(tuple(shape), _check(t.get("dtype"), str, f"dtype of {name}"))
        nodes = []
        for i, n in enumerate(_check(data["nodes"], list, "nodes")):
            if not isinstance(n, dict) or set(n) != {"op", "inputs", "outputs", "attrs"}:
                raise IRError(f"node {i} is malformed")
            nodes.append(Node(_check(n["op"], str, f"node {i} op"), _str_list(n["inputs"], f"node {i} inputs"),
                              _str_list(n["outputs"], f"node {i} outputs"), _check(n["attrs"], dict, f"node {i} attrs")))
        graph = cls(types=types, inputs=_str_list(data["inputs"], "inputs"), params=_str_list(data["params"], "params"),
                    state=_str_list(data["state"], "state"), nodes=nodes, outputs=_str_list(data["outputs"], "outputs"),
                    state_updates=dict(_check(data["state_updates"], dict, "state_updates")),
                    meta=_check(data["meta"], dict, "meta"))
        verify(graph)
        return graph

    @classmethod
    def loads(cls, text: str) -> "Graph":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise IRError(f"graph JSON is not valid JSON: {e}") from None
        return cls.from_json(data)


def _check(value, typ, what):
    if not isinstance(value, typ):
        raise IRError(f"{what} must be a {typ.__name__}, got {type(value).__name__}")
    return value


def _str_list(value, what) -> list[str]:
    _check(value, list, what)
    if not all(isinstance(v, str) for v in value):
        raise IRError(f"{what} must be a list of strings")
    return list(value)


# ---------------------------------------------------------------------------------------------
# Symbolic dims: strings such as "T" or "S + 1", evaluated with a tiny safe arithmetic evaluator.
# ---------------------------------------------------------------------------------------------

_ALLOWED_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
                   ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_ALLOWED_CALLS = {"max": max, "min": min, "floordiv": lambda a, b: a // b, "mod": lambda a, b: a % b}


def _parse_dim(text: str) -> ast.AST:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise IRError(f"bad symbolic dim {text!r}") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Name, ast.BinOp, ast.UnaryOp, ast.USub, ast.Load, ast.Call, *_ALLOWED_BINOPS)) or (
            isinstance(node, ast.Constant) and isinstance(node.value, int))
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _ALLOWED_CALLS):
            ok = False
        if not ok:
            raise IRError(f"bad symbolic dim {text!r}")
    return tree


def dim_symbols(text: str) -> set[str]:
    return {n.id for n in ast.walk(_parse_dim(text)) if isinstance(n, ast.Name) and n.id not in _ALLOWED_CALLS}


def eval_dim(dim: Dim, env: Mapping[str, Any]):
    """Evaluate a dim with symbols bound in env (to ints, or to jax symbolic dims)."""
    if isinstance(dim, int):
        return dim

    def ev(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise IRError(f"symbol {node.id!r} is not bound")
            return env[node.id]
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp):
            return _ALLOWED_BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Call):
            return _ALLOWED_CALLS[node.func.id](*[ev(a) for a in node.args])
        raise IRError(f"bad symbolic dim {dim!r}")

    return ev(_parse_dim(dim))


def dim_to_ir(d) -> Dim:
    """A dim from a jax aval (int or symbolic expression) as an IR dim."""
    if isinstance(d, (int, np.integer)):
        return int(d)
    return str(d)


def bind_symbols(types: Iterable[TensorType], shapes: Iterable[tuple[int, ...]]) -> dict[str, int]:
    """Bind graph symbols from concrete input shapes ("T" binds directly; "S + 1" solves for S)."""
    env: dict[str, int] = {}
    pending: list[tuple[str, int]] = []
    for t, shape in zip(types, shapes):
        if len(t.shape) != len(shape):
            raise IRError(f"expected rank {len(t.shape)} for {t}, got shape {tuple(shape)}")
        for d, n in zip(t.shape, shape):
            if isinstance(d, int):
                if d != n:
                    raise IRError(f"expected dim {d} in {t}, got {tuple(shape)}")
            elif d.isidentifier():
                if env.setdefault(d, n) != n:
                    raise IRError(f"symbol {d} bound to both {env[d]} and {n}")
            else:
                pending.append((d, n))
    for d, n in pending:
        unknown = dim_symbols(d) - set(env)
        if len(unknown) == 1:
            (sym,) = unknown
            # linear in sym: value = a * sym + b
            b = eval_dim(d, {**env, sym: 0})
            a = eval_dim(d, {**env, sym: 1}) - b
            if a == 0 or (n - b) % a:
                raise IRError(f"cannot solve dim {d!r} = {n}")
            env[sym] = (n - b) // a
        if eval_dim(d, env) != n:
            raise IRError(f"dim {d!r} should be {eval_dim(d, env)}, got {n}")
    return env


# ---------------------------------------------------------------------------------------------
# Generic ops: plain lax primitives from a traced model, with params encoded as JSON.
# ---------------------------------------------------------------------------------------------

# Primitives whose params hold sub-programs or effects: never allowed as generic ops.
_FORBIDDEN_GENERIC = {"pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                      "custom_vjp_call_jaxpr", "custom_lin", "cond", "while", "scan", "remat", "checkpoint",
                      "run_state", "pure_callback", "io_callback", "debug_callback", "debug_print", "shard_map",
                      "xla_pmap", "xla_call", "custom_transpose_call", "platform_index", "mesh_cast", "reshard",
                      "psum", "all_gather", "ppermute", "axis_index"}


def generic_primitive(name: str):
    """The lax primitive named `name`, from an allow-list (so a loaded graph can run nothing else)."""
    table = _generic_table()
    if name not in table:
        raise IRError(f"op {name!r} is neither a registered llmc op nor a supported lax primitive")
    return table[name]


_GENERIC_CACHE: dict[str, Any] = {}


def _generic_table() -> dict[str, Any]:
    if not _GENERIC_CACHE:
        import importlib

        from jax.extend.core import primitives as prims

        modules = [prims]
        # NOTE: a few lax primitives (split, ...) are not re-exported by jax.extend; look in lax's own
        # modules too, tolerating their absence in other jax versions.
        for mod in ("jax._src.lax.lax", "jax._src.lax.slicing", "jax._src.lax.special",
                    "jax._src.lax.control_flow.loops", "jax._src.lax.windowed_reductions"):
            try:
                modules.append(importlib.import_module(mod))
            except ImportError:
                pass
        for module in modules:
            for value in vars(module).values():
                if isinstance(value, jex_core.Primitive) and value.name not in _FORBIDDEN_GENERIC:
                    if not value.name.startswith("llmc.") and "scatter" not in value.name:
                        _GENERIC_CACHE.setdefault(value.name, value)
    return _GENERIC_CACHE


_ENUMS = {}


def _enum_types():
    if not _ENUMS:
        from jax import lax

        for cls in (lax.GatherScatterMode, lax.Precision, lax.RoundingMethod):
            _ENUMS[cls.__name__] = cls
    return _ENUMS


def encode_param(value: Any) -> Any:
    """A lax primitive param as JSON (dims, dtypes, enums and named tuples tagged with '$' keys)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (np.dtype, type)) or hasattr(value, "dtype") and isinstance(value, jnp.dtype):
        return {"$dtype": jnp.dtype(value).name}
    if isinstance(value, enum.Enum):
        if type(value).__name__ not in _enum_types():
            raise IRError(f"cannot encode enum {value!r}")
        return {"$enum": type(value).__name__, "name": value.name}
    if type(value).__name__ in ("GatherDimensionNumbers", "ScatterDimensionNumbers"):
        fields = value._asdict() if hasattr(value, "_asdict") else dataclasses.asdict(value)
        return {"$" + type(value).__name__: {k: encode_param(v) for k, v in fields.items()}}
    if isinstance(value, (tuple, list)):
        return {"$tuple": [encode_param(v) for v in value]}
    if hasattr(value, "dimension_as_value") or type(value).__name__ == "_DimExpr":
        return {"$dim": str(value)}
    try:
        return {"$dtype": jnp.dtype(value).name}
    except TypeError:
        pass
    raise IRError(f"cannot encode primitive param {value!r} of type {type(value).__name__}")


def decode_param(value: Any, env: Mapping[str, Any]) -> Any:
    if isinstance(value, list):
        raise IRError("untagged list in a generic op's attrs")
    if not isinstance(value, dict):
        return value
    if "$dim" in value:
        return eval_dim(value["$dim"], env)
    if "$tuple" in value:
        return tuple(decode_param(v, env) for v in value["$tuple"])
    if "$dtype" in value:
        return jnp.dtype(value["$dtype"])
    if "$enum" in value:
        cls = _enum_types().get(value["$enum"])
        if cls is None:
            raise IRError(f"unknown enum {value['$enum']!r}")
        return cls[value["name"]]
    if "$GatherDimensionNumbers" in value:
        from jax import lax

        return lax.GatherDimensionNumbers(**{k: decode_param(v, env) for k, v in value["$GatherDimensionNumbers"].items()})
    raise IRError(f"cannot decode primitive param {value!r}")


# ---------------------------------------------------------------------------------------------
# Evaluating one node: the reference of a semantic op, or the lax primitive of a generic one.
# ---------------------------------------------------------------------------------------------


def run_reference(node: Node, args: list, env: Mapping[str, Any]):
    """Run the reference implementation of `node` on `args`; always returns a tuple of outputs."""
    if node.op == "constant":
        return (jnp.asarray(node.attrs["value"], dtype=node.attrs["dtype"]),)
    if node.op == "dim_as_value":  # a symbolic dim used as a number (e.g. to wrap negative indices)
        value = eval_dim(node.attrs["dimension"]["$dim"], env)
        if not isinstance(value, int):
            from jax._src import core as jax_core

            return (jax_core.dimension_as_value(value).astype(node.attrs["dtype"]),)
        return (jnp.asarray(value, dtype=node.attrs["dtype"]),)
    if node.op in ops_lib.REGISTRY:
        op = ops_lib.REGISTRY[node.op]
        out = op.ref(*args, **node.attrs)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    prim = generic_primitive(node.op)
    params = {k: decode_param(v, env) for k, v in node.attrs.items()}
    out = prim.bind(*args, **params)
    return tuple(out) if prim.multiple_results else (out,)


Impl = Callable[[Node, list, Mapping[str, Any]], tuple]


def interpret(graph: Graph, inputs: Mapping[str, Any], params: Mapping[str, Any], state: Mapping[str, Any] | None = None,
              *, impls: Mapping[str, Impl] | None = None, static_env: Mapping[str, Any] | None = None):
    """Run a graph with every op's reference (or an override from `impls`, keyed by op name).

    Returns (outputs: list, new_state: dict). Works eagerly and under jax.jit.
    """
    state = state or {}
    values: dict[str, Any] = {}
    for group, names in (("input", graph.inputs), ("param", graph.params), ("state", graph.state)):
        source = {"input": inputs, "param": params, "state": state}[group]
        for name in names:
            if name not in source:
                raise IRError(f"missing {group} {name!r}")
            values[name] = source[name]
    env = bind_symbols([graph.types[n] for n in graph.inputs + graph.state], [tuple(jnp.shape(values[n])) for n in graph.inputs + graph.state])
    if static_env:
        env.update(static_env)
    impls = impls or {}
    for node in graph.nodes:
        args = [values[name] for name in node.inputs]
        impl = impls.get(node.op)
        outs = impl(node, args, env) if impl is not None else run_reference(node, args, env)
        if len(outs) != len(node.outputs):
            raise IRError(f"op {node.op} produced {len(outs)} outputs, node declares {len(node.outputs)}")
        values.update(zip(node.outputs, outs))
    new_state = {s: values[graph.state_updates.get(s, s)] for s in graph.state}
    return [values[o] for o in graph.outputs], new_state


# ---------------------------------------------------------------------------------------------
# Verifier: structure always; types by abstract evaluation with symbolic dims when asked.
# ---------------------------------------------------------------------------------------------


def verify(graph: Graph, *, check_types: bool = False) -> None:
    defined: set[str] = set()
    for group in (graph.inputs, graph.params, graph.state):
        for name in group:
            if name in defined:
                raise IRError(f"value {name!r} is defined twice")
            if name not in graph.types:
                raise IRError(f"value {name!r} has no type")
            defined.add(name)
    for i, node in enumerate(graph.nodes):
        if node.op not in ("constant", "dim_as_value") and node.op not in ops_lib.REGISTRY:
            generic_primitive(node.op)
        if node.op in ops_lib.REGISTRY:
            try:
                ops_lib.REGISTRY[node.op].check_attrs(node.attrs)
            except ops_lib.OpError as e:
                raise IRError(f"node {i} ({node.op}): {e}") from None
            expected = ops_lib.REGISTRY[node.op].num_outputs
            if len(node.outputs) != expected:
                raise IRError(f"node {i} ({node.op}) has {len(node.outputs)} outputs, expected {expected}")
        for name in node.inputs:
            if name not in defined:
                raise IRError(f"node {i} ({node.op}) uses {name!r} before it is defined")
        for name in node.outputs:
            if name in defined:
                raise IRError(f"node {i} ({node.op}) redefines {name!r}")
            if name not in graph.types:
                raise IRError(f"node {i} ({node.op}) output {name!r} has no type")
            defined.add(name)
    for name in graph.outputs:
        if name not in defined:
            raise IRError(f"graph output {name!r} is never defined")
    for s, v in graph.state_updates.items():
        if s not in graph.state:
            raise IRError(f"state_updates names {s!r}, which is not state")
        if v not in defined:
            raise IRError(f"state {s!r} is updated to undefined value {v!r}")
        if graph.types[v] != graph.types[s]:
            raise IRError(f"state {s!r} has type {graph.types[s]} but is updated with {graph.types[v]}")
    if check_types:
        _check_types(graph)


def _check_types(graph: Graph) -> None:
    symbols = graph.symbols()
    scope_dims = jax.export.symbolic_shape(",".join(symbols)) if symbols else ()
    env = dict(zip(symbols, scope_dims))

    def spec(name):
        t = graph.types[name]
        return jax.ShapeDtypeStruct(tuple(eval_dim(d, env) for d in t.shape), jnp.dtype(t.dtype))

    for i, node in enumerate(graph.nodes):
        specs = [spec(n) for n in node.inputs]

        def run(*args, node=node):
            op = ops_lib.REGISTRY.get(node.op)
            if op is not None and op.primitive is not None:  # the op's own shape rule
                out = op.primitive.bind(*args, **ops_lib._clean_attrs(node.attrs))
                return tuple(out) if op.primitive.multiple_results else (out,)
            return run_reference(node, list(args), env)

        try:
            outs = jax.eval_shape(run, *specs)
        except Exception as e:  # noqa: BLE001 - any failure here is a type error in the graph
            raise IRError(f"node {i} ({node.op}) does not type-check: {e}") from None
        for name, out in zip(node.outputs, outs):
            got = TensorType(tuple(dim_to_ir(d) for d in out.shape), jnp.dtype(out.dtype).name)
            want = graph.types[name]
            if got.dtype != want.dtype or [str(d) for d in got.shape] != [str(d) for d in want.shape]:
                raise IRError(f"node {i} ({node.op}) output {name} is declared {want} but computes {got}")


# ---------------------------------------------------------------------------------------------
# Memory of the state buffers (the KV pools and any scale pools a quantized KV format adds)
# ---------------------------------------------------------------------------------------------


def dtype_itemsize(dtype: str) -> int:
    """Bytes per element of a graph dtype name (ml_dtypes' bfloat16, float8_e4m3fn included)."""
    return jnp.dtype(dtype).itemsize


def state_bytes_per_block(graph: Graph) -> dict[str, int]:
    """{state name: bytes per block}: the product of every dim after the first (N, the block count) times
    the element size."""
    out = {}
    for name in graph.state:
        t = graph.types[name]
        dims = t.shape[1:]
        if not all(isinstance(d, (int, np.integer)) for d in dims):
            raise IRError(f"state {name} has symbolic dims after its first: {t}")
        out[name] = int(np.prod([int(d) for d in dims], dtype=np.int64)) * dtype_itemsize(t.dtype)
    return out


def kv_bytes_per_block(graph: Graph, pool: str | None = None) -> int:
    """Bytes per block of every state buffer, or only of those whose first dim is `pool` ("N": the first KV
    group's pools, "NW": the second group's, see insert_paged_kv)."""
    per = state_bytes_per_block(graph)
    return sum(b for name, b in per.items() if pool is None or graph.types[name].shape[0] == pool)


def window_pool_blocks(graph: Graph, *, max_num_seqs: int, max_blocks_per_seq: int) -> int | None:
    """Default size of the second KV group's pool (sliding-window layers beside global ones), or None if the
    graph has no second group: every sequence's window (ceil((window - 1) / block_size) + 1 blocks) plus a
    block of lookahead, and one max_model_len prefill chunk on top."""
    window = graph.meta.get("kv_window_w")
    if window is None:
        return None
    bs = int(graph.meta["block_size"])
    per_seq = -(-(int(window) - 1) // bs) + 1
    return max_num_seqs * (per_seq + 1) + max_blocks_per_seq


def resolve_window_blocks(graph: Graph, num_blocks: int, num_blocks_w: int | None, sizes: dict) -> int | None:
    """The second KV group's pool size (None without one): num_blocks_w, else its default capped at num_blocks."""
    default = window_pool_blocks(graph, **sizes)
    if default is None:
        if num_blocks_w is not None:
            raise ValueError("num_blocks_w is for graphs with a second KV group (sliding-window layers beside "
                             "global ones); this graph has none")
        return None
    if num_blocks_w is None:
        return int(min(default, num_blocks))
    if not isinstance(num_blocks_w, int) or num_blocks_w < 1:
        raise ValueError(f"num_blocks_w must be an integer >= 1, got {num_blocks_w!r}")
    return int(num_blocks_w)


def split_kv_blocks(graph: Graph, budget_bytes: int, *, max_num_seqs: int, max_blocks_per_seq: int,
                    num_blocks_w: int | None = None) -> tuple[int, int | None]:
    """(blocks of the first KV group, blocks of the second or None) that fit budget_bytes of KV pools: the second
    group's pool takes its default size (window_pool_blocks) or num_blocks_w, the first group the rest."""
    nw = num_blocks_w if num_blocks_w is not None else window_pool_blocks(
        graph, max_num_seqs=max_num_seqs, max_blocks_per_seq=max_blocks_per_seq)
    if nw is None:
        return int(budget_bytes) // max(kv_bytes_per_block(graph), 1), None
    n = (int(budget_bytes) - nw * kv_bytes_per_block(graph, "NW")) // max(kv_bytes_per_block(graph, "N"), 1)
    return int(n), int(min(nw, max(n, 1))) if num_blocks_w is None else int(nw)


# ---------------------------------------------------------------------------------------------
# Printer
# ---------------------------------------------------------------------------------------------


def _format_attr(value: Any) -> str:
    if isinstance(value, dict):
        if "$tuple" in value:
            return "(" + ",".join(_format_attr(v) for v in value["$tuple"]) + ")"
        if "$dtype" in value:
            return short_dtype(value["$dtype"])
        if "$dim" in value:
            return value["$dim"]
        if "$enum" in value:
            return value["name"]
        return "{" + ", ".join(f"{k}={_format_attr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_format_attr(v) for v in value) + "]"
    return str(value)


def format_node(graph: Graph, node: Node) -> str:
    outs = ", ".join(f"{o}: {graph.types[o]}" for o in node.outputs)
    attrs = {k: v for k, v in node.attrs.items() if v is not None and k not in ("sharding", "out_sharding")}
    attr_text = (" {" + ", ".join(f"{k}={_format_attr(v)}" for k, v in attrs.items()) + "}") if attrs else ""
    return f"{outs} = {node.op}({', '.join(node.inputs)}){attr_text}"


def format_graph(graph: Graph, *, max_nodes: int | None = None) -> str:
    lines = []
    sig = ", ".join(f"{n}: {graph.types[n]}" for n in graph.inputs)
    lines.append(f"graph({sig}) params={len(graph.params)} state={len(graph.state)} nodes={len(graph.nodes)}")
    for s in graph.state:
        lines.append(f"  state {s}: {graph.types[s]}")
    nodes = graph.nodes if max_nodes is None else graph.nodes[:max_nodes]
    for node in nodes:
        lines.append("  " + format_node(graph, node))
    if max_nodes is not None and len(graph.nodes) > max_nodes:
        lines.append(f"  ... {len(graph.nodes) - max_nodes} more nodes")
    updates = ", ".join(f"{s} <- {v}" for s, v in graph.state_updates.items())
    lines.append(f"  return {', '.join(graph.outputs)}" + (f"; {updates}" if updates else ""))
    return "\n".join(lines)
