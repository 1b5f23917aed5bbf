"""The step contract between the engine and a compiled Program (see docs/architecture.md)."""
from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np


@dataclasses.dataclass
class StepInput:
    """One ragged step: prefill chunks, decodes and verification rows of many sequences together.

    Sequence s owns flat token rows query_start[s]:query_start[s+1]. Its KV blocks are
    block_tables[s, :ceil(seq_lens[s] / block_size)]. A slot is block_id * block_size + offset;
    slot -1 means "do not write" (padding).
    """

    token_ids: np.ndarray  # i32[T]
    positions: np.ndarray  # i32[T]
    slot_mapping: np.ndarray  # i32[T]
    query_start: np.ndarray  # i32[S+1]
    seq_lens: np.ndarray  # i32[S]   context length of each sequence after this step
    block_tables: np.ndarray  # i32[S, B]
    logit_rows: np.ndarray  # i32[L]  flat token rows whose logits are returned

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def validate(self, *, block_size: int, num_blocks: int) -> None:
        """Raise ValueError naming the first inconsistency; cheap enough to run every step."""
        t, s = self.num_tokens, self.num_seqs
        for name in ("token_ids", "positions", "slot_mapping"):
            a = getattr(self, name)
            if a.shape != (t,):
                raise ValueError(f"StepInput.{name} has shape {a.shape}, expected ({t},)")
        if self.query_start.shape != (s + 1,):
            raise ValueError(f"StepInput.query_start has shape {self.query_start.shape}, expected ({s + 1},)")
        if self.block_tables.ndim != 2 or self.block_tables.shape[0] != s:
            raise ValueError(f"StepInput.block_tables has shape {self.block_tables.shape}, expected ({s}, B)")
        if self.logit_rows.ndim != 1:
            raise ValueError("StepInput.logit_rows must be 1-D")
        qs = self.query_start
        if qs[0] != 0 or qs[-1] != t or np.any(np.diff(qs) < 0):
            raise ValueError(f"StepInput.query_start must rise from 0 to {t}, got {qs.tolist()}")
        q_lens = np.diff(qs)
        if np.any(self.seq_lens < q_lens):
            raise ValueError("StepInput.seq_lens must be >= the new tokens of each sequence")
        max_ctx = self.block_tables.shape[1] * block_size
        if np.any(self.seq_lens > max_ctx):
            raise ValueError(f"a sequence is longer than its block table allows ({max_ctx} tokens)")
        if np.any((self.slot_mapping < -1) | (self.slot_mapping >= num_blocks * block_size)):
            raise ValueError("StepInput.slot_mapping has a slot outside the KV pool")
        if np.any((self.logit_rows < 0) | (self.logit_rows >= max(t, 1))):
            raise ValueError("StepInput.logit_rows points outside the step's tokens")


def window_step(windows, *, block_size: int, first_block: int = 0, all_rows: bool = True) -> StepInput:
    """One ragged prefill step running each window (a sequence of 1-D token arrays, or the rows of an i32[b, w]
    array) as its own sequence from position 0.

    Sequence s gets the next ceil(len / block_size) blocks after those of sequence s-1, starting at
    `first_block`; logits come for every token row (all_rows) or for the last row of each window.
    """
    windows = [np.asarray(w, np.int32).reshape(-1) for w in windows]
    per_seq = [-(-w.size // block_size) for w in windows]
    starts = np.concatenate([[0], np.cumsum([w.size for w in windows])]).astype(np.int32)
    tables = np.zeros((len(windows), max(per_seq)), np.int32)
    slots, positions = [], []
    next_block = first_block
    for s, w in enumerate(windows):
        blocks = np.arange(next_block, next_block + per_seq[s], dtype=np.int32)
        next_block += per_seq[s]
        tables[s, : per_seq[s]] = blocks
        idx = np.arange(w.size, dtype=np.int32)
        positions.append(idx)
        slots.append(blocks[idx // block_size] * block_size + idx % block_size)
    return StepInput(
        token_ids=np.concatenate(windows),
        positions=np.concatenate(positions),
        slot_mapping=np.concatenate(slots).astype(np.int32),
        query_start=starts,
        seq_lens=np.diff(starts).astype(np.int32),
        block_tables=tables,
        logit_rows=np.arange(starts[-1], dtype=np.int32) if all_rows else (starts[1:] - 1).astype(np.int32),
    )


class Program(Protocol):
    """A compiled step function over a KV pool that it owns."""

    block_size: int
    num_blocks: int
    max_blocks_per_seq: int
    vocab_size: int

    def step(self, inp: StepInput) -> np.ndarray:  # -> f32[L, V]
        ...
