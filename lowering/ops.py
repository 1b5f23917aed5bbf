"""The op registry: semantic ops (JAX primitives with a jnp reference and a shape rule) and generic ops."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from lowering.quant import formats

# A dim is an int or a symbol expression such as "T" or "S + 1".
Dim = int | str
Shape = tuple[Dim, ...]


class OpError(ValueError):
    """An op was given inputs or attributes it does not accept."""


@dataclasses.dataclass(frozen=True)
class OpDef:
    """One op: its reference, its shape/dtype rule, and the attributes it takes.

    `ref(*arrays, **attrs)` returns one array or a tuple (num_outputs > 1).
    `shape_rule(in_types, attrs)` maps [(shape, dtype)] to [(shape, dtype)] for the outputs.
    `attrs` names each attribute and its Python type(s); an attribute listed in `optional_attrs`
    may be absent or None.
    """

    name: str
    ref: Callable[..., Any]
    shape_rule: Callable[[list[tuple[Shape, str]], dict[str, Any]], list[tuple[Shape, str]]] | None
    attrs: dict[str, tuple[type, ...]]
    num_outputs: int = 1
    optional_attrs: frozenset[str] = frozenset()
    semantic: bool = True
    primitive: Primitive | None = None

    def check_attrs(self, attrs: dict[str, Any]) -> None:
        missing = set(self.attrs) - set(attrs) - self.optional_attrs
        if missing:
            raise OpError(f"op {self.name!r} is missing attributes {sorted(missing)}")
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise OpError(f"op {self.name!r} got unknown attributes {sorted(unknown)}")
        for key, value in attrs.items():
            if value is None and key in self.optional_attrs:
                continue
            if not isinstance(value, self.attrs[key]):
                raise OpError(f"op {self.name!r} attribute {key!r} must be {self.attrs[key]}, got {value!r}")


REGISTRY: dict[str, OpDef] = {}


def get_op(name: str) -> OpDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise OpError(f"unknown op {name!r}") from None


# ---------------------------------------------------------------------------------------------
# Registration: a semantic op is a JAX primitive, so `jax.make_jaxpr` keeps it as one equation.
# ---------------------------------------------------------------------------------------------


def _register(name, ref, shape_rule, attrs, *, num_outputs=1, optional_attrs=()):
    multi = num_outputs != 1
    prim = Primitive(f"llmc.{name}")
    prim.multiple_results = multi

    def impl(*args, **kw):
        return ref(*args, **kw)

    def abstract_eval(*avals, **kw):
        outs = shape_rule([(tuple(a.shape), jnp.dtype(a.dtype).name) for a in avals], kw)
        shaped = [jax.core.ShapedArray(s, jnp.dtype(d)) for s, d in outs]
        return shaped if multi else shaped[0]

    prim.def_impl(impl)
    prim.def_abstract_eval(abstract_eval)
    mlir.register_lowering(prim, mlir.lower_fun(ref, multiple_results=multi))
    op = OpDef(name, ref, shape_rule, attrs, num_outputs, frozenset(optional_attrs), True, prim)
    REGISTRY[name] = op
    return op


def _clean_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """Primitive params must be hashable: dicts become sorted tuples of pairs."""
    out = {}
    for k, v in attrs.items():
        if isinstance(v, dict):  # list values (LongRoPE's factors) become tuples too
            v = tuple(sorted((kk, tuple(vv) if isinstance(vv, list) else vv) for kk, vv in v.items()))
        elif isinstance(v, list):
            v = tuple(v)
        out[k] = v
    return out


def _bind(op: OpDef, *args, **attrs):
    attrs = {k: v for k, v in attrs.items() if not (v is None and k in op.optional_attrs)}
    op.check_attrs({k: (dict(v) if isinstance(v, tuple) and k in _DICT_ATTRS else v) for k, v in attrs.items()})
    return op.primitive.bind(*args, **_clean_attrs(attrs))


# Attributes carried as dicts in the IR but as tuples of pairs inside JAX primitives.
_DICT_ATTRS = {"rope_scaling"}


def _as_dict(value) -> dict | None:
    if value is None:
        return None
    return dict(value) if not isinstance(value, dict) else value


# ---------------------------------------------------------------------------------------------
# Semantic op references. Activations are 2-D [T, features]; heads are flattened into features.
# ---------------------------------------------------------------------------------------------


def ref_embed(token_ids, table, *, scale=None):
    # token_ids: i32[T]  table: [V, D]  ->  [T, D]
    # scale (Gemma: sqrt(D)): every row times the scale, which is rounded to the table's dtype first, as HF does
    rows = jnp.take(table, token_ids, axis=0, mode="clip")
    if scale is None:
        return rows
    return rows * jnp.asarray(scale, dtype=table.dtype)


def _embed_shape(ts, attrs):
    (ids_shape, _), (tab_shape, tab_dtype) = ts
    return [((ids_shape[0], tab_shape[1]), tab_dtype)]


def ref_embed_shard(token_ids, table, *, tp, axis_name, scale=None):
    # token_ids: i32[T]  table: [V / tp, D], this rank's rows [rank * V/tp, (rank + 1) * V/tp)  ->  [T, D]
    # Megatron's vocab-parallel embedding: rows of ids this rank does not hold are zero, so an all_reduce over
    # the ranks adds up the one rank's row. The rank is the position along the named mesh axis (shard_map, vmap).
    rows_per_rank = table.shape[0]
    local = token_ids - jax.lax.axis_index(axis_name) * rows_per_rank
    held = (local >= 0) & (local < rows_per_rank)
    rows = ref_embed(jnp.where(held, local, 0), table, scale=scale)
    return jnp.where(held[:, None], rows, jnp.zeros((), rows.dtype))


def ref_all_reduce(x, *, tp, axis_name):
    # x: this rank's partial sum -> the sum over the `tp` ranks of the named axis, on every rank
    del tp
    return jax.lax.psum(x, axis_name)


def ref_all_gather(x, *, tp, axis_name, axis, size):
    # x: this rank's slice along `axis` -> the ranks' slices concatenated in rank order, cut to `size`
    # (the padding that made the full dim divisible by tp is dropped), on every rank
    del tp
    full = jax.lax.all_gather(x, axis_name, axis=axis, tiled=True)
    return jax.lax.slice_in_dim(full, 0, size, axis=axis)


def _all_gather_shape(ts, attrs):
    (shape, dtype), = ts
    axis, size, tp = attrs["axis"], attrs["size"], attrs["tp"]
    if not 0 <= axis < len(shape):
        raise OpError(f"all_gather: axis {axis} out of range for a rank-{len(shape)} value")
    if isinstance(shape[axis], int) and not (shape[axis] * tp - shape[axis] < size <= shape[axis] * tp):
        raise OpError(f"all_gather: {tp} slices of {shape[axis]} cannot make {size} (padding is under one slice)")
    return [(tuple(size if i == axis else d for i, d in enumerate(shape)), dtype)]


def ref_rms_norm(x, weight, *, eps, weight_offset=None):
    # x: [T, D]  weight: [D]  ->  [T, D]; statistics in float32 as Hugging Face does
    # Llama form: the normalized row is rounded to x's dtype, then times the weight. With weight_offset (Gemma's
    # 1.0): x / rms(x) * (weight_offset + weight) all in float32, rounded once to x's dtype.
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    normed32 = x32 * jax.lax.rsqrt(variance + eps)
    if weight_offset is not None:
        return (normed32 * (weight_offset + weight.astype(jnp.float32))).astype(x.dtype)
    return weight.astype(x.dtype) * normed32.astype(x.dtype)


def ref_head_rms_norm(x, weight, *, eps, head_dim, weight_offset=None):
    # x: [T, H*Dh]  weight: [Dh]  ->  [T, H*Dh]; RMSNorm of each head's vector (Qwen3's and Gemma 3's QK-norm),
    # float32 statistics; weight_offset as in ref_rms_norm
    heads = x.reshape(x.shape[0], x.shape[1] // head_dim, head_dim)
    return ref_rms_norm(heads, weight, eps=eps, weight_offset=weight_offset).reshape(x.shape)


def _same_as_first(ts, attrs):
    return [ts[0]]


def ref_linear(x, weight, bias=None):
    # x: [T, K]  weight: [N, K]  bias: [N]  ->  [T, N]
    y = jnp.einsum("tk,nk->tn", x, weight.astype(x.dtype), preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _linear_shape(ts, attrs):
    (x_shape, x_dtype), (w_shape, _) = ts[0], ts[1]
    if len(x_shape) != 2 or len(w_shape) != 2:
        raise OpError(f"linear expects 2-D x and weight, got {x_shape} and {w_shape}")
    if isinstance(x_shape[1], int) and isinstance(w_shape[1], int) and x_shape[1] != w_shape[1]:
        raise OpError(f"linear: x has {x_shape[1]} features but weight expects {w_shape[1]}")
    return [((x_shape[0], w_shape[0]), x_dtype)]


@dataclasses.dataclass(frozen=True)
class RopeFrequencies:
    """How a rope op rotates each head: its first `rotary_dim` features (the rest pass through), by the angle
    position * inv_freq, with cos and sin multiplied by `attention_factor`.

    LongRoPE (Phi-3) has a second set: a token at position >= `long_from` (original_max_position_embeddings)
    rotates with `long_inv_freq`. NOTE: Hugging Face picks one set for a whole forward pass (long when the
    pass's length max(position) + 1 exceeds original_max_position_embeddings); llmc decides per token, which is
    the set HF uses for a pass that ends at that token. Below original_max_position_embeddings the two agree
    exactly (short factors); beyond it llmc's cached keys keep the rotation they were written with (short for
    positions below the threshold) where HF re-encodes the whole sequence with the long set.
    """

    rotary_dim: int
    inv_freq: np.ndarray  # f32[rotary_dim // 2]
    attention_factor: float = 1.0
    long_inv_freq: np.ndarray | None = None  # f32[rotary_dim // 2]
    long_from: int | None = None


ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def _rotary_dim(head_dim: int, scaling: dict) -> int:
    """How many features of a head RoPE rotates: int(head_dim * partial_rotary_factor), as Hugging Face."""
    fraction = scaling.get("partial_rotary_factor", 1.0)
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise OpError(f"rope partial_rotary_factor must be in (0, 1], got {fraction!r}")
    rotary_dim = int(head_dim * fraction)
    if rotary_dim < 2 or rotary_dim % 2:
        raise OpError(f"rope rotates {rotary_dim} of {head_dim} head features (partial_rotary_factor {fraction}); "
                      "it must be a positive even number")
    return rotary_dim


def _longrope_frequencies(rotary_dim: int, theta: float, scaling: dict) -> RopeFrequencies:
    """Phi-3's LongRoPE: inv_freq = 1 / (factor_i * theta^(2i/R)), short and long factor lists."""
    old_len = scaling.get("original_max_position_embeddings")
    if not isinstance(old_len, int) or isinstance(old_len, bool) or old_len < 1:
        raise OpError(f"longrope needs original_max_position_embeddings (a positive integer), got {old_len!r}")
    sets = []
    for key in ("short_factor", "long_factor"):
        value = scaling.get(key)
        factors = np.asarray(value if value is not None else [], dtype=np.float32)
        if factors.shape != (rotary_dim // 2,) or not np.all(np.isfinite(factors)) or not np.all(factors > 0):
            got = f"{len(value)} values" if isinstance(value, (list, tuple)) else repr(value)
            raise OpError(f"longrope {key} must be {rotary_dim // 2} positive numbers (one per rotated pair), "
                          f"got {got}")
        base = theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim)
        sets.append((1.0 / (factors * base)).astype(np.float32))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:  # Hugging Face's default, from the context extension factor
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise OpError("longrope needs attention_factor or factor (max_position_embeddings / "
                          f"original_max_position_embeddings), got factor {factor!r}")
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    if not isinstance(attention_factor, (int, float)) or attention_factor <= 0:
        raise OpError(f"longrope attention_factor must be a positive number, got {attention_factor!r}")
    return RopeFrequencies(rotary_dim, sets[0], float(attention_factor), sets[1], old_len)


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None) -> RopeFrequencies:
    """The rotation a rope op with these attributes applies: default, linear, Llama 3.1 or LongRoPE scaling,
    on all or (partial_rotary_factor) the first features of each head."""
    scaling = _as_dict(scaling) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise OpError(f"unsupported rope scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})")
    rotary_dim = _rotary_dim(head_dim, scaling)
    if kind == "longrope":
        return _longrope_frequencies(rotary_dim, theta, scaling)
    inv_freq = 1.0 / (theta ** (np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / rotary_dim))
    inv_freq = inv_freq.astype(np.float32)
    if kind == "linear":
        inv_freq = (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
    return RopeFrequencies(rotary_dim, inv_freq)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    """f32[head_dim // 2] inverse frequencies of a plain rotation (default, linear or Llama 3.1 scaling).

    LongRoPE (two sets, an attention factor) and partial rotation need `rope_frequencies`.
    """
    freqs = rope_frequencies(head_dim, theta, scaling)
    if freqs.long_inv_freq is not None or freqs.attention_factor != 1.0 or freqs.rotary_dim != head_dim:
        raise OpError("rope_inv_freq describes whole-head rotations with one frequency set; this rope scaling "
                      f"({_as_dict(scaling)}) needs rope_frequencies")
    return freqs.inv_freq


def rope_tables(positions, dtype, *, head_dim, theta, rope_scaling=None):
    """(cos, sin), each [T, 1, R] in `dtype` (R: the rotated features, head_dim unless partial), computed in
    float32 from the positions i32[T] and scaled by the attention factor (LongRoPE), as Hugging Face does."""
    freqs = rope_frequencies(head_dim, theta, rope_scaling)
    inv_freq = jnp.asarray(freqs.inv_freq)[None, :]  # f32[1, R/2]
    if freqs.long_inv_freq is not None:  # each token's set, by its own position (see RopeFrequencies)
        long = (positions >= freqs.long_from)[:, None]  # bool[T, 1]
        inv_freq = jnp.where(long, jnp.asarray(freqs.long_inv_freq)[None, :], inv_freq)  # f32[T, R/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq  # f32[T, R/2]
    emb = jnp.concatenate([angles, angles], axis=-1)  # f32[T, R]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    if freqs.attention_factor != 1.0:
        cos, sin = cos * freqs.attention_factor, sin * freqs.attention_factor
    return cos.astype(dtype)[:, None, :], sin.astype(dtype)[:, None, :]


def rotate_with_tables(x, cos, sin, *, num_heads, head_dim):
    # x: [T, H * Dh]  cos, sin: [T, 1, R] (R <= Dh)  ->  [T, H * Dh]; rotate-half (Hugging Face) convention
    # on each head's first R features, the other Dh - R features unchanged (partial rotation)
    xh = x.reshape(x.shape[0], num_heads, head_dim)  # [T, H, Dh]
    rotary_dim = cos.shape[-1]
    xr, passed = xh[..., :rotary_dim], xh[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-xr[..., half:], xr[..., :half]], axis=-1)
    out = xr * cos + rotated * sin
    if rotary_dim < head_dim:
        out = jnp.concatenate([out, passed], axis=-1)
    return out.reshape(x.shape)


def ref_rope(x, positions, *, num_heads, head_dim, theta, rope_scaling=None):
    # x: [T, H * Dh]  positions: i32[T]  ->  [T, H * Dh]
    cos, sin = rope_tables(positions, x.dtype, head_dim=head_dim, theta=theta, rope_scaling=rope_scaling)
    return rotate_with_tables(x, cos, sin, num_heads=num_heads, head_dim=head_dim)


def segment_ids(query_start, num_tokens):
    # query_start: i32[S+1] -> i32[T]: which sequence owns each flat token row
    return jnp.searchsorted(query_start[1:], jnp.arange(num_tokens, dtype=query_start.dtype), side="right")


def ref_attention(q, k, v, query_start, *, num_heads, num_kv_heads, head_dim, scale, window=None):
    # q: [T, Hq*Dh]  k, v: [T, Hkv*Dh]  query_start: i32[S+1]  ->  [T, Hq*Dh]
    # Causal attention of every token to the earlier tokens of its own sequence (no cache).
    # window (sliding-window attention): a query at position p sees only keys at positions > p - window.
    num_tokens = q.shape[0]
    group = num_heads // num_kv_heads
    qh = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    kh = k.reshape(num_tokens, num_kv_heads, head_dim).astype(jnp.float32)
    vh = v.reshape(num_tokens, num_kv_heads, head_dim).astype(jnp.float32)
    seg = segment_ids(query_start, num_tokens)  # i32[T]
    idx = jnp.arange(num_tokens)
    mask = (seg[:, None] == seg[None, :]) & (idx[None, :] <= idx[:, None])  # bool[T, T]
    if window is not None:
        mask = mask & (idx[None, :] > idx[:, None] - window)
    scores = jnp.einsum("tkgd,skd->kgts", qh, kh) * scale  # f32[Hkv, G, T, T]
    scores = jnp.where(mask[None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("kgts,skd->tkgd", probs, vh)
    return out.reshape(num_tokens, num_heads * head_dim).astype(q.dtype)


def ref_silu_mul(gate, up):
    # gate, up: [T, F] -> [T, F]
    g32 = gate.astype(jnp.float32)
    return (g32 * jax.nn.sigmoid(g32)).astype(gate.dtype) * up


def ref_gelu_tanh_mul(gate, up):
    # gate, up: [T, F] -> [T, F]; GeGLU (Gemma): GELU with the tanh approximation in float32, rounded, times up
    return jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(gate.dtype) * up


def route_tokens(x, router, *, top_k, norm_topk_prob):
    """The router of a mixture of experts, as Hugging Face computes it (Mixtral, Qwen2/3-MoE).

    x: [T, D]  router: [E, D]  ->  (weights f32[T, K], experts i32[T, K]), K = top_k, best first.
    Logits are x @ router^T in x's dtype (f32 accumulation), then softmax in float32 over all E experts,
    the top k probabilities, and with norm_topk_prob those k renormalised to sum to one. The weights stay float32
    as Mixtral keeps them (Qwen-MoE rounds them to the activation dtype: one bf16 rounding apart).
    """
    logits = jnp.einsum("td,ed->te", x, router.astype(x.dtype), preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits.astype(x.dtype).astype(jnp.float32), axis=-1)  # f32[T, E]
    weights, experts = jax.lax.top_k(probs, top_k)  # f32[T, K], i32[T, K]
    if norm_topk_prob:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def ref_moe(x, router, gate_up, down, *, top_k, norm_topk_prob):
    # x: [T, D]  router: [E, D]  gate_up: [E, 2F, D] (each expert's gate rows, then its up rows)
    # down: [E, D, F]  ->  [T, D]
    # out[t] = sum over the top_k experts e of token t: weight[t, e] * down_e(silu(gate_e x_t) * up_e x_t), each
    # expert's MLP in x's dtype as a dense MLP computes it (ref_linear, ref_silu_mul), the weighted sum in float32.
    # NOTE: every expert runs on every token here (clear, E / top_k times the work): backends route sparsely.
    num_experts, two_f = gate_up.shape[0], gate_up.shape[1]
    weights, experts = route_tokens(x, router, top_k=top_k, norm_topk_prob=norm_topk_prob)
    combine = jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32) * weights[..., None], axis=1)  # f32[T, E]
    h = jnp.einsum("td,efd->tef", x, gate_up.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    act = ref_silu_mul(h[..., : two_f // 2], h[..., two_f // 2:])  # [T, E, F]
    y = jnp.einsum("tef,edf->ted", act, down.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum("te,ted->td", combine, y.astype(jnp.float32)).astype(x.dtype)


def _moe_shape(ts, attrs):
    (x_shape, x_dtype), (r_shape, _), (gu_shape, _), (dn_shape, _) = ts
    if len(x_shape) != 2 or len(r_shape) != 2 or len(gu_shape) != 3 or len(dn_shape) != 3:
        raise OpError(f"moe expects x [T, D], router [E, D], gate_up [E, 2F, D] and down [E, D, F], got "
                      f"{x_shape}, {r_shape}, {gu_shape} and {dn_shape}")
    num_experts, d = r_shape
    two_f = gu_shape[1]
    if not isinstance(two_f, int) or two_f % 2:
        raise OpError(f"moe: gate_up's second dim must be an even 2F (gate rows then up rows), got {two_f}")
    want = {"router": ((num_experts, d), r_shape), "gate_up": ((num_experts, two_f, d), gu_shape),
            "down": ((num_experts, d, two_f // 2), dn_shape)}
    for name, (expected, got) in want.items():
        if tuple(expected) != tuple(got):
            raise OpError(f"moe: {name} has shape {got}, x [T, {x_shape[1]}] and the router imply {expected}")
    if isinstance(x_shape[1], int) and x_shape[1] != d:
        raise OpError(f"moe: x has {x_shape[1]} features but the router expects {d}")
    if not 1 <= attrs["top_k"] <= num_experts:
        raise OpError(f"moe: top_k must be in [1, {num_experts}] (the number of experts), got {attrs['top_k']}")
    return [((x_shape[0], d), x_dtype)]


def ref_logits(x, rows, weight):
    # x: [T, D]  rows: i32[L]  weight: [V, D]  ->  f32[L, V]
    picked = jnp.take(x, rows, axis=0, mode="clip")  # [L, D]
    y = jnp.einsum("ld,vd->lv", picked, weight.astype(x.dtype), preferred_element_type=jnp.float32)
    return y.astype(x.dtype).astype(jnp.float32)


def _logits_shape(ts, attrs):
    (x_shape, _), (rows_shape, _), (w_shape, _) = ts
    return [((rows_shape[0], w_shape[0]), "float32")]


def kv_rows_to_store(k, v, pools, scales, kv_format, *, scale_rule="amax", k_center=None, k_feedback=None):
    """What a kv_write stores: [(rows, pool)] for each pool it writes, the rows [T, Hkv, D'] already in the
    pool's encoding. k, v: [T, Hkv*Dh]. pools: (k_pool, v_pool), plus (k_block_scale, v_block_scale) for nvfp4.
    scales: () plain; (k_scale, v_scale) f32[Hkv] for fp8 (stored = e4m3(sat(x / scale[head]))); f32[]
    per-layer global scales for nvfp4 (each 16 values of one head share a block scale computed on write, by
    `scale_rule`: formats.nvfp4_block_scales). nvfp4 only: k_center f32[Hkv, Dh] (optional) is subtracted
    from every key before it is quantized (attention is unchanged: q.(k - c) shifts all of a query's scores
    by the same q.c, which softmax ignores); k_feedback f32[Hkv, Dh, Dh] (optional) rounds K score-aware
    (formats.quantize_nvfp4_feedback: GPTQ's error feedback with the calibration queries' second moment)."""
    heads, stored = pools[0].shape[2:]
    if kv_format == "nvfp4":
        kh = k.reshape(-1, heads, 2 * stored)
        if k_center is not None:
            kh = kh.astype(jnp.float32) - k_center.astype(jnp.float32)
        if k_feedback is not None:
            kq, kb = formats.jnp_quantize_nvfp4_feedback(kh, scales[0], k_feedback, scale_rule)
        else:
            kq, kb = formats.jnp_quantize_nvfp4(kh, scales[0], scale_rule)
        vq, vb = formats.jnp_quantize_nvfp4(v.reshape(-1, heads, 2 * stored), scales[1], scale_rule)
        return [(kq, pools[0]), (vq, pools[1]), (kb, pools[2]), (vb, pools[3])]
    kh, vh = k.reshape(-1, heads, stored), v.reshape(-1, heads, stored)
    if kv_format == "fp8":
        kh, vh = formats.jnp_quantize_fp8(kh, scales[0][:, None]), formats.jnp_quantize_fp8(vh, scales[1][:, None])
    return [(kh.astype(pools[0].dtype), pools[0]), (vh.astype(pools[1].dtype), pools[1])]


def _scatter_rows(slot_mapping, pairs):
    """Each pool [N, Bs, ...] with its rows written at slot_mapping i32[T] (-1 = skip)."""
    num_blocks, block_size = pairs[0][1].shape[:2]
    block = jnp.where(slot_mapping < 0, num_blocks, slot_mapping // block_size)  # out of range -> dropped
    offset = slot_mapping % block_size
    return tuple(pool.at[block, offset].set(rows, mode="drop") for rows, pool in pairs)


def ref_kv_write(k, v, slot_mapping, k_pool, v_pool, *scales, kv_format=None):
    # k, v: [T, Hkv*Dh]  slot_mapping: i32[T] (-1 = skip)  pools: [N, Bs, Hkv, Dh]  ->  new pools
    # kv_format "fp8": pools float8_e4m3fn, scales (k_scale, v_scale) f32[Hkv] (see kv_rows_to_store)
    return _scatter_rows(slot_mapping, kv_rows_to_store(k, v, (k_pool, v_pool), scales, kv_format))


def _kv_write_shape(ts, attrs):
    return [ts[3], ts[4]]


def ref_kv_write_nvfp4(k, v, slot_mapping, k_pool, v_pool, k_block_scale, v_block_scale, k_scale, v_scale,
                       k_center=None, k_feedback=None, *, scale_rule="amax"):
    # k, v: [T, Hkv*Dh]; pools u8[N, Bs, Hkv, Dh/2]; block scales e4m3[N, Bs, Hkv, Dh/16]; k_scale, v_scale: f32[]
    # per-layer global scales; k_center (optional): f32[Hkv, Dh] subtracted from K before quantizing;
    # k_feedback (optional, with k_center): f32[Hkv, Dh, Dh] score-aware rounding of K (kv_rows_to_store);
    # scale_rule: how block scales are chosen ("amax" | "mse46")  ->  (k_pool, v_pool, k_block_scale,
    # v_block_scale) updated
    return _scatter_rows(slot_mapping, kv_rows_to_store(k, v, (k_pool, v_pool, k_block_scale, v_block_scale),
                                                         (k_scale, v_scale), "nvfp4", scale_rule=scale_rule,
                                                         k_center=k_center, k_feedback=k_feedback))


def _kv_write_nvfp4_shape(ts, attrs):
    return [ts[3], ts[4], ts[5], ts[6]]


KV_MERGE_EPS = 1e-12  # norms below this count as zero (a zero vector has no direction to merge)


def kv_merge_vectors(a, b):
    """Merge two batches of head vectors [..., D] (f32): the SLERP midpoint of their directions (exact SLERP at
    t = 1/2: normalize(a/|a| + b/|b|)) scaled by their mean magnitude (|a| + |b|) / 2. A zero vector contributes
    no direction (the other's is kept); two zero or opposite vectors merge to zero."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    na = jnp.sqrt(jnp.sum(a * a, axis=-1, keepdims=True))
    nb = jnp.sqrt(jnp.sum(b * b, axis=-1, keepdims=True))
    s = a / jnp.maximum(na, KV_MERGE_EPS) + b / jnp.maximum(nb, KV_MERGE_EPS)
    ns = jnp.sqrt(jnp.sum(s * s, axis=-1, keepdims=True))
    return s / jnp.maximum(ns, KV_MERGE_EPS) * ((na + nb) * 0.5)


def kv_merge_rows_to_store(k, v, slot_mapping, k_pool, v_pool, *, num_kv_heads, head_dim):
    """What a kv_merge stores: [(merged rows [T, Hkv, Dh] in the pool dtype, pool)] for K and V. Rows of slot -1
    are computed from whatever slot 0 holds (maybe NaN) and must be dropped by the writer."""
    block_size = k_pool.shape[1]
    safe = jnp.maximum(slot_mapping, 0)
    block, offset = safe // block_size, safe % block_size
    out = []
    for x, pool in ((k, k_pool), (v, v_pool)):
        old = pool[block, offset]  # [T, Hkv, Dh]: the partner layer's row, written earlier in this step
        new = x.reshape(-1, num_kv_heads, head_dim)
        out.append((kv_merge_vectors(old, new).astype(pool.dtype), pool))
    return out


def ref_kv_merge(k, v, slot_mapping, k_pool, v_pool, *, num_kv_heads, head_dim):
    # k, v: [T, Hkv*Dh]  slot_mapping: i32[T] (-1 = skip)  pools: [N, Bs, Hkv, Dh] (unquantized)  ->  new pools
    # Cross-layer KV sharing (lowering/passes/share_kv_layers.py, MiniCache-style): the row already at each slot
    # (the partner layer's K / V, written by its kv_write earlier in the step) is replaced by its merge with this
    # layer's row, per KV head: normalize(a/|a| + b/|b|) * (|a| + |b|) / 2 (kv_merge_vectors). This is MiniCache's
    # merge without its per-layer magnitude restore and without retaining outlier tokens unmerged.
    return _scatter_rows(slot_mapping, kv_merge_rows_to_store(k, v, slot_mapping, k_pool, v_pool,
                                                               num_kv_heads=num_kv_heads, head_dim=head_dim))


def _kv_merge_shape(ts, attrs):
    (k_shape, _), (v_shape, _), _, (kp_shape, kp_dtype), (vp_shape, vp_dtype) = ts
    heads, dim = attrs["num_kv_heads"], attrs["head_dim"]
    for what, shape, dtype in (("k_pool", kp_shape, kp_dtype), ("v_pool", vp_shape, vp_dtype)):
        if len(shape) != 4 or tuple(shape[2:]) != (heads, dim):
            raise OpError(f"kv_merge: {what} must be [N, block_size, {heads}, {dim}], got {shape}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise OpError(f"kv_merge merges unquantized KV pools (float32 / bfloat16 / float16), got {what} {dtype}")
    for what, shape in (("k", k_shape), ("v", v_shape)):
        if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != heads * dim):
            raise OpError(f"kv_merge: {what} must be [T, {heads * dim}], got {shape}")
    return [ts[3], ts[4]]


def dequantize_kv(pool, extras, kv_format, which: int):
    """Stored KV values (any gathered slice of a pool) -> f32, for pool `which` (0: K, 1: V).

    extras: () for plain pools; (k_scale, v_scale) f32[Hkv] for fp8; (k_block_scale, v_block_scale, k_scale,
    v_scale) for nvfp4, the block-scale slice gathered exactly like `pool`.
    """
    if kv_format is None:
        return pool.astype(jnp.float32)
    if kv_format == "fp8":
        return pool.astype(jnp.float32) * extras[which][:, None]
    if kv_format == "nvfp4":
        return formats.jnp_dequantize_nvfp4(pool, extras[which], extras[2 + which])
    raise OpError(f"unknown kv_format {kv_format!r}")


def gather_kv_blocks(pool, extras, kv_format, which, tables):
    """pool[tables] dequantized: f32[*tables.shape, Bs, Hkv, Dh]."""
    gathered = jnp.take(pool, tables, axis=0, mode="clip")
    if kv_format == "nvfp4":
        extras = list(extras)
        extras[which] = jnp.take(extras[which], tables, axis=0, mode="clip")
    return dequantize_kv(gathered, extras, kv_format, which)


def ref_paged_attention(q, k_pool, v_pool, query_start, seq_lens, block_tables, *kv_extras, num_heads,
                        num_kv_heads, head_dim, scale, kv_format=None, window=None):
    # q: [T, Hq*Dh]  pools: [N, Bs, Hkv, Dh] (nvfp4: u8[..., Dh/2])  query_start: i32[S+1]  seq_lens: i32[S]
    # block_tables: i32[S, B]  kv_extras: the scales of kv_format (see dequantize_kv)  ->  [T, Hq*Dh]
    # Token t of sequence s sits at context index seq_lens[s] - (query_start[s+1] - t) and attends
    # to cached keys 0..that index of its own sequence, read through the block table; with `window`
    # (sliding-window attention) only to keys at index > that index - window. Blocks wholly before the
    # window may be freed: their table entries are never read as values (masked, and zeroed below).
    num_tokens = q.shape[0]
    block_size = k_pool.shape[1]
    num_ctx = block_tables.shape[1] * block_size
    group = num_heads // num_kv_heads
    seg = segment_ids(query_start, num_tokens)  # i32[T]
    tables = jnp.take(block_tables, seg, axis=0, mode="clip")  # i32[T, B]
    keys = gather_kv_blocks(k_pool, kv_extras, kv_format, 0, tables).reshape(num_tokens, num_ctx, num_kv_heads,
                                                                             head_dim)
    vals = gather_kv_blocks(v_pool, kv_extras, kv_format, 1, tables).reshape(num_tokens, num_ctx, num_kv_heads,
                                                                             head_dim)
    ctx_len = jnp.take(seq_lens, seg, mode="clip")  # i32[T]
    q_end = jnp.take(query_start, seg + 1, mode="clip")
    pos = ctx_len - (q_end - jnp.arange(num_tokens))  # i32[T]: context index of each query
    mask = jnp.arange(num_ctx)[None, :] <= pos[:, None]  # bool[T, C]
    if window is not None:
        mask = mask & (jnp.arange(num_ctx)[None, :] > pos[:, None] - window)
    qh = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,tckd->tkgc", qh, keys) * scale
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    # NOTE: masked probabilities are exactly 0, but 0 * NaN (an unused page) is NaN: zero the values.
    vals = jnp.where(mask[:, :, None, None], vals, 0.0)
    out = jnp.einsum("tkgc,tckd->tkgd", probs, vals)
    return out.reshape(num_tokens, num_heads * head_dim).astype(q.dtype)


def ref_attention_mass(q, k_pool, query_start, seq_lens, block_tables, slot_mapping, mass_pool, *kv_extras,
                       num_heads, num_kv_heads, head_dim, scale, kv_format=None):
    # q: [T, Hq*Dh]  k_pool: [N, Bs, Hkv, Dh] (nvfp4: u8[..., Dh/2])  query_start: i32[S+1]  seq_lens: i32[S]
    # block_tables: i32[S, B]  slot_mapping: i32[T] (-1 = skip)  mass_pool: f32[N, Bs, Hkv]
    # kv_extras: the scales of kv_format (see dequantize_kv; only K's are read)  ->  f32[N, Bs, Hkv] updated
    # H2O's accumulated attention: first the slots of this step's new tokens (slot_mapping) are set to 0, then
    # every cached key j of sequence s gains, per kv head g, the softmax probability (float32, over the keys
    # 0..pos(t) that row t sees, exactly as ref_paged_attention) of every query row t of s and every query head
    # of g's group. Slots no step sequence sees keep their value (NaN included). Rows with slot -1 (padding: a
    # row that writes no K/V is not a real token) add nothing.
    num_tokens = q.shape[0]
    num_blocks, block_size = k_pool.shape[:2]
    num_seqs, width = block_tables.shape
    num_ctx = width * block_size
    group = num_heads // num_kv_heads
    flat = mass_pool.reshape(num_blocks * block_size, num_kv_heads)
    new = jnp.where(slot_mapping < 0, num_blocks * block_size, slot_mapping)  # out of range -> dropped
    flat = flat.at[new].set(0.0, mode="drop")
    seg = segment_ids(query_start, num_tokens)  # i32[T]; S for rows past query_start[S]
    tables = jnp.take(block_tables, seg, axis=0, mode="clip")  # i32[T, B]
    keys = gather_kv_blocks(k_pool, kv_extras, kv_format, 0, tables).reshape(num_tokens, num_ctx, num_kv_heads,
                                                                             head_dim)
    ctx_len = jnp.take(seq_lens, seg, mode="clip")
    q_end = jnp.take(query_start, seg + 1, mode="clip")
    pos = ctx_len - (q_end - jnp.arange(num_tokens))  # i32[T]: context index of each query
    real = (seg < num_seqs) & (slot_mapping >= 0)  # bool[T]
    mask = (jnp.arange(num_ctx)[None, :] <= pos[:, None]) & real[:, None]  # bool[T, C]
    qh = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32)
    scores = jnp.einsum("tkgd,tckd->tkgc", qh, keys) * scale
    # NOTE: masked keys (unused pages may hold NaN) and rows that see nothing must add exactly 0, not NaN
    visible = mask[:, None, None, :]
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.where(visible, jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = e / jnp.where(total > 0, total, 1.0)  # f32[T, Hkv, G, C]
    mass = jnp.transpose(jnp.sum(probs, axis=2), (0, 2, 1))  # f32[T, C, Hkv]
    ctx = jnp.arange(num_ctx)
    slots = jnp.take_along_axis(tables, ctx[None, :] // block_size, axis=1) * block_size + ctx % block_size
    slots = jnp.where(mask, slots, num_blocks * block_size)  # i32[T, C]; invisible -> dropped
    flat = flat.at[slots].add(mass, mode="drop")
    return flat.reshape(mass_pool.shape)


def _attention_mass_shape(ts, attrs):
    (mass_shape, mass_dtype), (pool_shape, _) = ts[6], ts[1]
    if mass_dtype != "float32" or len(mass_shape) != 3 or len(pool_shape) != 4:
        raise OpError(f"attention_mass: the mass pool must be f32[N, Bs, Hkv] beside a K pool [N, Bs, Hkv, D], got "
                      f"{mass_dtype}{list(mass_shape)} and {list(pool_shape)}")
    return [ts[6]]


def ref_qlinear(x, *parts_and_bias, format, in_features, out_features, group_size=None, act_format=None):
    # x: [T, K]  parts: the quantized weight's parts (formats.WEIGHT_PARTS[format])  [bias: [N]]  ->  [T, N]
    # act_format "fp8": x is quantized per token to e4m3 first (W8A8), as the fp8 GEMM kernels do.
    n_parts = len(formats.WEIGHT_PARTS[format])
    parts, bias = parts_and_bias[:n_parts], (parts_and_bias[n_parts] if len(parts_and_bias) > n_parts else None)
    w = formats.jnp_dequantize_weight(format, *parts)  # f32[N, K]
    xin = formats.jnp_fake_quant_fp8_rows(x) if act_format == "fp8" else x.astype(jnp.float32)
    y = jnp.einsum("tk,nk->tn", xin, w, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype)


def _qlinear_shape(ts, attrs):
    (x_shape, x_dtype) = ts[0]
    if len(x_shape) != 2:
        raise OpError(f"qlinear expects 2-D x, got {x_shape}")
    if isinstance(x_shape[1], int) and x_shape[1] != attrs["in_features"]:
        raise OpError(f"qlinear: x has {x_shape[1]} features but the weight expects {attrs['in_features']}")
    if attrs["format"] not in formats.WEIGHT_FORMATS + formats.GGUF_FORMATS:
        raise OpError(f"qlinear: unknown format {attrs['format']!r}")
    return [((x_shape[0], attrs["out_features"]), x_dtype)]


def ref_qlogits(x, rows, *parts, format, in_features, out_features, group_size=None, act_format=None):
    # x: [T, D]  rows: i32[L]  parts: quantized [V, D] weight  ->  f32[L, V]
    picked = jnp.take(x, rows, axis=0, mode="clip")
    return ref_qlinear(picked, *parts, format=format, in_features=in_features, out_features=out_features,
                       group_size=group_size, act_format=act_format).astype(jnp.float32)


def _qlogits_shape(ts, attrs):
    (rows_shape, _) = ts[1]
    return [((rows_shape[0], attrs["out_features"]), "float32")]


def ref_rotate_heads(x, rotation, *, num_heads, head_dim):
    # x: [T, H*Dh]  rotation: f32[Dh, Dh] (orthonormal)  ->  [T, H*Dh], each head's vector times the rotation
    xh = x.reshape(x.shape[0], num_heads, head_dim).astype(jnp.float32)
    return jnp.einsum("thd,de->the", xh, rotation.astype(jnp.float32)).reshape(x.shape).astype(x.dtype)


ATTENTION_ATTRS = {"num_heads": (int,), "num_kv_heads": (int,), "head_dim": (int,), "scale": (float,),
                   "window": (int,)}
QUANT_ATTRS = {"format": (str,), "in_features": (int,), "out_features": (int,), "group_size": (int,),
               "act_format": (str,)}

embed = _register("embed", ref_embed, _embed_shape, {"scale": (float,)}, optional_attrs=("scale",))
rms_norm = _register("rms_norm", ref_rms_norm, _same_as_first, {"eps": (float,), "weight_offset": (float,)},
                     optional_attrs=("weight_offset",))
linear = _register("linear", ref_linear, _linear_shape, {})
rope = _register("rope", ref_rope, _same_as_first,
                 {"num_heads": (int,), "head_dim": (int,), "theta": (float,), "rope_scaling": (dict,)},
                 optional_attrs=("rope_scaling",))
attention = _register("attention", ref_attention, _same_as_first, ATTENTION_ATTRS, optional_attrs=("window",))
silu_mul = _register("silu_mul", ref_silu_mul, _same_as_first, {})
gelu_tanh_mul = _register("gelu_tanh_mul", ref_gelu_tanh_mul, _same_as_first, {})
logits = _register("logits", ref_logits, _logits_shape, {})
kv_write = _register("kv_write", ref_kv_write, _kv_write_shape, {"kv_format": (str,)}, num_outputs=2,
                     optional_attrs=("kv_format",))
kv_write_nvfp4 = _register("kv_write_nvfp4", ref_kv_write_nvfp4, _kv_write_nvfp4_shape, {"scale_rule": (str,)},
                           num_outputs=4, optional_attrs=("scale_rule",))
kv_merge = _register("kv_merge", ref_kv_merge, _kv_merge_shape, {"num_kv_heads": (int,), "head_dim": (int,)},
                     num_outputs=2)
paged_attention = _register("paged_attention", ref_paged_attention, _same_as_first,
                            {**ATTENTION_ATTRS, "kv_format": (str,)}, optional_attrs=("kv_format", "window"))
attention_mass = _register("attention_mass", ref_attention_mass, _attention_mass_shape,
                           {**{k: v for k, v in ATTENTION_ATTRS.items() if k != "window"}, "kv_format": (str,)},
                           optional_attrs=("kv_format",))
qlinear = _register("qlinear", ref_qlinear, _qlinear_shape, QUANT_ATTRS, optional_attrs=("group_size", "act_format"))
qlogits = _register("qlogits", ref_qlogits, _qlogits_shape, QUANT_ATTRS, optional_attrs=("group_size", "act_format"))
rotate_heads = _register("rotate_heads", ref_rotate_heads, _same_as_first, {"num_heads": (int,), "head_dim": (int,)})
head_rms_norm = _register("head_rms_norm", ref_head_rms_norm, _same_as_first,
                          {"eps": (float,), "head_dim": (int,), "weight_offset": (float,)},
                          optional_attrs=("weight_offset",))
moe = _register("moe", ref_moe, _moe_shape, {"top_k": (int,), "norm_topk_prob": (bool,)})
# tensor parallelism (lowering/passes/shard_tensor_parallel.py): the per-rank graph's collectives over a named
# mesh axis; their references need that axis bound (shard_map over a mesh, or vmap(axis_name=...) over ranks)
COLLECTIVE_ATTRS = {"tp": (int,), "axis_name": (str,)}
embed_shard = _register("embed_shard", ref_embed_shard, _embed_shape, {**COLLECTIVE_ATTRS, "scale": (float,)},
                        optional_attrs=("scale",))
all_reduce = _register("all_reduce", ref_all_reduce, _same_as_first, COLLECTIVE_ATTRS)
all_gather = _register("all_gather", ref_all_gather, _all_gather_shape,
                       {**COLLECTIVE_ATTRS, "axis": (int,), "size": (int,)})


# ---------------------------------------------------------------------------------------------
# Model-facing wrappers: what a Flax model calls. Each binds one primitive (one IR node).
# ---------------------------------------------------------------------------------------------


def embed_tokens(token_ids, table, scale: float | None = None):
    """scale: multiply the looked-up rows (Gemma's sqrt(hidden_size)), in the table's dtype."""
    return _bind(embed, token_ids, table, scale=None if scale is None else float(scale))


def rms_normalize(x, weight, eps: float, weight_offset: float | None = None):
    """weight_offset: Gemma's RMSNorm, x / rms(x) * (weight_offset + weight) in float32 (see ref_rms_norm)."""
    offset = None if weight_offset is None else float(weight_offset)
    return _bind(rms_norm, x, weight, eps=float(eps), weight_offset=offset)


def head_rms_normalize(x, weight, eps: float, head_dim: int, weight_offset: float | None = None):
    return _bind(head_rms_norm, x, weight, eps=float(eps), head_dim=int(head_dim),
                 weight_offset=None if weight_offset is None else float(weight_offset))


def project(x, weight, bias=None):
    if bias is None:
        return _bind(linear, x, weight)
    return _bind(linear, x, weight, bias)


def apply_rope(x, positions, *, num_heads: int, head_dim: int, theta: float, rope_scaling: dict | None = None):
    return _bind(rope, x, positions, num_heads=num_heads, head_dim=head_dim, theta=float(theta),
                 rope_scaling=rope_scaling or None)


def causal_attention(q, k, v, query_start, *, num_heads: int, num_kv_heads: int, head_dim: int,
                     scale: float | None = None, window: int | None = None):
    """window: sliding-window attention (a query at position p sees keys at positions > p - window)."""
    scale = float(scale if scale is not None else 1.0 / math.sqrt(head_dim))
    if window is not None and (not isinstance(window, int) or window < 1):
        raise OpError(f"attention window must be a positive integer, got {window!r}")
    return _bind(attention, q, k, v, query_start, num_heads=num_heads, num_kv_heads=num_kv_heads,
                 head_dim=head_dim, scale=scale, window=window)


def silu_and_mul(gate, up):
    return _bind(silu_mul, gate, up)


def gelu_tanh_and_mul(gate, up):
    return _bind(gelu_tanh_mul, gate, up)


def mixture_of_experts(x, router, gate_up, down, *, top_k: int, norm_topk_prob: bool):
    """x [T, D] through the top_k of E expert MLPs (see ref_moe): router [E, D], gate_up [E, 2F, D], down [E, D, F]."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise OpError(f"moe: top_k must be an integer, got {top_k!r}")
    return _bind(moe, x, router, gate_up, down, top_k=top_k, norm_topk_prob=bool(norm_topk_prob))


def compute_logits(x, rows, weight):
    return _bind(logits, x, rows, weight)


def semantic_op_for_primitive(prim) -> OpDef | None:
    for op in REGISTRY.values():
        if op.semantic and op.primitive is prim:
            return op
    return None


def output_types(op: OpDef, in_types: Sequence[tuple[Shape, str]], attrs: dict[str, Any]) -> list[tuple[Shape, str]]:
    """The output (shape, dtype) list of an op applied to inputs of the given types."""
    if op.shape_rule is None:
        raise OpError(f"op {op.name!r} has no shape rule")
    return op.shape_rule(list(in_types), attrs)
