"""Calibration: run a paged graph over fixed token windows (one prefill step per batch of windows) to
collect statistics of intermediate values and to measure next-token loss with fake-quantized weights/KV."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lowering import ops
from lowering.ir import Graph, IRError, eval_dim, interpret
from lowering.quant import formats
from runtime.step import window_step

DEFAULT_CALIBRATION_FILE = Path(__file__).with_name("calibration.txt")


class CalibrationError(ValueError):
    """Calibration data is missing, too short or not tokenizable."""


def calibration_windows(source: Any, tokenizer=None, *, window: int = 128, num_windows: int = 4,
                        vocab_size: int | None = None, seed: int = 0) -> list[np.ndarray]:
    """Fixed token windows for calibration.

    source: None (llmc's bundled calibration text), a str of text, a path to a text file, or a sequence of
    token-id sequences (used as given, each cut to `window`). Text is tokenized once and cut into
    consecutive non-overlapping windows. Without a tokenizer (a bare Flax model), windows of random token
    ids (seeded) are used and a warning is not needed: the caller records `source="random tokens"`.
    """
    if window < 2 or num_windows < 1:
        raise CalibrationError(f"calibration needs window >= 2 and num_windows >= 1, got {window}, {num_windows}")
    if source is not None and not isinstance(source, (str, Path)):
        seqs = [np.asarray(s, np.int32).reshape(-1)[:window] for s in source]
        if not seqs or any(s.size < 2 for s in seqs):
            raise CalibrationError("calibration token sequences must each have at least 2 tokens")
        return seqs[:num_windows]
    if tokenizer is None:
        if vocab_size is None:
            raise CalibrationError("calibration text needs a tokenizer; pass token ids instead")
        rng = np.random.default_rng(seed)
        return [rng.integers(0, vocab_size, size=window, dtype=np.int32) for _ in range(num_windows)]
    if source is None:
        text = DEFAULT_CALIBRATION_FILE.read_text()
    elif isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and len(source) < 4096
                                      and Path(source).is_file()):
        text = Path(source).read_text()
    else:
        text = source
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if ids.size < 2:
        raise CalibrationError("calibration text tokenizes to fewer than 2 tokens")
    count = min(num_windows, max(1, ids.size // window))
    return [ids[i * window:(i + 1) * window] for i in range(count)]


@dataclasses.dataclass
class QuantFlags:
    """Run-time switches of the fake-quantized forward (arrays, so changing them never recompiles)."""

    act_fp8: np.ndarray  # f32[num linear-like nodes]: 1 = quantize the input per token to fp8 (W8A8)
    kv_format: np.ndarray  # i32[num layers]: 0 plain, 1 fp8, 2 nvfp4
    kv_scale: np.ndarray  # f32[num layers, 2, Hkv]: fp8 scale per KV head (K, V)
    kv_global: np.ndarray  # f32[num layers, 2]: nvfp4 global scale (K, V)
    kv_center: np.ndarray  # f32[num layers, Hkv, Dh]: nvfp4 K center (subtracted before quantizing K)
    kv_feedback: np.ndarray  # f32[num layers, Hkv, Dh, Dh]: nvfp4 K rounding factor (identity: nearest)


class GraphRunner:
    """Runs a paged graph (after insert_paged_kv) over batches of whole windows on the CPU (jax.jit).

    `collect(names, reducer)` returns reduced statistics of intermediate values; `loss(params, flags)`
    returns the mean next-token NLL over the windows with optional fake quantization:
    linear / logits nodes quantize their input to fp8 per token where flags.act_fp8 says so, and kv_write
    nodes round K and V through the layer's KV format where flags.kv_format says so.
    """

    def __init__(self, graph: Graph, params: Mapping[str, Any], windows: Sequence[np.ndarray], *,
                 batch_windows: int = 4):
        if "block_size" not in graph.meta:
            raise IRError("calibration needs a paged graph (run insert_paged_kv first)")
        self.graph = graph
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        self.windows = [np.asarray(w, np.int32) for w in windows]
        self.block_size = int(graph.meta["block_size"])
        self.batches = [self.windows[i:i + batch_windows] for i in range(0, len(self.windows), batch_windows)]
        self.linear_nodes = [n for n in graph.nodes if n.op in ("linear", "logits", "qlinear", "qlogits")]
        self.kv_nodes = [n for n in graph.nodes if n.op == "kv_write" and not n.attrs.get("kv_format")]
        self._index = {id(n): i for i, n in enumerate(self.linear_nodes)}
        self._kv_index = {id(n): i for i, n in enumerate(self.kv_nodes)}
        self._loss_fn = None
        self._collect_fns: dict = {}

    # -- inputs -----------------------------------------------------------------------------------

    def _step_inputs(self, batch: list[np.ndarray], *, all_rows: bool):
        """(graph inputs, pool blocks needed, longest window) of one prefill step over `batch` (block 0 unused)."""
        step = window_step(batch, block_size=self.block_size, first_block=1, all_rows=all_rows,
                           two_groups="block_tables_w" in self.graph.inputs)
        inputs = {name: getattr(step, name) for name in self.graph.inputs}
        return inputs, int(step.block_tables.max()) + 1, int(step.seq_lens.max())

    def _state(self, num_blocks: int):
        env = {"N": num_blocks, "NW": num_blocks}  # a second KV group mirrors the first's block ids
        return {s: jnp.zeros(tuple(eval_dim(d, env) for d in self.graph.types[s].shape), self.graph.types[s].dtype)
                for s in self.graph.state}

    def _impls(self, max_q_len: int, flags: QuantFlags | None, feedback: bool = False):
        from lowering.backends.cpu import cpu_impls

        impls = dict(cpu_impls(max_q_len))
        if flags is None:
            return impls
        index, kv_index = self._index, self._kv_index

        def with_act(node, args):
            if node.op in ("linear", "qlinear"):
                x = args[0]
                q = formats.jnp_fake_quant_fp8_rows(x).astype(x.dtype)
                return [jnp.where(flags.act_fp8[index[id(node)]] > 0, q, x), *args[1:]]
            x, rows = args[0], args[1]
            picked = jnp.take(x, rows, axis=0, mode="clip")
            q = formats.jnp_fake_quant_fp8_rows(picked).astype(x.dtype)
            picked = jnp.where(flags.act_fp8[index[id(node)]] > 0, q, picked)
            return [picked, jnp.arange(rows.shape[0], dtype=rows.dtype), *args[2:]]

        def linear(node, args, env):
            return (ops.ref_linear(*with_act(node, args)),)

        def logits(node, args, env):
            return (ops.ref_logits(*with_act(node, args)),)

        def kv_write(node, args, env):
            if id(node) not in kv_index:  # already quantized: nothing to simulate
                return impls_base_kv(node, args, env)
            k, v, slots, kp, vp = args
            layer = kv_index[id(node)]
            heads, dim = kp.shape[2:]
            out = []
            for which, x in enumerate((k, v)):
                xh = x.reshape(-1, heads, dim).astype(jnp.float32)
                scale = flags.kv_scale[layer, which][:, None]
                fp8 = formats.jnp_round_fp8(xh / scale) * scale
                gs = flags.kv_global[layer, which]
                if dim % 16 == 0:  # as kv_write_nvfp4 stores it (K centered: attention ignores the shift)
                    rule = formats.KV_NVFP4_SCALE_RULE
                    xc = xh - flags.kv_center[layer] if which == 0 else xh
                    if which == 0 and feedback:  # some layer rounds K score-aware (identity elsewhere)
                        parts = formats.jnp_quantize_nvfp4_feedback(xc, gs, flags.kv_feedback[layer], rule)
                    else:
                        parts = formats.jnp_quantize_nvfp4(xc, gs, rule)
                    nv = formats.jnp_dequantize_nvfp4(*parts, gs)
                else:
                    nv = xh
                fmt = flags.kv_format[layer]
                out.append(jnp.where(fmt == 1, fp8, jnp.where(fmt == 2, nv, xh)).reshape(x.shape).astype(x.dtype))
            return impls_base_kv(node, [out[0], out[1], slots, kp, vp], env)

        impls_base_kv = impls["kv_write"]
        impls.update({"linear": linear, "logits": logits, "kv_write": kv_write})
        return impls

    # -- statistics -------------------------------------------------------------------------------

    def collect(self, names: Sequence[str], reducer: Callable[[str, Any], Any],
                combine: Callable[[Any, Any], Any] = lambda a, b: a + b) -> dict[str, np.ndarray]:
        """{name: combine over batches of reducer(name, value)} for intermediate values `names`.

        reducer runs inside jit on the value restricted to real token rows (f32[T, ...])."""
        names = list(names)
        key = (tuple(names), reducer)  # the reducer too: the same values may be reduced in different ways
        if key not in self._collect_fns:
            graph = self.graph.copy()
            graph.outputs = graph.outputs + names

            def run(params, state, inputs, max_q_len):
                outs, _ = interpret(graph, inputs, params, state, impls=self._impls(max_q_len, None))
                return {n: reducer(n, v.astype(jnp.float32)) for n, v in zip(names, outs[1:])}

            self._collect_fns[key] = jax.jit(run, static_argnums=(3,))
        fn = self._collect_fns[key]
        total: dict[str, np.ndarray] = {}
        for batch in self.batches:
            inputs, num_blocks, max_q = self._step_inputs(batch, all_rows=False)
            got = fn(self.params, self._state(num_blocks), inputs, max_q)
            for n in names:
                value = np.asarray(got[n])
                total[n] = value if n not in total else combine(total[n], value)
        return total

    # -- loss -------------------------------------------------------------------------------------

    def loss(self, params: Mapping[str, Any] | None = None, flags: QuantFlags | None = None) -> float:
        """Mean next-token NLL (nats) over every window; params override self.params by name."""
        merged = dict(self.params)
        if params:
            merged.update({k: jnp.asarray(v) for k, v in params.items()})
        if flags is None:
            flags = self.no_flags()
        if self._loss_fn is None:
            graph = self.graph

            def run(params, state, inputs, targets, valid, flag_arrays, max_q_len, feedback):
                flags = QuantFlags(*flag_arrays)
                outs, _ = interpret(graph, inputs, params, state, impls=self._impls(max_q_len, flags, feedback))
                logp = jax.nn.log_softmax(outs[0].astype(jnp.float32), axis=-1)
                nll = -jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0]
                return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)

            self._loss_fn = jax.jit(run, static_argnums=(6, 7))
        # the sequential score-aware K rounding only where a layer has a factor other than the identity
        feedback = bool((flags.kv_feedback != np.eye(flags.kv_feedback.shape[-1], dtype=np.float32)).any())
        total, count = 0.0, 0
        for batch in self.batches:
            inputs, num_blocks, max_q = self._step_inputs(batch, all_rows=True)
            targets = np.concatenate([np.append(w[1:], 0) for w in batch]).astype(np.int32)
            valid = np.concatenate([np.arange(w.size) < w.size - 1 for w in batch])
            jflags = tuple(jnp.asarray(getattr(flags, f.name)) for f in dataclasses.fields(QuantFlags))
            s, c = self._loss_fn(merged, self._state(num_blocks), inputs, targets, valid, jflags, max_q, feedback)
            total += float(s)
            count += int(c)
        return total / max(count, 1)

    def no_flags(self) -> QuantFlags:
        layers = max(len(self.kv_nodes), 1)
        # heads and head_dim from the K pool of a KV layer that flags can quantize (the graph's first state
        # buffer may be an already-quantized pool, e.g. packed nvfp4 with head_dim / 2 bytes per row, when a
        # guard kept some layers unquantized)
        pool = self.kv_nodes[0].inputs[3] if self.kv_nodes else None
        heads, dim = self.graph.types[pool].shape[2:4] if pool is not None else (1, 1)
        return QuantFlags(np.zeros(len(self.linear_nodes), np.float32), np.zeros(layers, np.int32),
                          np.ones((layers, 2, heads), np.float32), np.ones((layers, 2), np.float32),
                          np.zeros((layers, heads, dim), np.float32),
                          np.broadcast_to(np.eye(dim, dtype=np.float32), (layers, heads, dim, dim)).copy())

    @property
    def num_tokens(self) -> int:
        return sum(w.size for w in self.windows)


def ppl_increase(loss: float, base_loss: float) -> float:
    """Relative perplexity increase exp(loss - base) - 1."""
    return math.expm1(loss - base_loss)
