"""CUDA backend: the graph lowered to Triton kernels + cuBLAS on torch tensors; decode steps replay CUDA graphs.

Planning (once, at build): every node becomes a closure over torch tensors. Semantic ops map to
kernels_gpu (paged attention, kv_write, RMSNorm with the residual add fused in, RoPE rotating the
fused-QKV views in place, SiLU-and-mul on the fused gate|up output) and cuBLAS (linears, logits);
generic lax ops map to torch ops, or, failing that, to JAX through DLPack (eager only).

Quantized IR (lowering/quant): qlinear / qlogits run kernels_gpu.quant_linear on a QuantizedWeight built
once from the node's param parts; kv_write / paged_attention with kv_format "fp8" and kv_write_nvfp4 use
the kernels' quantized KV formats (the block-scale pools of nvfp4 are extra state); rotate_heads is a
matmul on the [T*H, D] view. Everything is decided per node, so layers may differ in format.

Running: a decode-only step (one new token per sequence, batch <= the largest bucket) is padded to a
batch bucket (1, 2, 4, 8, ..., 256) and replays the CUDA graph captured for (bucket, context bucket)
on first use: no Python per layer, one host->device copy of the packed step inputs, one copy back.
Any other step (prefill chunks, mixed batches, verification) runs the same closures eagerly.
step_async launches a step without waiting (the engine's async scheduling): the host builds the next step while
the GPU runs this one, whose tokens stay on the device and are fed into the next step's token ids there.

The same code runs on a CPU torch device under TRITON_INTERPRET=1 (tests), without CUDA graphs.
"""
from __future__ import annotations

import math
import os
import warnings
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np

from lowering.backends.patterns import check_hidden_output, fusable_norm
from lowering.ir import (Graph, IRError, Node, bind_symbols, decode_param, dim_symbols, eval_dim, generic_primitive,
                         kv_bytes_per_block, resolve_window_blocks, split_kv_blocks)
from lowering.kv_policy import plan_for_graph
from lowering.passes.shard_tensor_parallel import tp_plan

DEFAULT_GPU_MEMORY_FRACTION = 0.9
DEFAULT_CPU_KV_CACHE_BYTES = 256 << 20  # device="cpu" (interpreter tests): 256 MiB unless told otherwise
GRAPH_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREFILL_FAST_PATH_MIN_TOKENS = 64  # a step whose longest new sequence is shorter stays on the paged kernel
MIN_CONTEXT_BUCKET = 256  # decode graphs are keyed by the step's longest context, rounded up to a power of two
# CUDA graphs also serve uniform verification steps: every sequence runs q tokens (its last token and a q-1 token
# draft) with logits for all rows; q up to this many
MAX_GRAPH_QUERY = 9
# steps of at most this many rows run the decode GEMV fusions (kernels_gpu.fused_gemv; measured faster than the
# unfused kernels + cuBLAS at one row only, also with tensor-core tiles for 2-16 rows: see FUSED_MAX_M's and
# MULTI_ROW's notes there)
FUSED_GEMV_ROWS = 1
# Steps of 2 to DOT_GEMV_ROWS rows (verification steps) run their dense linears of K <= DOT_GEMV_MAX_K through
# kernels_gpu.fused_gemv.gemv's tensor-core tiles (MULTI_ROW "dot", no prologue) after the unfused norm / SwiGLU
# kernel (both launched with PDL there); larger steps and longer K take cuBLAS. NOTE: H200, 2026-11-29, 5 rows: the
# norm + GEMV pairs of SmolLM2-135M (K = 576 / 1536) 3.4-5.8 us against 5.9-7.0 us with cuBLAS; Llama-3.2-1B's
# K >= 2048 projections are 0.6-1.0x cuBLAS in these tiles (fused_gemv's TILE_SIZES note)
DOT_GEMV_ROWS = 16
DOT_GEMV_MAX_K = 1536

_TORCH_DTYPES: dict[str, Any] = {}


def torch_dtype(name: str):
    import torch

    if not _TORCH_DTYPES:
        _TORCH_DTYPES.update({
            "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
            "float64": torch.float64, "int32": torch.int32, "int64": torch.int64, "int8": torch.int8,
            "uint8": torch.uint8, "int16": torch.int16, "bool": torch.bool, "float8_e4m3fn": torch.float8_e4m3fn,
            "uint32": torch.uint32 if hasattr(torch, "uint32") else torch.int32,
        })
    if name not in _TORCH_DTYPES:
        raise IRError(f"dtype {name} has no torch equivalent on the cuda target")
    return _TORCH_DTYPES[name]


def to_torch(value, device, dtype: str | None = None):
    """A numpy/JAX array -> torch tensor on `device` (bfloat16 goes through its bit pattern)."""
    import torch

    if isinstance(value, torch.Tensor):  # already a tensor (a param source that makes them on the device)
        return value.to(device=device, dtype=torch_dtype(dtype or str(value.dtype).removeprefix("torch.")))
    arr = np.asarray(value)
    if not arr.flags.writeable or not arr.flags.c_contiguous:
        arr = arr.copy(order="C")  # NOTE: not ascontiguousarray, which turns a 0-d array (a scalar param) 1-d
    name = dtype or arr.dtype.name
    if arr.dtype.name == "bfloat16":
        t = torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    elif arr.dtype.name == "float8_e4m3fn":  # ml_dtypes: torch.from_numpy knows no float8
        t = torch.from_numpy(arr.view(np.uint8)).view(torch.float8_e4m3fn)
    else:
        t = torch.from_numpy(arr)
    return t.to(device=device, dtype=torch_dtype(name))


def _bucket_pow2(n: int, minimum: int = 1) -> int:
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


class _StepContext:
    """Host facts of the step being run (or captured) that kernels need without syncing the device.

    fresh_prefill: every sequence starts at position 0 (no cached context) and the longest has at
    least PREFILL_FAST_PATH_MIN_TOKENS tokens: attention reads the new K/V directly (prefill kernel).
    """

    def __init__(self, *, env: dict, max_q_len: int, max_seq_len: int, fresh_prefill: bool = False):
        self.env = env
        self.max_q_len = max_q_len
        self.max_seq_len = max_seq_len
        self.fresh_prefill = fresh_prefill
        # piecewise graphs: the fixed [T, Hq * D] buffer the next captured run reads, for an attention entry to write
        # its output into (instead of a copy after it); None: the entry allocates its output
        self.out = None


def await_copy(generations, slot: int, generation: int, event, stale: str) -> None:
    """Wait for a launch's results to reach the host through pinned buffer `slot` (`event`: recorded after the copy;
    None on a CPU device); RuntimeError(stale) when a later launch has reused that buffer (generations[slot] moved
    past `generation`)."""
    if generations[slot] != generation:
        raise RuntimeError(stale)
    if event is not None:
        event.synchronize()


class PendingTokens:
    """The tokens of a step launched by CudaProgram.step_async: result() waits for the copy back (i32[L])."""

    def __init__(self, program: "CudaProgram", slot: int, generation: int, num_rows: int, event):
        self._program, self._slot, self._generation = program, slot, generation
        self.num_rows = num_rows
        self._event = event
        self._tokens: np.ndarray | None = None

    def result(self) -> np.ndarray:
        if self._tokens is None:
            program = self._program
            await_copy(program._async_generation, self._slot, self._generation, self._event,
                       "step_async: a step's tokens were read after two later steps were launched (at most two steps "
                       "may be in flight)")
            self._tokens = program._async_out[self._slot][: self.num_rows].numpy().copy()
        return self._tokens


class CudaProgram:
    """Program for target="cuda": step(StepInput) -> f32[L, V]; step_greedy -> i32[L]; owns the KV pools.

    num_blocks: KV blocks in the pool; by default as many as `gpu_memory_fraction` of the card allows
    after the weights and a profiled peak step of `max_num_batched_tokens` tokens (on a CPU device:
    `kv_cache_bytes`, default 256 MiB). cuda_graphs: capture decode steps (default: on a CUDA device).
    Quantized weights come from the quantization passes (compile_model(weights=...)): qlinear / qlogits nodes.
    """

    def __init__(self, graph: Graph, params: Mapping[str, Any], *, num_blocks: int | None = None,
                 max_num_seqs: int = 64, max_model_len: int = 2048, device: str | None = None,
                 gpu_memory_fraction: float | None = None, kv_cache_bytes: int | None = None,
                 max_num_batched_tokens: int = 8192, cuda_graphs: bool | None = None, pool_fill: float = 0.0,
                 num_blocks_w: int | None = None, tp_rank: int = 0, tp_group: Any = None,
                 tp_all_reduce: str = "auto", piecewise_graphs: bool | None = None, fold_all_reduces: bool = False):
        """tp_rank / tp_group: this process's rank and its torch.distributed group, for a graph sharded by
        shard_tensor_parallel (lowering/backends/cuda_tp.py starts the ranks; a plain build refuses such a graph).
        tp_all_reduce: "nccl" (torch.distributed.all_reduce), "symm" (torch symmetric memory's one-shot all-reduce:
        one kernel reading the peers' buffers over NVLink after a signal barrier, for activations up to
        SYMM_ALL_REDUCE_BYTES, NCCL above), "push" (kernels_gpu.all_reduce: each rank stores its partial into the
        peers' inboxes, where the data is its own flag; activations up to PUSH_ALL_REDUCE_BYTES, NCCL above; ranks on
        the CPU, in the interpreter, map each other's inboxes from shared-memory files: tests), "auto" (push, then
        symm, then NCCL by size, each where torch symmetric memory works on CUDA).
        fold_all_reduces: with push all-reduces, one-row steps fold the all-reduce after a row-parallel linear into
        the fused GEMVs on either side of it (_fold_plan). Off by default: on two H200s a TP=2 Llama-3-8B-shaped
        batch-1 step took 2.890 ms folded against 2.600 ms with push all-reduce kernels (BENCHMARKS.md).
        piecewise_graphs: ragged steps replay piecewise CUDA graphs (lowering/backends/cuda_piecewise.py; default:
        where decode steps replay CUDA graphs); False runs them eagerly (less GPU memory held by graphs)."""
        import torch

        if "block_size" not in graph.meta:
            raise IRError("graph has no paged KV cache: run insert_paged_kv before building a program")
        if device is None:
            if not torch.cuda.is_available():
                raise RuntimeError("target='cuda' needs an NVIDIA GPU, and torch.cuda.is_available() is False here; "
                                   "compile for target='cpu', or pass device='cpu' (with TRITON_INTERPRET=1) to run "
                                   "the CUDA program's kernels in Triton's interpreter")
            device = "cuda"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} asked for, but torch.cuda.is_available() is False")
        if self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("device='cpu' runs the Triton kernels in their interpreter: set TRITON_INTERPRET=1 "
                               "before importing llmc")
        if gpu_memory_fraction is not None and not (0.0 < float(gpu_memory_fraction) <= 1.0):
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {gpu_memory_fraction!r}")
        if not isinstance(max_num_seqs, int) or max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}")
        self.graph = graph
        plan = tp_plan(graph)
        self.tp_size, self.tp_rank, self.tp_group = (1, 0, None) if plan is None else (plan[0], int(tp_rank), tp_group)
        if tp_all_reduce not in ("auto", "nccl", "symm", "push"):
            raise ValueError(f"tp_all_reduce must be 'auto', 'push', 'symm' or 'nccl', got {tp_all_reduce!r}")
        self.tp_all_reduce = tp_all_reduce
        self._symm: dict[str, Any] = {}
        self._deferred_all_reduces: set[str] = set()  # all-reduce outputs whose reduction a norm closure may take
        self._fold: dict = {}  # all-reduces folded into fused GEMVs at one-row steps (_fold_plan)
        self._all_reduce_ordinal: dict[str, int] = {}  # an all-reduce's output: its index among the graph's (_plan)
        self.fold_all_reduces = bool(fold_all_reduces)
        # called with (inp, greedy, hidden) once a step is checked, before it runs (cuda_tp: rank 0 sends it on)
        self.on_step: Callable[..., None] | None = None
        if plan is not None and tp_group is None:
            raise IRError(f"the graph is sharded for tensor_parallel={plan[0]}: build it with build_program(\"cuda\", "
                          "...) (one process per GPU, lowering/backends/cuda_tp.py), not CudaProgram directly")
        self.block_size = int(graph.meta["block_size"])
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.max_num_seqs = max_num_seqs
        self.kv_window, self.kv_window_w = graph.meta.get("kv_window"), graph.meta.get("kv_window_w")
        self._two_groups = self.kv_window_w is not None
        # KV eviction (graph.meta["kv_policy"]): a sequence never holds more than the plan's blocks
        self.eviction = plan_for_graph(graph, max_model_len)
        per_seq = self.max_blocks_per_seq if self.eviction is None else min(
            self.max_blocks_per_seq, self.eviction.max_blocks(self.block_size))
        sizes = dict(max_num_seqs=max_num_seqs, max_blocks_per_seq=per_seq)

        out_type = graph.types[graph.outputs[0]]
        self.vocab_size = int(out_type.shape[-1])
        missing = set(graph.params) - set(params)
        if missing:
            raise IRError(f"program is missing params {sorted(missing)[:3]}")
        self.params = {name: to_torch(params[name], self.device, graph.types[name].dtype) for name in graph.params}
        self._qweights: dict[tuple, Any] = {}  # qlinear / qlogits weights: (format, group, part names) -> QuantizedWeight
        self._embed_rows = self._embedding_rows()
        self.prefill_fast_path = True  # fresh prefills take kernels_gpu.prefill_attention (tests switch it off)
        # steps of at most fused_gemv_rows rows (<= kernels_gpu.fused_gemv.FUSED_MAX_M) run norm / SwiGLU + GEMV
        # fused (tests switch it off, or raise the rows to cover the kernel's multi-row path)
        self.fused_gemv = True
        self.fused_gemv_rows = FUSED_GEMV_ROWS
        self.dot_gemv_rows = DOT_GEMV_ROWS  # (0: cuBLAS above fused_gemv_rows, for ablations)
        self.fused_rope_kv_write = True  # "rope(q,k)+kv_write" in one launch (off: the two kernels, for ablations)
        # W8A8 linears fed by a norm / SwiGLU get fp8 activations from that kernel (off: the norm / SwiGLU stores
        # its bf16 row and quant_linear quantizes it in a kernel of its own, for ablations)
        self.fused_act_quant = True
        self.num_fresh_prefill_steps = 0  # eager steps that took the prefill kernel
        self.prefill_fast_path_min_tokens = PREFILL_FAST_PATH_MIN_TOKENS
        self.eager_only_ops: list[str] = []  # generic ops run through JAX (no CUDA graphs then)
        self._plan = _plan(graph, self)
        self.cuda_graphs = (self.device.type == "cuda" and not self.eager_only_ops) if cuda_graphs is None else bool(cuda_graphs)
        if self.cuda_graphs and (self.device.type != "cuda" or self.eager_only_ops):
            raise ValueError("cuda_graphs=True needs a CUDA device and a graph with no eager-only ops "
                             f"(eager-only here: {self.eager_only_ops})")

        per_block = self.kv_bytes_per_block()
        if num_blocks is None:
            if kv_cache_bytes is None:
                if self.device.type == "cuda":
                    kv_cache_bytes = self._kv_budget_from_memory(gpu_memory_fraction or DEFAULT_GPU_MEMORY_FRACTION,
                                                                 max_num_batched_tokens)
                else:
                    kv_cache_bytes = DEFAULT_CPU_KV_CACHE_BYTES
            num_blocks, num_blocks_w = split_kv_blocks(graph, kv_cache_bytes, num_blocks_w=num_blocks_w, **sizes)
            if num_blocks < per_seq:
                raise RuntimeError(
                    f"the KV cache fits {num_blocks} blocks of {self.block_size} tokens ({kv_cache_bytes / 2**30:.2f} GiB"
                    f" at {per_block} bytes per block) but one sequence of max_model_len={max_model_len} needs "
                    f"{per_seq}; raise gpu_memory_fraction / kv_cache_bytes or lower max_model_len")
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an integer >= 1, got {num_blocks!r}")
        if self.tp_group is not None:  # every rank must hold the same block ids: the smallest pool wins
            num_blocks, num_blocks_w = _agree_min(self, num_blocks, num_blocks_w)
        self.num_blocks = int(num_blocks)
        self.num_blocks_w = resolve_window_blocks(graph, self.num_blocks, num_blocks_w, sizes)
        self.state = self._allocate_state(self.num_blocks, pool_fill, self.num_blocks_w)

        # decode graphs: packed i32 inputs in one device buffer, filled by one copy per step
        # every bucket below max_num_seqs, then max_num_seqs itself (at most 256 sequences per graph)
        largest = min(max_num_seqs, GRAPH_BATCH_BUCKETS[-1])
        self.graph_batch_buckets = tuple(b for b in GRAPH_BATCH_BUCKETS if b < largest) + (largest,)
        self._graphs: dict[tuple[int, int, int], tuple[Any, ...]] = {}  # (batch, q, ctx bucket) -> graph, outputs
        self._graph_pool = None
        self._static = None
        self._pad_templates: dict[tuple[int, int], np.ndarray] = {}  # (b, q) -> _pad_template
        self._stage = 0  # which pinned staging buffer of _static the next decode step fills (step_async alternates)
        self._stage_events: tuple = ()  # each staging buffer's last copy to the device (made with the buffers)
        # step_async: the last async step's tokens on the device (what the next step's feed reads), how many, and the
        # two pinned buffers they come back through (one per step in flight)
        self._feed_src = None
        self._feed_count = 0
        self._async_out: list = [None, None]
        self._async_generation = [0, 0]
        self._async_slot = 0
        self.num_graph_replays = 0
        self.num_eager_steps = 0
        self._ngram_buffers: dict = {}  # start_ngram_loop's chunk buffers, by (sequences, q, chunk)
        # ragged steps (prefill, mixed, ragged verification) of at most PIECEWISE_TOKEN_BUCKETS[-1] rows replay
        # piecewise CUDA graphs: everything but attention captured per token bucket (lowering/backends/
        # cuda_piecewise.py); off: they run eagerly (ablations, tests)
        if piecewise_graphs not in (None, True, False):
            raise ValueError(f"piecewise_graphs must be True, False or None, got {piecewise_graphs!r}")
        if piecewise_graphs and not self.cuda_graphs:
            raise ValueError("piecewise_graphs=True needs CUDA graphs (a CUDA device, cuda_graphs not False, no "
                             "eager-only ops)")
        self.piecewise_graphs = self.cuda_graphs if piecewise_graphs is None else piecewise_graphs
        self._piecewise = None  # its PiecewiseGraphs, made on first use (None until then, or when unsupported)
        self._piecewise_checked = False
        self.num_piecewise_steps = 0

    @property
    def prefers_uniform_drafts(self) -> bool:
        """Speculating engines fill drafts to one length per step, so verification steps replay CUDA graphs."""
        return self.cuda_graphs

    # -- memory --------------------------------------------------------------------------------

    @property
    def launch_plan(self) -> list[str]:
        """What each step runs, in order (fused ops show as e.g. "add+rms_norm", "rope(q,k)")."""
        return [label for *_, label in self._plan]

    def kv_bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.graph)

    def compact_kv(self, compactions) -> None:
        """Apply KV compactions (runtime.step.KVCompaction) under the graph's eviction policy, in order, in place on
        the pools (torch gathers then scatters; outside any CUDA graph, before the step that follows)."""
        if self.eviction is None:
            raise ValueError("compact_kv: this program has no KV eviction policy (compile_model(kv_policy=...))")
        if compactions:
            from lowering.backends.kv_compact import compact_torch

            compact_torch(self.state, self.graph, self.eviction, compactions, self.block_size)

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())

    def _allocate_state(self, num_blocks: int, fill: float, num_blocks_w: int | None = None) -> dict:
        """Every state buffer (K/V pools, nvfp4 block-scale pools) [N, ...] in its own dtype, filled with `fill`;
        integer pools (nvfp4's packed u8 codes) take all-ones bytes for a non-finite fill."""
        import torch

        env = {"N": num_blocks, "NW": num_blocks if num_blocks_w is None else num_blocks_w}
        state = {}
        for s in self.graph.state:
            shape = tuple(eval_dim(d, env) for d in self.graph.types[s].shape)
            dtype = torch_dtype(self.graph.types[s].dtype)
            value = fill
            if not dtype.is_floating_point and not math.isfinite(fill):
                value = 255 if dtype == torch.uint8 else -1
            state[s] = torch.full(shape, value, dtype=dtype, device=self.device)
        return state

    def _kv_budget_from_memory(self, fraction: float, max_tokens: int) -> int:
        """Bytes left for KV blocks: fraction x card memory - what is in use - the profiled peak of a big step."""
        import torch

        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        in_use = total - free  # our weights, other processes, the CUDA context
        # profile one prefill step of max_tokens tokens (one sequence) over a pool just big enough for it
        blocks = -(-max_tokens // self.block_size) + 1
        self.state = self._allocate_state(blocks, 0.0)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        n = max_tokens
        inputs = {
            "token_ids": np.zeros(n, np.int32), "positions": np.arange(n, dtype=np.int32),
            "slot_mapping": np.arange(n, dtype=np.int32) + self.block_size,
            "query_start": np.array([0, n], np.int32), "seq_lens": np.array([n], np.int32),
            "block_tables": (np.arange(blocks - 1, dtype=np.int32) + 1)[None, :],
            "logit_rows": np.arange(min(self.max_num_seqs, n), dtype=np.int32),
        }
        if self._two_groups:  # the profiling pools of both groups are `blocks` long
            inputs["block_tables_w"], inputs["slot_mapping_w"] = inputs["block_tables"], inputs["slot_mapping"]
        self._run_eager(inputs)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del self.state  # the real pool is allocated once its size is known
        torch.cuda.empty_cache()
        budget = int(total * fraction) - in_use - peak
        if budget <= 0:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: {fraction:.0%} of {total / 2**30:.1f} GiB is "
                f"{total * fraction / 2**30:.1f} GiB, {in_use / 2**30:.1f} GiB is already in use (weights, other "
                f"processes) and a {max_tokens}-token step peaks at {peak / 2**30:.2f} GiB; raise gpu_memory_fraction "
                f"or lower max_num_batched_tokens")
        return budget

    # -- running ---------------------------------------------------------------------------------

    def _embedding_rows(self) -> int | None:
        for node in self.graph.nodes:
            if node.op == "embed":
                return int(self.params[node.inputs[1]].shape[0]) if node.inputs[1] in self.params else None
            if node.op == "embed_shard":  # the whole table's rows (the graph keeps the unsharded shapes)
                return int(self.graph.meta["tensor_parallel"]["full_shapes"][node.inputs[1]][0])
        return None

    def _check_step(self, inp) -> None:
        inp.validate(block_size=self.block_size, num_blocks=self.num_blocks, num_blocks_w=self.num_blocks_w)
        if inp.block_tables.shape[1] > self.max_blocks_per_seq:
            raise ValueError(f"StepInput.block_tables is {inp.block_tables.shape[1]} blocks wide; this program holds "
                             f"at most {self.max_blocks_per_seq} per sequence (max_model_len)")
        if inp.num_tokens and self._embed_rows is not None:
            lo, hi = int(inp.token_ids.min()), int(inp.token_ids.max())
            if lo < 0 or hi >= self._embed_rows:
                raise ValueError(f"StepInput.token_ids must be in [0, {self._embed_rows}), got values in [{lo}, {hi}]")
        if inp.num_seqs and inp.block_tables.size:
            width = -(-int(inp.seq_lens.max()) // self.block_size)
            for name, n in (("block_tables", self.num_blocks), ("block_tables_w", self.num_blocks_w)):
                tables = getattr(inp, name)
                used = None if tables is None else tables[:, :width]
                if used is not None and used.size and (used.min() < 0 or used.max() >= n):
                    raise ValueError(f"StepInput.{name} names a block outside [0, {n})")

    def step(self, inp, *, with_hidden: bool = False):
        """Run one ragged step; returns f32[L, V] logits on the host (with_hidden: and f32[T, D] hidden states)."""
        logits, _, hidden = self._step_device(inp, greedy=False, hidden=with_hidden)
        logits = logits.float().cpu().numpy()
        return (logits, hidden.float().cpu().numpy()) if with_hidden else logits

    def step_greedy(self, inp, *, with_hidden: bool = False):
        """Run one ragged step and pick argmax tokens on the device (ties: lowest id); returns i32[L]
        (with_hidden: and the f32[T, D] final-norm hidden states of every token row)."""
        _, tokens, hidden = self._step_device(inp, hidden=with_hidden)
        tokens = tokens.cpu().numpy()
        return (tokens, hidden.float().cpu().numpy()) if with_hidden else tokens

    def step_sample(self, inp, *, temperature, top_k, top_p, seeds, offsets, min_p=None) -> np.ndarray:
        """Run one ragged step and sample on the device with per-row parameters; returns i32[L].

        temperature f32[L] (0 = greedy), top_k i32[L] (0 or -1 = off), top_p f32[L] (1 = off),
        min_p f32[L] (0 = off), seeds / offsets i64[L]: the same (seed, offset) draws the same token
        for the same logits (see kernels_gpu/sampling.py for the exact rules).
        """
        host = self._sampling_arrays(inp, "step_sample", temperature=temperature, top_k=top_k, top_p=top_p,
                                     min_p=min_p, seeds=seeds, offsets=offsets)
        logits, _, _ = self._step_device(inp, greedy=False)
        return self._sample_on_device(logits, host).cpu().numpy()

    def _sampling_arrays(self, inp, fn: str, *, temperature, top_k, top_p, seeds, offsets, min_p=None) -> dict:
        """step_sample's per-row parameters as checked host arrays."""
        import torch

        from kernels_gpu.sampling import check_sampling_values

        num_rows = int(inp.logit_rows.shape[0])
        host = {"temperature": np.asarray(temperature, np.float32), "top_k": np.asarray(top_k, np.int32),
                "top_p": np.asarray(top_p, np.float32),
                "min_p": np.zeros(num_rows, np.float32) if min_p is None else np.asarray(min_p, np.float32),
                "seeds": np.asarray(seeds, np.int64), "offsets": np.asarray(offsets, np.int64)}
        for name, a in host.items():
            if a.shape != (num_rows,):
                raise ValueError(f"{fn}: {name} must have one value per logit row ({num_rows}), got shape {a.shape}")
        check_sampling_values(*(torch.from_numpy(host[k]) for k in ("temperature", "top_k", "top_p", "min_p")))
        return host

    def _sample_on_device(self, logits, host: dict):
        import torch

        from kernels_gpu.sampling import sample

        dev = {k: torch.from_numpy(v).to(self.device, non_blocking=True) for k, v in host.items()}
        return sample(logits, **dev)

    # -- async scheduling: launch a step, collect its tokens later --------------------------------------

    @property
    def supports_async_steps(self) -> bool:
        """step_async is usable (on one GPU, and on rank 0 of a tensor-parallel group, whose workers launch the same
        steps with the same feed: _launch_async)."""
        return True

    def step_async(self, inp, *, feed_rows=None, feed_from=None, sampling: dict | None = None) -> "PendingTokens":
        """Launch one step (greedy, or sampled on the device) and return at once; `.result()` waits for its i32[L]
        tokens. The host builds the next step while this one runs (async scheduling, runtime/engine.py).

        feed_rows / feed_from (i32[K]): this step's token rows feed_rows[i] take the token that the previous
        step_async picked at its logit row feed_from[i], read on the device (the host has not seen it yet); the
        step's token_ids there must still be valid ids (they are overwritten). sampling: None for greedy, else
        step_sample's keyword arguments. At most two steps may be in flight: a third launch before the first's
        result() makes that result raise."""
        import torch

        feed = self._feed_index(inp, feed_rows, feed_from)
        host = None if sampling is None else self._sampling_arrays(inp, "step_async", **sampling)
        n = self._launch_async(inp, feed, host)
        slot = self._async_slot
        self._async_slot ^= 1
        out = self._async_out[slot]
        if out is None or out.shape[0] < n:
            cuda = self.device.type == "cuda"
            out = self._async_out[slot] = torch.zeros(max(n, 256), dtype=torch.int32, pin_memory=cuda)
        out[:n].copy_(self._feed_src[:n], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._async_generation[slot] += 1
        return PendingTokens(self, slot, self._async_generation[slot], n, event)

    # -- speculation on the device: n-gram drafts, verification and the accept rule without the host --------

    @property
    def supports_ngram_loop(self) -> bool:
        """start_ngram_loop is usable (lowering/backends/cuda_spec.py: not with tensor parallelism, KV eviction or
        sliding-window KV)."""
        from lowering.backends.cuda_spec import ngram_loop_unsupported

        return ngram_loop_unsupported(self) is None

    def start_ngram_loop(self, histories, block_tables, *, k: int, ngram_min: int = 1, ngram_max: int = 4,
                         capacity: int | None = None, max_chunk: int = 8):
        """Device-side n-gram speculation for these decoding sequences (their tokens so far; block tables i32[S, w]):
        -> a lowering.backends.cuda_spec.NgramLoop whose launch(n, max_seq_len) runs n draft / verify / accept
        iterations without waiting for the host. capacity: the longest history it may hold (default: the block
        tables' reach plus k + 1). No other step may run on this program while a loop's iterations are in flight."""
        from lowering.backends.cuda_spec import NgramLoop

        if capacity is None:
            capacity = self.max_blocks_per_seq * self.block_size + k + 1
        return NgramLoop(self, histories, block_tables, k=k, ngram_min=ngram_min, ngram_max=ngram_max,
                         capacity=capacity, max_chunk=max_chunk)

    def _launch_async(self, inp, feed: np.ndarray | None, host: dict | None) -> int:
        """step_async's device work: run the step with its checked feed, pick its tokens (greedy, or sampled with the
        checked arrays `host`) and keep them in _feed_src for the next step's feed; -> the number of tokens. On rank 0
        of a tensor-parallel group every worker runs the same call (on_step), keeping a _feed_src of its own."""
        import torch

        logits, tokens, _ = self._step_device(inp, greedy=host is None, feed=feed,
                                              forward=("_launch_async", (inp, feed, host), {}))
        if host is not None:
            tokens = self._sample_on_device(logits, host)
            if self.tp_group is not None:
                import torch.distributed as dist

                # every rank holds the same all-gathered logits and the draws are counter-based, so the ranks
                # should pick alike; rank 0's picks are sent anyway, so that a rank can never feed different tokens
                tokens = tokens.contiguous()
                dist.broadcast(tokens, src=0, group=self.tp_group)
        n = int(tokens.shape[0])
        if self._feed_src is None or self._feed_src.shape[0] < n:
            self._feed_src = torch.zeros(max(n, 256), dtype=torch.int32, device=self.device)
        self._feed_src[:n].copy_(tokens)
        self._feed_count = n
        return n

    def _feed_index(self, inp, feed_rows, feed_from) -> np.ndarray | None:
        """Check a feed against the step and the last async step; -> i32[2K] (rows, then sources) or None."""
        if feed_rows is None and feed_from is None:
            return None
        rows = np.asarray(feed_rows if feed_rows is not None else [], dtype=np.int64).reshape(-1)
        sources = np.asarray(feed_from if feed_from is not None else [], dtype=np.int64).reshape(-1)
        if rows.shape != sources.shape:
            raise ValueError(f"step_async: feed_rows and feed_from differ in length ({rows.size} vs {sources.size})")
        if rows.size == 0:
            return None
        if rows.min() < 0 or rows.max() >= inp.num_tokens or np.unique(rows).size != rows.size:
            raise ValueError(f"step_async: feed_rows must be distinct token rows in [0, {inp.num_tokens})")
        if sources.min() < 0 or sources.max() >= self._feed_count:
            raise ValueError(f"step_async: feed_from must name logit rows of the previous async step, which had "
                             f"{self._feed_count}; got values in [{sources.min()}, {sources.max()}]")
        return np.concatenate([rows, sources]).astype(np.int32)

    def _step_device(self, inp, *, greedy: bool = True, hidden: bool = False, feed: np.ndarray | None = None,
                     forward: tuple | None = None):
        """-> (logits f32[L, V], greedy tokens i32[L] or None, hidden [T, D] or None), all on the device.

        hidden: the graph's second output (insert_speculation for medusa / eagle); such steps run eagerly.
        feed: step_async's checked i32[2K] (token rows, then the last async step's rows they take their token from).
        forward: (method, args, kwargs) the workers of a tensor-parallel group run for this step, once it is checked
        (default: this call)."""
        if hidden:
            check_hidden_output(self.graph)
        self._check_step(inp)
        if self.on_step is not None:  # rank 0 of a tensor-parallel group: the other ranks run the same step
            self.on_step(*(forward or ("_step_device", (inp,), {"greedy": greedy, "hidden": hidden})))
        num_rows = int(inp.logit_rows.shape[0])
        q = self._uniform_query(inp)
        if self.cuda_graphs and q and inp.num_seqs <= self.graph_batch_buckets[-1]:
            logits, tokens, extra = self._replay(inp, q, feed)
            self.num_graph_replays += 1
            hidden_rows = extra[0][: inp.num_tokens] if hidden else None
            return logits[:num_rows], tokens[:num_rows], hidden_rows
        arrays = {k: getattr(inp, k) for k in self.graph.inputs}
        self.last_step_compiled = False  # (a Triton kernel's first compile is not detected)
        logits = self._run_piecewise(arrays, feed)
        if logits is None:
            logits = self._run_eager(arrays, feed)
            self.num_eager_steps += 1
        else:
            self.num_piecewise_steps += 1
        tokens = _argmax(logits) if greedy else None
        hidden_rows = self._extra_outputs[0][: inp.num_tokens] if hidden else None
        return logits[:num_rows], (tokens[:num_rows] if tokens is not None else None), hidden_rows

    @staticmethod
    def _uniform_query(inp) -> int:
        """q when every sequence runs q <= MAX_GRAPH_QUERY new tokens with logits for all rows in order (a decode
        step: q = 1; a verification step with equal draft lengths: q = k + 1); else 0. Such steps replay graphs."""
        s, t = inp.num_seqs, inp.num_tokens
        if s == 0 or t % s or not 1 <= t // s <= MAX_GRAPH_QUERY:
            return 0
        q = t // s
        if not np.array_equal(inp.query_start, np.arange(s + 1, dtype=np.int32) * q):
            return 0
        if not (inp.logit_rows.shape[0] == t and np.array_equal(inp.logit_rows, np.arange(t, dtype=np.int32))):
            return 0
        return q

    def _run_eager(self, arrays: Mapping[str, np.ndarray], feed: np.ndarray | None = None):
        inputs = _upload_inputs(arrays, self.graph.inputs, self.device)
        if feed is not None:
            from kernels_gpu.sampling import feed_tokens

            feed_tokens(inputs["token_ids"], self._feed_src, _to_device(feed, self.device), feed.size // 2)
        ctx = self._step_context(arrays)
        ctx.env = self._env(inputs)
        return self._execute(inputs, ctx)

    def _step_context(self, arrays: Mapping[str, np.ndarray]) -> "_StepContext":
        """A ragged step's host values (its env is bound by the caller, from the tensors it runs on)."""
        q_lens = np.diff(arrays["query_start"])
        max_q_len = max(1, int(q_lens.max()) if q_lens.size else 1)
        fresh = (self.prefill_fast_path and max_q_len >= self.prefill_fast_path_min_tokens
                 and bool(np.array_equal(arrays["seq_lens"], q_lens)))
        self.num_fresh_prefill_steps += int(fresh)
        return _StepContext(env={}, max_q_len=max_q_len, fresh_prefill=fresh,
                            max_seq_len=max(1, int(arrays["seq_lens"].max()) if arrays["seq_lens"].size else 1))

    def _run_piecewise(self, arrays: Mapping[str, np.ndarray], feed: np.ndarray | None = None):
        """A ragged step through piecewise CUDA graphs (lowering/backends/cuda_piecewise.py): -> logits [L, V], or
        None where this step or program runs eagerly (piecewise_graphs off, unsupported, a step past the largest
        bucket, a capture that failed)."""
        from lowering.backends import cuda_piecewise as pw_lib

        if not self.piecewise_graphs:
            return None
        if not self._piecewise_checked:
            self._piecewise_checked = True
            self._piecewise = pw_lib.make_piecewise(self)
        pw = self._piecewise
        if pw is None or not pw.fits(arrays["token_ids"].shape[0], arrays["logit_rows"].shape[0]):
            return None
        names = [n for n in pw_lib.SEQUENCE_INPUTS if n in self.graph.inputs]
        feed_dev = _to_device(feed, self.device) if feed is not None else None
        ctx = self._step_context(arrays)
        logits = pw.run(arrays, lambda: _upload_inputs(arrays, names, self.device), ctx, feed_dev)
        if logits is None:  # the capture failed: the eager run that follows counts the step
            self.num_fresh_prefill_steps -= int(ctx.fresh_prefill)
        return logits

    def _env(self, inputs) -> dict:
        names = list(self.graph.inputs) + list(self.graph.state)
        shapes = [tuple(inputs[n].shape) for n in self.graph.inputs] + [tuple(self.state[s].shape) for s in self.graph.state]
        return bind_symbols([self.graph.types[n] for n in names], shapes)

    def _execute(self, inputs: Mapping[str, Any], ctx: _StepContext):
        values: dict[str, Any] = dict(inputs)
        values.update(self.params)
        values.update(self.state)
        for fn, ins, outs, _ in self._plan:
            results = fn(ctx, *[values[n] for n in ins])
            values.update(zip(outs, results))
        for s in self.graph.state:  # kernels update the pools in place; keep whatever tensor holds them
            self.state[s] = values[self.graph.state_updates.get(s, s)]
        self._extra_outputs = [values[o] for o in self.graph.outputs[1:]]  # the hidden states (speculation)
        return values[self.graph.outputs[0]]

    # -- CUDA graphs for decode ------------------------------------------------------------------------

    def _static_buffers(self):
        import torch

        if self._static is None:
            max_b = self.graph_batch_buckets[-1]
            rows = max_b * MAX_GRAPH_QUERY
            # feed first (step_async: rows then sources; copied only when a step has one), block tables last
            fields = [("feed", 2 * rows), ("token_ids", rows), ("positions", rows), ("slot_mapping", rows),
                      ("query_start", max_b + 1), ("seq_lens", max_b), ("logit_rows", rows)]
            if self._two_groups:
                fields.append(("slot_mapping_w", rows))
                fields.append(("block_tables_w", max_b * self.max_blocks_per_seq))
            fields.append(("block_tables", max_b * self.max_blocks_per_seq))  # last: _fill_decode copies up to it
            offsets, at = {}, 0
            for name, size in fields:
                offsets[name] = at
                at += size
            device_buf = torch.zeros(at, dtype=torch.int32, device=self.device)
            # two pinned staging buffers: while a step launched by step_async may not have copied its inputs yet,
            # the next one fills the other
            host_bufs = tuple(torch.zeros(at, dtype=torch.int32, pin_memory=True) for _ in range(2))
            self._stage_events = (torch.cuda.Event(), torch.cuda.Event())
            self._static = (device_buf, host_bufs, offsets)
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._static

    def _fill_decode(self, host: np.ndarray, offsets: dict, b: int, inp=None, q: int = 1) -> int:
        """Write a uniform step (q tokens a sequence, all rows logit rows) padded to batch b into the packed host
        buffer; returns how many ints to copy. Pad sequences own q rows that write nowhere and see q
        positions of block 0 (their rows are computed and dropped)."""
        width = self.max_blocks_per_seq
        n = offsets["block_tables"] + b * width
        first = offsets["token_ids"]
        head = offsets["block_tables_w"] if self._two_groups else offsets["block_tables"]  # the per-row fields
        host[first:head] = self._pad_template(offsets, b, q)  # all padding: a step copies it, then its rows
        tables = host[offsets["block_tables"]: n].reshape(b, width)
        tables[:] = 0
        if self._two_groups:
            tables_w = host[offsets["block_tables_w"]: offsets["block_tables_w"] + b * width].reshape(b, width)
            tables_w[:] = 0
        if inp is not None:
            t, s = inp.num_tokens, inp.num_seqs
            host[offsets["token_ids"]: offsets["token_ids"] + t] = inp.token_ids
            host[offsets["positions"]: offsets["positions"] + t] = inp.positions
            host[offsets["slot_mapping"]: offsets["slot_mapping"] + t] = inp.slot_mapping
            host[offsets["seq_lens"]: offsets["seq_lens"] + s] = inp.seq_lens
            tables[:s, : inp.block_tables.shape[1]] = inp.block_tables
            if self._two_groups:
                host[offsets["slot_mapping_w"]: offsets["slot_mapping_w"] + t] = inp.slot_mapping_w
                tables_w[:s, : inp.block_tables_w.shape[1]] = inp.block_tables_w
        return n

    def _pad_template(self, offsets: dict, b: int, q: int) -> np.ndarray:
        """The packed decode buffer's per-row fields (token_ids up to the block tables) of a uniform step of q rows a
        sequence padded to batch b, all padding (pad sequences own q rows that write nowhere and see q positions of
        block 0); made once per (b, q)."""
        template = self._pad_templates.get((b, q))
        if template is None:
            first = offsets["token_ids"]
            head = offsets["block_tables_w"] if self._two_groups else offsets["block_tables"]
            pad = np.zeros(head, np.int32)
            rows = b * q
            pad[offsets["positions"]: offsets["positions"] + rows] = np.tile(np.arange(q, dtype=np.int32), b)
            pad[offsets["slot_mapping"]: offsets["slot_mapping"] + rows] = -1
            pad[offsets["query_start"]: offsets["query_start"] + b + 1] = np.arange(b + 1, dtype=np.int32) * q
            pad[offsets["seq_lens"]: offsets["seq_lens"] + b] = q if q > 1 else 0  # a decode pad sees no context
            pad[offsets["logit_rows"]: offsets["logit_rows"] + rows] = np.arange(rows, dtype=np.int32)
            if self._two_groups:
                pad[offsets["slot_mapping_w"]: offsets["slot_mapping_w"] + rows] = -1
            template = self._pad_templates[(b, q)] = pad[first:]
        return template

    def _decode_views(self, b: int, q: int = 1):
        device_buf, _, offsets = self._static_buffers()
        width = self.max_blocks_per_seq

        def view(name, n, shape=None):
            t = device_buf[offsets[name]: offsets[name] + n]
            return t.view(shape) if shape else t

        rows = b * q
        views = {"token_ids": view("token_ids", rows), "positions": view("positions", rows),
                 "slot_mapping": view("slot_mapping", rows), "query_start": view("query_start", b + 1),
                 "seq_lens": view("seq_lens", b), "logit_rows": view("logit_rows", rows),
                 "block_tables": view("block_tables", b * width, (b, width))}
        if self._two_groups:
            views["slot_mapping_w"] = view("slot_mapping_w", rows)
            views["block_tables_w"] = view("block_tables_w", b * width, (b, width))
        return views

    def would_compile(self, num_seqs: int, rows_per_seq: int, max_seq_len: int) -> bool:
        """Whether a uniform step (num_seqs sequences of rows_per_seq rows, the longest max_seq_len tokens after it)
        has no CUDA graph yet, so running it would capture one (tens to hundreds of milliseconds)."""
        if not (self.cuda_graphs and 1 <= rows_per_seq <= MAX_GRAPH_QUERY and num_seqs <= self.graph_batch_buckets[-1]):
            return False
        return self.graph_key(num_seqs, rows_per_seq, max_seq_len) not in self._graphs

    def graph_key(self, num_seqs: int, q: int, max_seq_len: int) -> tuple[int, int, int]:
        """(batch bucket, q, context bucket): the CUDA graph a uniform step of num_seqs sequences of q rows, the
        longest max_seq_len tokens after it, replays."""
        b = next(x for x in self.graph_batch_buckets if x >= num_seqs)
        ctx_bucket = min(_bucket_pow2(int(max_seq_len), MIN_CONTEXT_BUCKET),
                         _bucket_pow2(self.max_blocks_per_seq * self.block_size))
        return b, q, ctx_bucket

    def _replay(self, inp, q: int = 1, feed: np.ndarray | None = None):
        """Replay the graph of this uniform step's (batch bucket, q, context bucket); -> logits, tokens, extra outputs.
        feed: step_async's token feed, applied on the device between the input copy and the replay."""
        key = self.graph_key(inp.num_seqs, q, int(inp.seq_lens.max()))
        b, _, ctx_bucket = key
        self.last_step_compiled = key not in self._graphs  # a capture (and its warm-up runs): not a step's cost
        if self.last_step_compiled:
            self._capture(b, ctx_bucket, q)
        graph, logits, tokens, extra = self._graphs[key]
        device_buf, host_bufs, offsets = self._static
        stage = self._stage
        self._stage ^= 1
        event = self._stage_events[stage]
        event.synchronize()  # that buffer's last copy was two steps ago: long done, but never overwrite it early
        host_buf = host_bufs[stage]
        host = host_buf.numpy()
        n = self._fill_decode(host, offsets, b, inp, q)
        first = offsets["token_ids"]
        if feed is not None:
            host[: feed.size] = feed
            first = 0
        device_buf[first:n].copy_(host_buf[first:n], non_blocking=True)
        event.record()
        if feed is not None:
            from kernels_gpu.sampling import feed_tokens

            k = feed.size // 2
            tok = offsets["token_ids"]
            feed_tokens(device_buf[tok: tok + b * q], self._feed_src, device_buf[: 2 * k], k)
        graph.replay()
        return logits, tokens, extra

    def _capture(self, b: int, ctx_bucket: int, q: int = 1) -> None:
        import torch

        device_buf, host_bufs, offsets = self._static_buffers()
        torch.cuda.synchronize(self.device)
        host_buf = host_bufs[self._stage]
        n = self._fill_decode(host_buf.numpy(), offsets, b, q=q)  # safe inputs: nothing written
        device_buf[:n].copy_(host_buf[:n])
        inputs = self._decode_views(b, q)
        ctx = _StepContext(env=self._env(inputs), max_q_len=q, max_seq_len=ctx_bucket)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compile/autotune every kernel outside the capture
                _argmax(self._execute(inputs, ctx))
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # NOTE: thread_local: a CUDA call from another thread (JAX's runtime, a proposer) must not void the capture
        with torch.cuda.graph(graph, pool=self._graph_pool, capture_error_mode="thread_local"):
            logits = self._execute(inputs, ctx)
            tokens = _argmax(logits)
            extra = list(self._extra_outputs)  # the hidden states (speculation), in the graph's memory
        torch.cuda.synchronize(self.device)
        self._graphs[(b, q, ctx_bucket)] = (graph, logits, tokens, extra)

    def drop_decode_graphs(self) -> None:
        """Forget every captured decode graph and its memory pool, and the ragged steps' piecewise graphs; later
        steps capture again. For changes to what a step runs (fused_gemv, fused_gemv_rows, fused_act_quant), and
        before a tensor-parallel rank leaves its process group (a live graph holding NCCL collectives keeps the
        communicator's teardown waiting)."""
        import torch

        if self._piecewise is not None:  # the ragged steps' graphs too (captured again on next use)
            torch.cuda.synchronize(self.device)
            self._piecewise = None
            self._piecewise_checked = False
        if self._static is None:  # nothing was captured
            return
        torch.cuda.synchronize(self.device)
        for graph, *_ in self._graphs.values():
            graph.reset()
        self._graphs.clear()
        self._graph_pool = torch.cuda.graph_pool_handle()  # NOTE: a fresh pool: the old one's blocks may be live

    def capture_decode_graphs(self, context_len: int | None = None) -> int:
        """Capture every batch bucket's decode graph up front (else each is captured on first use)."""
        if not self.cuda_graphs:
            return 0
        ctx = context_len or MIN_CONTEXT_BUCKET
        ctx_bucket = min(_bucket_pow2(ctx, MIN_CONTEXT_BUCKET), _bucket_pow2(self.max_blocks_per_seq * self.block_size))
        for b in sorted(self.graph_batch_buckets, reverse=True):  # largest first: smaller ones reuse its pool
            if (b, 1, ctx_bucket) not in self._graphs:
                self._capture(b, ctx_bucket)
        return len(self._graphs)


def _argmax(logits):
    """i32[L] argmax per row, lowest id on ties, on the device.

    NOTE: torch.argmax for many rows, kernels_gpu.sampling.greedy's split-row path for few: on the H100
    (V=128256) torch took 0.037 ms for 64 rows against the one-program-per-row Triton kernel's 0.064 ms
    (2026-11-26), but also 0.038 ms for one row, which the split path reads with many programs (2026-11-28).
    """
    import torch

    from kernels_gpu.sampling import GREEDY_SPLIT_MAX_ROWS, greedy

    if logits.dim() == 2 and 0 < logits.shape[0] <= GREEDY_SPLIT_MAX_ROWS:
        return greedy(logits)
    return torch.argmax(logits, dim=-1).to(torch.int32)


def _upload_inputs(arrays: Mapping[str, np.ndarray], names, device) -> dict:
    """The named int32 step inputs on the device, packed into one buffer and copied once: name -> tensor view."""
    packed, views = _pack_inputs(arrays, names)
    dev = _to_device(packed, device)
    return {name: dev[a:b].view(shape) for name, (a, b, shape) in views.items()}


def _pack_inputs(arrays: Mapping[str, np.ndarray], names) -> tuple[np.ndarray, dict]:
    parts, views, at = [], {}, 0
    for name in names:
        a = np.ascontiguousarray(arrays[name], dtype=np.int32)
        parts.append(a.reshape(-1))
        views[name] = (at, at + a.size, tuple(a.shape))
        at += a.size
    return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), views


def _to_device(packed: np.ndarray, device):
    import torch

    t = torch.from_numpy(packed)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------------------------------------
# Planning: graph nodes -> closures over torch tensors.
# ---------------------------------------------------------------------------------------------

Fn = Callable[..., tuple]


def _plan(graph: Graph, program: CudaProgram) -> list[tuple[Fn, list[str], list[str], str]]:
    """(closure, input names, output names, label) in execution order."""
    producers = graph.producers()
    users = graph.users()
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    plan: list[tuple[Fn, list[str], list[str], str]] = []
    skip: set[int] = set()
    program._all_reduce_ordinal = _all_reduce_ordinals(graph)
    program._fold = _fold_plan(graph, program, producers, users)
    for i, node in enumerate(graph.nodes):
        if id(node) in skip:
            continue
        # decode GEMVs with their input's producer fused in (a norm, a residual add + norm, a SwiGLU / GeGLU)
        fused_gemv = _gemv_fusion(graph, node, users, producers, position, program)
        if fused_gemv is not None:
            fn, ins, outs, label, absorbed = fused_gemv
            skip.update(id(n) for n in absorbed)
            plan.append((fn, ins, outs, label))
            continue
        # RMSNorm fed by a residual add: one add_rms_norm kernel yields both the sum and the norm
        if node.op == "add" and len(node.inputs) == 2:
            fused = fusable_norm(graph, node, users, position)
            if fused is not None:
                skip.add(id(fused))
                plan.append((_add_rms_norm_fn(fused.attrs["eps"], fused.attrs.get("weight_offset")),
                             [node.inputs[0], node.inputs[1], fused.inputs[1]],
                             [fused.outputs[0], node.outputs[0]], "add+rms_norm"))
                continue
        # q and k RoPE of one layer: one kernel launch rotating both (in place when they are fused-QKV views)
        if node.op == "rope":
            partner = _rope_partner(graph, node, users, producers, position)
            fused_kv = None if partner is None else _rope_kv_write(graph, node, partner, users, producers, position,
                                                                    program)
            if fused_kv is not None:
                fn, ins, outs, absorbed = fused_kv
                skip.update(id(n) for n in absorbed)
                plan.append((fn, ins, outs, "rope(q,k)+kv_write"))
                continue
            if partner is not None:
                skip.add(id(partner))
                plan.append((_rope_pair_fn(node, partner, graph, users, program),
                             [node.inputs[0], partner.inputs[0], node.inputs[1]], [node.outputs[0], partner.outputs[0]],
                             "rope(q,k)"))
                continue
        lower = _LOWERINGS.get(node.op)
        if lower is not None:
            fn = lower(node, graph, program, producers, users)
            ins = getattr(fn, "inputs", None)  # a lowering that reads fewer values (params bound at build)
            ins = list(node.inputs) if ins is None else list(ins)
            plan.append((fn, ins + getattr(fn, "extra_inputs", []), list(node.outputs), getattr(fn, "label", node.op)))
        else:
            plan.append((_generic_fn(node, graph, program), list(node.inputs), list(node.outputs), node.op))
    return plan


_FLOAT_DTYPES = ("bfloat16", "float16", "float32")


def _only_consumer(graph, name: str, users) -> Node | None:
    """The one node reading `name`, if exactly one does and it is not a graph output."""
    readers = users.get(name, [])
    return readers[0] if len(readers) == 1 and name not in graph.outputs else None


def _dense_gemv_consumer(graph, name: str, users) -> Node | None:
    """A linear (or logits) that is the only reader of `name`, as its activation, with a dense float weight [N, K]
    (and bias) held as params: the GEMV a producer of `name` can be fused into."""
    node = _only_consumer(graph, name, users)
    if node is None or node.op not in ("linear", "logits") or node.inputs[0] != name:
        return None
    weights = node.inputs[1:] if node.op == "linear" else node.inputs[2:]
    if not all(w in graph.params and graph.types[w].dtype in _FLOAT_DTYPES for w in weights):
        return None
    if len(graph.types[weights[0]].shape) != 2 or graph.types[name].dtype not in _FLOAT_DTYPES:
        return None
    return node


def _quant_gemv_consumer(graph, name: str, users, program):
    """(qlinear / qlogits node, QuantizedWeight) when a weight-only quantized (int8 / int4 / nvfp4) linear or logits,
    its weight parts held as params, is the only reader of `name`, as its activation: the batch-1 GEMV
    kernels_gpu.fused_qgemv fuses a producer of `name` into. Else None."""
    from kernels_gpu.fused_qgemv import QGEMV_SCHEMES
    from lowering.quant import formats

    node = _only_consumer(graph, name, users)
    if node is None or node.op not in ("qlinear", "qlogits") or node.inputs[0] != name:
        return None
    fmt = node.attrs["format"]
    if fmt not in QGEMV_SCHEMES or node.attrs.get("act_format") or graph.types[name].dtype not in _FLOAT_DTYPES:
        return None
    first = 1 if node.op == "qlinear" else 2
    if not all(p in program.params for p in node.inputs[first: first + len(formats.WEIGHT_PARTS[fmt])]):
        return None
    return node, _qweight_of(node, graph, program)[0]


def _gemv_consumer(graph, name: str, users, program):
    """(GEMV node, QuantizedWeight or None for a dense weight, the node's inputs after the activation that the fused
    closure reads: linear (weight[, bias]), logits (rows, weight), qlinear ([bias]), qlogits (rows)), or None."""
    from lowering.quant import formats

    node = _dense_gemv_consumer(graph, name, users)
    if node is not None:
        return node, None, list(node.inputs[1:])
    found = _quant_gemv_consumer(graph, name, users, program)
    if found is None:
        return None
    node, qw = found
    if node.op == "qlogits":
        return node, qw, [node.inputs[1]]
    return node, qw, list(node.inputs[1 + len(formats.WEIGHT_PARTS[node.attrs["format"]]):])


def _fused_producer(graph, node: Node, users, producers, position):
    """(kind, norm) when `node` makes a linear's input that a fused kernel can compute, the input being
    (norm or node).outputs[0]: "add+rms_norm" (norm: the rms_norm its sum feeds), "rms_norm" (norm: node), or
    node.op for a silu_mul / gelu_tanh_mul of one split's halves (norm: None). Else None."""
    if node.op == "add" and len(node.inputs) == 2:
        norm = fusable_norm(graph, node, users, position)
        return None if norm is None else ("add+rms_norm", norm)
    if node.op == "rms_norm" and graph.types[node.inputs[1]].dtype in _FLOAT_DTYPES \
            and len(graph.types[node.inputs[0]].shape) == 2:
        return "rms_norm", node
    if node.op in ("silu_mul", "gelu_tanh_mul") and _split_halves(graph, node, producers) is not None:
        return node.op, None
    return None


def _gemv_fusion(graph, node: Node, users, producers, position, program):
    """(closure, inputs, outputs, label, absorbed nodes) when `node` starts a fusable producer -> GEMV chain:
      add + rms_norm -> linear / logits      kernels_gpu.fused_gemv.norm_gemv (keeps the sum when anyone reads it)
      rms_norm -> linear / logits            norm_gemv without a residual
      silu_mul / gelu_tanh_mul -> linear     act_gemv (gate and up: the halves of one split)
    and the same with a weight-only quantized qlinear / qlogits (kernels_gpu.fused_qgemv, one-row steps), or, for a
    W8A8 qlinear, the producer quantizing its row (_w8a8_fusion). Steps of more than program.fused_gemv_rows rows
    (quantized: more than one) run the unfused kernels and cuBLAS / quant_linear inside the same closure."""
    def label(gemv):
        return gemv.op if gemv.op in ("linear", "logits") else f"{gemv.op}[{gemv.attrs['format']}]"

    match = _fused_producer(graph, node, users, producers, position)
    if match is None:
        return None
    kind, norm = match
    activation = (norm or node).outputs[0]
    fp8 = _w8a8_fusion(graph, node, kind, norm, activation, users, producers, program)
    if fp8 is not None:
        return fp8
    found = _gemv_consumer(graph, activation, users, program)
    if found is None:
        return None
    gemv, qw, rest = found
    if kind == "add+rms_norm":
        summed = node.outputs[0]
        keep = gemv.op in ("linear", "qlinear") or bool([u for u in users.get(summed, []) if u is not norm]) \
            or summed in graph.outputs
        reduce = _deferrable_all_reduce(graph, node, producers, users, program) if qw is None else None
        may_defer = reduce is not None and gemv.op == "linear"
        if may_defer:
            program._deferred_all_reduces.add(node.inputs[reduce[0]])
        fn = _norm_gemv_fn(norm, gemv, program, with_residual=True, keep_residual=keep, qw=qw, reduce=reduce,
                           may_defer=may_defer, num_all_reduces=len(program._all_reduce_ordinal),
                           fold=None if reduce is None else program._fold.get("slot", {}).get(node.inputs[reduce[0]]))
        ins = [node.inputs[0], node.inputs[1], norm.inputs[1]] + rest
        outs = [gemv.outputs[0]] + ([summed] if keep else [])
        return fn, ins, outs, f"add+rms_norm+{label(gemv)}", (norm, gemv)
    if kind == "rms_norm":
        fn = _norm_gemv_fn(node, gemv, program, with_residual=False, keep_residual=False, qw=qw)
        return fn, [node.inputs[0], node.inputs[1]] + rest, [gemv.outputs[0]], f"rms_norm+{label(gemv)}", (gemv,)
    if gemv.op not in ("linear", "qlinear"):
        return None
    fn = _act_gemv_fn(node, graph, program, producers, qw=qw, gemv=gemv)
    return fn, list(node.inputs) + rest, [gemv.outputs[0]], f"{node.op}+{label(gemv)}", (gemv,)


def _w8a8_consumer(graph, name: str, users, program):
    """(qlinear node, QuantizedWeight, its bias inputs) when a W8A8 qlinear (fp8 weight, act_format fp8, weight
    parts held as params) is the only reader of `name`, as its activation: its activation quantizer can run inside
    the kernel producing `name`. Else None."""
    from lowering.quant import formats

    node = _only_consumer(graph, name, users)
    if node is None or node.op != "qlinear" or node.inputs[0] != name or graph.types[name].dtype not in _FLOAT_DTYPES:
        return None
    if node.attrs["format"] != "fp8" or node.attrs.get("act_format") != "fp8":
        return None
    n_parts = len(formats.WEIGHT_PARTS["fp8"])
    if not all(p in program.params for p in node.inputs[1: 1 + n_parts]):
        return None
    return node, _qweight_of(node, graph, program)[0], list(node.inputs[1 + n_parts:])


def _w8a8_fusion(graph, node: Node, kind: str, norm, activation: str, users, producers, program):
    """(closure, inputs, outputs, label, absorbed nodes) when the fusable producer `node` (_fused_producer's kind and
    norm) makes the activation of a W8A8 qlinear and can quantize it to fp8 itself (every step size; kernels_gpu
    .norms.add_rms_norm_fp8, kernels_gpu.activations.silu_and_mul_fp8 / gelu_tanh_and_mul_fp8, then the weight's
    quant_linear.Fp8Linear):
      add + rms_norm -> qlinear[fp8+a8]      rms_norm -> qlinear[fp8+a8]      silu_mul / gelu_tanh_mul -> ..."""
    found = _w8a8_consumer(graph, activation, users, program)
    if found is None:
        return None
    gemv, qw, rest = found
    if kind == "add+rms_norm":
        fn = _norm_fp8_fn(norm, program, qw, with_residual=True)
        return (fn, [node.inputs[0], node.inputs[1], norm.inputs[1]] + rest, [gemv.outputs[0], node.outputs[0]],
                "add+rms_norm[fp8]+qlinear[fp8+a8]", (norm, gemv))
    if kind == "rms_norm":
        fn = _norm_fp8_fn(node, program, qw, with_residual=False)
        return fn, [node.inputs[0], node.inputs[1]] + rest, [gemv.outputs[0]], "rms_norm[fp8]+qlinear[fp8+a8]", (gemv,)
    fn = _act_fp8_fn(node, graph, program, producers, qw)
    return fn, list(node.inputs) + rest, [gemv.outputs[0]], f"{node.op}[fp8]+qlinear[fp8+a8]", (gemv,)


def _norm_fp8_fn(norm: Node, program, qw, *, with_residual: bool) -> Fn:
    from kernels_gpu.norms import add_rms_norm, add_rms_norm_fp8
    from kernels_gpu.quant_linear import Fp8Linear

    eps, offset = norm.attrs["eps"], norm.attrs.get("weight_offset")
    fp8_linear = Fp8Linear(qw)

    def run(ctx, *args):
        if with_residual:
            x, residual, norm_w, *rest = args
        else:
            (x, norm_w, *rest), residual = args, None
        bias = rest[0] if rest else None
        if program.fused_act_quant:
            xq, xs, summed = add_rms_norm_fp8(x, residual, norm_w, eps, offset)
            y = fp8_linear(xq, xs, bias, out_dtype=x.dtype)
        else:
            normed, summed = add_rms_norm(x, residual, norm_w, eps, offset)
            y = _quantized_matmul(normed, qw, bias)
        return (y, summed) if with_residual else (y,)

    return run


def _act_fp8_fn(node: Node, graph, program, producers, qw) -> Fn:
    from kernels_gpu.activations import gelu_tanh_and_mul, gelu_tanh_and_mul_fp8, silu_and_mul, silu_and_mul_fp8
    from kernels_gpu.quant_linear import Fp8Linear

    gelu = node.op == "gelu_tanh_mul"
    width = _split_halves(graph, node, producers)
    fp8_linear = Fp8Linear(qw)

    def run(ctx, g, u, *rest):
        bias = rest[0] if rest else None
        base = g.as_strided((g.shape[0], 2 * width), g.stride())  # [T, 2F]: gate | up
        if program.fused_act_quant:
            xq, xs = gelu_tanh_and_mul_fp8(base) if gelu else silu_and_mul_fp8(base)
            return (fp8_linear(xq, xs, bias, out_dtype=g.dtype),)
        act = gelu_tanh_and_mul(base) if gelu else silu_and_mul(base)
        return (_quantized_matmul(act, qw, bias),)

    return run


def _norm_gemv_fn(norm: Node, gemv: Node, program, *, with_residual: bool, keep_residual: bool, qw=None,
                  reduce: tuple[int, int, str] | None = None, may_defer: bool = False, num_all_reduces: int = 0,
                  fold: int | None = None) -> Fn:
    """qw: the QuantizedWeight of a qlinear / qlogits gemv (its bias / rows are the closure's last inputs).
    reduce: (input, ordinal, dtype) of an all-reduce feeding the residual add (read by nothing else); may_defer: its
    reduction may be left to this closure's unfused norm (_defers); fold: its ring slot when it may be folded into
    this closure's GEMV (_folded)."""
    import torch.nn.functional as F

    from kernels_gpu.fused_gemv import norm_gemv
    from kernels_gpu.fused_qgemv import Workspace, norm_qgemv
    from kernels_gpu.norms import add_rms_norm

    eps, offset = norm.attrs["eps"], norm.attrs.get("weight_offset")
    logits = gemv.op in ("logits", "qlogits")
    dot, dense = _dense_fn(program)
    workspace = None if qw is None else Workspace(program.device)  # this call site's split-K scratch
    push = None
    if reduce is not None:  # the all-reduce's lowering (earlier in the graph) made it
        push = _one_shot_all_reduces(program, torch_dtype(reduce[2]), num_all_reduces)[1]

    def run(ctx, *args):
        if with_residual:
            x, residual, norm_w, *rest = args
        else:
            (x, norm_w, *rest), residual = args, None
        if qw is not None:
            rows, weight, bias = (rest[0], None, None) if logits else (None, None, rest[0] if rest else None)
        else:
            rows, weight, bias = (rest[0], rest[1], None) if logits else \
                (None, rest[0], rest[1] if len(rest) > 1 else None)
        m = rows.shape[0] if logits else x.shape[0]
        if program.fused_gemv and m <= program.fused_gemv_rows and (qw is None or m == 1):
            kernel = norm_gemv if qw is None else partial(norm_qgemv, workspace=workspace)
            kw = {}
            if fold is not None and _folded(program, push, fold, x.shape[0]):
                if reduce[0] == 1:  # x: the all-reduce's (partial) tensor, overwritten with the sum; residual: the stream
                    x, residual = residual, x
                kw["exchange"] = push.exchange(reduce[1], fold, "gather")
            y, summed = kernel(x, residual, norm_w, eps, weight if qw is None else qw, bias, weight_offset=offset,
                               rows=rows, out_dtype=torch_dtype("float32") if logits else None,
                               keep_residual=keep_residual, round_to_act=logits, **kw)
        else:
            if may_defer and _defers(program, push, args[reduce[0]]):
                part, other = (x, residual) if reduce[0] == 0 else (residual, x)
                normed, summed = push.add_rms_norm(part, reduce[1], other, norm_w, eps, offset)
            else:
                normed, summed = add_rms_norm(x, residual, norm_w, eps, offset,
                                              pdl=qw is None and not logits and dot(*x.shape))
            if logits:
                picked = normed.index_select(0, rows)
                y = (F.linear(picked, weight) if qw is None else _quantized_matmul(picked, qw)).float()
            else:
                y = dense(normed, weight, bias) if qw is None else _quantized_matmul(normed, qw, bias)
        return (y, summed) if keep_residual else (y,)

    return run


def _split_halves(graph, node: Node, producers) -> int | None:
    """F when a silu_mul / gelu_tanh_mul's gate and up are the two halves of one [T, 2F] split (so one kernel reads
    them from their common base), else None."""
    gate, up = node.inputs
    src = producers.get(gate)
    fused = (src is not None and src is producers.get(up) and src.op == "split" and src.outputs[:2] == [gate, up]
             and len(src.outputs) == 2 and int(src.attrs["axis"]) in (1, -1)
             and graph.types[gate].shape == graph.types[up].shape)
    return int(graph.types[gate].shape[1]) if fused else None


def _act_gemv_fn(node: Node, graph, program, producers, qw=None, gemv: Node | None = None) -> Fn:
    """qw: the QuantizedWeight of a qlinear consumer (its bias, if any, is the closure's last input). gemv: the linear
    (a folded all-reduce's producer: _fold_plan)."""
    from kernels_gpu.activations import gelu_tanh_and_mul, silu_and_mul
    from kernels_gpu.fused_gemv import act_gemv
    from kernels_gpu.fused_qgemv import Workspace, act_qgemv

    gelu = node.op == "gelu_tanh_mul"
    width = _split_halves(graph, node, producers)
    dot, dense = _dense_fn(program)
    workspace = None if qw is None else Workspace(program.device)
    fold, push = (None, None) if gemv is None or qw is not None else _fold_push(gemv, graph, program)

    def run(ctx, g, u, *rest):
        weight, bias = (None, rest[0] if rest else None) if qw is not None else \
            (rest[0], rest[1] if len(rest) > 1 else None)
        base = g.as_strided((g.shape[0], 2 * width), g.stride())  # [T, 2F]: gate | up
        act_name = "gelu_tanh" if gelu else "silu"
        if program.fused_gemv and g.shape[0] <= program.fused_gemv_rows:
            if qw is None:
                ex = push.exchange(*fold, "push") if _folded(program, push, fold, g.shape[0]) else None
                return (act_gemv(base, weight, bias, act=act_name, exchange=ex),)
            if g.shape[0] == 1:
                return (act_qgemv(base, qw, bias, act=act_name, workspace=workspace),)
        pdl = qw is None and dot(g.shape[0], width)
        act = gelu_tanh_and_mul(base, pdl=pdl) if gelu else silu_and_mul(base, pdl=pdl)
        return (dense(act, weight, bias) if qw is None else _quantized_matmul(act, qw, bias),)

    return run


def _rope_partner(graph, node: Node, users, producers, position) -> Node | None:
    """A later rope node with the same positions and rotation whose input already exists here."""
    same = {k: v for k, v in node.attrs.items() if k != "num_heads"}
    for other in users.get(node.inputs[1], []):
        if other is node or other.op != "rope" or position[id(other)] <= position[id(node)]:
            continue
        if {k: v for k, v in other.attrs.items() if k != "num_heads"} != same:
            continue
        src = producers.get(other.inputs[0])
        if src is not None and position[id(src)] > position[id(node)]:
            continue
        if graph.types[other.inputs[0]].dtype != graph.types[node.inputs[0]].dtype:
            continue
        return other
    return None


def _rope_kv_write(graph, a: Node, b: Node, users, producers, position, program):
    """(closure, inputs, outputs, absorbed nodes) running a layer's q / k rope pair and the plain kv_write of the
    rotated k (and v) as one kernels_gpu.rope.rope_kv_write launch, or None when the pattern is not there: the
    rotated k read only by a kv_write of a bf16 / fp16 / fp32 pool, every feature rotated, v already computed."""
    from kernels_gpu.kv_write import kv_write
    from kernels_gpu.rope import apply_rope, rope_kv_write

    def kv_of(rope):
        readers = users.get(rope.outputs[0], [])
        kv = readers[0] if len(readers) == 1 and rope.outputs[0] not in graph.outputs else None
        ok = kv is not None and kv.op == "kv_write" and len(kv.inputs) == 5 and kv.inputs[0] == rope.outputs[0] \
            and not kv.attrs.get("kv_format")
        return kv if ok else None

    kv = kv_of(b)
    q_rope, k_rope = (a, b) if kv is not None else (b, a)
    kv = kv or kv_of(a)
    if kv is None:
        return None
    _, v, slots, k_pool, v_pool = kv.inputs
    pool_t = graph.types[k_pool]
    dim, hq, hk = q_rope.attrs["head_dim"], q_rope.attrs["num_heads"], k_rope.attrs["num_heads"]
    if len(pool_t.shape) != 4 or pool_t.dtype not in _FLOAT_DTYPES or tuple(pool_t.shape[2:]) != (hk, dim):
        return None
    src = producers.get(v)
    if src is not None and position[id(src)] > position[id(a)]:
        return None
    inv_freq, extra = _rope_tables(q_rope.attrs, program.device)
    if extra.pop("rotary_dim", dim) != dim:  # partial rotation: the rest of k would need a copy
        return None
    inplace = _inplace_ok(graph, q_rope.inputs[0], users) and _inplace_ok(graph, k_rope.inputs[0], users)

    def run(ctx, q, k, positions, v_rows, slot_rows, kp, vp):
        t = q.shape[0]
        q3, k3, v3 = q.view(t, hq, dim), k.view(t, hk, dim), v_rows.view(t, hk, dim)
        if program.fused_rope_kv_write and not ctx.fresh_prefill:
            q_rot = rope_kv_write(q3, k3, v3, positions, inv_freq, slot_rows, kp, vp, inplace=inplace, **extra)
            # NOTE: the rotated k is not materialized; its only other reader, paged_attention's prefill fast path,
            # reads it in fresh-prefill steps only, which take the branch below
            return q_rot.view(t, hq * dim), None, kp, vp
        q_rot, k_rot = apply_rope(q3, k3, positions, inv_freq, inplace=inplace, **extra)
        kv_write(k_rot, v3, slot_rows, kp, vp, check_slots=False)
        return q_rot.view(t, hq * dim), k_rot.view(t, hk * dim), kp, vp

    ins = [q_rope.inputs[0], k_rope.inputs[0], q_rope.inputs[1], v, slots, k_pool, v_pool]
    return run, ins, [q_rope.outputs[0], k_rope.outputs[0]] + list(kv.outputs), (b, kv)


def _inplace_ok(graph, name: str, users) -> bool:
    return len(users.get(name, [])) == 1 and name not in graph.inputs + graph.params + graph.state


def _rope_tables(attrs, device):
    """A rope node's inverse frequencies f32[R/2] on the device, and apply_rope's other rotation arguments
    (partial rotation; LongRoPE's long set, threshold and attention factor)."""
    import torch

    from kernels_gpu.rope import rope_inv_freq
    from lowering import ops

    freqs = ops.rope_frequencies(attrs["head_dim"], attrs["theta"], attrs.get("rope_scaling"))
    if freqs.long_inv_freq is None and freqs.rotary_dim == attrs["head_dim"] and freqs.attention_factor == 1.0:
        # NOTE: plain rotations keep the torch rule, bit-identical to Hugging Face's inv_freq
        return rope_inv_freq(attrs["head_dim"], attrs["theta"], attrs.get("rope_scaling"), device=device), {}
    extra = dict(rotary_dim=freqs.rotary_dim, attention_factor=freqs.attention_factor)
    if freqs.long_inv_freq is not None:
        extra.update(long_inv_freq=torch.from_numpy(freqs.long_inv_freq).to(device), long_from=freqs.long_from)
    return torch.from_numpy(freqs.inv_freq).to(device), extra


def _rope_pair_fn(a: Node, b: Node, graph, users, program) -> Fn:
    from kernels_gpu.rope import apply_rope

    attrs = a.attrs
    inv_freq, extra = _rope_tables(attrs, program.device)
    dim, ha, hb = attrs["head_dim"], a.attrs["num_heads"], b.attrs["num_heads"]
    inplace = _inplace_ok(graph, a.inputs[0], users) and _inplace_ok(graph, b.inputs[0], users)

    def run(ctx, x, y, positions):
        t = x.shape[0]
        qa, qb = apply_rope(x.view(t, ha, dim), y.view(t, hb, dim), positions, inv_freq, inplace=inplace, **extra)
        return qa.view(t, ha * dim), qb.view(t, hb * dim)

    return run


def _add_rms_norm_fn(eps: float, weight_offset: float | None = None) -> Fn:
    from kernels_gpu.norms import add_rms_norm

    def run(ctx, x, residual, weight):
        normed, total = add_rms_norm(x, residual, weight, eps, weight_offset)
        return normed, total

    return run


DEQUANT_CHUNK_ELEMENTS = 1 << 24  # weight-only schemes at prefill sizes: dequantize this many weights at a time


def _quantized_matmul(x, qw, bias=None, *, dequantize_always: bool = False):
    """x @ dequant(W)^T: the quant_linear kernels where they pay (decode and batched-decode M, and fp8 at any M:
    kernels_gpu.quant_linear.uses_gemm_kernels); weight-only schemes at prefill sizes dequantize row chunks of W to
    x's dtype (kernels_gpu.quant_linear.dequantize_to, one kernel a chunk) and use cuBLAS. dequantize_always: always
    the chunked path (an fp8 weight used weight-only: the kernels' fp8 is W8A8).

    NOTE: on the H100 (2026-11-26) the in-register-dequantizing GEMMs with prefill tiles ran at 0.05-0.6x cuBLAS
    bf16 for M >= 64 with int4/nvfp4, so every M > 16 took the chunked path; on an H200 (2026-11-28) that path cost
    0.09-7 ms per projection at M = 32-256 against 0.01-0.45 ms for the kernels with batch tiles.
    """
    import torch.nn.functional as F

    from kernels_gpu.quant_linear import QuantizedWeight, dequantize_to, quant_linear, uses_gemm_kernels

    x = x if x.stride(-1) == 1 else x.contiguous()
    if not dequantize_always and uses_gemm_kernels(qw.scheme, x.shape[0], x.device):
        return quant_linear(x, qw, bias)
    n, k = qw.out_features, qw.in_features
    rows = max(1, DEQUANT_CHUNK_ELEMENTS // k)
    out = x.new_empty((x.shape[0], n))
    buf = x.new_empty((min(rows, n), k))
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        part = QuantizedWeight(qw.scheme, n1 - n0, k, {name: (t if t.dim() == 0 else t[n0:n1])
                                                      for name, t in qw.tensors.items()}, qw.group_size)
        w = dequantize_to(part, x.dtype, out=buf[: n1 - n0])
        out[:, n0:n1] = F.linear(x, w, None if bias is None else bias[n0:n1])
    return out


def _qweight_of(node, graph, program):
    """(QuantizedWeight, dequantize_always) of a qlinear / qlogits node, built once per set of parts."""
    from kernels_gpu.quant_linear import QuantizedWeight
    from lowering.quant import formats

    a = node.attrs
    fmt = a["format"]
    first = 1 if node.op == "qlinear" else 2
    names = node.inputs[first: first + len(formats.WEIGHT_PARTS[fmt])]
    for name in names:
        if name not in program.params:
            raise IRError(f"{node.op}: weight part {name!r} must be a param on the cuda target")
    act = a.get("act_format")
    if act not in (None, "fp8") or (act == "fp8" and fmt != "fp8"):
        raise IRError(f"{node.op}: act_format {act!r} with weight format {fmt!r} is not supported on the cuda target")
    key = (fmt, a.get("group_size"), *names)
    qw = program._qweights.get(key)
    if qw is None:
        parts = dict(zip(formats.WEIGHT_PARTS[fmt], (program.params[n] for n in names)))
        qw = QuantizedWeight.from_parts(fmt, parts, int(a["in_features"]), int(a["out_features"]), a.get("group_size"))
        program._qweights[key] = qw
    # the kernels' fp8 scheme quantizes the activations (W8A8); an fp8 weight without act_format stays weight-only
    return qw, fmt == "fp8" and act is None


def _lower_qlinear(node, graph, program, producers, users) -> Fn:
    from kernels_gpu.fused_qgemv import Workspace, qgemv, supports
    from kernels_gpu.quant_linear import Fp8Linear, quantize_activation_fp8

    qw, dense = _qweight_of(node, graph, program)
    n_parts = len(qw.tensors)
    # one-row steps of a weight-only scheme: the fused GEMV with its memset-free split-K (quant_linear's GEMV zeroes
    # a buffer, adds into it with atomics and copies it out: two more launches)
    workspace = Workspace(program.device) if supports(qw) and not dense else None
    w8a8 = Fp8Linear(qw) if qw.scheme == "fp8" and not dense else None  # (checked once, not at every step)

    def run(ctx, x, bias=None):
        if workspace is not None and x.shape[0] == 1 and program.fused_gemv and x.stride(-1) == 1:
            return (qgemv(x, qw, bias, workspace=workspace),)
        if w8a8 is not None and x.dim() == 2:
            return (w8a8(*quantize_activation_fp8(x), bias, out_dtype=x.dtype),)
        return (_quantized_matmul(x, qw, bias, dequantize_always=dense),)

    run.inputs = [node.inputs[0]] + list(node.inputs[1 + n_parts:])  # x [, bias]
    run.label = f"qlinear[{node.attrs['format']}{'+a8' if node.attrs.get('act_format') else ''}]"
    return run


def _lower_qlogits(node, graph, program, producers, users) -> Fn:
    qw, dense = _qweight_of(node, graph, program)

    def run(ctx, x, rows):
        return (_quantized_matmul(x.index_select(0, rows), qw, dequantize_always=dense).float(),)

    run.inputs = node.inputs[:2]
    run.label = f"qlogits[{node.attrs['format']}{'+a8' if node.attrs.get('act_format') else ''}]"
    return run


def _lower_rotate_heads(node, graph, program, producers, users) -> Fn:
    import torch

    heads, dim = int(node.attrs["num_heads"]), int(node.attrs["head_dim"])

    def run(ctx, x, rotation):
        t = x.shape[0]
        rows = x.reshape(t * heads, dim)
        if x.dtype == torch.float32:
            out = torch.matmul(rows, rotation.float())
        else:  # f32 math, rounded once to x's dtype (the op's reference)
            out = torch.matmul(rows.float(), rotation.float()).to(x.dtype)
        return (out.view(t, heads * dim),)

    return run


def _lower_embed(node, graph, program, producers, users) -> Fn:
    import torch

    scale = node.attrs.get("scale")
    if scale is not None:  # Gemma: the scale rounded to the table's dtype first, as in the op's reference
        # NOTE: a Python number (no host tensor made per step, so decode steps stay capturable in CUDA graphs)
        scale = float(torch.tensor(scale, dtype=torch_dtype(graph.types[node.inputs[1]].dtype)))

    def run(ctx, ids, table):
        rows = table.index_select(0, ids)
        return (rows if scale is None else rows * scale,)

    return run


def _lower_rms_norm(node, graph, program, producers, users) -> Fn:
    from kernels_gpu.norms import add_rms_norm

    eps, offset = node.attrs["eps"], node.attrs.get("weight_offset")

    def run(ctx, x, weight):
        return (add_rms_norm(x.contiguous(), None, weight, eps, offset)[0],)

    return run


def _lower_head_rms_norm(node, graph, program, producers, users) -> Fn:
    """QK-norm: the RMSNorm kernel over rows of head_dim (x [T, H*Dh] viewed as [T*H, Dh])."""
    from kernels_gpu.norms import add_rms_norm

    eps, dh, offset = node.attrs["eps"], node.attrs["head_dim"], node.attrs.get("weight_offset")

    def run(ctx, x, weight):
        x = x.contiguous()
        return (add_rms_norm(x.view(-1, dh), None, weight, eps, offset)[0].view(x.shape),)

    return run


def _fold_push(gemv: Node, graph, program):
    """((all-reduce ordinal, ring slot), _PushAllReduce) of the folded all-reduce a linear feeds (_fold_plan), or
    (None, None)."""
    slot = program._fold.get("slot", {}).get(gemv.outputs[0])
    if slot is None:
        return None, None
    dtype = torch_dtype(graph.types[gemv.outputs[0]].dtype)
    push = _one_shot_all_reduces(program, dtype, len(program._all_reduce_ordinal))[1]
    return (program._fold["node"][gemv.outputs[0]], slot), push


def _dense_fn(program):
    """(dot, dense): dot(m, k) says whether an activation of m rows and k columns takes kernels_gpu.fused_gemv.gemv's
    tensor-core tiles (2 to program.dot_gemv_rows rows, k <= DOT_GEMV_MAX_K; its producer then launches with PDL);
    dense(x, weight, bias=None) -> x @ weight^T (+ bias) through them, or cuBLAS."""
    import torch.nn.functional as F

    from kernels_gpu.fused_gemv import gemv, max_rows

    def dot(m: int, k: int) -> bool:
        return program.fused_gemv and 1 < m <= min(program.dot_gemv_rows, max_rows()) and k <= DOT_GEMV_MAX_K

    def dense(x, weight, bias=None):
        if dot(*x.shape) and weight.dim() == 2 and x.stride(-1) == 1 and weight.stride(-1) == 1:
            return gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    return dot, dense


def _lower_linear(node, graph, program, producers, users) -> Fn:
    """kernels_gpu.fused_gemv.gemv for a step of at most program.fused_gemv_rows rows (1.09-1.18x cuBLAS on the
    H100's batch-1 o_proj shapes), else _dense_fn's."""
    from kernels_gpu.fused_gemv import gemv

    _, dense = _dense_fn(program)

    fold, push = _fold_push(node, graph, program)

    def run(ctx, x, weight, bias=None):
        if program.fused_gemv and x.shape[0] <= program.fused_gemv_rows and weight.dim() == 2:
            ex = push.exchange(*fold, "push") if _folded(program, push, fold, x.shape[0]) else None
            return (gemv(x, weight, bias, exchange=ex),)
        return (dense(x, weight, bias),)

    return run


def _lower_logits(node, graph, program, producers, users) -> Fn:
    import torch.nn.functional as F

    def run(ctx, x, rows, weight):
        return (F.linear(x.index_select(0, rows), weight).float(),)

    return run


def _lower_rope(node, graph, program, producers, users) -> Fn:
    from kernels_gpu.rope import apply_rope

    a = node.attrs
    inv_freq, extra = _rope_tables(a, program.device)
    heads, dim = a["num_heads"], a["head_dim"]
    # in place when the input is a view nobody else reads (the q or k slice of the fused QKV output)
    inplace = _inplace_ok(graph, node.inputs[0], users)

    def run(ctx, x, positions):
        x3 = x.view(x.shape[0], heads, dim)
        rotated, _ = apply_rope(x3, x3[:, :0], positions, inv_freq, inplace=inplace, **extra)
        return (rotated.view(x.shape[0], heads * dim),)

    return run


def _lower_split(node, graph, program, producers, users) -> Fn:
    sizes = [int(s) for s in node.attrs["sizes"]["$tuple"]] if isinstance(node.attrs["sizes"], dict) else list(node.attrs["sizes"])
    axis = int(node.attrs["axis"])

    def run(ctx, x):
        return tuple(x.split(sizes, dim=axis))

    return run


def _lower_silu_mul(node, graph, program, producers, users) -> Fn:
    """silu_mul (SwiGLU) and gelu_tanh_mul (GeGLU): the fused kernel when gate and up are one split's halves."""
    import torch

    from kernels_gpu.activations import gelu_tanh_and_mul, silu_and_mul

    gelu = node.op == "gelu_tanh_mul"
    act_and_mul = gelu_tanh_and_mul if gelu else silu_and_mul
    width = _split_halves(graph, node, producers)
    if width is not None:

        def run(ctx, g, u):
            # g and u are the two halves of one [T, 2F] tensor: hand the kernel their common base
            base = g.as_strided((g.shape[0], 2 * width), g.stride())
            return (act_and_mul(base),)

        return run

    def run_plain(ctx, g, u):
        g32 = g.float()
        act = torch.nn.functional.gelu(g32, approximate="tanh") if gelu else g32 * torch.sigmoid(g32)
        return (act.to(g.dtype) * u,)

    return run_plain


def _lower_moe(node, graph, program, producers, users) -> Fn:
    """Mixture of experts: routing in torch (softmax / top-k on the device), then kernels_gpu.moe's grouped GEMMs
    over expert-sorted rows; sizes follow from the shapes (no host sync), so decode steps stay capturable."""
    from kernels_gpu.moe import fused_moe

    top_k, renormalize = int(node.attrs["top_k"]), bool(node.attrs["norm_topk_prob"])

    def run(ctx, x, router, gate_up, down):
        return (fused_moe(x.contiguous(), router, gate_up, down, top_k=top_k, renormalize=renormalize),)

    run.label = f"moe[top{top_k}]"
    return run


def _lower_kv_write(node, graph, program, producers, users) -> Fn:
    from kernels_gpu.kv_write import kv_write

    pool_type = graph.types[node.inputs[3]]
    heads, dim = int(pool_type.shape[2]), int(pool_type.shape[3])
    kv_format = node.attrs.get("kv_format")
    if kv_format not in (None, "fp8"):
        raise IRError(f"kv_write: kv_format {kv_format!r} is not supported on the cuda target (nvfp4 is kv_write_nvfp4)")

    def run(ctx, k, v, slots, k_pool, v_pool, k_scale=None, v_scale=None):
        t = k.shape[0]
        if kv_format == "fp8":
            kv_write(k.view(t, heads, dim), v.view(t, heads, dim), slots, k_pool, v_pool, kv_format="fp8",
                     k_scale=k_scale, v_scale=v_scale, check_slots=False)
        else:
            kv_write(k.view(t, heads, dim), v.view(t, heads, dim), slots, k_pool, v_pool, check_slots=False)
        return k_pool, v_pool

    if kv_format == "fp8":
        run.label = "kv_write[fp8]"
    return run


def _lower_kv_write_nvfp4(node, graph, program, producers, users) -> Fn:
    from kernels_gpu.kv_write import kv_write

    pool_type = graph.types[node.inputs[3]]
    heads, dim = int(pool_type.shape[2]), 2 * int(pool_type.shape[3])

    scale_rule = node.attrs.get("scale_rule", "amax")

    def run(ctx, k, v, slots, k_pool, v_pool, k_block_scale, v_block_scale, k_scale, v_scale, k_center=None,
            k_feedback=None):
        t = k.shape[0]
        kv_write(k.view(t, heads, dim), v.view(t, heads, dim), slots, k_pool, v_pool, kv_format="nvfp4",
                 k_scale=k_scale, v_scale=v_scale, k_block_scale=k_block_scale, v_block_scale=v_block_scale,
                 check_slots=False, k_center=k_center, scale_rule=scale_rule, k_feedback=k_feedback)
        return k_pool, v_pool, k_block_scale, v_block_scale

    return run


def _lower_kv_merge(node, graph, program, producers, users) -> Fn:
    """kv_merge (cross-layer KV sharing, ops.ref_kv_merge) as torch ops on the pools, in place: gather the rows at
    the slots, merge in float32, write them back. No host syncs (CUDA-graph capturable): a token of slot -1 repeats
    the first valid token's write (identical index and value), or rewrites slot 0 with itself when none is valid."""
    import torch

    pool_type = graph.types[node.inputs[3]]
    heads, dim = int(pool_type.shape[2]), int(pool_type.shape[3])
    if pool_type.dtype not in ("float32", "bfloat16", "float16"):
        raise IRError(f"kv_merge: the cuda target merges unquantized KV pools only, got {pool_type.dtype}")
    from lowering.ops import KV_MERGE_EPS as eps

    def merge(a, b):  # ops.kv_merge_vectors in torch (float32)
        na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
        s = a / na.clamp_min(eps) + b / nb.clamp_min(eps)
        return s / s.norm(dim=-1, keepdim=True).clamp_min(eps) * ((na + nb) * 0.5)

    def run(ctx, k, v, slots, k_pool, v_pool):
        t = k.shape[0]
        slots = slots.long()
        valid = slots >= 0
        first = torch.argmax(valid.to(torch.int32))  # the first valid token (0 when there is none)
        src = torch.where(valid, torch.arange(t, device=slots.device), first)
        at = slots.clamp_min(0)[src]
        keep_new = valid[src][:, None, None]
        for x, pool in ((k, k_pool), (v, v_pool)):
            flat = pool.view(-1, heads, dim)
            old = flat.index_select(0, at)
            new = x.reshape(t, heads, dim).index_select(0, src)
            rows = torch.where(keep_new, merge(old.float(), new.float()).to(pool.dtype), old)
            flat.index_copy_(0, at, rows)
        return k_pool, v_pool

    return run


def _kv_format_args(kv_format, extras) -> dict:
    """paged_attention keyword arguments for the node's kv_format and its extra inputs (see ops.dequantize_kv)."""
    if kv_format is None:
        return {}
    if kv_format == "fp8":
        k_scale, v_scale = extras
        return {"kv_format": "fp8", "k_scale": k_scale, "v_scale": v_scale}
    k_bs, v_bs, k_scale, v_scale = extras
    return {"kv_format": "nvfp4", "k_block_scale": k_bs, "v_block_scale": v_bs, "k_scale": k_scale, "v_scale": v_scale}


def _lower_paged_attention(node, graph, program, producers, users) -> Fn:
    from kernels_gpu.paged_attention import paged_attention

    a = node.attrs
    hq, dim, scale = a["num_heads"], a["head_dim"], a["scale"]
    kv_format = a.get("kv_format")
    window = a.get("window")  # sliding window (None: full causal attention)
    if kv_format not in (None, "fp8", "nvfp4"):
        raise IRError(f"paged_attention: kv_format {kv_format!r} is not supported on the cuda target")
    if dim % 16 or not 16 <= dim <= 256:  # the kernels' head tile: refused when the program is built, not mid-step
        raise IRError(f"paged_attention: the cuda target's attention kernels need head_dim a multiple of 16 in "
                      f"[16, 256], got {dim} (compile for target='cpu' or 'tpu')")
    num_extras = {None: 0, "fp8": 2, "nvfp4": 4}[kv_format]
    if len(node.inputs) != 6 + num_extras:
        raise IRError(f"paged_attention with kv_format {kv_format!r} takes {6 + num_extras} inputs, got {len(node.inputs)}")
    if kv_format == "nvfp4" and dim < 32 and program.device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # NOTE: the GPU kernel splits D into even / odd halves whose dots need K = D / 2 >= 16 (Triton)
        raise IRError(f"paged_attention: nvfp4 KV needs head_dim >= 32 on the GPU kernel, got {dim}")
    if kv_format is not None:
        # NOTE: the prefill kernel reads the new K/V unquantized, while attention must see what the cache holds:
        # a quantized layer always takes the paged kernel
        def run_quantized(ctx, q, k_pool, v_pool, query_start, seq_lens, block_tables, *extras):
            t = q.shape[0]
            out = paged_attention(q.view(t, hq, dim), k_pool, v_pool, query_start, seq_lens, block_tables,
                                  scale=scale, max_q_len=ctx.max_q_len, max_seq_len=ctx.max_seq_len, window=window,
                                  out=_out_hint(ctx, t, hq, dim), **_kv_format_args(kv_format, extras))
            return (out.view(t, hq * dim),)

        run_quantized.label = f"paged_attention[{kv_format}]"
        return run_quantized
    writer = producers.get(node.inputs[1])  # the kv_write that filled the pools: its k, v are this step's K/V
    if (writer is not None and writer.op == "kv_write" and writer.outputs[0] == node.inputs[1]
            and writer.attrs.get("kv_format") is None):
        from kernels_gpu.prefill_attention import prefill_attention

        hkv = int(graph.types[writer.inputs[3]].shape[2])
        new_k, new_v = writer.inputs[0], writer.inputs[1]

        def run_either(ctx, q, k_pool, v_pool, query_start, seq_lens, block_tables, k, v):
            t = q.shape[0]
            if ctx.fresh_prefill:  # nothing cached: attend over the new K/V straight from the projections
                out = prefill_attention(q.view(t, hq, dim), k.view(t, hkv, dim), v.view(t, hkv, dim), query_start,
                                        scale=scale, max_seqlen=ctx.max_q_len, window=window,
                                        out=_out_hint(ctx, t, hq, dim))
            else:
                out = paged_attention(q.view(t, hq, dim), k_pool, v_pool, query_start, seq_lens, block_tables,
                                      scale=scale, max_q_len=ctx.max_q_len, max_seq_len=ctx.max_seq_len,
                                      window=window, out=_out_hint(ctx, t, hq, dim))
            return (out.view(t, hq * dim),)

        run_either.extra_inputs = [new_k, new_v]
        return run_either

    def run(ctx, q, k_pool, v_pool, query_start, seq_lens, block_tables):
        t = q.shape[0]
        out = paged_attention(q.view(t, hq, dim), k_pool, v_pool, query_start, seq_lens, block_tables, scale=scale,
                              max_q_len=ctx.max_q_len, max_seq_len=ctx.max_seq_len, window=window,
                              out=_out_hint(ctx, t, hq, dim))
        return (out.view(t, hq * dim),)

    return run


def _out_hint(ctx, t: int, hq: int, dim: int):
    """ctx.out as the attention kernels' [T, Hq, D] out, where it fits (else None: they allocate)."""
    out = ctx.out
    if out is None or out.shape[0] != t or out.numel() != t * hq * dim or not out.is_contiguous():
        return None
    return out.view(t, hq, dim)


def _lower_attention_mass(node, graph, program, producers, users) -> Fn:
    """H2O accumulated attention (kernels_gpu.attention_mass): adds this step's softmax mass to the mass pool in
    place (the pool is state; state_updates names this node's output, the same tensor). The K pool input is
    the one kv_write filled this step (kv_write updates it in place, so paged_attention and this node read it)."""
    from kernels_gpu.attention_mass import attention_mass

    a = node.attrs
    hq, dim, scale = a["num_heads"], a["head_dim"], a["scale"]
    kv_format = a.get("kv_format")
    if kv_format not in (None, "fp8", "nvfp4"):
        raise IRError(f"attention_mass: kv_format {kv_format!r} is not supported on the cuda target")
    if dim % 16 or not 16 <= dim <= 256:
        raise IRError(f"attention_mass: the cuda target's kernel needs head_dim a multiple of 16 in [16, 256], got "
                      f"{dim} (compile for target='cpu' or 'tpu')")
    num_extras = {None: 0, "fp8": 2, "nvfp4": 4}[kv_format]
    if len(node.inputs) != 7 + num_extras:
        raise IRError(f"attention_mass with kv_format {kv_format!r} takes {7 + num_extras} inputs, "
                      f"got {len(node.inputs)}")
    if (kv_format == "nvfp4" and dim < 32 and program.device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise IRError(f"attention_mass: nvfp4 KV needs head_dim >= 32 on the GPU kernel, got {dim}")
    # NOTE: the kernel updates its mass input in place: no later node may read the value it had before
    here = next(i for i, n in enumerate(graph.nodes) if n is node)
    later = [u.op for u in users.get(node.inputs[6], []) if any(n is u for n in graph.nodes[here + 1:])]
    if later or node.inputs[6] in graph.params:
        raise IRError(f"attention_mass updates its mass pool {node.inputs[6]!r} in place on the cuda target, but "
                      f"{'it is a param' if not later else f'later nodes ({later}) read its old value'}")

    def run(ctx, q, k_pool, query_start, seq_lens, block_tables, slot_mapping, mass_pool, *extras):
        t = q.shape[0]
        attention_mass(q.view(t, hq, dim), k_pool, query_start, seq_lens, block_tables, slot_mapping, mass_pool,
                       scale=scale, max_q_len=ctx.max_q_len, max_seq_len=ctx.max_seq_len,
                       **_kv_format_args(kv_format, extras))
        return (mass_pool,)

    if kv_format is not None:
        run.label = f"attention_mass[{kv_format}]"
    return run


def _lower_embed_shard(node, graph, program, producers, users) -> Fn:
    """Vocab-parallel embedding: rows of ids this rank holds, zeros elsewhere (an all_reduce follows)."""
    import torch

    scale = node.attrs.get("scale")
    if scale is not None:
        scale = float(torch.tensor(scale, dtype=torch_dtype(graph.types[node.inputs[1]].dtype)))
    rows = int(graph.types[node.inputs[1]].shape[0])
    first = program.tp_rank * rows

    def run(ctx, ids, table):
        local = ids - first
        held = (local >= 0) & (local < rows)
        out = table.index_select(0, torch.where(held, local, torch.zeros_like(local)))
        out = out.masked_fill(~held[:, None], 0)
        return (out if scale is None else out * scale,)

    return run


SYMM_ALL_REDUCE_BYTES = 2 << 20  # one-shot all-reduces up to this size (decode and small prefill steps)
# push all-reduces (kernels_gpu.all_reduce) up to this size: decode steps of up to 64 rows of a 4096-wide model. Each
# all-reduce of the graph holds an inbox of tp x this on every rank (Llama-3-8B, TP=2: 65 x 1 MiB a GPU)
PUSH_ALL_REDUCE_BYTES = 512 << 10


class _PushAllReduce:
    """kernels_gpu.all_reduce's one-kernel push all-reduce: one inbox per all-reduce node of the graph (its reuse
    rule), all in one symmetric-memory buffer every rank maps; filled with the sentinel before the ranks meet."""

    def __init__(self, program, dtype, num_nodes: int, fold_slots: int = 0):
        """fold_slots: the all-reduces folded into fused GEMVs at one-row steps (_fold_plan): their flags."""
        import torch
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        from kernels_gpu.all_reduce import int_view_dtype, sentinel

        idt = int_view_dtype(dtype)
        world, rank = program.tp_size, program.tp_rank
        self.cap = PUSH_ALL_REDUCE_BYTES // dtype.itemsize  # elements of one rank's partial
        per_node = world * self.cap
        total = num_nodes * per_node
        if program.device.type == "cpu":  # the interpreter's ranks (tests): shared-memory files every rank maps
            local, peers, handle = self._shared_files(program, total, idt)
        else:
            name = program.tp_group.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
            local = symm_mem.empty(total, dtype=idt, device=program.device)
            handle = symm_mem.rendezvous(local, name)
            local.fill_(sentinel(idt))
            peers = [local if r == rank else handle.get_buffer(r, (total,), idt) for r in range(world)]
        self.inboxes = [[p[k * per_node:(k + 1) * per_node] for p in peers] for k in range(num_nodes)]
        self.flags = torch.zeros(max(fold_slots, 1), dtype=torch.int32, device=program.device)
        self.fold_slots = fold_slots
        self._exchanges: dict = {}
        self.err = torch.zeros(1, dtype=torch.int32, device=program.device)
        self.rank, self.world, self._local, self._handle = rank, world, local, handle
        if program.device.type == "cuda":
            torch.cuda.synchronize(program.device)
        dist.barrier(group=program.tp_group)  # every inbox is empty before any rank pushes

    @staticmethod
    def _shared_files(program, total: int, idt):
        """(local, every rank's buffer, None) for ranks on the CPU: one file per rank in a directory rank 0 names,
        mapped shared by every rank, then unlinked (the mappings stay)."""
        import shutil
        import tempfile

        import torch
        import torch.distributed as dist

        from kernels_gpu.all_reduce import sentinel

        group, rank = program.tp_group, program.tp_rank
        where = [tempfile.mkdtemp(prefix="llmc-push-") if rank == 0 else None]
        dist.broadcast_object_list(where, src=dist.get_global_rank(group, 0), group=group)
        paths = [os.path.join(where[0], f"rank{r}") for r in range(program.tp_size)]
        local = torch.from_file(paths[rank], shared=True, size=total, dtype=idt)
        local.fill_(sentinel(idt))
        dist.barrier(group=group)
        peers = [local if r == rank else torch.from_file(paths[r], shared=True, size=total, dtype=idt)
                 for r in range(program.tp_size)]
        dist.barrier(group=group)
        if rank == 0:
            shutil.rmtree(where[0], ignore_errors=True)
        return local, peers, None

    def fits(self, x) -> bool:
        return x.numel() <= self.cap and x.is_contiguous()

    def __call__(self, x, node: int):
        import torch

        from kernels_gpu.all_reduce import push_all_reduce

        return push_all_reduce(x, torch.empty_like(x), self.inboxes[node], self.rank, self.err)

    def exchange(self, node: int, slot: int, role: str):
        """The inbox.Exchange of all-reduce `node` (ring slot `slot` of the folded ones) for its producer GEMV
        ("push": into every rank's inbox of it) or its consumer ("gather": this rank's inbox, raising flags[slot]
        after lowering the flag of the slot before)."""
        if (node, role) not in self._exchanges:
            from kernels_gpu.inbox import Exchange

            if role == "push":
                ex = Exchange(rank=self.rank, world=self.world, err=self.err, push=tuple(self.inboxes[node]))
            else:
                ex = Exchange(rank=self.rank, world=self.world, err=self.err, gather=self.inboxes[node][self.rank],
                              flags=self.flags, slot=slot, prev=(slot - 1) % self.fold_slots)
            self._exchanges[(node, role)] = ex
        return self._exchanges[(node, role)]

    def add_rms_norm(self, x, node: int, residual, weight, eps: float, weight_offset):
        """The all-reduce of x fused with the residual add + RMSNorm it feeds: -> (normed, summed)."""
        from kernels_gpu.all_reduce import push_all_reduce_add_rms_norm

        return push_all_reduce_add_rms_norm(x, residual, weight, eps, self.inboxes[node], self.rank, self.err,
                                            weight_offset=weight_offset)

    def check(self) -> None:
        """Raise if a push all-reduce on this rank gave up waiting for a peer (its results were garbage)."""
        if int(self.err.item()):
            raise RuntimeError("tensor parallelism: a push all-reduce gave up waiting for a peer rank (dead or out "
                               "of step); the outputs since are garbage")


class _SymmAllReduce:
    """One-shot all-reduce through torch symmetric memory: each rank copies its partial into its symmetric buffer,
    one kernel waits for every peer's signal and sums the peers' buffers read over NVLink. Three buffers in
    rotation (consecutive all-reduces never share one, so a fast rank cannot overwrite a buffer a slow peer is
    still reading: the next all-reduce's start barrier orders them)."""

    def __init__(self, program, dtype):
        import torch
        import torch.distributed._symmetric_memory as symm_mem

        self.name = program.tp_group.group_name
        if hasattr(symm_mem, "enable_symm_mem_for_group"):
            symm_mem.enable_symm_mem_for_group(self.name)
        elems = SYMM_ALL_REDUCE_BYTES // dtype.itemsize
        self.bufs = [symm_mem.empty(elems, dtype=dtype, device=program.device) for _ in range(3)]
        for b in self.bufs:
            symm_mem.rendezvous(b, self.name)
        self.copy_out = getattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out", None)

    def __call__(self, x, slot: int):
        import torch

        buf = self.bufs[slot][: x.numel()].view_as(x)
        out = torch.empty_like(x)
        if self.copy_out is not None:
            self.copy_out(buf, x, "sum", self.name, out)
        else:
            buf.copy_(x)
            torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", self.name, out)
        return out


# group name -> the process group whose symmetric memory was set up under it in this process. torch keeps that set-up
# per group name for the life of the process, so a later group of the same name (a second tensor-parallel program
# after the first one closed) would rendezvous through the first group's dead store.
_SYMM_GROUPS: dict[str, Any] = {}


def _one_shot_all_reduces(program, dtype, num_nodes: int):
    """(symm, push) for activations of `dtype`: the program's _SymmAllReduce and _PushAllReduce, each None where it is
    not used (tp_all_reduce, no CUDA, torch without symmetric memory, fewer than two all-reduces a step for push).
    Every rank takes the same decision (they agree through the group) or they would wait in different collectives."""
    mode = program.tp_all_reduce
    cpu_push = _cpu_push(program)
    if mode == "nccl" or (program.device.type != "cuda" and not cpu_push):
        if mode == "symm":
            raise RuntimeError(f"tp_all_reduce={mode!r} needs CUDA devices")
        return None, None
    key = str(dtype)
    if key not in program._symm:
        import torch
        import torch.distributed as dist

        group = program.tp_group
        stale = not cpu_push and _SYMM_GROUPS.get(group.group_name, group) is not group
        # first agree that no rank's symmetric memory set-up is stale, then that every rank set each kind up
        fresh = torch.tensor([int(not stale)], dtype=torch.int32, device=program.device)
        dist.all_reduce(fresh, op=dist.ReduceOp.MIN, group=group)
        made: dict[str, Any] = {"symm": None, "push": None}
        errors: dict[str, Any] = {}
        wanted = [k for k in ("symm", "push") if mode in ("auto", k)]
        if "push" in wanted and num_nodes < 2:  # the push kernel's inbox reuse rule needs two a step
            wanted.remove("push")
            errors["push"] = f"the graph has {num_nodes} all-reduce a step (push needs two)"
        for kind in wanted:
            if not int(fresh.item()):
                errors[kind] = "this process already used symmetric memory under the same group name (an earlier " \
                               "tensor-parallel program); torch keeps that per process"
                continue
            try:
                fold = program._fold if program._fold.get("dtype") == str(dtype) else {}
                made[kind] = _SymmAllReduce(program, dtype) if kind == "symm" else \
                    _PushAllReduce(program, dtype, num_nodes, len(fold.get("ring", ())))
                if not cpu_push:
                    _SYMM_GROUPS[group.group_name] = group
            except Exception as e:  # noqa: BLE001 - older torch, no NVLink P2P: NCCL does it
                errors[kind] = e
            ok = torch.tensor([int(made[kind] is not None)], dtype=torch.int32, device=program.device)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
            if not int(ok.item()):
                if mode == kind:
                    raise RuntimeError(f"tp_all_reduce={kind!r}: unavailable on a rank "
                                       f"({errors.get(kind) or 'another rank failed'})")
                if kind in errors and stale:
                    warnings.warn(f"tensor parallelism: no {kind} all-reduce ({errors[kind]})", stacklevel=2)
                made[kind] = None
        if mode == "push" and made["push"] is None:
            raise RuntimeError(f"tp_all_reduce='push': {errors.get('push')}")
        program._symm[key] = (made["symm"], made["push"])
    return program._symm[key]


def _all_reduce_ordinals(graph: Graph) -> dict[str, int]:
    """{an all-reduce's output: its index among the graph's all-reduces, in execution order}."""
    return {n.outputs[0]: k for k, n in enumerate(x for x in graph.nodes if x.op == "all_reduce")}


def _cpu_push(program) -> bool:
    """Push all-reduces between ranks on the CPU (the interpreter's ranks in tests, over shared-memory files)."""
    return program.device.type == "cpu" and program.tp_all_reduce == "push"


def _fold_plan(graph: Graph, program, producers, users) -> dict:
    """The all-reduces folded into the fused GEMVs on either side of them at one-row steps (kernels_gpu.inbox.
    Exchange): a row-parallel dense linear (its input from attention or a SwiGLU) feeding only the all-reduce, whose
    output feeds only a residual add + RMSNorm + dense linear closure. -> {"ring": [all-reduce outputs],
    "slot": {all-reduce output or producer output: ring slot}, "node": {the same: the all-reduce's ordinal among all},
    "dtype"}, or {} (fewer than two, whose flags could not alternate; no tensor parallelism over CUDA with push
    all-reduces). A consumer that is the logits is left out: a step may pick no logit rows and not launch it.
    Reads program._all_reduce_ordinal (_plan sets it first)."""
    if program.tp_group is None or (program.device.type != "cuda" and not _cpu_push(program)) \
            or program.tp_all_reduce not in ("auto", "push") or not getattr(program, "fold_all_reduces", False):
        return {}
    position = {id(n): i for i, n in enumerate(graph.nodes)}
    ring, slot, ordinal = [], {}, {}
    for name, k in program._all_reduce_ordinal.items():
        node = producers[name]
        src = producers.get(node.inputs[0])
        if src is None or src.op != "linear" or _only_consumer(graph, node.inputs[0], users) is not node:
            continue
        if _dense_gemv_consumer(graph, src.inputs[0], users) is not src:
            continue
        before = producers.get(src.inputs[0])
        kind = None if before is None else _fused_producer(graph, before, users, producers, position)
        if kind is not None and kind[0] not in ("silu_mul", "gelu_tanh_mul"):
            continue  # a norm-fed producer: its closure is a norm GEMV's
        add = _only_consumer(graph, node.outputs[0], users)
        match = None if add is None or add.op != "add" else _fused_producer(graph, add, users, producers, position)
        consumer = None if match is None or match[0] != "add+rms_norm" else \
            _dense_gemv_consumer(graph, match[1].outputs[0], users)
        if consumer is None or consumer.op != "linear":
            continue
        slot[node.outputs[0]] = slot[src.outputs[0]] = len(ring)
        ordinal[node.outputs[0]] = ordinal[src.outputs[0]] = k
        ring.append(node.outputs[0])
    dtypes = {graph.types[o].dtype for o in ring}
    if len(ring) < 2 or len(dtypes) != 1:
        return {}
    return {"ring": ring, "slot": slot, "node": ordinal, "dtype": str(torch_dtype(dtypes.pop()))}


def _folded(program, push, slot, rows: int):
    """The all-reduce of ring slot `slot` runs folded into the GEMVs around it in this step (one row, fused GEMVs,
    push all-reduces): the producer, the all-reduce and the consumer closures decide by it alike."""
    return slot is not None and push is not None and rows == 1 and program.fused_gemv and \
        program.fused_gemv_rows >= 1


def _defers(program, push, x) -> bool:
    """Whether an all-reduce whose only reader is a residual add + RMSNorm + linear closure leaves the reduction to
    that closure (kernels_gpu.all_reduce.push_all_reduce_add_rms_norm, one kernel for both): where the push kernel
    takes x and the closure runs the unfused norm (more rows than the fused GEMVs take). Both closures decide by it."""
    return push is not None and push.fits(x) and not (program.fused_gemv and x.shape[0] <= program.fused_gemv_rows)


def _deferrable_all_reduce(graph, add: Node, producers, users, program) -> tuple[int, int, str] | None:
    """(which of the add's inputs, the all-reduce's ordinal among the graph's all-reduces, its dtype) when an input
    of this residual add is an all-reduce's output read by nothing else; else None."""
    if program.tp_group is None:
        return None
    for i, name in enumerate(add.inputs):
        src = producers.get(name)
        if src is not None and src.op == "all_reduce" and _only_consumer(graph, name, users) is add:
            return i, program._all_reduce_ordinal[name], graph.types[name].dtype
    return None


def _lower_all_reduce(node, graph, program, producers, users) -> Fn:
    """The sum over the ranks of this rank's partial: for decode-sized activations one push kernel (kernels_gpu.
    all_reduce), else a one-shot symmetric-memory kernel for small ones, else NCCL in place (all captured inside the
    CUDA graphs)."""
    import torch.distributed as dist

    group = program.tp_group
    count = len(program._all_reduce_ordinal)
    k = program._all_reduce_ordinal[node.outputs[0]]
    symm, push = _one_shot_all_reduces(program, torch_dtype(graph.types[node.inputs[0]].dtype), count)
    # torch's one-shot kernel: rotating buffers: all-reduce k of the step takes k % 2, and the last takes 2 when their
    # count is odd, so two consecutive all-reduces (also the last of a step and the first of the next) never share one
    slot = 2 if (count % 2 and k == count - 1) else k % 2

    out_name = node.outputs[0]
    fold = program._fold.get("slot", {}).get(out_name)

    def run(ctx, x):
        if _folded(program, push, fold, x.shape[0]):
            return (x,)  # the producer GEMV pushed its tiles; the consumer GEMV sums the inbox
        if push is not None and push.fits(x):
            if out_name in program._deferred_all_reduces and _defers(program, push, x):
                return (x,)  # the partial: the add + RMSNorm closure reading it reduces it in its kernel
            return (push(x, k),)
        nbytes = x.numel() * x.element_size()
        if symm is not None and nbytes <= SYMM_ALL_REDUCE_BYTES and nbytes % 16 == 0 and x.is_contiguous():
            return (symm(x, slot),)
        dist.all_reduce(x, group=group)
        return (x,)

    return run


def _lower_all_gather(node, graph, program, producers, users) -> Fn:
    """The ranks' slices concatenated along `axis` (in rank order), cut to `size`."""
    import torch
    import torch.distributed as dist

    group, tp = program.tp_group, program.tp_size
    axis, size = int(node.attrs["axis"]), int(node.attrs["size"])
    into_tensor = dist.get_backend(group) == "nccl"

    def run(ctx, x):
        x = x.contiguous()
        if into_tensor:
            parts = torch.empty((tp, *x.shape), dtype=x.dtype, device=x.device)
            dist.all_gather_into_tensor(parts, x, group=group)
            parts = parts.unbind(0)
        else:  # gloo (the CPU interpreter tests) gathers into a list
            parts = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(parts, x, group=group)
        full = torch.cat(parts, dim=axis)
        return (full if full.shape[axis] == size else full.narrow(axis, 0, size).contiguous(),)

    return run


def _agree_min(program, num_blocks: int, num_blocks_w: int | None) -> tuple[int, int | None]:
    """The smallest num_blocks (and num_blocks_w) over the tensor-parallel ranks."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([num_blocks, -1 if num_blocks_w is None else num_blocks_w], dtype=torch.int64,
                     device=program.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=program.tp_group)
    low = t.tolist()
    return int(low[0]), (None if num_blocks_w is None else int(low[1]))


def _lower_constant(node, graph, program, producers, users) -> Fn:
    value = to_torch(np.asarray(node.attrs["value"], dtype=node.attrs["dtype"]), program.device, node.attrs["dtype"])

    def run(ctx):
        return (value,)

    return run


_LOWERINGS: dict[str, Callable[..., Fn]] = {
    "embed": _lower_embed,
    "rms_norm": _lower_rms_norm,
    "head_rms_norm": _lower_head_rms_norm,
    "linear": _lower_linear,
    "logits": _lower_logits,
    "rope": _lower_rope,
    "split": _lower_split,
    "silu_mul": _lower_silu_mul,
    "gelu_tanh_mul": _lower_silu_mul,
    "moe": _lower_moe,
    "kv_write": _lower_kv_write,
    "kv_write_nvfp4": _lower_kv_write_nvfp4,
    "kv_merge": _lower_kv_merge,
    "paged_attention": _lower_paged_attention,
    "attention_mass": _lower_attention_mass,
    "qlinear": _lower_qlinear,
    "qlogits": _lower_qlogits,
    "rotate_heads": _lower_rotate_heads,
    "constant": _lower_constant,
    "embed_shard": _lower_embed_shard,
    "all_reduce": _lower_all_reduce,
    "all_gather": _lower_all_gather,
}


# Generic lax primitives with a direct torch equivalent (attrs decoded per step: dims may be symbolic).
def _torch_generic_table():
    import torch

    def reduce(fn):
        def run(x, *, axes, **_):
            return fn(x, dim=tuple(int(a) for a in axes)) if axes else x

        return run

    def dot_general(a, b, *, dimension_numbers, preferred_element_type=None, **_):
        (ca, cb), (ba, bb) = dimension_numbers
        letters = "abcdefghijklmnopqrstuvwxyz"
        sa = [letters[i] for i in range(a.dim())]
        sb = [letters[a.dim() + i] for i in range(b.dim())]
        for i, j in zip(ba, bb):
            sb[j] = sa[i]
        for i, j in zip(ca, cb):
            sb[j] = sa[i]
        batch = [sa[i] for i in ba]
        free_a = [sa[i] for i in range(a.dim()) if i not in ca and i not in ba]
        free_b = [sb[j] for j in range(b.dim()) if j not in cb and j not in bb]
        out = torch.einsum(f"{''.join(sa)},{''.join(sb)}->{''.join(batch + free_a + free_b)}", a, b)
        return out.to(torch_dtype(preferred_element_type.name)) if preferred_element_type is not None else out

    def broadcast_in_dim(x, *, shape, broadcast_dimensions, **_):
        view = [1] * len(shape)
        for src, dst in enumerate(broadcast_dimensions):
            view[dst] = x.shape[src]
        return x.reshape(view).expand(*[int(s) for s in shape])

    def slice_(x, *, start_indices, limit_indices, strides=None, **_):
        idx = tuple(slice(int(s), int(e), int(st) if strides else 1)
                    for s, e, st in zip(start_indices, limit_indices, strides or [1] * len(start_indices)))
        return x[idx]

    def select_n(which, *cases):
        if len(cases) == 2:
            return torch.where(which.bool(), cases[1], cases[0])
        out = cases[0]
        for i, c in enumerate(cases[1:], start=1):
            out = torch.where(which == i, c, out)
        return out

    def loose(fn):  # elementwise ops: ignore lax-only params (accuracy, ...)
        return lambda *args, **_: fn(*args)

    elementwise = {
        "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
        "max": torch.maximum, "min": torch.minimum, "neg": torch.neg, "exp": torch.exp, "log": torch.log,
        "tanh": torch.tanh, "logistic": torch.sigmoid, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "abs": torch.abs,
        "sin": torch.sin, "cos": torch.cos, "erf": torch.erf, "sign": torch.sign, "square": torch.square,
        "pow": torch.pow,
        "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
        "and": torch.bitwise_and, "or": torch.bitwise_or, "not": torch.bitwise_not,
    }
    return {name: loose(fn) for name, fn in elementwise.items()} | {
        "convert_element_type": lambda x, *, new_dtype, **_: x.to(torch_dtype(new_dtype.name)),
        "reshape": lambda x, *, new_sizes, dimensions=None, **_: x.reshape(tuple(int(s) for s in new_sizes)),
        "broadcast_in_dim": broadcast_in_dim,
        "transpose": lambda x, *, permutation: x.permute(*[int(p) for p in permutation]),
        "squeeze": lambda x, *, dimensions: x.reshape([s for i, s in enumerate(x.shape) if i not in dimensions]),
        "expand_dims": lambda x, *, dimensions: x.reshape(_expanded(x.shape, dimensions)),
        "concatenate": lambda *xs, dimension: torch.cat(xs, dim=int(dimension)),
        "slice": slice_, "dot_general": dot_general, "select_n": select_n,
        "reduce_sum": reduce(torch.sum), "reduce_max": reduce(lambda x, dim: torch.amax(x, dim=dim)),
        "reduce_min": reduce(lambda x, dim: torch.amin(x, dim=dim)),
        "integer_pow": lambda x, *, y, **_: x ** int(y),
        "stop_gradient": lambda x: x, "copy": lambda x: x.clone(), "copy_p": lambda x: x.clone(),
    }


def _expanded(shape, dims):
    out = list(shape)
    for d in sorted(int(x) for x in dims):
        out.insert(d, 1)
    return out


_GENERIC_TORCH: dict[str, Callable] = {}


def _generic_fn(node: Node, graph: Graph, program: CudaProgram) -> Fn:
    if node.op == "dim_as_value":
        import torch

        dtype = torch_dtype(node.attrs["dtype"])
        dim = node.attrs["dimension"]["$dim"]

        def run_dim(ctx):
            return (torch.tensor(eval_dim(dim, ctx.env), dtype=dtype, device=program.device),)

        program.eager_only_ops.append(node.op)  # a host value turned tensor: not capturable
        return run_dim
    if not _GENERIC_TORCH:
        _GENERIC_TORCH.update(_torch_generic_table())
    prim = generic_primitive(node.op)  # raises a clear IRError for ops outside the allow-list
    symbolic = _has_symbolic(node.attrs)
    static_params = None if symbolic else {k: decode_param(v, {}) for k, v in node.attrs.items()}
    fn = _GENERIC_TORCH.get(node.op)
    if fn is not None:
        def run(ctx, *args):
            params = static_params if static_params is not None else {k: decode_param(v, ctx.env) for k, v in node.attrs.items()}
            return (fn(*args, **params),)

        run.symbols = _attr_symbols(node.attrs)  # (a piecewise graph captures it only if these are T and L)
        return run

    # no torch equivalent: run the lax primitive itself through DLPack (eager steps only)
    program.eager_only_ops.append(node.op)

    def run_jax(ctx, *args):
        import jax
        import torch

        params = static_params if static_params is not None else {k: decode_param(v, ctx.env) for k, v in node.attrs.items()}
        out = prim.bind(*[jax.dlpack.from_dlpack(a.contiguous()) for a in args], **params)
        outs = out if prim.multiple_results else (out,)
        return tuple(torch.from_dlpack(o) for o in outs)

    return run_jax


def _attr_symbols(attrs) -> set[str]:
    """The dim symbols a generic op's attrs name."""
    if isinstance(attrs, dict):
        if "$dim" in attrs:
            d = attrs["$dim"]
            return set() if isinstance(d, int) else set(dim_symbols(d))
        return set().union(*(_attr_symbols(v) for v in attrs.values())) if attrs else set()
    if isinstance(attrs, (list, tuple)):
        return set().union(*(_attr_symbols(v) for v in attrs)) if attrs else set()
    return set()


def _has_symbolic(attrs) -> bool:
    if isinstance(attrs, dict):
        return "$dim" in attrs or any(_has_symbolic(v) for v in attrs.values())
    if isinstance(attrs, (list, tuple)):
        return any(_has_symbolic(v) for v in attrs)
    return False
