"""shard_tensor_parallel: the step graph split Megatron-style over `tp` ranks (one graph, run by every rank).

Every value of the graph is, on each rank, in one of three layouts:
  replicated  the whole value, the same on every rank (activations between blocks, norms' outputs);
  sharded     features split by rank: a value made of segments (q, k, v of a fused projection; gate, up) holds
              segment i's features [r * n_i / tp, (r + 1) * n_i / tp) of each, in order;
  partial     a summand: the ranks' values add up to the whole (after a row-parallel linear).

The pass walks the graph once:
  embed(ids, table)                 -> embed_shard(ids, table[V/tp rows]) + all_reduce        (vocab-parallel)
  linear(replicated x, W)           -> linear(x, W[out/tp rows])    column-parallel: the output is sharded, its
                                       segments those of the split that reads it (q/k/v, gate/up)
  split, rope, head_rms_norm, silu_mul, gelu_tanh_mul, elementwise ops on sharded values -> per-rank sizes
  kv_write, paged_attention         -> the rank's KV heads: pools [N, block_size, Hkv / tp, Dh]
  linear(sharded x, W)              -> linear(x, W[:, in/tp cols]) + all_reduce    row-parallel (a bias is held
                                       by rank 0 alone, so it is added once)
  logits(x, rows, W)                -> logits(x, rows, W[V/tp rows]) + all_gather(axis=1)     (vocab-parallel)
Anything else must see replicated values only. The vocabulary is padded with zero rows to a multiple of tp
(the gather drops the padding). The per-rank params are described, not stored: graph.meta["tensor_parallel"]
maps each param to a shard spec, and `shard_param` cuts rank r's piece from the full value (a numpy memmap is
read only where the piece lies), so no rank ever holds the whole model.

What it refuses (IRError, naming the node or the model's numbers): head counts, KV head counts or MLP widths
that tp does not divide, quantized weights or KV, KV sharing and H2O nodes, MoE layers, and any op it does
not know reading a sharded or partial value.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from lowering.ir import Graph, IRError, Node, TensorType

AXIS_NAME = "tp"
META_KEY = "tensor_parallel"

REPLICATED, SHARDED, PARTIAL = "replicated", "sharded", "partial"
# ops whose sharded inputs keep their per-feature layout (no shape attrs to rewrite beyond these)
_ELEMENTWISE = {"silu_mul", "gelu_tanh_mul", "add", "sub", "mul", "div", "neg", "tanh", "exp", "logistic",
                "convert_element_type", "max", "min", "integer_pow", "sqrt", "rsqrt", "erf", "pow"}
_REFUSED = {"qlinear": "quantized weights", "qlogits": "a quantized logits weight",
            "kv_write_nvfp4": "an nvfp4 KV cache", "kv_merge": "cross-layer KV sharing",
            "attention_mass": "H2O KV eviction", "moe": "mixture-of-experts layers",
            "rotate_heads": "a rotated (Hadamard) KV cache", "attention": "attention without a paged KV cache"}


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How rank r's piece of a param comes from the full value.

    kind "replicate": the whole value; "rank0": the whole value on rank 0, zeros elsewhere (a row-parallel
    bias, added once); "split": along `axis`, the full value padded with zeros to `padded` (when given), then
    each of `segments` (sizes along axis, summing to the padded size) contributes its r-th of tp equal slices.
    """

    kind: str
    axis: int = 0
    segments: tuple[int, ...] = ()
    padded: int | None = None

    def to_json(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "split":
            out.update(axis=self.axis, segments=list(self.segments))
            if self.padded is not None:
                out["padded"] = self.padded
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "ShardSpec":
        if not isinstance(data, Mapping) or data.get("kind") not in ("replicate", "rank0", "split"):
            raise IRError(f"bad tensor-parallel shard spec {data!r}")
        if data["kind"] != "split":
            return cls(data["kind"])
        return cls("split", int(data["axis"]), tuple(int(s) for s in data["segments"]),
                   None if data.get("padded") is None else int(data["padded"]))

    def local_shape(self, shape: tuple[int, ...], tp: int) -> tuple[int, ...]:
        if self.kind != "split":
            return tuple(shape)
        return tuple(sum(self.segments) // tp if i == self.axis else d for i, d in enumerate(shape))


def shard_param(value, spec: ShardSpec, rank: int, tp: int) -> np.ndarray:
    """Rank `rank`'s piece of a full param value (numpy; a memmap is read only where the piece lies)."""
    if not 0 <= rank < tp:
        raise ValueError(f"rank {rank} is outside a tensor-parallel group of {tp}")
    if spec.kind == "replicate":
        return np.asarray(value)
    if spec.kind == "rank0":
        return np.asarray(value) if rank == 0 else np.zeros(np.shape(value), np.asarray(value).dtype)
    axis, full = spec.axis, np.shape(value)[spec.axis]
    pieces, start = [], 0
    for seg in spec.segments:
        width = seg // tp
        lo, hi = start + rank * width, start + (rank + 1) * width
        have_hi = min(hi, full)  # rows past the full size are padding: zeros
        index = [slice(None)] * np.ndim(value)
        index[axis] = slice(min(lo, full), have_hi)
        piece = np.asarray(value[tuple(index)])
        if hi - lo > piece.shape[axis]:
            pad = [(0, 0)] * piece.ndim
            pad[axis] = (0, hi - lo - piece.shape[axis])
            piece = np.pad(piece, pad)
        pieces.append(piece)
        start += seg
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)


def tp_plan(graph: Graph) -> tuple[int, dict[str, ShardSpec]] | None:
    """(tp, {param: ShardSpec}) of a graph sharded by shard_tensor_parallel; None for an unsharded graph."""
    meta = graph.meta.get(META_KEY)
    if not meta:
        return None
    try:
        tp, specs = int(meta["tp"]), {k: ShardSpec.from_json(v) for k, v in meta["params"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise IRError(f"graph.meta[{META_KEY!r}] is malformed: {e}") from None
    missing = set(graph.params) - set(specs)
    if missing:
        raise IRError(f"graph.meta[{META_KEY!r}] has no shard spec for params {sorted(missing)[:3]}")
    return tp, specs


def shard_params(graph: Graph, params: Mapping[str, Any], rank: int) -> "RankParams":
    """A lazy mapping of rank `rank`'s params: each piece is cut when it is read (one at a time on upload)."""
    plan = tp_plan(graph)
    if plan is None:
        raise IRError("shard_params: the graph is not sharded (compile with tensor_parallel=N)")
    return RankParams(graph, params, rank, *plan)


class RankParams(Mapping):
    """graph.params -> rank r's piece, cut from `full` on each read (checked against the graph's local type)."""

    def __init__(self, graph: Graph, full: Mapping[str, Any], rank: int, tp: int, specs: dict[str, ShardSpec]):
        self.graph, self.full, self.rank, self.tp, self.specs = graph, full, rank, tp, specs

    def __getitem__(self, name: str):
        if name not in self.specs:
            raise KeyError(name)
        piece = shard_param(self.full[name], self.specs[name], self.rank, self.tp)
        want = self.graph.types[name]
        if tuple(piece.shape) != tuple(want.shape):
            raise IRError(f"param {name}: rank {self.rank}'s piece is {list(piece.shape)}, the sharded graph says "
                          f"{list(want.shape)} (was the graph sharded from this model?)")
        return piece

    def __iter__(self):
        return iter(n for n in self.graph.params if n in self.full)

    def __len__(self):
        return sum(1 for _ in self)


def shard_tensor_parallel(graph: Graph, tp: int, *, axis_name: str = AXIS_NAME) -> Graph:
    """The per-rank graph of `tp`-way tensor parallelism (see the module doc); tp=1 returns the graph unchanged."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise IRError(f"tensor parallelism needs an integer tp >= 1, got {tp!r}")
    if tp == 1:
        return graph
    if META_KEY in graph.meta:
        raise IRError("the graph is already sharded for tensor parallelism")
    if "block_size" not in graph.meta:
        raise IRError("shard_tensor_parallel runs on the step graph: run insert_paged_kv first")
    return _Sharder(graph.copy(), tp, axis_name).run()


class _Sharder:
    def __init__(self, graph: Graph, tp: int, axis_name: str):
        self.g, self.tp, self.axis_name = graph, tp, axis_name
        self.layout: dict[str, str] = {}
        self.segments: dict[str, tuple[int, ...]] = {}  # sharded value -> full segment sizes along features
        self.specs: dict[str, ShardSpec] = {}
        self.full_types = {p: graph.types[p] for p in graph.params}
        self.users = graph.users()
        self.nodes: list[Node] = []

    # -- helpers ------------------------------------------------------------------------------------------------
    def fail(self, node: Node, why: str):
        raise IRError(f"tensor parallelism (tp={self.tp}) cannot shard {node.op} -> {', '.join(node.outputs)}: {why}")

    def spec(self, node: Node, param: str, spec: ShardSpec):
        if param not in self.full_types:
            self.fail(node, f"{param} must be a weight (a graph param) to be sharded")
        old = self.specs.get(param)
        if old is not None and old != spec:
            self.fail(node, f"{param} is used both as {old} and as {spec}")
        self.specs[param] = spec

    def divide(self, node: Node, n: int, what: str) -> int:
        if n % self.tp:
            self.fail(node, f"{what} ({n}) is not divisible by tp={self.tp}")
        return n // self.tp

    def lay(self, name: str) -> str:
        return self.layout.get(name, REPLICATED)

    def set_features(self, name: str, full: int):
        t = self.g.types[name]
        self.g.types[name] = TensorType((*t.shape[:-1], full // self.tp), t.dtype)

    def collective(self, op: str, partial: str, out: str, **attrs):
        self.nodes.append(Node(op, [partial], [out], {"tp": self.tp, "axis_name": self.axis_name, **attrs}))

    def fresh_like(self, name: str, hint: str, type_: TensorType | None = None) -> str:
        new = self.g.fresh_name(hint)
        self.g.types[new] = type_ or self.g.types[name]
        return new

    # -- the walk ----------------------------------------------------------------------------------------------
    def run(self) -> Graph:
        g = self.g
        for node in g.nodes:  # the common refusal first, in the model's terms
            if node.op == "paged_attention":
                hq, hkv = int(node.attrs["num_heads"]), int(node.attrs["num_kv_heads"])
                if hq % self.tp or hkv % self.tp:
                    self.fail(node, f"the model has {hq} attention heads and {hkv} KV heads; tp={self.tp} must divide "
                                    "both (each rank keeps whole heads)")
        for node in g.nodes:
            if node.op in _REFUSED:
                self.fail(node, f"{_REFUSED[node.op]} cannot be tensor-parallel in this build")
            handler = getattr(self, f"_op_{node.op}", None)
            if handler is not None:
                handler(node)
                continue
            if node.op in _ELEMENTWISE and any(self.lay(i) == SHARDED for i in node.inputs):
                self._elementwise(node)
                continue
            bad = [i for i in node.inputs if self.lay(i) != REPLICATED]
            if bad:
                self.fail(node, f"its input {bad[0]} is {self.lay(bad[0])} across ranks and this op needs it whole")
            self.nodes.append(node)
        for out in g.outputs:
            if self.lay(out) != REPLICATED:
                raise IRError(f"tensor parallelism: graph output {out} would be {self.lay(out)} across ranks")
        for p in g.params:
            self.specs.setdefault(p, ShardSpec("replicate"))
            g.types[p] = TensorType(self.specs[p].local_shape(self.full_types[p].shape, self.tp),
                                    self.full_types[p].dtype)
        g.nodes = self.nodes
        g.meta[META_KEY] = {"tp": self.tp, "axis_name": self.axis_name,
                            "params": {p: self.specs[p].to_json() for p in g.params},
                            "full_shapes": {p: list(self.full_types[p].shape) for p in g.params}}
        return g

    def _vocab_spec(self, node: Node, table: str) -> tuple[ShardSpec, int]:
        vocab = int(self.full_types[table].shape[0])
        padded = -(-vocab // self.tp) * self.tp
        return ShardSpec("split", 0, (padded,), padded if padded != vocab else None), vocab

    def _op_embed(self, node: Node):
        ids, table = node.inputs
        if self.lay(ids) != REPLICATED:
            self.fail(node, "token ids must be replicated")
        spec, _ = self._vocab_spec(node, table)
        self.spec(node, table, spec)
        partial = self.fresh_like(node.outputs[0], "embpart")
        attrs = {"tp": self.tp, "axis_name": self.axis_name}
        if node.attrs.get("scale") is not None:
            attrs["scale"] = node.attrs["scale"]
        self.nodes.append(Node("embed_shard", [ids, table], [partial], attrs))
        self.collective("all_reduce", partial, node.outputs[0])

    def _op_logits(self, node: Node):
        x, rows, weight = node.inputs
        if self.lay(x) != REPLICATED:
            self.fail(node, "the final hidden state must be replicated")
        spec, vocab = self._vocab_spec(node, weight)
        self.spec(node, weight, spec)
        out_t = self.g.types[node.outputs[0]]
        local = self.fresh_like(node.outputs[0], "logitpart",
                                TensorType((out_t.shape[0], spec.segments[0] // self.tp), out_t.dtype))
        self.nodes.append(Node("logits", [x, rows, weight], [local], dict(node.attrs)))
        self.collective("all_gather", local, node.outputs[0], axis=1, size=vocab)

    def _op_linear(self, node: Node):
        x, weight, *bias = node.inputs
        out = node.outputs[0]
        n_out, n_in = (int(d) for d in self.full_types.get(weight, self.g.types[weight]).shape)
        if self.lay(x) == REPLICATED:  # column-parallel
            readers = self.users.get(out, [])
            segments = (n_out,)
            if len(readers) == 1 and readers[0].op == "split" and int(readers[0].attrs.get("axis", -1)) == 1:
                segments = tuple(int(s) for s in readers[0].attrs["sizes"]["$tuple"])
            for s in segments:
                self.divide(node, s, f"a projection segment of {weight}")
            spec = ShardSpec("split", 0, segments)
            self.spec(node, weight, spec)
            if bias:
                self.spec(node, bias[0], spec)
            self.layout[out], self.segments[out] = SHARDED, segments
            self.set_features(out, n_out)
            self.nodes.append(node)
        elif self.lay(x) == SHARDED:  # row-parallel
            segments = self.segments[x]
            self.spec(node, weight, ShardSpec("split", 1, segments))
            if bias:
                self.spec(node, bias[0], ShardSpec("rank0"))
            partial = self.fresh_like(out, "rowpart")
            self.nodes.append(Node("linear", [x, weight, *bias], [partial], dict(node.attrs)))
            self.collective("all_reduce", partial, out)
        else:
            self.fail(node, "its input is a partial sum")

    def _op_split(self, node: Node):
        (x,) = node.inputs
        if self.lay(x) != SHARDED:
            return self._replicated(node)
        sizes = tuple(int(s) for s in node.attrs["sizes"]["$tuple"])
        if int(node.attrs.get("axis", -1)) != 1 or sizes != self.segments[x]:
            self.fail(node, f"it splits {sizes} but the sharded value is made of segments {self.segments[x]}")
        attrs = dict(node.attrs)
        attrs["sizes"] = {"$tuple": [s // self.tp for s in sizes]}
        for out, s in zip(node.outputs, sizes):
            self.layout[out], self.segments[out] = SHARDED, (s,)
            self.set_features(out, s)
        self.nodes.append(Node(node.op, list(node.inputs), list(node.outputs), attrs))

    def _heads_op(self, node: Node, keys: tuple[str, ...]):
        x = node.inputs[0]
        if self.lay(x) != SHARDED:
            return self._replicated(node)
        attrs = dict(node.attrs)
        for key in keys:
            attrs[key] = self.divide(node, int(attrs[key]), key)
        out = node.outputs[0]
        self.layout[out], self.segments[out] = SHARDED, self.segments[x]
        self.set_features(out, sum(self.segments[x]))
        self.nodes.append(Node(node.op, list(node.inputs), list(node.outputs), attrs))

    def _op_rope(self, node: Node):
        self._heads_op(node, ("num_heads",))

    def _op_head_rms_norm(self, node: Node):
        self._heads_op(node, ())

    def _elementwise(self, node: Node):
        lays = {self.lay(i) for i in node.inputs if self.g.types[i].shape != ()}
        if lays == {REPLICATED}:
            return self._replicated(node)
        if lays != {SHARDED}:
            self.fail(node, "it mixes sharded values with whole or partial ones")
        segs = {self.segments[i] for i in node.inputs if self.g.types[i].shape != ()}
        if len(segs) != 1:
            self.fail(node, f"its inputs are sharded differently ({sorted(segs)})")
        seg = segs.pop()
        for out in node.outputs:
            self.layout[out], self.segments[out] = SHARDED, seg
            self.set_features(out, sum(seg))
        self.nodes.append(node)

    def _op_kv_write(self, node: Node):
        k, v, slots, k_pool, v_pool, *scales = node.inputs
        if node.attrs.get("kv_format") or scales:
            self.fail(node, "a quantized KV cache cannot be tensor-parallel in this build")
        if self.lay(k) != SHARDED or self.lay(v) != SHARDED:
            self.fail(node, "K and V must come from column-parallel projections")
        pool_t = self.g.types[k_pool]
        heads = self.divide(node, int(pool_t.shape[2]), "the number of KV heads")
        local = TensorType((*pool_t.shape[:2], heads, *pool_t.shape[3:]), pool_t.dtype)
        for name in (k_pool, v_pool, *node.outputs):
            self.g.types[name] = local
        self.nodes.append(node)

    def _op_paged_attention(self, node: Node):
        q = node.inputs[0]
        if self.lay(q) != SHARDED:
            self.fail(node, "queries must come from a column-parallel projection")
        if node.attrs.get("kv_format"):
            self.fail(node, "a quantized KV cache cannot be tensor-parallel in this build")
        attrs = dict(node.attrs)
        attrs["num_heads"] = self.divide(node, int(attrs["num_heads"]), "the number of attention heads")
        attrs["num_kv_heads"] = self.divide(node, int(attrs["num_kv_heads"]), "the number of KV heads")
        out = node.outputs[0]
        self.layout[out], self.segments[out] = SHARDED, (int(node.attrs["num_heads"]) * int(node.attrs["head_dim"]),)
        self.set_features(out, self.segments[out][0])
        self.nodes.append(Node(node.op, list(node.inputs), list(node.outputs), attrs))

    def _replicated(self, node: Node):
        bad = [i for i in node.inputs if self.lay(i) != REPLICATED]
        if bad:
            self.fail(node, f"its input {bad[0]} is {self.lay(bad[0])} across ranks")
        self.nodes.append(node)
