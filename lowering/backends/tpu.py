"""TPU backend: the graph under jax.jit with its attention, KV writes, quantized matmuls and norms as Pallas TPU kernels.

Everything else (linears, logits, RoPE, SiLU-and-mul, embedding, kv_merge of cross-layer KV sharing (its jnp
reference), the generic lax ops) is XLA, which tiles
dense matmuls onto the MXU well. The Program is the CPU backend's (lowering/backends/cpu.py) with another
lowering table:

  paged_attention              -> kernels_pallas.ragged_paged_attention (decode, chunked prefill and
                                  verification rows in one ragged kernel; bf16 / fp8 / nvfp4 KV)
  attention_mass (H2O)         -> kernels_pallas.attention_mass (per-sequence softmax mass; XLA scatter-adds
                                  it into the mass pool)
  kv_write, kv_write_nvfp4     -> kernels_pallas.kv_write (quantization on write; pools aliased in place)
  qlinear, qlogits (weight-only) -> kernels_pallas.quant_matmul (int8, fp8, int4, nvfp4 and the GGUF-native
                                  q4_1 / q8_0, dequantized in VMEM);
                                  W8A8 (act_format "fp8") stays on the XLA reference
  add -> rms_norm (residual)   -> kernels_pallas.norms.add_rms_norm (the sum and the norm in one kernel)
  rms_norm (alone)             -> kernels_pallas.norms.rms_norm
                                  (Gemma's (1 + w) norms, attr weight_offset, stay on the XLA reference)
  moe                          -> router in XLA, expert MLPs as kernels_pallas.moe.gmm grouped matmuls over
                                  rows sorted by expert (megablox style)

KV pools are donated to the jitted step and updated in place; each step is padded to a bucket of token
count, sequence count and block-table width (cpu.pad_step), so the number of compiled programs stays
bounded. The kernels need no static query-tile length (they read the ragged layout from scalar-prefetched
query_start / seq_lens); the compiled key only says whether a step is decode-only, which takes the
attention kernel's decode query block (tuning "decode_queries_per_block") instead of the prefill one.

Without a TPU (`interpret=None` and no TPU device) every kernel runs in Pallas' TPU interpret mode on the
CPU: the whole Program is testable here, slowly. Block sizes come from kernels_pallas.tuning.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowering import ops
from lowering.backends.cpu import CpuProgram, cpu_impls
from lowering.backends.patterns import fusable_norm
from lowering.ir import Graph, Node, run_reference

DEFAULT_HBM_FRACTION = 0.9  # of the TPU's free HBM for the KV pools when kv_cache_bytes is not given


def on_tpu() -> bool:
    try:
        devices = jax.devices()
    except RuntimeError:
        return False
    return bool(devices) and devices[0].platform == "tpu"


class TpuProgram(CpuProgram):
    """Program for target="tpu": step(StepInput) -> f32[L, V]; Pallas kernels, interpret mode off-TPU."""

    def __init__(self, graph: Graph, params: Mapping[str, Any], *, interpret: bool | None = None,
                 kv_cache_bytes: int | None = None, **kwargs):
        self.interpret = (not on_tpu()) if interpret is None else bool(interpret)
        if kv_cache_bytes is None and kwargs.get("num_blocks") is None and not self.interpret:
            kv_cache_bytes = _free_hbm_bytes(params)
        # residual add -> rms_norm pairs: the add's kernel computes the norm too, keyed by the norm node
        users = graph.users()
        position = {id(n): i for i, n in enumerate(graph.nodes)}
        self._fused_norm: dict[int, Node] = {}
        for node in graph.nodes:
            norm = fusable_norm(graph, node, users, position) if node.op == "add" else None
            if norm is not None and norm.inputs[1] in graph.params and norm.attrs.get("weight_offset") is None:
                self._fused_norm[id(node)] = norm
        super().__init__(graph, params, kv_cache_bytes=kv_cache_bytes, **kwargs)

    def _max_q_len_key(self, padded: dict) -> int:
        """1 for decode-only steps (they take the decode query block), 0 otherwise: the ragged kernel needs no
        static query tile, so at most two programs per padded shape."""
        q_lens = np.diff(padded["query_start"])
        return 1 if int(q_lens.max()) <= 1 else 0

    def _impls(self, params, max_q_len: int) -> dict:
        from kernels_pallas.kv_write import kv_write, kv_write_nvfp4
        from kernels_pallas.moe import moe_experts
        from kernels_pallas.norms import add_rms_norm, rms_norm
        from kernels_pallas.quant_matmul import quantized_matmul
        from kernels_pallas.attention_mass import attention_mass as pallas_attention_mass
        from kernels_pallas.ragged_paged_attention import ragged_paged_attention
        from kernels_pallas.tuning import attention_blocks

        interp = self.interpret
        normed: dict[int, Any] = {}  # id(rms_norm node) -> its output, computed by the fused add

        # pages per KV block scaled to this page size, and the decode query block on decode-only steps
        att_blocks = attention_blocks(self.block_size, decode=max_q_len == 1)

        def paged_attention(node: Node, args, env):
            return (ragged_paged_attention(*args, **node.attrs, **att_blocks, interpret=interp),)

        def attention_mass(node: Node, args, env):  # H2O mass: the new pool (XLA scatters the kernel's sums)
            return (pallas_attention_mass(*args, **node.attrs, **att_blocks, interpret=interp),)

        def write(node: Node, args, env):
            if node.op == "kv_write_nvfp4":
                return tuple(kv_write_nvfp4(*args, interpret=interp, scale_rule=node.attrs.get("scale_rule", "amax")))
            return tuple(kv_write(*args, kv_format=node.attrs.get("kv_format"), interpret=interp))

        def qlinear(node: Node, args, env):
            a = node.attrs
            if a.get("act_format") is not None or a["format"] not in _KERNEL_FORMATS:
                return run_reference(node, args, env)  # W8A8: XLA quantizes the activations, then dots
            x, rest = args[0], args[1:]
            if node.op == "qlogits":
                x, rest = jnp.take(x, rest[0], axis=0, mode="clip"), rest[1:]
            n_parts = len(_weight_parts(a["format"]))
            parts, bias = rest[:n_parts], (rest[n_parts] if len(rest) > n_parts else None)
            y = quantized_matmul(x, *parts, format=a["format"], in_features=a["in_features"],
                                 out_features=a["out_features"], group_size=a.get("group_size"), bias=bias,
                                 interpret=interp)
            return (y.astype(jnp.float32) if node.op == "qlogits" else y,)

        def moe(node: Node, args, env):  # the router in XLA, the expert MLPs as two grouped matmuls
            x, router, gate_up, down = args
            weights, experts = ops.route_tokens(x, router, top_k=node.attrs["top_k"],
                                                norm_topk_prob=node.attrs["norm_topk_prob"])
            return (moe_experts(x, gate_up, down, weights, experts, interpret=interp),)

        def add(node: Node, args, env):
            norm = self._fused_norm.get(id(node))
            if norm is None:
                return run_reference(node, args, env)
            y, total = add_rms_norm(args[0], args[1], params[norm.inputs[1]], eps=norm.attrs["eps"],
                                    interpret=interp)
            normed[id(norm)] = y
            return (total,)

        def norm(node: Node, args, env):
            if id(node) in normed:
                return (normed.pop(id(node)),)
            if node.attrs.get("weight_offset") is not None:  # Gemma's form: no Pallas kernel, XLA
                return run_reference(node, args, env)
            return (rms_norm(args[0], args[1], eps=node.attrs["eps"], interpret=interp),)

        return {"rope": cpu_impls(1)["rope"], "paged_attention": paged_attention, "kv_write": write,
                "kv_write_nvfp4": write, "qlinear": qlinear, "qlogits": qlinear, "add": add, "rms_norm": norm,
                "moe": moe, "attention_mass": attention_mass}


_KERNEL_FORMATS = ("int8", "fp8", "int4", "nvfp4", "q4_1", "q8_0")  # weight-only formats of quant_matmul


def _weight_parts(fmt: str):
    from lowering.quant import formats

    return formats.WEIGHT_PARTS[fmt]


def _free_hbm_bytes(params: Mapping[str, Any]) -> int:
    """KV budget on a TPU: a fraction of the device's memory limit left after the weights."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = int(stats.get("bytes_limit", 16 << 30))
    weights = sum(int(getattr(v, "nbytes", 0)) for v in params.values())
    return max(int((limit - weights) * DEFAULT_HBM_FRACTION), 64 << 20)
