"""Speculative decoding with n-gram drafts kept on the GPU: CudaProgram.start_ngram_loop.

Each iteration drafts (kernels_gpu.spec_ngram.ngram_propose, from the token history held on the device), runs the
uniform verification step of q = k + 1 rows a sequence (the decode CUDA graph of that shape, or the eager plan where
graphs are off), and applies the greedy accept rule (spec_accept_greedy), which appends the emitted tokens to the
history on the device. Nothing in between needs the host, so the host launches iterations back to back and reads
their emitted tokens a chunk later (runtime/engine.py: device speculation), the way async scheduling overlaps plain
decode steps. Without this, a verification step must come back to the host before the next draft can be made, which
at batch 1 costs more than the drafts save (BENCHMARKS.md, fourteenth session).
"""
from __future__ import annotations

import numpy as np

STEP_INPUTS = frozenset({"token_ids", "positions", "slot_mapping", "query_start", "seq_lens", "block_tables",
                         "logit_rows"})


def ngram_loop_unsupported(program) -> str | None:
    """Why `program` cannot run start_ngram_loop, or None."""
    if program.tp_group is not None:
        return "tensor parallelism (the ranks would need the loop's device state too)"
    if program.eviction is not None:
        return "KV eviction"
    if program._two_groups or program.kv_window is not None:
        return "sliding-window KV"
    extra = set(program.graph.inputs) - STEP_INPUTS
    if extra:
        return f"step inputs the loop does not make ({sorted(extra)})"
    return None


class ChunkResult:
    """One launch's iterations, read back: tokens i32[I, S, k + 1] (each row's greedy target; the first q columns
    hold the step's), counts i32[I, S] (tokens emitted: accepted drafts + 1), real i32[I, S] (the tokens a draft of
    k would have had from the n-gram match: how many the step verified is min(real, q - 1)), q (the step's rows per
    sequence)."""

    def __init__(self, tokens: np.ndarray, counts: np.ndarray, real: np.ndarray, q: int):
        self.tokens, self.counts, self.real, self.q = tokens, counts, real, q


class PendingChunk:
    """A launched chunk of iterations; result() waits for its copy back."""

    def __init__(self, loop: "NgramLoop", buffer: int, generation: int, num_iters: int, q: int, event):
        self._loop, self._buffer, self._generation = loop, buffer, generation
        self.num_iters, self.q = num_iters, q
        self._event = event
        self._result: ChunkResult | None = None

    def result(self) -> ChunkResult:
        if self._result is None:
            from lowering.backends.cuda import await_copy

            loop = self._loop
            await_copy(loop._generation, self._buffer, self._generation, self._event,
                       "ngram loop: a chunk was read after two later chunks were launched (at most two chunks may "
                       "be in flight)")
            n, s = self.num_iters, loop.num_seqs
            host = loop._host[self._buffer]
            tokens = host[0][:n].numpy().copy().reshape(n, s, loop.q_max)
            self._result = ChunkResult(tokens, host[1][:n].numpy().copy(), host[2][:n].numpy().copy(), self.q)
        return self._result


class NgramLoop:
    """Device-side n-gram speculation for a fixed set of decoding sequences (made by CudaProgram.start_ngram_loop).

    histories: each sequence's tokens so far (its last token has no K/V yet); block_tables i32[S, >= width used]: the
    blocks the loop may write (grow them with set_block_tables before launching iterations that reach further).
    Each launch runs steps of q rows a sequence: k + 1 (verify a k-token draft) or fewer, down to 1 (a plain decode
    step, where drafts are not to be had); every step reports the draft length a match would give.
    """

    def __init__(self, program, histories, block_tables: np.ndarray, *, k: int, ngram_min: int, ngram_max: int,
                 capacity: int, max_chunk: int):
        import torch

        why = ngram_loop_unsupported(program)
        if why is not None:
            raise ValueError(f"start_ngram_loop: not with {why}")
        if not 1 <= k + 1 <= _max_graph_query():
            raise ValueError(f"start_ngram_loop: k must be in [1, {_max_graph_query() - 1}], got {k}")
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"start_ngram_loop: need 1 <= ngram_min <= ngram_max, got {ngram_min}, {ngram_max}")
        s = len(histories)
        if not 1 <= s <= program.graph_batch_buckets[-1]:
            raise ValueError(f"start_ngram_loop: 1 to {program.graph_batch_buckets[-1]} sequences, got {s}")
        if max_chunk < 1:
            raise ValueError(f"start_ngram_loop: max_chunk must be >= 1, got {max_chunk}")
        lengths = [len(h) for h in histories]
        if min(lengths) < 1 or max(lengths) + k + 1 > capacity:
            raise ValueError(f"start_ngram_loop: histories of {min(lengths)}..{max(lengths)} tokens do not fit a "
                             f"capacity of {capacity} with k={k}")
        self.program = program
        self.device = dev = program.device
        self.k, self.q_max, self.num_seqs = k, k + 1, s
        self.ngram_min, self.ngram_max = ngram_min, ngram_max
        self.capacity = capacity
        self.max_chunk = max_chunk
        self.num_iterations = 0
        hist = np.zeros((s, capacity), np.int32)
        for i, h in enumerate(histories):
            hist[i, : len(h)] = h
        self.hist = torch.from_numpy(hist).to(dev)
        self.n = torch.tensor(lengths, dtype=torch.int32, device=dev)
        self.real = torch.zeros(s, dtype=torch.int32, device=dev)
        self._cuda = dev.type == "cuda"
        # the program keeps, for the next loop of this shape (pinned allocations cost milliseconds; a burst may last
        # a few steps): two chunk buffers on the device and their pinned copies (one per chunk in flight), and two
        # pinned staging buffers for the inputs the host changes between launches (block tables, a new q's padding)
        key = (s, self.q_max, max_chunk)
        cached = program._ngram_buffers.pop(key, None)
        if cached is None:
            ring = [(torch.zeros(max_chunk, s, self.q_max, dtype=torch.int32, device=dev),
                     torch.zeros(max_chunk, s, dtype=torch.int32, device=dev),
                     torch.zeros(max_chunk, s, dtype=torch.int32, device=dev)) for _ in range(2)]
            host = [tuple(torch.zeros(t.shape, dtype=torch.int32, pin_memory=self._cuda).reshape(max_chunk, -1)
                          for t in r) for r in ring]
            cached = (ring, host, [])
        if len(program._ngram_buffers) >= 8:  # a few shapes kept (an older loop's buffers are not read any more)
            program._ngram_buffers.pop(next(iter(program._ngram_buffers)))
        program._ngram_buffers[key] = cached
        self._ring, self._host, self._stages = cached
        self._generation = [0, 0]
        self._buffer = 0
        self._graphs = program.cuda_graphs
        self._tables = np.zeros((s, program.max_blocks_per_seq), np.int32)
        self._q = None  # the q whose padding the program's packed decode buffer holds (graphs)
        if self._graphs:
            self.bucket = next(b for b in program.graph_batch_buckets if b >= s)
        else:
            self.bucket = s
            self._eager_views: dict[int, dict] = {}
            self._eager_tables = torch.zeros(s, program.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.set_block_tables(block_tables)

    # -- inputs --------------------------------------------------------------------------------------

    def _copy_in(self, dst, values: np.ndarray) -> None:
        """dst (a device int32 view) = values, in stream order without waiting for the device: through one of two
        pinned staging buffers, each reused only once the copy made from it two calls ago is done."""
        import torch

        values = np.ascontiguousarray(values, dtype=np.int32).reshape(-1)
        if not self._cuda:
            dst.copy_(torch.from_numpy(values).view(dst.shape))
            return
        stages = self._stages
        while len(stages) < 2 or stages[0][0].shape[0] < values.size:
            stages.clear()
            size = max(values.size, 1 << 14)
            stages.extend((torch.zeros(size, dtype=torch.int32, pin_memory=True), torch.cuda.Event())
                          for _ in range(2))
        buf, event = stages[0]
        stages.append(stages.pop(0))
        event.synchronize()
        buf[: values.size].numpy()[:] = values
        dst.copy_(buf[: values.size].view(dst.shape), non_blocking=True)
        event.record(torch.cuda.current_stream(self.device))

    def _views(self, q: int) -> dict:
        """The step inputs of q rows a sequence (graphs: views of the program's packed decode buffer, whose padding
        for this q is written first when another q ran last)."""
        import torch

        program = self.program
        if not self._graphs:
            views = self._eager_views.get(q)
            if views is None:
                s, dev = self.num_seqs, self.device
                views = self._eager_views[q] = {
                    "token_ids": torch.zeros(s * q, dtype=torch.int32, device=dev),
                    "positions": torch.zeros(s * q, dtype=torch.int32, device=dev),
                    "slot_mapping": torch.zeros(s * q, dtype=torch.int32, device=dev),
                    "query_start": torch.arange(0, s * q + 1, q, dtype=torch.int32, device=dev),
                    "seq_lens": torch.zeros(s, dtype=torch.int32, device=dev),
                    "logit_rows": torch.arange(s * q, dtype=torch.int32, device=dev),
                    "block_tables": self._eager_tables,
                }
            return views
        views = program._decode_views(self.bucket, q)
        if self._q != q:
            device_buf, _, offsets = program._static_buffers()
            template = program._pad_template(offsets, self.bucket, q)
            first = offsets["token_ids"]
            self._copy_in(device_buf[first: first + template.size], template)
            self._q = q
        return views

    def _table_view(self):
        if not self._graphs:
            return self._eager_tables
        device_buf, _, offsets = self.program._static_buffers()
        at = offsets["block_tables"]
        return device_buf[at: at + self.num_seqs * self.program.max_blocks_per_seq]

    def set_block_tables(self, block_tables: np.ndarray) -> None:
        """The sequences' block tables (rows in history order); copied in stream order, so iterations launched
        before see the old ones."""
        tables = np.asarray(block_tables, dtype=np.int32)
        if tables.ndim != 2 or tables.shape[0] != self.num_seqs or tables.shape[1] > self.program.max_blocks_per_seq:
            raise ValueError(f"set_block_tables: expected [{self.num_seqs}, <= {self.program.max_blocks_per_seq}] "
                             f"tables, got {tables.shape}")
        if tables.size and (tables.min() < 0 or tables.max() >= self.program.num_blocks):
            raise ValueError(f"set_block_tables: a block outside [0, {self.program.num_blocks})")
        self._tables[:] = 0
        self._tables[:, : tables.shape[1]] = tables
        self._copy_in(self._table_view(), self._tables)

    # -- running -------------------------------------------------------------------------------------

    def launch(self, num_iters: int, max_seq_len: int, q: int | None = None) -> PendingChunk:
        """Launch num_iters iterations (<= max_chunk) of steps of q rows a sequence (default k + 1; 1 .. k + 1) and
        return at once. max_seq_len: a bound on every sequence's length after them (the caller's: its known length
        + the rows of every iteration launched), which the step's attention is planned for; the block tables must
        cover it."""
        import torch

        from kernels_gpu.spec_ngram import ngram_propose, spec_accept_greedy

        q = self.q_max if q is None else int(q)
        if not 1 <= q <= self.q_max:
            raise ValueError(f"launch: q must be in [1, {self.q_max}], got {q}")
        if not 1 <= num_iters <= self.max_chunk:
            raise ValueError(f"launch: 1 to {self.max_chunk} iterations, got {num_iters}")
        if max_seq_len + 1 > self.capacity:
            raise ValueError(f"launch: sequences may reach {max_seq_len} tokens, past the loop's capacity "
                             f"{self.capacity}")
        program = self.program
        run = self._step_fn(max_seq_len, q)
        views = self._views(q)
        tables = views["block_tables"]
        buf = self._buffer
        self._buffer ^= 1
        ring_tokens, ring_counts, ring_real = self._ring[buf]
        for i in range(num_iters):
            ngram_propose(self.hist, self.n, tables, q=q, block_size=program.block_size, ngram_min=self.ngram_min,
                          ngram_max=self.ngram_max, token_ids=views["token_ids"], positions=views["positions"],
                          slot_mapping=views["slot_mapping"], seq_lens=views["seq_lens"], real=self.real,
                          max_draft=self.k)
            targets = run()
            spec_accept_greedy(targets, views["token_ids"], self.hist, self.n, self.real, ring_tokens[i],
                               ring_counts[i], ring_real[i], q=q)
        self.num_iterations += num_iters
        host = self._host[buf]
        for dst, src in zip(host, self._ring[buf]):
            dst[:num_iters].copy_(src[:num_iters].reshape(num_iters, -1), non_blocking=True)
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._generation[buf] += 1
        return PendingChunk(self, buf, self._generation[buf], num_iters, q, event)

    def _step_fn(self, max_seq_len: int, q: int):
        """A callable running one step of q rows a sequence on the current inputs -> its greedy targets (i32, S q
        rows first): the CUDA graph of (bucket, q, context bucket), captured here if new, or the eager plan."""
        from lowering.backends.cuda import _StepContext, _argmax

        program = self.program
        if not self._graphs:
            views = self._views(q)
            ctx = _StepContext(env=program._env(views), max_q_len=q, max_seq_len=max_seq_len)

            def eager():
                program.num_eager_steps += 1
                return _argmax(program._execute(views, ctx))
            return eager
        key = program.graph_key(self.bucket, q, max_seq_len)
        if key not in program._graphs:
            # a capture rewrites the packed decode buffer with safe inputs (nothing written to the pools): put the
            # padding and this loop's block tables back (the per-row fields are written by every iteration)
            program._capture(key[0], key[2], key[1])
            self._q = None
            self._copy_in(self._table_view(), self._tables)
        graph, _, tokens, _ = program._graphs[key]

        def replay():
            program.num_graph_replays += 1
            graph.replay()
            return tokens
        return replay


def _max_graph_query() -> int:
    from lowering.backends.cuda import MAX_GRAPH_QUERY

    return MAX_GRAPH_QUERY
