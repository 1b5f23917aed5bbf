"""The quantization passes: rotate_kv (Hadamard rotation of K/V head dims), quantize_weights (linear ->
qlinear with packed params, RTN or GPTQ), quantize_kv (KV pools in fp8 / nvfp4 with calibrated scales),
and quantize_model, which runs them with calibration and the accuracy guard (lowering/quant/guard.py).

They run after insert_paged_kv on a graph whose params are materialized (numpy arrays by name).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from lowering.ir import Graph, IRError, Node, TensorType
from lowering.passes.rewrite import eliminate_dead_code
from lowering.quant import formats

ROTATION_PARAM = "kv.rotation"
UNQUANTIZED = "none"
_NO_QUANT_NAMES = (None, "none", "bf16", "bfloat16", "float16", "fp16", "float32", "fp32", "float")
METHODS = ("auto", "rtn", "gptq")
GPTQ_FORMATS = ("int4", "nvfp4", "fp8")  # the formats "auto" quantizes with GPTQ


class QuantError(ValueError):
    """A quantization request that cannot be satisfied: unknown format, bad override, unsupported graph."""


def normalize_format(value: Any, *, what: str, allowed: tuple[str, ...]) -> str:
    """A user format name -> one of `allowed` or UNQUANTIZED ("none")."""
    if isinstance(value, str):
        value = value.strip().lower()
    if value in _NO_QUANT_NAMES:
        return UNQUANTIZED
    if value not in allowed:
        raise QuantError(f"unknown {what} format {value!r}; choose one of {', '.join(allowed)} or None "
                         "(keep the model's dtype)")
    return value


# ------------------------------------------------------------------------------------------ units

@dataclasses.dataclass
class WeightUnit:
    """One quantizable weight: a linear node's weight, or the logits weight ("lm_head")."""

    name: str  # the weight param name without ".weight"; "lm_head" for the logits weight
    node_index: int
    param: str
    input_value: str  # the activation the node multiplies (its Hessian source for GPTQ)
    shape: tuple[int, int]
    format: str = UNQUANTIZED  # requested
    skip_reason: str | None = None


def weight_units(graph: Graph) -> list[WeightUnit]:
    units = []
    params = set(graph.params)
    for i, node in enumerate(graph.nodes):
        if node.op == "linear":
            param, name = node.inputs[1], node.inputs[1].removesuffix(".weight")
        elif node.op == "logits":
            param, name = node.inputs[2], "lm_head"
        else:
            continue
        if param not in params or len(graph.types[param].shape) != 2:
            continue
        shape = tuple(int(d) for d in graph.types[param].shape)
        units.append(WeightUnit(name, i, param, node.inputs[0], shape))
    return units


def resolve_weight_plan(units: list[WeightUnit], weights: Any) -> None:
    """Set each unit's requested format from `weights`: one format for every linear but the logits weight,
    or {glob pattern: format} where later patterns override earlier ones ("lm_head" names the logits
    weight, which a "*" pattern also matches)."""
    if weights is None:
        return
    if isinstance(weights, str):
        # the logits weight stays in the model dtype unless named (as GPTQ/AWQ/vLLM checkpoints do): it is
        # the most sensitive matrix, and a tied one would need a second, quantized copy of the embedding
        weights = {"*": weights, "lm_head": None}
    if not isinstance(weights, Mapping):
        raise QuantError(f"weights must be a format name or a {{pattern: format}} dict, got {type(weights).__name__}")
    rules = [(str(p), normalize_format(f, what="weight", allowed=formats.WEIGHT_FORMATS)) for p, f in weights.items()]
    for pattern, _ in rules:
        if not any(fnmatch.fnmatchcase(u.name, pattern) or fnmatch.fnmatchcase(u.param, pattern) for u in units):
            raise QuantError(f"weights override {pattern!r} matches no linear layer; names look like "
                             f"{units[0].name!r}{' or lm_head' if any(u.name == 'lm_head' for u in units) else ''}"
                             if units else f"weights override {pattern!r}: the graph has no linear layers")
    for u in units:
        for pattern, fmt in rules:
            if fnmatch.fnmatchcase(u.name, pattern) or fnmatch.fnmatchcase(u.param, pattern):
                u.format = fmt
        if u.format != UNQUANTIZED and not formats.supports(u.format, u.shape):
            try:
                formats.check_weight_format(u.format, u.shape)
            except formats.FormatError as e:
                u.skip_reason = str(e)
            u.format = UNQUANTIZED


@dataclasses.dataclass
class KVLayer:
    layer: int
    kv_write: int  # node indices
    attention: int
    num_kv_heads: int
    head_dim: int
    format: str = UNQUANTIZED

    @property
    def name(self) -> str:
        return f"kv.{self.layer}"


def kv_layers(graph: Graph) -> list[KVLayer]:
    users = graph.users()
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    layers = []
    for i, node in enumerate(graph.nodes):
        if node.op not in ("kv_write", "kv_write_nvfp4"):
            continue
        pool = node.inputs[3]
        if not (pool.startswith("kv.") and pool.endswith(".k")):
            raise IRError(f"kv_write node {i} writes {pool!r}, not a kv.<layer>.k pool")
        layer = int(pool.split(".")[1])
        att = [u for u in users.get(node.outputs[0], []) if u.op == "paged_attention"]
        if len(att) != 1:
            raise IRError(f"KV layer {layer}: expected one paged_attention reading its pool, found {len(att)}")
        t = graph.types[pool]
        fmt = node.attrs.get("kv_format") or ("nvfp4" if node.op == "kv_write_nvfp4" else UNQUANTIZED)
        layers.append(KVLayer(layer, i, index[id(att[0])], int(t.shape[2]), int(att[0].attrs["head_dim"]), fmt))
    return layers


# ------------------------------------------------------------------------------------------ rotate_kv

def rotate_kv(graph: Graph, params: dict[str, np.ndarray], *, seed: int = 0) -> tuple[Graph, dict]:
    """Rotate K and V head vectors by one random-sign Hadamard matrix R (orthonormal, D x D).

    q and k are rotated after RoPE (rotate_heads nodes), which leaves every score q.k unchanged; V's
    rotation is folded into the rows of its projection weight and R^T into the columns of the output
    projection, so the attention output is unchanged too. Quantizing K/V in the rotated basis spreads
    outlier channels over the whole head (QuaRot-style), which 4-bit KV needs.
    """
    layers = kv_layers(graph)
    if not layers:
        raise QuantError("kv rotation needs a paged graph with KV layers")
    if any(lay.format != UNQUANTIZED for lay in layers) or ROTATION_PARAM in graph.params:
        raise QuantError("rotate_kv must run before quantize_kv, once")
    head_dims = {lay.head_dim for lay in layers}
    if len(head_dims) != 1:
        raise QuantError(f"kv rotation needs one head_dim across layers, got {sorted(head_dims)}")
    d = head_dims.pop()
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=d)
    rot = (signs[:, None] * formats.hadamard(d)).astype(np.float32)  # diag(s) H: orthonormal
    graph = graph.copy()
    params = dict(params)
    graph.params.append(ROTATION_PARAM)
    graph.types[ROTATION_PARAM] = TensorType((d, d), "float32")
    params[ROTATION_PARAM] = rot
    producers, users = graph.producers(), graph.users()
    param_users = {p: len(users.get(p, [])) for p in graph.params}
    inserts: dict[int, list[Node]] = {}  # node id -> nodes to insert before it
    after: dict[int, list[Node]] = {}

    def rotated(value: str, heads: int, matrix: str = ROTATION_PARAM) -> tuple[str, Node]:
        out = graph.fresh_name("rot")
        graph.types[out] = graph.types[value]
        return out, Node("rotate_heads", [value, matrix], [out], {"num_heads": heads, "head_dim": d})

    for lay in layers:
        kvw, att = graph.nodes[lay.kv_write], graph.nodes[lay.attention]
        hq, hkv = int(att.attrs["num_heads"]), lay.num_kv_heads
        k_rot, k_node = rotated(kvw.inputs[0], hkv)
        q_rot, q_node = rotated(att.inputs[0], hq)
        inserts.setdefault(id(kvw), []).append(k_node)
        inserts.setdefault(id(att), []).append(q_node)
        kvw.inputs[0], att.inputs[0] = k_rot, q_rot
        if not _fold_v(graph, params, producers, param_users, kvw.inputs[1], hkv, d, rot):
            v_rot, v_node = rotated(kvw.inputs[1], hkv)
            inserts[id(kvw)].append(v_node)
            kvw.inputs[1] = v_rot
        if not _fold_o(graph, params, users, param_users, att.outputs[0], hq, d, rot):
            if ROTATION_PARAM + "_t" not in graph.params:
                graph.params.append(ROTATION_PARAM + "_t")
                graph.types[ROTATION_PARAM + "_t"] = TensorType((d, d), "float32")
                params[ROTATION_PARAM + "_t"] = np.ascontiguousarray(rot.T)
            o = att.outputs[0]
            o_inner = graph.fresh_name("att")
            graph.types[o_inner] = graph.types[o]
            att.outputs[0] = o_inner
            after[id(att)] = [Node("rotate_heads", [o_inner, ROTATION_PARAM + "_t"], [o],
                                   {"num_heads": hq, "head_dim": d})]
    nodes = []
    for node in graph.nodes:
        nodes.extend(inserts.get(id(node), []))
        nodes.append(node)
        nodes.extend(after.get(id(node), []))
    graph.nodes = nodes
    graph.meta["kv_rotation"] = {"kind": "random-sign hadamard", "head_dim": d, "seed": seed}
    return graph, params


def _fold_v(graph, params, producers, param_users, v, heads, d, rot) -> bool:
    """v_h <- v_h R by rotating the rows of v's projection weight (and bias); False if v's producer is not a
    linear (or a split of one) whose weight nothing else uses."""
    node, offset = producers.get(v), 0
    if node is not None and node.op == "split" and node.attrs.get("axis") == 1:
        sizes = [int(s) for s in node.attrs["sizes"]["$tuple"]]
        offset = sum(sizes[:node.outputs.index(v)])
        node = producers.get(node.inputs[0])
    if node is None or node.op != "linear" or any(param_users.get(p, 0) != 1 for p in node.inputs[1:]):
        return False
    if not all(p in params for p in node.inputs[1:]):
        return False
    rows = heads * d
    w = np.array(params[node.inputs[1]], np.float32)
    block = w[offset:offset + rows].reshape(heads, d, -1)
    w[offset:offset + rows] = np.einsum("de,hdk->hek", rot, block).reshape(rows, -1)
    params[node.inputs[1]] = w.astype(params[node.inputs[1]].dtype)
    if len(node.inputs) > 2:
        b = np.array(params[node.inputs[2]], np.float32)
        b[offset:offset + rows] = np.einsum("de,hd->he", rot, b[offset:offset + rows].reshape(heads, d)).reshape(-1)
        params[node.inputs[2]] = b.astype(params[node.inputs[2]].dtype)
    return True


def _fold_o(graph, params, users, param_users, o, heads, d, rot) -> bool:
    """The attention output arrives rotated (o_h R): fold R^T into the output projection's columns."""
    readers = users.get(o, [])
    if len(readers) != 1 or readers[0].op != "linear" or readers[0].inputs[0] != o:
        return False
    node = readers[0]
    if param_users.get(node.inputs[1], 0) != 1 or node.inputs[1] not in params:
        return False
    w = np.array(params[node.inputs[1]], np.float32)  # [M, Hq * D]
    w = np.einsum("mhd,de->mhe", w.reshape(w.shape[0], heads, d), rot).reshape(w.shape[0], heads * d)
    params[node.inputs[1]] = w.astype(params[node.inputs[1]].dtype)
    return True


# ------------------------------------------------------------------------------------------ rewrites

def apply_weight_quantization(graph: Graph, params: dict, quantized: Mapping[str, tuple[str, dict]]) -> tuple[Graph, dict]:
    """quantized: unit name -> (format, parts). linear -> qlinear, logits -> qlogits with the parts as params
    named "<weight param>.<part>"; weights nothing else reads are dropped."""
    graph = graph.copy()
    params = dict(params)
    by_index = {u.node_index: u for u in weight_units(graph) if u.name in quantized}
    for i, unit in by_index.items():
        node = graph.nodes[i]
        fmt, parts = quantized[unit.name]
        names = []
        for part, (shape, dtype) in formats.weight_part_types(fmt, unit.shape).items():
            name = f"{unit.param}.{part}" if unit.name != "lm_head" else f"lm_head.{part}"
            if tuple(parts[part].shape) != tuple(shape) or parts[part].dtype.name != dtype:
                raise QuantError(f"{unit.name}: {fmt} part {part} is {parts[part].dtype}{list(parts[part].shape)}, "
                                 f"expected {dtype}{list(shape)}")
            graph.params.append(name)
            graph.types[name] = TensorType(tuple(shape), dtype)
            params[name] = parts[part]
            names.append(name)
        attrs = {"format": fmt, "in_features": unit.shape[1], "out_features": unit.shape[0]}
        if fmt == "int4":
            attrs["group_size"] = unit.shape[1] // parts["scale"].shape[1]
        if fmt == "fp8":
            attrs["act_format"] = "fp8"
        if node.op == "linear":
            graph.nodes[i] = Node("qlinear", [node.inputs[0], *names, *node.inputs[2:]], node.outputs, attrs)
        else:
            graph.nodes[i] = Node("qlogits", [node.inputs[0], node.inputs[1], *names], node.outputs, attrs)
    eliminate_dead_code(graph)
    params = {k: v for k, v in params.items() if k in set(graph.params)}
    return graph, params


def apply_kv_quantization(graph: Graph, params: dict, plan: Mapping[int, str],
                          scales: Mapping[int, tuple[np.ndarray, np.ndarray]],
                          centers: Mapping[int, np.ndarray] | None = None,
                          scale_rule: str = "amax", feedback: Mapping[int, np.ndarray] | None = None
                          ) -> tuple[Graph, dict]:
    """plan: layer -> "fp8" | "nvfp4"; scales: layer -> (k, v) scales (fp8: f32[Hkv]; nvfp4: f32[] global).
    nvfp4 only: centers: layer -> f32[Hkv, Dh] subtracted from K before it is quantized (param
    kv.<layer>.k_center, kv_write_nvfp4's 10th input); scale_rule: how block scales are chosen on write
    (formats.nvfp4_block_scales; kv_write_nvfp4's attribute); feedback: layer -> f32[Hkv, Dh, Dh] factors of
    score-aware K rounding (formats.feedback_factor; param kv.<layer>.k_feedback, kv_write_nvfp4's 11th input,
    after a center: zeros when none was given)."""
    formats.check_scale_rule(scale_rule)
    graph = graph.copy()
    params = dict(params)
    for lay in kv_layers(graph):
        fmt = plan.get(lay.layer, UNQUANTIZED)
        if fmt == UNQUANTIZED:
            continue
        if lay.format != UNQUANTIZED:
            raise QuantError(f"KV layer {lay.layer} is already {lay.format}")
        kvw, att = graph.nodes[lay.kv_write], graph.nodes[lay.attention]
        k_pool, v_pool = kvw.inputs[3], kvw.inputs[4]
        new_k, new_v = kvw.outputs
        n, bs, h, d = graph.types[k_pool].shape
        scale_names = [f"kv.{lay.layer}.k_scale", f"kv.{lay.layer}.v_scale"]
        k_s, v_s = scales[lay.layer]
        for name, value in zip(scale_names, (k_s, v_s)):
            value = np.asarray(value, np.float32).reshape((h,) if fmt == "fp8" else ())
            graph.params.append(name)
            graph.types[name] = TensorType(tuple(value.shape), "float32")
            params[name] = value
        if fmt == "fp8":
            pool_t = TensorType((n, bs, h, d), "float8_e4m3fn")
            for name in (k_pool, v_pool, new_k, new_v):
                graph.types[name] = pool_t
            kvw.inputs = kvw.inputs[:5] + scale_names
            kvw.attrs = {"kv_format": "fp8"}
            att.inputs = att.inputs[:6] + scale_names
            att.attrs = {**att.attrs, "kv_format": "fp8"}
            continue
        if d % formats.NVFP4_BLOCK:
            raise QuantError(f"nvfp4 KV needs head_dim divisible by {formats.NVFP4_BLOCK}, got {d}")
        pool_t = TensorType((n, bs, h, d // 2), "uint8")
        bs_t = TensorType((n, bs, h, d // formats.NVFP4_BLOCK), "float8_e4m3fn")
        for name in (k_pool, v_pool, new_k, new_v):
            graph.types[name] = pool_t
        k_bs, v_bs = f"kv.{lay.layer}.k_block_scale", f"kv.{lay.layer}.v_block_scale"
        new_kbs, new_vbs = graph.add_state(k_bs, bs_t, "kbscale"), graph.add_state(v_bs, bs_t, "vbscale")
        center = []
        has_feedback = feedback is not None and lay.layer in feedback
        if (centers is not None and lay.layer in centers) or has_feedback:
            name = f"kv.{lay.layer}.k_center"
            graph.params.append(name)
            graph.types[name] = TensorType((h, d), "float32")
            given = centers.get(lay.layer) if centers is not None else None
            params[name] = (np.asarray(given, np.float32).reshape(h, d) if given is not None
                            else np.zeros((h, d), np.float32))
            center = [name]
        if has_feedback:
            name = f"kv.{lay.layer}.k_feedback"
            graph.params.append(name)
            graph.types[name] = TensorType((h, d, d), "float32")
            params[name] = np.asarray(feedback[lay.layer], np.float32).reshape(h, d, d)
            center.append(name)
        graph.nodes[lay.kv_write] = Node("kv_write_nvfp4", kvw.inputs[:5] + [k_bs, v_bs] + scale_names + center,
                                         [new_k, new_v, new_kbs, new_vbs],
                                         {"scale_rule": scale_rule} if scale_rule != "amax" else {})
        att.inputs = att.inputs[:6] + [new_kbs, new_vbs] + scale_names
        att.attrs = {**att.attrs, "kv_format": "nvfp4"}
    graph.meta["kv_formats"] = {str(lay.layer): lay.format for lay in kv_layers(graph)}
    return graph, params


# ------------------------------------------------------------------------------------------ quantize_model

# How nvfp4 K is rounded on write: "score" quantizes each key with GPTQ's error feedback against the second
# moment of the calibration queries that read it (formats.quantize_nvfp4_feedback: the expected squared score
# error, not the key's own error, is minimized); "nearest" codes each value on its own.
KV_ROUNDINGS = ("nearest", "score")


@dataclasses.dataclass
class QuantOptions:
    """What compile_model(weights=..., kv_cache=...) asked for."""

    weights: Any = None  # format name | {pattern: format} | None
    kv_cache: str | None = None  # "fp8" | "nvfp4" | None
    kv_rotation: bool = False
    kv_rounding: str = "nearest"  # nvfp4 K codes: "nearest" | "score" (formats.quantize_nvfp4_feedback)
    method: str = "auto"  # "auto" (GPTQ for int4/nvfp4/fp8, RTN for int8) | "rtn" | "gptq"
    max_ppl_increase: float | None = 0.01  # None: no accuracy guard
    calibration: Any = None  # None (bundled text) | text | path | token id sequences
    calibration_windows: int = 8
    calibration_window: int = 128
    guard_windows: int = 4  # of the calibration windows, how many the guard's loss measurements use

    def validate(self) -> "QuantOptions":
        if self.method not in METHODS:
            raise QuantError(f"quant method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.max_ppl_increase is not None and not (isinstance(self.max_ppl_increase, (int, float))
                                                      and self.max_ppl_increase >= 0):
            raise QuantError(f"max_ppl_increase must be a number >= 0 or None, got {self.max_ppl_increase!r}")
        normalize_format(self.kv_cache, what="kv_cache", allowed=formats.KV_FORMATS)
        if self.kv_rounding not in KV_ROUNDINGS:
            raise QuantError(f"kv_rounding must be one of {', '.join(KV_ROUNDINGS)}, got {self.kv_rounding!r}")
        if isinstance(self.weights, str) or self.weights is None:
            normalize_format(self.weights, what="weight", allowed=formats.WEIGHT_FORMATS)
        for name in ("calibration_windows", "calibration_window", "guard_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (2 if name == "calibration_window" else 1):
                raise QuantError(f"{name} must be a positive integer, got {value!r}")
        return self

    @property
    def active(self) -> bool:
        kv = normalize_format(self.kv_cache, what="kv_cache", allowed=formats.KV_FORMATS)
        if isinstance(self.weights, Mapping):
            wq = any(normalize_format(f, what="weight", allowed=formats.WEIGHT_FORMATS) != UNQUANTIZED
                     for f in self.weights.values())
        else:
            wq = normalize_format(self.weights, what="weight", allowed=formats.WEIGHT_FORMATS) != UNQUANTIZED
        return wq or kv != UNQUANTIZED or self.kv_rotation


def quantize_model(graph: Graph, params: Mapping[str, Any], options: QuantOptions, *, tokenizer=None,
                   vocab_size: int | None = None, log=None) -> tuple[Graph, dict, "Any"]:
    """rotate_kv -> calibrate -> quantize weights (RTN/GPTQ) -> accuracy guard -> rewrite. Returns
    (graph, params, QuantReport)."""
    from lowering.quant import calibrate
    from lowering.quant.guard import QuantReport, run_guard

    options.validate()
    start = time.perf_counter()
    log = log or (lambda msg: print(f"llmc: {msg}", file=sys.stderr))
    params = {k: np.asarray(v) for k, v in params.items()}
    if options.kv_rotation:
        graph, params = rotate_kv(graph, params)
    units = weight_units(graph)
    resolve_weight_plan(units, options.weights)
    kv_fmt = normalize_format(options.kv_cache, what="kv_cache", allowed=formats.KV_FORMATS)
    layers = kv_layers(graph)
    if kv_fmt == "nvfp4" and layers and layers[0].head_dim % formats.NVFP4_BLOCK:
        raise QuantError(f"nvfp4 KV needs head_dim divisible by {formats.NVFP4_BLOCK}, got {layers[0].head_dim}")
    for lay in layers:
        lay.format = kv_fmt
    active_units = [u for u in units if u.format != UNQUANTIZED]
    # GPTQ ("auto" and "gptq") is for the 4-bit formats and fp8, whose e4m3 grid (3 mantissa bits) rounds
    # far coarser than int8 and which quantizes activations too (W8A8); int8 always uses RTN
    methods = {u.name: "gptq" if options.method != "rtn" and u.format in GPTQ_FORMATS else "rtn"
               for u in active_units}
    needs_calibration = (kv_fmt != UNQUANTIZED or "gptq" in methods.values()
                         or (options.max_ppl_increase is not None and active_units))
    runner = windows = None
    calib_source = "none"
    if needs_calibration:
        windows = calibrate.calibration_windows(options.calibration, tokenizer, window=options.calibration_window,
                                                num_windows=options.calibration_windows, vocab_size=vocab_size)
        if options.calibration is None:
            calib_source = "bundled text" if tokenizer is not None else "random tokens"
        else:
            calib_source = "user text" if isinstance(options.calibration, (str, Path)) else "user tokens"
        runner = calibrate.GraphRunner(graph, params, windows)
        log(f"quantize: calibrating on {sum(w.size for w in windows)} tokens ({calib_source})")

    # KV scales from calibration: amax per KV head (fp8) / per layer (nvfp4)
    kv_scales: dict[int, tuple] = {}
    kv_amax: dict[int, tuple] = {}
    kv_centers: dict[int, np.ndarray] = {}  # nvfp4: layer -> f32[Hkv, Dh] mean key
    kv_feedback: dict[int, np.ndarray] = {}  # nvfp4, kv_rounding "score": layer -> f32[Hkv, Dh, Dh]
    if layers and runner is not None:
        names = []
        for lay in layers:
            names += graph.nodes[lay.kv_write].inputs[:2]
        heads = {n: lay.num_kv_heads for lay in layers for n in graph.nodes[lay.kv_write].inputs[:2]}
        # per channel (sum, max, min) of every K and V: amax = max(max, -min); the mean for K centering
        stats = runner.collect(names, lambda n, x: _channel_sum_max_min(x, heads[n]), _combine_sum_max_min)
        for lay in layers:
            k_st, v_st = (np.asarray(stats[n], np.float64) for n in graph.nodes[lay.kv_write].inputs[:2])
            kv_amax[lay.layer] = tuple(np.maximum(st[1], -st[2]).max(axis=-1).astype(np.float32)
                                       for st in (k_st, v_st))
            kv_scales[lay.layer] = tuple(
                formats.fp8_scale(a) if kv_fmt != "nvfp4" else formats.nvfp4_global_scale(a.max())
                for a in kv_amax[lay.layer])
            if kv_fmt == "nvfp4":
                # K centering: keys minus their calibration mean (per KV head and channel, after RoPE and any
                # rotation) leave attention unchanged and quantize better; K's global scale then comes from
                # the centered amax (per channel max |x - c| = max(max x - c, c - min x)).
                center = (k_st[0] / max(runner.num_tokens, 1)).astype(np.float32)
                kv_centers[lay.layer] = center
                k_amax = np.maximum(k_st[1] - center, center - k_st[2]).max()
                kv_scales[lay.layer] = (formats.nvfp4_global_scale(k_amax), kv_scales[lay.layer][1])
        if kv_fmt == "nvfp4" and options.kv_rounding == "score":
            kv_feedback = query_feedback(graph, runner, layers)

    # weights: RTN or GPTQ per unit
    quantized: dict[str, tuple[str, dict]] = {}
    gptq_units = [u for u in active_units if methods[u.name] == "gptq"]
    hessians: dict[str, np.ndarray] = {}
    if gptq_units:
        from lowering.quant.gptq import gptq_quantize

        sources = sorted({u.input_value for u in gptq_units})
        t0 = time.perf_counter()
        hessians = runner.collect(sources, lambda n, x: x.T @ x, lambda a, b: a + b)
        log(f"quantize: {len(sources)} input Hessians in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    for u in active_units:
        w = np.asarray(params[u.param], np.float32)
        if methods[u.name] == "gptq":
            quantized[u.name] = (u.format, gptq_quantize(w, np.asarray(hessians[u.input_value], np.float64), u.format))
        else:
            quantized[u.name] = (u.format, formats.quantize_weight(w, u.format))
    if active_units:
        log(f"quantize: {len(active_units)} weights ({', '.join(sorted({u.format for u in active_units}))}) "
            f"in {time.perf_counter() - t0:.1f} s")

    # accuracy guard: decide which units stay in higher precision
    kv_plan = {lay.layer: lay.format for lay in layers}
    guard = run_guard(runner, graph, params, units, quantized, layers, kv_scales, options, log, kv_centers,
                      kv_feedback) \
        if options.max_ppl_increase is not None and runner is not None and (active_units or kv_fmt != UNQUANTIZED) \
        else None
    kept = set(guard.kept) if guard else set()
    final_weights = {name: q for name, q in quantized.items() if name not in kept}
    kv_plan = {layer: fmt for layer, fmt in kv_plan.items() if f"kv.{layer}" not in kept}

    new_graph, new_params = apply_weight_quantization(graph, params, final_weights)
    new_graph, new_params = apply_kv_quantization(new_graph, new_params, kv_plan, kv_scales, kv_centers,
                                                  formats.KV_NVFP4_SCALE_RULE, kv_feedback)

    measured = None
    if runner is not None:  # the real quantized graph on the guard's windows
        final_runner = calibrate.GraphRunner(new_graph, new_params, windows[:options.guard_windows])
        base_loss = guard.base_loss if guard else calibrate.GraphRunner(graph, params, final_runner.windows).loss()
        measured = (base_loss, final_runner.loss())
    report = QuantReport.build(options, units, methods, final_weights, layers, kv_plan, guard, measured,
                               graph, params, new_graph, new_params, calib_source,
                               sum(w.size for w in windows) if windows else 0, time.perf_counter() - start)
    return new_graph, new_params, report


def query_feedback(graph: Graph, runner, layers) -> dict[int, np.ndarray]:
    """layer -> f32[Hkv, Dh, Dh]: formats.feedback_factor of the second moment E[q q^T] of the queries each KV
    head's keys meet (its GQA group's q heads, as the attention reads them: after RoPE and any rotation) over
    the calibration windows."""
    import jax.numpy as jnp

    names, shape = [], {}
    for lay in layers:
        q = graph.nodes[lay.attention].inputs[0]
        names.append(q)
        shape[q] = (lay.num_kv_heads, lay.head_dim)

    def moment(name, x):
        hkv, d = shape[name]
        xh = x.reshape(x.shape[0], hkv, -1, d)  # [T, Hkv, group, Dh]
        return jnp.einsum("tkgd,tkge->kde", xh, xh)

    stats = runner.collect(names, moment)
    return {lay.layer: formats.feedback_factor(stats[q]) for lay, q in zip(layers, names)}


def _channel_sum_max_min(x, heads: int):
    import jax.numpy as jnp

    xh = x.reshape(x.shape[0], heads, -1)
    return jnp.stack([jnp.sum(xh, axis=0), jnp.max(xh, axis=0), jnp.min(xh, axis=0)])


def _combine_sum_max_min(a, b):
    return np.stack([a[0] + b[0], np.maximum(a[1], b[1]), np.minimum(a[2], b[2])])

