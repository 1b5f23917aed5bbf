"""Piecewise CUDA graphs for the CUDA program's ragged steps (prefill, chunked prefill, mixed and ragged verify).

A uniform step (every sequence the same number of rows: decode, verification with one draft length) replays one
CUDA graph of the whole step (CudaProgram._replay). A ragged step cannot: its attention kernels take host values
(the longest query and context, the fresh-prefill choice) and per-sequence inputs whose sizes vary step to step.
Run eagerly, such a step costs one host launch per kernel, ~200 for a 16-layer Llama, which on the H200's host
(50-120 us a launch) is as long as the kernels themselves.

Here the step's plan is cut at every entry that reads a per-sequence input (query_start, seq_lens, block tables):
the attention entries. The runs between them (projections, norms, SwiGLU, RoPE + KV write, logits) depend only on
the number of token rows T and of logit rows L, so each is captured once per (T bucket, L bucket, fresh-prefill)
and replayed; the attention entries run eagerly in between on the step's own per-sequence inputs. Token rows past T
are padding: token 0 at position 0 writing no KV slot (slot -1); logit rows past L read row 0. Attention leaves
pad rows unwritten and every op outside attention is row-wise, so pad rows never reach a real row.

Static memory: the captured runs share one graph memory pool (a run's temporaries are reused by later captures;
only values a later run reads stay alive), and an eager entry's output that a captured run reads is copied into
a fixed buffer (reused once its value is dead). A captured value that only eager entries read later (each layer's
q / k / v, read by its attention) is held by a non-owning tensor once its last reader has run: its memory goes back
to the pool for the next layer's run and for other buckets' captures (a replay runs in the same order, so the
reader is done before anything else writes there). Without that, every bucket kept every layer's q / k / v alive:
~0.6 MB a token row for a Llama-3-8B, 18 GB over the buckets up to 8192 rows. This mirrors vLLM's piecewise CUDA
graphs (attention outside the graph, weak references to graph outputs), written for our plan of closures.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np

# token-row buckets of a captured step (a step of more rows runs eagerly): powers of two up to 512, then at most
# 1.5x apart (padding wastes at most half a bucket of compute where steps are compute-bound)
PIECEWISE_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# logit rows of a captured step: up to min(rows, LOGIT_ROWS_SMALL) (one per sequence: prefill, mixed steps) pad to
# that many, more (logits for every row: perplexity) to the row bucket; so a row bucket has at most two captures
# per fresh-prefill flag. A padded row costs a logits GEMM row, next to nothing beside the weight read.
LOGIT_ROWS_SMALL = 64
# hand the memory of captured values only eager entries read back to the pool after their last read (module doc)
SHARE_EAGER_READS = True
ROW_INPUTS = ("token_ids", "positions", "slot_mapping", "slot_mapping_w")  # i32[T]: padded to the bucket
SEQUENCE_INPUTS = ("query_start", "seq_lens", "block_tables", "block_tables_w")  # per sequence: eager entries only
ROW_SYMBOLS = frozenset({"T", "L"})  # symbols a captured entry may bind (the buckets fix them)


def bucket(n: int, buckets=PIECEWISE_TOKEN_BUCKETS) -> int | None:
    """The smallest bucket >= n, or None past the largest."""
    return next((b for b in buckets if b >= n), None)


def logit_bucket(num_logit_rows: int, rows: int) -> int | None:
    """The logit rows a step of `rows` (bucketed) token rows is captured with, or None (more than rows)."""
    small = min(rows, LOGIT_ROWS_SMALL)
    if num_logit_rows <= small:
        return small
    return rows if num_logit_rows <= rows else None


def eager_entry(ins, fn) -> bool:
    """A plan entry runs eagerly between captured runs when it reads a per-sequence input, or binds a symbol other
    than T and L (a generic op's shape, which a captured run would freeze)."""
    return any(name in SEQUENCE_INPUTS for name in ins) or bool(set(getattr(fn, "symbols", ())) - ROW_SYMBOLS)


def split_plan(plan) -> list[tuple[bool, list[int]]]:
    """The plan as runs of consecutive entries: (captured, entry indices), in order."""
    runs: list[tuple[bool, list[int]]] = []
    for i, (fn, ins, _, _) in enumerate(plan):
        captured = not eager_entry(ins, fn)
        if runs and runs[-1][0] == captured:
            runs[-1][1].append(i)
        else:
            runs.append((captured, [i]))
    return runs


def why_not_piecewise(program) -> str | None:
    """Why this program's ragged steps cannot replay piecewise graphs (None: they can)."""
    if program.device.type != "cuda":
        return "not on a CUDA device"
    if not program.cuda_graphs:
        return "CUDA graphs are off"
    if program.tp_size > 1:
        return "tensor-parallel programs run their ragged steps eagerly"
    if program.eager_only_ops:
        return f"the graph has eager-only ops ({program.eager_only_ops[:3]})"
    if program.eviction is not None:
        return "KV eviction (kv_policy) programs run their ragged steps eagerly"
    if any(node.op == "attention_mass" for node in program.graph.nodes):
        return "attention_mass accumulates in place (a capture's warm-up run would count a step twice)"
    if not any(captured for captured, _ in split_plan(program._plan)):
        return "nothing to capture"
    return None


class _Bucket:
    """One captured (T bucket, L bucket, fresh) step: its static row inputs, runs and static values."""

    def __init__(self, program, rows: int, logit_rows: int):
        import torch

        self.rows, self.logit_rows = rows, logit_rows
        names = [n for n in ROW_INPUTS if n in program.graph.inputs]
        self.offsets, at = {}, 0
        for name in names + ["logit_rows"]:
            size = logit_rows if name == "logit_rows" else rows
            self.offsets[name] = (at, at + size)
            at += size
        self.device_buf = torch.zeros(at, dtype=torch.int32, device=program.device)
        self.host_bufs = tuple(torch.zeros(at, dtype=torch.int32, pin_memory=True) for _ in range(2))
        self.events = (torch.cuda.Event(), torch.cuda.Event())
        self.stage = 0
        self.inputs = {name: self.device_buf[a:b] for name, (a, b) in self.offsets.items()}
        self.graphs: list[Any] = []  # per run: a CUDAGraph, or None for an eager run
        self.values: dict[str, Any] = {}  # static tensors the replays read and write: inputs, run outputs
        self.static_out: dict[str, Any] = {}  # eager outputs a captured run reads: name -> the buffer it reads

    def stage_inputs(self, arrays) -> None:
        """Copy the step's row inputs, padded, into the static inputs (non-blocking, double-buffered)."""
        stage = self.stage
        self.stage ^= 1
        event = self.events[stage]
        event.synchronize()  # that staging buffer's last copy was two steps ago
        fill_row_inputs(self.host_bufs[stage].numpy(), self.offsets, arrays)
        self.device_buf.copy_(self.host_bufs[stage], non_blocking=True)
        event.record()


# what a pad row holds: token 0 at position 0, writing no KV slot; a pad logit row reads row 0
PAD_VALUES = {"token_ids": 0, "positions": 0, "slot_mapping": -1, "slot_mapping_w": -1, "logit_rows": 0}


def fill_row_inputs(host: np.ndarray, offsets: dict, arrays) -> None:
    """Lay a step's row inputs (and logit rows) out in the packed host buffer: each field's real rows, then its
    padding up to the bucket (offsets: name -> (start, end) in `host`)."""
    for name, (a, b) in offsets.items():
        values = arrays[name]
        n = values.shape[0]
        if n > b - a:
            raise ValueError(f"{name}: {n} rows do not fit the bucket's {b - a}")
        host[a:a + n] = values
        host[a + n:b] = PAD_VALUES[name]


class PiecewiseGraphs:
    """Captures and replays a CudaProgram's ragged steps piecewise (see the module docstring)."""

    def __init__(self, program):
        self.program = program
        self.runs = split_plan(program._plan)
        self.buckets: dict[tuple[int, int, bool], _Bucket] = {}
        self.pool = None
        self.num_captures = 0
        self._envs: dict[tuple, dict] = {}  # (bucket key, per-sequence input shapes) -> symbol bindings
        plan = program._plan
        # the last plan entry that reads each value (graph outputs: never dead)
        self.last_use: dict[str, int] = {}
        for i, (_, ins, _, _) in enumerate(plan):
            for name in ins:
                self.last_use[name] = i
        for name in program.graph.outputs:
            self.last_use[name] = len(plan)
        # values an eager entry makes that a later captured run reads (they need a fixed address), and the values
        # eager entries read (a replay hands them the tensors the capture made: those stay alive)
        self.captured_reads: set[str] = set()
        self.eager_reads: set[str] = set()
        for captured, idx in self.runs:
            for i in idx:
                (self.captured_reads if captured else self.eager_reads).update(plan[i][1])
        # values a captured run makes and an eager entry reads (each layer's q / k / v): a capture holds them by a
        # non-owning tensor once their last reader has run (SHARE_EAGER_READS; module doc)
        captured_outs = {name for captured, idx in self.runs if captured for i in idx for name in plan[i][2]}
        self.shareable = (self.eager_reads & captured_outs) - set(program.graph.state_updates.values()) \
            - set(program.graph.outputs)

    def fits(self, num_tokens: int, num_logit_rows: int) -> bool:
        rows = bucket(num_tokens)
        return rows is not None and logit_bucket(num_logit_rows, rows) is not None

    def run(self, arrays, upload_seq, ctx, feed_dev=None):
        """Run one ragged step; -> its logits [L, V] (a view of static memory, valid until the next step), or None
        when its capture failed (the program then runs it, and every later ragged step, eagerly).

        upload_seq() -> the step's per-sequence inputs on the device: a replay calls it after launching the first
        captured run, so their copy and the symbols' binding overlap the GPU instead of delaying its first kernel."""
        program = self.program
        t, l = arrays["token_ids"].shape[0], arrays["logit_rows"].shape[0]
        rows = bucket(t)
        key = (rows, logit_bucket(l, rows), bool(ctx.fresh_prefill))
        entry = self.buckets.get(key)
        first = entry is None
        if first:
            entry = _Bucket(program, key[0], key[1])
        entry.stage_inputs(arrays)
        if feed_dev is not None:
            from kernels_gpu.sampling import feed_tokens

            feed_tokens(entry.inputs["token_ids"], program._feed_src, feed_dev, feed_dev.numel() // 2)
        if first:
            seq_inputs = upload_seq()
            ctx.env = self._env(key, entry, seq_inputs)
            try:
                logits = self._capture(entry, seq_inputs, ctx, t)
            except Exception as err:  # e.g. an op that syncs with the host: this program's ragged steps run eagerly
                capture_failed(program, err)
                return None
            self.buckets[key] = entry
        else:
            logits = self._replay(entry, key, upload_seq, ctx, t)
        return logits[:l]

    def _env(self, key, entry, seq_inputs: dict) -> dict:
        """The step's symbol bindings (bind_symbols over every input and pool), cached by bucket and the shapes of the
        per-sequence inputs: the rest is fixed by the bucket."""
        shapes = (key,) + tuple(tuple(v.shape) for v in seq_inputs.values())
        env = self._envs.get(shapes)
        if env is None:
            if len(self._envs) >= 512:
                self._envs.clear()
            env = self._envs[shapes] = self.program._env({**entry.inputs, **seq_inputs})
        return dict(env)

    def _eager(self, entry, values: dict, idx, ctx, t: int) -> None:
        """Run eager entries; outputs a captured run reads are copied (their real rows) into the fixed buffers."""
        plan = self.program._plan
        for i in idx:
            fn, ins, outs, _ = plan[i]
            # an entry with one output the next runs read (attention) writes it into that buffer itself
            ctx.out = entry.static_out.get(outs[0]) if len(outs) == 1 else None
            try:
                results = fn(ctx, *[values[n] for n in ins])
            finally:
                ctx.out = None
            for name, r in zip(outs, results):
                fixed = entry.static_out.get(name)
                if fixed is None or r.data_ptr() == fixed.data_ptr():
                    values[name] = fixed if fixed is not None else r
                    continue
                _copy_real_rows(fixed, r, t, entry.rows)
                values[name] = fixed

    def _replay(self, entry, key, upload_seq, ctx, t: int):
        values = dict(entry.values)
        staged = False
        for (captured, idx), graph in zip(self.runs, entry.graphs):
            if captured:
                graph.replay()
            else:
                if not staged:  # the GPU has the first captured run to do meanwhile
                    seq_inputs = upload_seq()
                    values.update(seq_inputs)
                    ctx.env = self._env(key, entry, seq_inputs)
                    staged = True
                self._eager(entry, values, idx, ctx, t)
        program = self.program
        program._extra_outputs = [values[o] for o in program.graph.outputs[1:]]
        return values[program.graph.outputs[0]]

    def _capture(self, entry, seq_inputs, ctx, t: int):
        """Warm up (one eager run of the padded step compiles every kernel for these shapes), then capture the runs
        in order, replaying each at once; the eager entries run in between, as in a replay."""
        import torch

        program = self.program
        plan = program._plan
        inputs = {**entry.inputs, **seq_inputs}
        program.last_step_compiled = True
        program._execute(inputs, ctx)  # NOTE: rewrites the KV slots this step writes again below (same values)
        torch.cuda.synchronize(program.device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        values: dict[str, Any] = dict(inputs)
        values.update(program.params)
        values.update(program.state)
        keep = set(entry.inputs) | set(program.params) | set(program.state) | set(program.graph.outputs)
        keep |= self.eager_reads - set(seq_inputs)
        pending = set(self.shareable) if SHARE_EAGER_READS else set()  # not yet handed back to the pool
        free: dict[tuple, list] = {}  # fixed eager-output buffers whose value is dead, by (shape, dtype)
        owner: dict[str, Any] = {}  # value name -> the fixed buffer holding it
        side = torch.cuda.Stream(program.device)
        for r, (captured, idx) in enumerate(self.runs):
            if captured:
                graph = torch.cuda.CUDAGraph()
                side.wait_stream(torch.cuda.current_stream(program.device))
                with torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                    for i in idx:
                        fn, ins, outs, _ = plan[i]
                        values.update(zip(outs, fn(ctx, *[values[n] for n in ins])))
                torch.cuda.current_stream(program.device).wait_stream(side)
                graph.replay()
                entry.graphs.append(graph)
            else:
                for i in idx:  # fixed buffers for the outputs a captured run reads, before the entries run
                    for name in plan[i][2]:
                        if name in self.captured_reads and name not in keep:
                            entry.static_out[name] = None  # allocated from the first result's shape
                for i in idx:
                    fn, ins, outs, _ = plan[i]
                    results = fn(ctx, *[values[n] for n in ins])
                    for name, res in zip(outs, results):
                        if name in entry.static_out and entry.static_out[name] is None:
                            spec = (tuple(res.shape), res.dtype)
                            fixed = free.get(spec, []).pop() if free.get(spec) else torch.zeros(
                                spec[0], dtype=spec[1], device=program.device)
                            entry.static_out[name] = owner[name] = fixed
                            _copy_real_rows(fixed, res, t, entry.rows)
                            res = fixed
                        values[name] = res
                entry.graphs.append(None)
            done = idx[-1]
            for name in [n for n in values if n not in keep and self.last_use.get(n, -1) <= done]:
                del values[name]  # dead: its memory (graph pool, or a fixed buffer) serves later runs
                fixed = owner.pop(name, None)
                if fixed is not None:
                    free.setdefault((tuple(fixed.shape), fixed.dtype), []).append(fixed)
            for name in [n for n in pending if n in values and self.last_use.get(n, -1) <= done]:
                if isinstance(values[name], torch.Tensor):  # (a closure may return None for an unused output)
                    values[name] = non_owning(values[name])  # read for the last time: the pool reuses its memory
                pending.discard(name)
        for s in program.graph.state:
            now = values[program.graph.state_updates.get(s, s)]
            if now.data_ptr() != program.state[s].data_ptr():
                raise RuntimeError(f"state {s!r} is not updated in place; piecewise graphs need in-place pools")
        # what a replay starts from: static inputs, params, state, captured outputs and fixed buffers
        entry.values = {n: v for n, v in values.items() if n not in seq_inputs}
        for name, fixed in entry.static_out.items():
            entry.values.setdefault(name, fixed)
        self.num_captures += 1
        program._extra_outputs = [values[o] for o in program.graph.outputs[1:]]
        return values[program.graph.outputs[0]]


def _copy_real_rows(fixed, value, t: int, bucket_rows: int) -> None:
    """Copy an eager output into its fixed buffer: its first t rows when it has one row per token row (the pad rows
    are garbage), else all of it."""
    rows = t if value.dim() and value.shape[0] == bucket_rows else value.shape[0]
    fixed[:rows].copy_(value[:rows])


def non_owning(t):
    """A tensor over t's memory that does not keep it allocated (the caller guarantees the memory's use)."""
    import torch

    storage = torch._C._construct_storage_from_data_pointer(t.untyped_storage().data_ptr(), t.device,
                                                            t.untyped_storage().nbytes())
    return torch.empty(0, dtype=t.dtype, device=t.device).set_(storage, t.storage_offset(), t.shape, t.stride())


def make_piecewise(program) -> "PiecewiseGraphs | None":
    reason = why_not_piecewise(program)
    return None if reason is not None else PiecewiseGraphs(program)


def capture_failed(program, err: Exception) -> None:
    """A capture raised: turn piecewise graphs off for this program (its steps run eagerly), with a warning."""
    import torch

    try:
        torch.cuda.synchronize(program.device)
    except Exception:  # pragma: no cover - a broken context: the eager retry reports it
        pass
    program.piecewise_graphs = False
    warnings.warn(f"piecewise CUDA graphs turned off for this program ({type(err).__name__}: {err}); its ragged "
                  "steps run eagerly", RuntimeWarning, stacklevel=3)
