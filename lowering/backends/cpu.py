"""CPU backend: the graph's op references under one jax.jit per shape bucket, KV pools donated in place."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowering import ops
from lowering.backends.patterns import check_hidden_output
from lowering.ir import (Graph, IRError, Node, eval_dim, interpret, resolve_window_blocks, run_reference,
                         split_kv_blocks)
from lowering.kv_policy import plan_for_graph
from runtime.step import StepInput

DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB of KV pool unless told otherwise


def _bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum): bounds the number of compiled shapes."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def _fine_bucket(n: int, minimum: int = 1) -> int:
    """Smallest of 1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, ... >= max(n, minimum).

    Four sizes per octave: at most 25% padding, and only a few compiled shapes per octave.
    """
    n = max(n, minimum)
    if n <= 8:
        return n
    p = _bucket(n) // 2  # n in (p, 2p]
    step = p // 4
    return -(-n // step) * step


class CpuProgram:
    """Program for target="cpu": step(StepInput) -> f32[L, V]; owns the paged KV pools."""

    def __init__(self, graph: Graph, params: Mapping[str, Any], *, num_blocks: int | None = None,
                 max_num_seqs: int = 64, max_model_len: int = 2048, kv_cache_bytes: int | None = None,
                 pool_fill: float = 0.0, num_blocks_w: int | None = None):
        """num_blocks_w: blocks of the second KV group's pool (sliding-window layers beside global ones, see
        insert_paged_kv); by default every sequence's window plus one max_model_len prefill (window_pool_blocks)."""
        if "block_size" not in graph.meta:
            raise IRError("graph has no paged KV cache: run insert_paged_kv before building a program")
        self.graph = graph
        self.block_size = int(graph.meta["block_size"])
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.kv_window, self.kv_window_w = graph.meta.get("kv_window"), graph.meta.get("kv_window_w")
        # KV eviction (graph.meta["kv_policy"]): a sequence never holds more than the plan's blocks
        self.eviction = plan_for_graph(graph, max_model_len)
        per_seq = self.max_blocks_per_seq if self.eviction is None else min(
            self.max_blocks_per_seq, self.eviction.max_blocks(self.block_size))
        sizes = dict(max_num_seqs=max_num_seqs, max_blocks_per_seq=per_seq)
        if num_blocks is None:
            budget = kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
            wanted = max_num_seqs * per_seq
            fit, num_blocks_w = split_kv_blocks(graph, budget, num_blocks_w=num_blocks_w, **sizes)
            num_blocks = max(per_seq, min(wanted, fit))
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self.num_blocks_w = resolve_window_blocks(graph, self.num_blocks, num_blocks_w, sizes)
        out_type = graph.types[graph.outputs[0]]
        self.vocab_size = int(out_type.shape[-1])
        missing = set(graph.params) - set(params)
        if missing:
            raise IRError(f"program is missing params {sorted(missing)[:3]}")
        self.params = self._load_params(params)
        env = {"N": self.num_blocks, "NW": self.num_blocks_w}
        self.state = {s: self._new_state(tuple(eval_dim(d, env) for d in graph.types[s].shape), graph.types[s].dtype,
                                         pool_fill) for s in graph.state}
        self._step = self._step_function()
        # padded step shapes already run (would_compile); shared like the jitted step, per pool size
        seen = self.graph.__dict__.setdefault("_cpu_seen_shapes", {}) if type(self) is CpuProgram else {}
        self._seen_shapes: set = seen.setdefault((hash(self.graph.dumps()), self.num_blocks, self.num_blocks_w), set())

    def _load_params(self, params: Mapping[str, Any]) -> dict:
        return {k: jnp.asarray(v) for k, v in params.items()}

    def _new_state(self, shape: tuple[int, ...], dtype: str, fill: float):
        return jnp.full(shape, fill, dtype=dtype)

    def _step_function(self):
        """The jitted step. Plain CPU programs of one graph share it (kept on the graph object), so engines
        built over the same compiled model reuse its compiled shapes instead of compiling them again."""
        if type(self) is not CpuProgram:  # subclasses' kernels may depend on the instance
            return jax.jit(self._run, donate_argnums=(1,), static_argnums=(3,))
        key = hash(self.graph.dumps())  # a graph edited in place after a program was built gets a new function
        cached = self.graph.__dict__.get("_cpu_step_fn")
        shared = cached[1] if cached is not None and cached[0] == key else None
        if shared is None:
            graph = self.graph

            def run(params, state, inputs, max_q_len):
                outs, new_state = interpret(graph, inputs, params, state, impls=cpu_impls(max_q_len))
                return tuple(outs), new_state

            shared = jax.jit(run, donate_argnums=(1,), static_argnums=(3,))
            self.graph.__dict__["_cpu_step_fn"] = (key, shared)
        return shared

    def _run(self, params, state, inputs, max_q_len):
        outs, new_state = interpret(self.graph, inputs, params, state, impls=self._impls(params, max_q_len))
        return tuple(outs), new_state

    def _impls(self, params, max_q_len: int) -> dict:
        """The op implementations of one trace (a subclass swaps in its kernels)."""
        return cpu_impls(max_q_len)

    def _max_q_len_key(self, padded: dict) -> int:
        """The static query-tile length a step is compiled for: the longest new-token run, bucketed."""
        return _fine_bucket(int(np.diff(padded["query_start"]).max()))

    def kv_cache_bytes(self) -> int:
        return sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in self.state.values())

    def compact_kv(self, compactions) -> None:
        """Apply KV compactions (runtime.step.KVCompaction) under the graph's eviction policy, in order."""
        if self.eviction is None:
            raise ValueError("compact_kv: this program has no KV eviction policy (compile_model(kv_policy=...))")
        if compactions:
            from lowering.backends.kv_compact import compact_jax

            self.state = compact_jax(self.state, self.graph, self.eviction, compactions, self.block_size)

    def would_compile(self, num_seqs: int, rows_per_seq: int, max_seq_len: int) -> bool:
        """Whether a uniform step (num_seqs sequences of rows_per_seq rows, logits for all, the longest max_seq_len
        tokens after it) has a padded shape this Program has not run, so XLA would compile it (seconds)."""
        s, q = int(num_seqs), int(rows_per_seq)
        width = max(1, -(-int(max_seq_len) // self.block_size))
        two = self.num_blocks_w is not None
        probe = StepInput(np.zeros(s * q, np.int32), np.zeros(s * q, np.int32), np.full(s * q, -1, np.int32),
                          (np.arange(s + 1) * q).astype(np.int32), np.full(s, q, np.int32),
                          np.zeros((s, width), np.int32), np.arange(s * q, dtype=np.int32),
                          np.zeros((s, width), np.int32) if two else None, np.full(s * q, -1, np.int32) if two else None)
        padded = pad_step(probe, max_blocks_per_seq=self.max_blocks_per_seq)
        return _shape_key(padded, self._max_q_len_key(padded)) not in self._seen_shapes

    def step(self, inp: StepInput, *, with_hidden: bool = False):
        """Run one ragged step; pads every dim to a bucket (few compiled shapes), returns f32[L, V].

        with_hidden (graphs compiled for medusa / eagle speculation): returns (logits f32[L, V], hidden
        f32[T, D]), the final-norm hidden state of every token row."""
        if with_hidden:
            check_hidden_output(self.graph)
        inp.validate(block_size=self.block_size, num_blocks=self.num_blocks, num_blocks_w=self.num_blocks_w)
        padded = pad_step(inp, max_blocks_per_seq=self.max_blocks_per_seq)
        compiled = jit_cache_size(self._step)
        key = self._max_q_len_key(padded)
        self._seen_shapes.add(_shape_key(padded, key))
        outs, self.state = self._step(self.params, self.state, padded, key)
        # a step that compiled a new shape took seconds: cost models (speculation) skip its time
        self.last_step_compiled = jit_cache_size(self._step) != compiled
        logits = np.asarray(outs[0][: inp.logit_rows.shape[0]])
        if not with_hidden:
            return logits
        return logits, np.asarray(outs[1][: inp.num_tokens], np.float32)



def _shape_key(padded: dict, max_q_len_key: int) -> tuple:
    return tuple(int(padded[n].shape[-1]) for n in sorted(padded)) + (max_q_len_key,)


def jit_cache_size(fn) -> int:
    """How many shapes a jax.jit function has compiled (-1 where JAX does not say): a change means a call compiled."""
    size = getattr(fn, "_cache_size", None)
    return int(size()) if callable(size) else -1


def pad_step(inp: StepInput, *, max_blocks_per_seq: int) -> dict[str, np.ndarray]:
    """StepInput -> padded arrays. Pad tokens form one extra empty sequence and write nowhere.

    token rows   [ real tokens (T) | pad (T_pad - T) ]
    sequences    [ real (S) | one pad sequence owning the pad rows, seq_len 0 | empty ones ]
    """
    t, s, l = inp.num_tokens, inp.num_seqs, inp.logit_rows.shape[0]
    t_pad, s_pad, l_pad = _fine_bucket(t), _fine_bucket(s + 1, 2), _fine_bucket(l)
    need_blocks = int(inp.block_tables.shape[1])
    b_pad = min(_fine_bucket(need_blocks, 4), max(max_blocks_per_seq, need_blocks))

    def pad1(a, n, fill):  # i32[k] -> i32[n]
        out = np.full((n,), fill, np.int32)
        out[: a.shape[0]] = a
        return out

    query_start = np.full((s_pad + 1,), t_pad, np.int32)
    query_start[: s + 1] = inp.query_start
    seq_lens = np.zeros((s_pad,), np.int32)
    seq_lens[:s] = inp.seq_lens
    def pad_tables(block_tables):
        tables = np.zeros((s_pad, b_pad), np.int32)
        tables[:s, : block_tables.shape[1]] = block_tables[:, :b_pad]
        return tables

    out = {
        "token_ids": pad1(inp.token_ids, t_pad, 0),
        "positions": pad1(inp.positions, t_pad, 0),
        "slot_mapping": pad1(inp.slot_mapping, t_pad, -1),
        "query_start": query_start,
        "seq_lens": seq_lens,
        "block_tables": pad_tables(inp.block_tables),
        "logit_rows": pad1(inp.logit_rows, l_pad, 0),
    }
    if inp.block_tables_w is not None:  # the second KV group (sliding-window layers)
        out["block_tables_w"] = pad_tables(inp.block_tables_w)
        out["slot_mapping_w"] = pad1(inp.slot_mapping_w, t_pad, -1)
    return out


# ---------------------------------------------------------------------------------------------
# CPU lowering table: op implementations that XLA:CPU runs well. Everything else uses the reference.
# ---------------------------------------------------------------------------------------------


def cpu_impls(max_q_len: int) -> dict:
    """Per-trace implementations; `max_q_len` (static) bounds any sequence's new tokens this step."""
    rope_tables: dict = {}

    def rope(node: Node, args, env):
        x, positions = args
        a = node.attrs
        key = (id(positions), a["head_dim"], a["theta"], str(a.get("rope_scaling")), x.dtype)
        if key not in rope_tables:  # cos/sin once per step, shared by every layer
            rope_tables[key] = ops.rope_tables(positions, x.dtype, head_dim=a["head_dim"], theta=a["theta"],
                                               rope_scaling=a.get("rope_scaling"))
        cos, sin = rope_tables[key]
        return (ops.rotate_with_tables(x, cos, sin, num_heads=a["num_heads"], head_dim=a["head_dim"]),)

    def paged_attention(node: Node, args, env):
        if max_q_len == 1:  # decode only: one query per sequence, per-token gathers are the same work
            return (ops.ref_paged_attention(*args, **node.attrs),)
        return (paged_attention_by_sequence(*args, max_q_len=max_q_len, **node.attrs),)

    def kv_write(node: Node, args, env):  # kv_write (plain or fp8) and kv_write_nvfp4
        k, v, slots = args[:3]
        nvfp4 = node.op == "kv_write_nvfp4"
        if nvfp4:
            return write_rows_in_place(slots, ops.kv_rows_to_store(
                k, v, args[3:7], args[7:9], "nvfp4", scale_rule=node.attrs.get("scale_rule", "amax"),
                k_center=args[9] if len(args) > 9 else None, k_feedback=args[10] if len(args) > 10 else None))
        return write_rows_in_place(slots, ops.kv_rows_to_store(k, v, args[3:5], args[5:], node.attrs.get("kv_format")))

    def kv_merge(node: Node, args, env):  # the reference's merged rows, written in place like kv_write's
        return write_rows_in_place(args[2], ops.kv_merge_rows_to_store(*args, **node.attrs))

    impls = {"rope": rope, "paged_attention": paged_attention, "kv_write": kv_write, "kv_write_nvfp4": kv_write,
             "kv_merge": kv_merge}
    from lowering.backends import cpu_native

    if cpu_native.available():  # GGUF blocks multiplied in place (else the reference dequantizes them first)
        impls["qlinear"] = impls["qlogits"] = gguf_qlinear
    return impls


NATIVE_MAX_ROWS = 32  # above this many rows, dequantize once and let XLA's GEMM run (prefill)


def gguf_qlinear(node: Node, args, env):
    """qlinear / qlogits over GGUF-native weights (q4_1, q8_0) at decode-sized M: the native kernel reads the
    blocks and never materializes float32 weights. Everything else: the op's reference."""
    from lowering.backends import cpu_native
    from lowering.quant import formats

    a = node.attrs
    fmt = a["format"]
    x, rest = args[0], list(args[1:])
    if node.op == "qlogits":
        x, rest = jnp.take(x, rest[0], axis=0, mode="clip"), rest[1:]
    if fmt not in formats.GGUF_FORMATS or x.dtype != jnp.float32 or x.shape[0] > NATIVE_MAX_ROWS:
        return run_reference(node, args, env)
    n_parts = len(formats.WEIGHT_PARTS[fmt])
    y = cpu_native.gguf_matmul(x, *rest[:n_parts], format=fmt)
    if len(rest) > n_parts:  # bias
        y = y + rest[n_parts].astype(jnp.float32)
    return (y,)


def write_rows_in_place(slot_mapping, pairs):
    """Write rows into pools at slot_mapping i32[T] (-1: skip): pairs of (rows [T, ...], pool [N, Bs, ...]).

    Same result as a scatter, as a loop of dynamic_update_slice that XLA:CPU does in place.
    NOTE: XLA:CPU turns a scatter of a few rows into an elementwise pass over the whole pool (its
    cost grows with the pool, not the step); a loop of small in-place updates costs O(T).
    A slot of -1 rewrites the current contents of slot 0, which changes nothing.
    """
    block_size = pairs[0][1].shape[1]
    # NOTE: XLA:CPU copies a float8 pool on every dynamic_update_slice of the loop (~400x slower than f32);
    # the same bytes written through a uint8 view stay in place.
    fp8 = [pool.dtype == jnp.float8_e4m3fn for _, pool in pairs]
    rows = [r.reshape(-1, 1, 1, *pool.shape[2:]).astype(pool.dtype) for r, pool in pairs]
    rows = [jax.lax.bitcast_convert_type(r, jnp.uint8) if f else r for r, f in zip(rows, fp8)]
    pools_in = tuple(jax.lax.bitcast_convert_type(pool, jnp.uint8) if f else pool for (_, pool), f in zip(pairs, fp8))

    def write_one(i, pools):
        slot = slot_mapping[i]
        at_block, at_off = jnp.maximum(slot, 0) // block_size, jnp.maximum(slot, 0) % block_size
        out = []
        for r, pool in zip(rows, pools):
            at = (at_block, at_off) + (0,) * (pool.ndim - 2)
            size = (1, 1, *pool.shape[2:])
            new = jnp.where(slot >= 0, r[i], jax.lax.dynamic_slice(pool, at, size))
            out.append(jax.lax.dynamic_update_slice(pool, new, at))
        return tuple(out)

    out = jax.lax.fori_loop(0, slot_mapping.shape[0], write_one, pools_in)
    return tuple(jax.lax.bitcast_convert_type(p, jnp.float8_e4m3fn) if f else p for p, f in zip(out, fp8))


def paged_attention_by_sequence(q, k_pool, v_pool, query_start, seq_lens, block_tables, *kv_extras, num_heads,
                                num_kv_heads, head_dim, scale, max_q_len, kv_format=None, window=None):
    """Same result as ops.ref_paged_attention, computed per sequence on padded query tiles.

    q rows are gathered into [S, Q, ...] tiles (Q = max_q_len), attend to the sequence's gathered
    context [S, C, ...] once, and are scattered back to their flat rows. With a sliding `window` a query at
    context index p sees indices > p - window; values before the window of a sequence's first new token
    (pages that may be freed, holding anything) are zeroed, so they never reach the output.
    """
    num_tokens = q.shape[0]
    num_seqs, num_table = block_tables.shape
    block_size = k_pool.shape[1]
    num_ctx = num_table * block_size
    group = num_heads // num_kv_heads
    q_lens = query_start[1:] - query_start[:-1]  # i32[S]
    tile = jnp.arange(max_q_len)  # i32[Q]
    rows = query_start[:-1, None] + tile[None, :]  # i32[S, Q]
    row_ok = tile[None, :] < q_lens[:, None]  # bool[S, Q]
    qt = jnp.take(q, jnp.where(row_ok, rows, 0), axis=0).astype(jnp.float32)  # [S, Q, Hq*Dh]
    qt = qt.reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim)
    keys = ops.gather_kv_blocks(k_pool, kv_extras, kv_format, 0, block_tables).reshape(
        num_seqs, num_ctx, num_kv_heads, head_dim)
    vals = ops.gather_kv_blocks(v_pool, kv_extras, kv_format, 1, block_tables).reshape(
        num_seqs, num_ctx, num_kv_heads, head_dim)
    q_pos = (seq_lens - q_lens)[:, None] + tile[None, :]  # i32[S, Q]: context index of each query
    mask = jnp.arange(num_ctx)[None, None, :] <= q_pos[:, :, None]  # bool[S, Q, C]
    ctx_ok = jnp.arange(num_ctx)[None, :] < seq_lens[:, None]  # bool[S, C]
    if window is not None:
        mask = mask & (jnp.arange(num_ctx)[None, None, :] > q_pos[:, :, None] - window)
        ctx_ok = ctx_ok & (jnp.arange(num_ctx)[None, :] > q_pos[:, :1] - window)  # the first query's window
    vals = jnp.where(ctx_ok[:, :, None, None], vals, 0.0)
    scores = jnp.einsum("sqkgd,sckd->skgqc", qt, keys) * scale  # f32[S, Hkv, G, Q, C]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("skgqc,sckd->sqkgd", probs, vals).reshape(num_seqs * max_q_len, num_heads * head_dim)
    # back to flat rows: token t is tile row (t - query_start[seg]) of sequence seg
    seg = jnp.minimum(ops.segment_ids(query_start, num_tokens), num_seqs - 1)
    flat = seg * max_q_len + jnp.clip(jnp.arange(num_tokens) - query_start[seg], 0, max_q_len - 1)
    return jnp.take(out, flat, axis=0).astype(q.dtype)
