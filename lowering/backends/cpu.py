"""CPU backend: the graph's op references under one jax.jit per shape bucket, KV pools donated in place."""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowering.ir import Graph, IRError, bind_symbols, eval_dim, interpret
from runtime.step import StepInput

DEFAULT_KV_CACHE_BYTES = 1 << 30  # 1 GiB of KV pool unless told otherwise


def _bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= max(n, minimum): bounds the number of compiled shapes."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def kv_bytes_per_block(graph: Graph) -> int:
    total = 0
    for name in graph.state:
        t = graph.types[name]
        per_block = math.prod(d for d in t.shape[1:])
        total += per_block * jnp.dtype(t.dtype).itemsize
    return total


class CpuProgram:
    """Program for target="cpu": step(StepInput) -> f32[L, V]; owns the paged KV pools."""

    def __init__(self, graph: Graph, params: Mapping[str, Any], *, num_blocks: int | None = None,
                 max_num_seqs: int = 64, max_model_len: int = 2048, kv_cache_bytes: int | None = None,
                 pool_fill: float = 0.0):
        if "block_size" not in graph.meta:
            raise IRError("graph has no paged KV cache: run insert_paged_kv before building a program")
        self.graph = graph
        self.block_size = int(graph.meta["block_size"])
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        if num_blocks is None:
            budget = kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
            wanted = max_num_seqs * self.max_blocks_per_seq
            num_blocks = max(self.max_blocks_per_seq, min(wanted, budget // max(kv_bytes_per_block(graph), 1)))
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        out_type = graph.types[graph.outputs[0]]
        self.vocab_size = int(out_type.shape[-1])
        self.params = {k: jnp.asarray(v) for k, v in params.items()}
        missing = set(graph.params) - set(self.params)
        if missing:
            raise IRError(f"program is missing params {sorted(missing)[:3]}")
        env = {"N": self.num_blocks}
        self.state = {s: jnp.full(tuple(eval_dim(d, env) for d in graph.types[s].shape), pool_fill,
                                  dtype=graph.types[s].dtype) for s in graph.state}
        self._step = jax.jit(self._run, donate_argnums=(1,))

    def _run(self, params, state, inputs):
        outs, new_state = interpret(self.graph, inputs, params, state)
        return outs[0], new_state

    def kv_cache_bytes(self) -> int:
        return sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in self.state.values())

    def step(self, inp: StepInput) -> np.ndarray:
        """Run one ragged step; pads every dim to a power-of-two bucket, returns f32[L, V]."""
        inp.validate(block_size=self.block_size, num_blocks=self.num_blocks)
        padded = pad_step(inp, max_blocks_per_seq=self.max_blocks_per_seq)
        logits, self.state = self._step(self.params, self.state, padded)
        return np.asarray(logits[: inp.logit_rows.shape[0]])


def pad_step(inp: StepInput, *, max_blocks_per_seq: int) -> dict[str, np.ndarray]:
    """StepInput -> padded arrays. Pad tokens form one extra empty sequence and write nowhere.

    token rows   [ real tokens (T) | pad (T_pad - T) ]
    sequences    [ real (S) | one pad sequence owning the pad rows, seq_len 0 | empty ones ]
    """
    t, s, l = inp.num_tokens, inp.num_seqs, inp.logit_rows.shape[0]
    t_pad, s_pad, l_pad = _bucket(t, 8), _bucket(s + 1, 2), _bucket(l, 1)
    need_blocks = int(inp.block_tables.shape[1])
    b_pad = min(_bucket(max(need_blocks, 1), 4), max(max_blocks_per_seq, need_blocks))

    def pad1(a, n, fill):  # i32[k] -> i32[n]
        out = np.full((n,), fill, np.int32)
        out[: a.shape[0]] = a
        return out

    query_start = np.full((s_pad + 1,), t_pad, np.int32)
    query_start[: s + 1] = inp.query_start
    seq_lens = np.zeros((s_pad,), np.int32)
    seq_lens[:s] = inp.seq_lens
    tables = np.zeros((s_pad, b_pad), np.int32)
    tables[:s, : inp.block_tables.shape[1]] = inp.block_tables[:, :b_pad]
    return {
        "token_ids": pad1(inp.token_ids, t_pad, 0),
        "positions": pad1(inp.positions, t_pad, 0),
        "slot_mapping": pad1(inp.slot_mapping, t_pad, -1),
        "query_start": query_start,
        "seq_lens": seq_lens,
        "block_tables": tables,
        "logit_rows": pad1(inp.logit_rows, l_pad, 0),
    }
