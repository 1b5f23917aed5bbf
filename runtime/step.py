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
    # Programs with a second KV group (sliding-window layers beside global ones, e.g. Gemma 3): that group's
    # block tables i32[S, B] and slots i32[T] in its own pool; None otherwise
    block_tables_w: np.ndarray | None = None
    slot_mapping_w: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    def validate(self, *, block_size: int, num_blocks: int, num_blocks_w: int | None = None) -> None:
        """Raise ValueError naming the first inconsistency; cheap enough to run every step.

        num_blocks_w: the second KV group's pool size, for a Program that has one (None: it has not)."""
        t, s = self.num_tokens, self.num_seqs
        if (num_blocks_w is None) != (self.block_tables_w is None) or (self.block_tables_w is None) != (
                self.slot_mapping_w is None):
            need = "needs" if num_blocks_w is not None else "takes no"
            raise ValueError(f"this Program {need} a second KV group (block_tables_w and slot_mapping_w, sliding-window "
                             f"layers); the StepInput has block_tables_w={self.block_tables_w is not None}, "
                             f"slot_mapping_w={self.slot_mapping_w is not None}")
        if num_blocks_w is not None:
            if self.block_tables_w.shape != self.block_tables.shape:
                raise ValueError(f"StepInput.block_tables_w has shape {self.block_tables_w.shape}, expected "
                                 f"{self.block_tables.shape} (block_tables')")
            if self.slot_mapping_w.shape != (t,):
                raise ValueError(f"StepInput.slot_mapping_w has shape {self.slot_mapping_w.shape}, expected ({t},)")
            if t and (self.slot_mapping_w.min() < -1 or self.slot_mapping_w.max() >= num_blocks_w * block_size):
                raise ValueError("StepInput.slot_mapping_w has a slot outside the second KV group's pool")
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
        # NOTE: min / max reductions, not np.any over temporaries: this runs on every decode step, on the host
        # time a batch-1 step cannot hide
        qs = self.query_start
        q_lens = qs[1:] - qs[:-1]
        if qs[0] != 0 or qs[-1] != t or (s and q_lens.min() < 0):
            raise ValueError(f"StepInput.query_start must rise from 0 to {t}, got {qs.tolist()}")
        if s and (self.seq_lens - q_lens).min() < 0:
            raise ValueError("StepInput.seq_lens must be >= the new tokens of each sequence")
        max_ctx = self.block_tables.shape[1] * block_size
        if s and self.seq_lens.max() > max_ctx:
            raise ValueError(f"a sequence is longer than its block table allows ({max_ctx} tokens)")
        if t and (self.slot_mapping.min() < -1 or self.slot_mapping.max() >= num_blocks * block_size):
            raise ValueError("StepInput.slot_mapping has a slot outside the KV pool")
        if self.logit_rows.size and (self.logit_rows.min() < 0 or self.logit_rows.max() >= max(t, 1)):
            raise ValueError("StepInput.logit_rows points outside the step's tokens")


def window_step(windows, *, block_size: int, first_block: int = 0, all_rows: bool = True,
                two_groups: bool = False) -> StepInput:
    """One ragged prefill step running each window (a sequence of 1-D token arrays, or the rows of an i32[b, w]
    array) as its own sequence from position 0.

    Sequence s gets the next ceil(len / block_size) blocks after those of sequence s-1, starting at
    `first_block`; logits come for every token row (all_rows) or for the last row of each window.
    two_groups: a second KV group (sliding-window layers) uses the same block ids in its own pool, which must
    then be as large as the first.
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
    slot_mapping = np.concatenate(slots).astype(np.int32)
    return StepInput(
        token_ids=np.concatenate(windows),
        positions=np.concatenate(positions),
        slot_mapping=slot_mapping,
        query_start=starts,
        seq_lens=np.diff(starts).astype(np.int32),
        block_tables=tables,
        logit_rows=np.arange(starts[-1], dtype=np.int32) if all_rows else (starts[1:] - 1).astype(np.int32),
        block_tables_w=tables.copy() if two_groups else None,
        slot_mapping_w=slot_mapping.copy() if two_groups else None,
    )


@dataclasses.dataclass
class KVCompaction:
    """One sequence's cache compacted under the program's KV eviction policy (lowering/kv_policy.py).

    The sequence's old_len cached tokens lie in src_table's blocks (cache index j at slot
    src_table[j // block_size] * block_size + j % block_size); the Program keeps new_len of them (which ones: the
    policy's rule, per layer and KV head for H2O), in their original order, at cache indices 0 .. new_len - 1
    of dst_table's blocks. Every source is read before any destination is written, so the two tables may
    share blocks (the kept tokens move towards the front) and blocks the scheduler freed this step may
    already be destinations. Runs on the device before the step that follows it.
    """

    src_table: np.ndarray  # i32[ceil(old_len / block_size)]
    dst_table: np.ndarray  # i32[ceil(new_len / block_size)]
    old_len: int
    new_len: int

    def slots(self, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """(i32[old_len] source slots, i32[new_len] destination slots)."""
        def of(table, n):
            j = np.arange(n, dtype=np.int64)
            return (np.asarray(table, np.int64)[j // block_size] * block_size + j % block_size).astype(np.int32)

        if self.new_len > self.old_len or self.new_len < 1:
            raise ValueError(f"KVCompaction keeps {self.new_len} of {self.old_len} tokens")
        if len(self.src_table) * block_size < self.old_len or len(self.dst_table) * block_size < self.new_len:
            raise ValueError("KVCompaction tables are too short for their lengths")
        return of(self.src_table, self.old_len), of(self.dst_table, self.new_len)


def mirror_kv_groups(inp: StepInput, program) -> StepInput:
    """A hand-built step (block ids laid out by the caller) for `program`: when the Program has a second KV group,
    that group uses the same block ids in its own pool, which must hold them (see mirror_pool_options)."""
    if getattr(program, "num_blocks_w", None) is None or inp.block_tables_w is not None:
        return inp
    return dataclasses.replace(inp, block_tables_w=inp.block_tables.copy(), slot_mapping_w=inp.slot_mapping.copy())


def mirror_pool_options(graph, num_blocks: int) -> dict:
    """Program options for a private pool whose steps mirror their block ids into the second KV group."""
    return {"num_blocks_w": int(num_blocks)} if graph.meta.get("kv_window_w") is not None else {}


class Program(Protocol):
    """A compiled step function over a KV pool that it owns."""

    block_size: int
    num_blocks: int
    max_blocks_per_seq: int
    vocab_size: int
    # sliding windows (graph meta, see insert_paged_kv): the first KV group's window (None: full attention), and
    # the second group's pool size and window (None: no second group)
    kv_window: int | None
    num_blocks_w: int | None
    kv_window_w: int | None

    def step(self, inp: StepInput) -> np.ndarray:  # -> f32[L, V]
        ...
