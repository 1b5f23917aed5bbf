"""Test helpers for lowering: tiny configs, numpy float64 references, ragged step builders."""
from __future__ import annotations

import math

import numpy as np

from lowering.models.config import ModelConfig
from runtime.step import StepInput


def tiny_config(**overrides) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_layers=2,
                num_heads=6, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=256, tie_word_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)


def np_attention_f64(q, k, v, num_heads, num_kv_heads, head_dim, q_offset=0):
    """Causal attention of q rows (context index q_offset + i) over k/v rows 0..; float64."""
    q = np.asarray(q, np.float64).reshape(q.shape[0], num_heads, head_dim)
    k = np.asarray(k, np.float64).reshape(k.shape[0], num_kv_heads, head_dim)
    v = np.asarray(v, np.float64).reshape(v.shape[0], num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    out = np.zeros_like(q)
    for i in range(q.shape[0]):
        last = q_offset + i
        for h in range(num_heads):
            kh = h // group
            s = k[: last + 1, kh] @ q[i, h] / math.sqrt(head_dim)
            p = np.exp(s - s.max())
            p /= p.sum()
            out[i, h] = p @ v[: last + 1, kh]
    return out.reshape(q.shape[0], num_heads * head_dim)


class PagedLayout:
    """Assigns shuffled physical blocks to sequences (block 0 never used) and builds StepInputs."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0):
        self.block_size = block_size
        self.free = list(np.random.default_rng(seed).permutation(np.arange(1, num_blocks)))
        self.tables: dict[int, list[int]] = {}

    def slot(self, seq: int, index: int) -> int:
        table = self.tables.setdefault(seq, [])
        while len(table) <= index // self.block_size:
            table.append(int(self.free.pop()))
        return table[index // self.block_size] * self.block_size + index % self.block_size

    def step(self, chunks: list[tuple[int, list[int], int]]) -> StepInput:
        """chunks: (seq id, new token ids, context length before them); logits for each chunk's last row."""
        token_ids, positions, slots, starts, seq_lens, rows = [], [], [], [0], [], []
        for seq, toks, start in chunks:
            for j, tok in enumerate(toks):
                token_ids.append(tok)
                positions.append(start + j)
                slots.append(self.slot(seq, start + j))
            starts.append(len(token_ids))
            seq_lens.append(start + len(toks))
            rows.append(len(token_ids) - 1)
        width = max(len(self.tables[seq]) for seq, _, _ in chunks)
        tables = np.zeros((len(chunks), width), np.int32)
        for i, (seq, _, _) in enumerate(chunks):
            tables[i, : len(self.tables[seq])] = self.tables[seq]
        as32 = lambda a: np.asarray(a, np.int32)  # noqa: E731
        return StepInput(as32(token_ids), as32(positions), as32(slots), as32(starts), as32(seq_lens), tables, as32(rows))
