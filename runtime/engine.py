"""Engine: continuous batching of generate() requests over a compiled Program and its paged KV pool."""
from __future__ import annotations

import bisect
import dataclasses
import enum
import itertools
import time
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, Union

import numpy as np

from runtime.block_pool import BlockPool
from runtime.block_pool import blocks_needed
from runtime.kv_manager import KVCacheManager, PrefixCacheStats
from runtime.sampler import SamplingParams, entropy, find_stop_string, make_generator, sample, token_logprobs
from runtime.speculative import Draft, cost_bucket, decayed_mean
from runtime.step import Program, StepInput

if TYPE_CHECKING:
    from lowering.models.config import ModelConfig
    from lowering.speculation import Speculative

Prompt = Union[str, Sequence[int]]


# ---------------------------------------------------------------------------------------------
# What the Engine needs from a model: a CompiledModel (lowering.compile_model) or a loaded artifact.


class Tokenizer(Protocol):
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...


class ModelHandle(Protocol):
    tokenizer: Tokenizer | None  # None: token-id prompts only, no text
    config: "ModelConfig | None"  # uses vocab_size, max_position_embeddings, eos_token_ids
    block_size: int

    def make_program(
        self, *, num_blocks: int | None = None, max_num_seqs: int = 64, max_model_len: int | None = None
    ) -> Program: ...


@dataclasses.dataclass
class RequestOutput:
    """A finished request. `prompt` is the string the caller passed (None for token-id prompts)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str  # generated text, cut before a stop string; excludes eos / stop tokens
    token_ids: list[int]  # generated tokens only, including a final eos / stop token
    finish_reason: str  # "stop" | "length"
    # with SamplingParams.logprobs: per generated token (its logprob, [(id, logprob)] of the best, best first)
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # generate(track_entropy=True) with logprobs: per generated token, the entropy (nats) of the distribution it
    # was drawn from (runtime/router.py's cascade confidence)
    entropies: list[float] | None = None
    # a cascade draft (generate(drafts=...)): its tokens the model checked, and how many of them it accepted
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# Requests and incremental detokenization


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas, never emitting half a UTF-8 character.

    Decodes the window ids[prefix_offset:] and emits only what it adds over the already emitted
    ids[prefix_offset:read_offset] (the prefix-offset scheme of HF TGI and vLLM). A decode ending
    in U+FFFD is an incomplete character: wait for more tokens. The window starts a few tokens
    into the prompt so tokenizers that drop a leading space at the start of a decode
    (SentencePiece) still produce the space before the first generated word.
    """

    NUM_PROMPT_CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer | None, prompt_token_ids: Sequence[int]):
        self.tokenizer = tokenizer
        num_context = min(len(prompt_token_ids), self.NUM_PROMPT_CONTEXT_TOKENS)
        self.ids = list(prompt_token_ids[len(prompt_token_ids) - num_context :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def add_token(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character decodes to U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, *, final: bool) -> str:
        if self.read_offset == len(self.ids) or self.tokenizer is None:
            return ""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]


PLACEHOLDER = -1  # a token_ids entry whose token an in-flight step is still picking (async scheduling)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt's state across steps. `token_ids` is prompt + generated tokens."""

    request_id: str
    arrival: int  # FCFS order; the latest arrival is preempted first
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    generator: np.random.Generator
    detokenizer: IncrementalDetokenizer
    token_ids: list[int]
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    num_computed_tokens: int = 0  # tokens whose K/V are in the pool
    num_evicted: int = 0  # of those, tokens a KV eviction policy dropped (cache index = token index - this)
    block_ids: list[int] = dataclasses.field(default_factory=list)  # block table (kv_manager fills it)
    block_ids_w: list[int] = dataclasses.field(default_factory=list)  # second KV group's table (sliding-window layers)
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)  # prefix-cache hashes of full blocks
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    device_seed: int | None = None  # seed of device-side sampling (Programs with step_sample)
    output_logprobs: list = dataclasses.field(default_factory=list)  # with params.logprobs, one per output token
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)  # draft to verify in the next step
    spec_draft: "Draft | None" = None  # the proposal behind spec_token_ids (with its probabilities, if any)
    draft_source: str | None = None  # "cascade": spec_token_ids is another model's answer (Engine.generate(drafts=))
    cascade_draft: list[int] | None = None  # that whole answer (its part past the output so far is checked next)
    num_draft_tokens: int = 0  # cascade draft tokens verified, and accepted
    num_accepted_draft_tokens: int = 0
    track_entropy: bool = False  # record output_entropies (needs host logits: params.logprobs set)
    output_entropies: list = dataclasses.field(default_factory=list)
    # async scheduling (Engine._step_async): (step serial, logit row) of the token the in-flight step picks for this
    # request; token_ids ends with PLACEHOLDER until it is known. final_pending: that token is the last one
    # (max_tokens / max_model_len), so no step is scheduled for the request meanwhile
    inflight: tuple[int, int] | None = None
    final_pending: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


# ---------------------------------------------------------------------------------------------
# Scheduling: which tokens of which requests run this step, and their KV blocks


@dataclasses.dataclass
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of one request, computed in this step."""

    request: Request
    start: int
    num_tokens: int
    num_cached_tokens: int = 0  # tokens of a request admitted this step found in the prefix cache (== start)
    num_spec: int = 0  # the chunk's last num_spec tokens are the request's draft (spec_token_ids), verified here
    num_evicted: int = 0  # the request's evicted tokens when scheduled: its cache holds tokens from start - this on

    @property
    def wants_logits(self) -> bool:
        """True when the chunk reaches the request's last token, so the step samples its next one."""
        return self.start + self.num_tokens - self.num_spec == self.request.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]  # decodes first, then prefill chunks
    preempted: list[Request]
    # KV eviction: caches the Program compacts before this step runs (runtime.step.KVCompaction)
    compactions: list = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens this step's admissions skipped because their K/V were in the prefix cache."""
        return sum(c.num_cached_tokens for c in self.chunks)


@dataclasses.dataclass
class SchedulerStats:
    """A snapshot of the scheduler's counters (cumulative ones since it was built)."""

    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int  # includes cached blocks nobody holds (evictable)
    num_cached_blocks: int  # blocks holding a prefix-cache hash, in use or evictable
    num_preemptions: int
    num_scheduled_tokens: int  # tokens sent to the Program
    prefix_cache: PrefixCacheStats  # queries / hits in tokens, per admission (see kv_manager)


class Scheduler:
    """FCFS continuous batching with a token budget, chunked prefill, prefix caching and preemption.

    Each step schedules, in this order, while the token budget lasts:
      1. running requests with one uncomputed token (decodes), one token each;
      2. running requests still prefilling, the next chunk of each;
      3. waiting requests in arrival order, while a sequence slot and enough free blocks exist
         (skipped in a step that preempted someone). An admitted request starts after the leading
         full blocks of its tokens that are in the prefix cache, so the step computes only the rest.
    A running request that needs a block when none is free preempts the latest-arrived running
    request, possibly itself: that request's blocks are freed (its cached full blocks stay cached)
    and it waits to be recomputed from its prompt + generated tokens, which gives the same tokens it
    would have had. Waiting requests are admitted strictly in arrival order (a preempted request
    keeps its place), so none starves.

    After the Program ran a step, `update_after_step` registers the blocks it filled in the prefix
    cache (blocks are cached only once their K/V are written).
    """

    def __init__(
        self, *, num_blocks: int, block_size: int, max_num_seqs: int, max_num_batched_tokens: int,
        enable_prefix_caching: bool = True, window: int | None = None, window_group: tuple[int, int] | None = None,
        eviction=None,
    ):
        """window / window_group: the Program's sliding-window KV groups (see KVCacheManager); eviction: its KV
        eviction plan (lowering.kv_policy.EvictionPlan): a request's cache is compacted to the budget before a
        step would take it past the capacity, and no step gives it more tokens than the capacity leaves room for."""
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching, window=window,
                                 window_group=window_group, eviction=eviction)
        self.waiting: list[Request] = []  # sorted by arrival
        self.running: list[Request] = []  # sorted by arrival
        self.num_preemptions = 0
        self.num_scheduled_tokens = 0
        self.on_release: list = []  # callables(request) run when a request finishes, is aborted or preempted

    @property
    def allocator(self) -> BlockPool:
        """The block pool (num_free_blocks, allocate, ...)."""
        return self.kv.pool

    @property
    def prefix_cache_queries(self) -> int:
        """Tokens of admitted new requests looked up in the prefix cache (recomputes of preempted ones not counted)."""
        return self.kv.stats.queried_tokens

    @property
    def prefix_cache_hits(self) -> int:
        """Of prefix_cache_queries, the tokens found in cached blocks (not computed again)."""
        return self.kv.stats.hit_tokens

    def stats(self) -> SchedulerStats:
        pool = self.kv.pool
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            num_used_blocks=pool.num_used_blocks,
            num_free_blocks=pool.num_free_blocks,
            num_cached_blocks=pool.num_cached_blocks,
            num_preemptions=self.num_preemptions,
            num_scheduled_tokens=self.num_scheduled_tokens,
            prefix_cache=dataclasses.replace(self.kv.stats),
        )

    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        bisect.insort(self.waiting, req, key=_arrival)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def finish_request(self, req: Request) -> None:
        self.kv.free(req)
        self.running.remove(req)
        req.status = RequestStatus.FINISHED
        self._release(req)

    def _release(self, req: Request) -> None:
        req.spec_token_ids, req.spec_draft, req.draft_source = [], None, None
        for fn in self.on_release:
            fn(req)

    def abort_request(self, req: Request) -> None:
        """Drop a running or waiting request, freeing its blocks (a finished one is left alone)."""
        if req in self.running:
            self.finish_request(req)
        elif req in self.waiting:  # waiting requests hold no blocks (preemption freed them)
            self.waiting.remove(req)
            req.status = RequestStatus.FINISHED
            self._release(req)

    def abort_all_requests(self) -> None:
        for req in self.running + self.waiting:
            self.abort_request(req)

    def schedule(self) -> SchedulerOutput:
        scheduled: dict[int, ScheduledChunk] = {}  # arrival -> chunk, in scheduling order
        preempted: list[Request] = []
        compactions: list = []  # (request, KVCompaction)
        eviction = self.kv.eviction

        # (a request whose last token is in flight and will finish it has nothing to compute: async scheduling)
        decodes = [r for r in self.running if r.num_uncomputed_tokens == 1 and not r.final_pending]
        prefills = [r for r in self.running if r.num_uncomputed_tokens > 1]
        used = 0  # tokens scheduled so far (recounted after a preemption gives some back)
        for req in decodes + prefills:
            if req.status is not RequestStatus.RUNNING:  # preempted earlier in this step
                continue
            # a decode runs its last token and its draft (speculative decoding), as much of it as the budget allows;
            # so does the last prefill chunk of a request that came with a cascade draft
            num_spec = len(req.spec_token_ids)
            num_new = min(req.num_uncomputed_tokens + num_spec, self.max_num_batched_tokens - used)
            if num_new == 0:
                break
            if eviction is not None:
                if not self._compact_if_needed(req, num_new, scheduled, preempted, compactions):
                    used = self._used(scheduled)
                    continue
                num_new = min(num_new, eviction.capacity - self.kv.cache_len(req))
            num_spec = max(0, num_new - req.num_uncomputed_tokens)
            if num_spec < len(req.spec_token_ids) and num_new >= req.num_uncomputed_tokens:
                req.spec_token_ids = req.spec_token_ids[:num_spec]  # (a draft waits for the chunk that reaches the end)
            num_preempted = len(preempted)
            if self._grow_blocks(req, num_new, scheduled, preempted):
                scheduled[req.arrival] = ScheduledChunk(req, req.num_computed_tokens, num_new, num_spec=num_spec,
                                                        num_evicted=req.num_evicted)
            used = used + num_new if len(preempted) == num_preempted else self._used(scheduled)

        # NOTE: a step that had to preempt is short of blocks; admitting now would only thrash.
        while self.waiting and not preempted and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            budget = self.max_num_batched_tokens - used
            if budget == 0:
                break
            computed_blocks = self.kv.get_computed_blocks(req)
            num_cached = len(computed_blocks) * self.block_size
            num_new = min(req.num_tokens - num_cached, budget)
            if eviction is not None:
                num_new = min(num_new, eviction.capacity - num_cached)
            num_spec = 0
            if req.spec_token_ids and num_new == req.num_tokens - num_cached:
                # a cascade draft rides on the prompt's last chunk: the whole answer is checked in this one pass
                room = budget - num_new if eviction is None else min(budget, eviction.capacity - num_cached) - num_new
                num_spec = max(0, min(len(req.spec_token_ids), room))
                if num_spec:
                    req.spec_token_ids = req.spec_token_ids[:num_spec]
            if not self.kv.allocate_for(req, num_new + num_spec, computed_blocks=computed_blocks):  # sets num_computed_tokens
                if not num_spec or not self.kv.allocate_for(req, num_new, computed_blocks=computed_blocks):
                    break
                num_spec = 0  # no room for the draft's slots now: the prompt alone (the draft is dropped)
            self.waiting.pop(0)
            req.status = RequestStatus.RUNNING
            bisect.insort(self.running, req, key=_arrival)
            scheduled[req.arrival] = ScheduledChunk(req, num_cached, num_new + num_spec, num_cached_tokens=num_cached,
                                                    num_spec=num_spec)
            num_new += num_spec
            used += num_new

        chunks = list(scheduled.values())
        for chunk in chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
        # a request compacted, then preempted later in this step, holds no blocks any more: nothing to move
        out = SchedulerOutput(chunks, preempted, [c for r, c in compactions if r.status is RequestStatus.RUNNING])
        self.num_scheduled_tokens += out.num_tokens
        return out

    def update_after_step(self, out: SchedulerOutput) -> None:
        """The Program ran `out`: register the blocks its chunks filled in the prefix cache."""
        for chunk in out.chunks:
            if chunk.request.status is RequestStatus.RUNNING:
                self.kv.cache_full_blocks(chunk.request)

    @staticmethod
    def _used(scheduled: dict[int, ScheduledChunk]) -> int:
        return sum(c.num_tokens for c in scheduled.values())

    def _compact_if_needed(self, req: Request, num_new: int, scheduled: dict[int, ScheduledChunk],
                           preempted: list[Request], compactions: list) -> bool:
        """Compact req's cache to its eviction budget when num_new more tokens would pass the capacity (preempting
        latest arrivals if the compaction needs blocks the pool lacks); False if req itself was preempted."""
        if not self.kv.needs_compaction(req, num_new):
            return True
        compaction = self._preempting_until(req, lambda: self.kv.plan_compaction(req), scheduled, preempted)
        if compaction is None:
            return False
        compactions.append((req, compaction))
        return True

    def _grow_blocks(
        self, req: Request, num_new: int, scheduled: dict[int, ScheduledChunk], preempted: list[Request]
    ) -> bool:
        """Give req blocks for num_new more tokens, preempting latest arrivals; False if req itself was preempted."""
        return self._preempting_until(req, lambda: self.kv.allocate_for(req, num_new), scheduled, preempted) is not None

    def _preempting_until(self, req: Request, attempt, scheduled: dict[int, ScheduledChunk],
                          preempted: list[Request]):
        """attempt() until it succeeds (a truthy result), preempting the latest-arrived running request after each
        failure; that result, or None once req itself was preempted."""
        while not (result := attempt()):
            victim = self.running[-1]
            self._preempt(victim, scheduled, preempted)
            if victim is req:
                return None
        return result

    def _preempt(self, req: Request, scheduled: dict[int, ScheduledChunk], preempted: list[Request]) -> None:
        self._release(req)
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.running.remove(req)
        scheduled.pop(req.arrival, None)  # a victim already scheduled this step gives its tokens back
        self.add_request(req)
        preempted.append(req)
        self.num_preemptions += 1


@dataclasses.dataclass
class _Inflight:
    """A step launched by Engine._step_async: its serial, the Program's pending tokens, and for each logit row
    (request, index of its PLACEHOLDER in token_ids)."""

    serial: int
    pending: object
    places: list


@dataclasses.dataclass(eq=False)
class _Burst:
    """A device-speculation burst (Engine._step_device_spec): its requests (in the loop's sequence order), the
    Program's loop, the chunks in flight and how many iterations they hold."""

    reqs: list
    q: int
    loop: object = None
    next_q: int = 1  # rows a sequence of the next chunk's steps (q, or 1 while n-gram matches are not found)
    inflight: list = dataclasses.field(default_factory=list)
    inflight_iters: int = 0
    inflight_rows: int = 0  # the rows a sequence of those iterations (what they may add to its length)
    stopping: bool = False
    num_iters: int = 0  # iterations collected (once a chunk is, later ones are cost samples)
    mark: float = 0.0  # when the last chunk was collected (or the burst launched)


def _arrival(req: Request) -> int:
    return req.arrival


# ---------------------------------------------------------------------------------------------
# Step building: scheduler output -> the Program's ragged StepInput


def build_step_input(
    chunks: list[ScheduledChunk], *, block_size: int, max_blocks_per_seq: int, two_groups: bool = False,
    cache_positions: bool = False,
) -> tuple[StepInput, list[Request]]:
    """Flatten one step's chunks into a StepInput; also return the requests that get a logit row.

    Sequence s is chunks[s]; its tokens are flat rows query_start[s]:query_start[s+1]. Unused
    block-table entries are 0 (a valid block, so a kernel that over-reads stays in bounds); B is
    the widest table this step's contexts need. So are entries a sliding window freed (FREED), which
    attention never reads. A Program with a second KV group (two_groups) also gets block_tables_w
    and slot_mapping_w from each request's block_ids_w.

        chunk s:       request r, tokens [start, start + n)
        positions:     start .. start + n - 1
        slot_mapping:  block_ids[pos // block_size] * block_size + pos % block_size
        seq_lens[s]:   start + n
        logit row:     query_start[s + 1] - 1, only if the chunk reaches r's last token
        a draft:       a decode chunk with num_spec = k runs r's last token then r.spec_token_ids[:k], and
                       gets the k + 1 logit rows query_start[s + 1] - 1 - k .. query_start[s + 1] - 1
    KV eviction: a chunk's tokens sit at cache indices start - num_evicted + i (slots, seq_lens and the table
    width follow the cache); positions stay the tokens' own unless cache_positions (StreamingLLM's rule:
    a token's position is its cache index).
    Returns the requests with logit rows, in row order (one per request, however many rows it has).
    """
    num_seqs = len(chunks)
    q_lens = np.array([c.num_tokens for c in chunks], dtype=np.int32)  # i32[S]
    query_start = np.zeros(num_seqs + 1, dtype=np.int32)  # i32[S+1]
    np.cumsum(q_lens, out=query_start[1:])
    starts = np.array([c.start for c in chunks], dtype=np.int32)  # i32[S]
    cache_starts = starts - np.array([c.num_evicted for c in chunks], dtype=np.int32)  # i32[S]
    seq_lens = cache_starts + q_lens  # i32[S]

    token_ids = np.concatenate(
        [np.asarray(c.request.token_ids[c.start : c.start + c.num_tokens - c.num_spec]
                    + c.request.spec_token_ids[: c.num_spec], dtype=np.int32) for c in chunks]
    )  # i32[T]
    seq_of_row = np.repeat(np.arange(num_seqs, dtype=np.int32), q_lens)  # i32[T]
    in_chunk = np.arange(token_ids.shape[0], dtype=np.int32) - query_start[seq_of_row]  # i32[T]
    cache_index = in_chunk + cache_starts[seq_of_row]  # i32[T]
    positions = cache_index if cache_positions else in_chunk + starts[seq_of_row]  # i32[T]

    # NOTE: the table is only as wide as this step's longest context needs, so attention over it
    # costs what the contexts cost, not what max_model_len would.
    width = int(max(1, (-(-seq_lens // block_size)).max()))
    if width > max_blocks_per_seq:
        raise ValueError(f"a sequence needs {width} blocks but the program allows {max_blocks_per_seq}")
    def tables_and_slots(attr: str):
        tables = np.zeros((num_seqs, width), dtype=np.int32)  # i32[S, B]
        for s, chunk in enumerate(chunks):
            ids = getattr(chunk.request, attr)[:width]
            tables[s, : len(ids)] = ids
        np.maximum(tables, 0, out=tables)  # FREED (-1) entries -> block 0, never read
        block_of_row = tables[seq_of_row, cache_index // block_size]  # i32[T]
        return tables, (block_of_row * block_size + cache_index % block_size).astype(np.int32)  # i32[T]

    block_tables, slot_mapping = tables_and_slots("block_ids")
    block_tables_w, slot_mapping_w = tables_and_slots("block_ids_w") if two_groups else (None, None)

    # the last row of a chunk that reaches its request's last token; with a draft of k tokens, its k + 1 rows
    logit_rows = np.array([row for s, c in enumerate(chunks) if c.wants_logits
                           for row in range(query_start[s + 1] - 1 - c.num_spec, query_start[s + 1])],
                          dtype=np.int32)  # i32[L]
    sampled = [c.request for c in chunks if c.wants_logits]

    step = StepInput(
        token_ids=token_ids,
        positions=positions,
        slot_mapping=slot_mapping,
        query_start=query_start,
        seq_lens=seq_lens,
        block_tables=block_tables,
        logit_rows=logit_rows,
        block_tables_w=block_tables_w,
        slot_mapping_w=slot_mapping_w,
    )
    return step, sampled


# ---------------------------------------------------------------------------------------------
# Engine


class Engine:
    """Runs many prompts through one Program with continuous batching.

        engine = Engine(runtime.load("artifacts/smollm2"))
        outs = engine.generate(["Hi"], SamplingParams(max_tokens=32, temperature=0.0), chat=True)
    """

    def __init__(
        self,
        model: ModelHandle,
        *,
        num_blocks: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        program_options: dict | None = None,
        enable_prefix_caching: bool | None = None,
        speculative: "Speculative | bool | None" = None,
        async_scheduling: bool | None = None,
        spec_on_device: bool | None = None,
    ):
        """program_options: extra keyword arguments for the target's Program (e.g. gpu_memory_fraction,
        cuda_graphs for target="cuda"; kv_cache_bytes for both). enable_prefix_caching: reuse the K/V of
        full blocks that earlier requests computed for the same leading tokens (see runtime/block_pool.py);
        None: on, unless the model's KV eviction policy cannot use it (H2O, see check_prefix_caching).
        speculative: None uses what the model was compiled with (compile_model(speculative=...)), False turns
        speculation off, a lowering.Speculative overrides it (runtime/speculative.py).
        async_scheduling: launch each step before the previous step's tokens are back, so the host's work (scheduling,
        building the step, stop checks, detokenizing) overlaps the GPU's; the tokens still in flight are fed to the
        next step on the device, and a request's stop is seen one step late (that step's extra row is dropped).
        None: on where the Program supports it (CudaProgram.step_async) and nothing needs a step's tokens on the host
        before the next (no speculation, KV eviction, cascade drafts, penalties or logprobs; other steps run as
        before); False: off.
        spec_on_device: n-gram speculation at low batch (at most DEVICE_SPEC_MAX_SEQS greedy decoding requests, by
        default one, none waiting) runs on the device: drafts, verification and the accept rule of many steps are
        launched without waiting for the host, which reads the tokens a chunk later (Program.start_ngram_loop;
        _step_device_spec).
        None: on where the Program supports it and the model speculates with method="ngram"; True: required;
        False: off (drafts are made on the host between synchronous verification steps)."""
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if num_blocks is not None and (not isinstance(num_blocks, int) or num_blocks < 1):
            raise ValueError(f"num_blocks must be an integer >= 1 or None, got {num_blocks!r}")
        config = model.config
        max_positions = config.max_position_embeddings if config is not None else None
        for name, value in (("async_scheduling", async_scheduling), ("spec_on_device", spec_on_device)):
            if value not in (None, True, False):
                raise ValueError(f"{name} must be True, False or None, got {value!r}")
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or max_model_len < 2:
                raise ValueError(f"max_model_len must be an integer >= 2 or None, got {max_model_len!r}")
            if max_positions is not None and max_model_len > max_positions:
                raise ValueError(
                    f"max_model_len={max_model_len} exceeds the model's max_position_embeddings={max_positions}"
                )

        self.model = model
        self.tokenizer = model.tokenizer
        self.program = model.make_program(num_blocks=num_blocks, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                          **(program_options or {}))
        self.block_size = self.program.block_size
        max_len_per_seq = self.program.max_blocks_per_seq * self.block_size
        if max_model_len is None:
            max_model_len = min(max_positions or max_len_per_seq, max_len_per_seq)
        elif max_model_len > max_len_per_seq:
            raise ValueError(
                f"max_model_len={max_model_len} needs {blocks_needed(max_model_len, self.block_size)} blocks per "
                f"sequence but the program's block tables hold {self.program.max_blocks_per_seq}"
            )
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.vocab_size = config.vocab_size if config is not None else self.program.vocab_size
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids if self.tokenizer is not None else ()) | frozenset(
            config.eos_token_ids if config is not None else ()
        )
        self.eviction = getattr(self.program, "eviction", None)
        enable_prefix_caching = check_prefix_caching(self.eviction, enable_prefix_caching)
        self.scheduler = Scheduler(
            num_blocks=self.program.num_blocks,
            block_size=self.block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            enable_prefix_caching=enable_prefix_caching,
            window=getattr(self.program, "kv_window", None),
            window_group=((self.program.num_blocks_w, self.program.kv_window_w)
                          if getattr(self.program, "num_blocks_w", None) is not None else None),
            eviction=self.eviction,
        )
        self.num_steps = 0
        self.num_compactions = 0
        self.cascade_stats = {"num_drafts": 0, "num_draft_tokens": 0, "num_accepted_tokens": 0}
        self._request_counter = itertools.count()
        self._setup_speculation(model, speculative, max_num_seqs, program_options)
        supported = bool(getattr(self.program, "supports_async_steps", False))
        if async_scheduling and not supported:
            raise ValueError(f"async_scheduling=True needs a Program with step_async (target='cuda'); "
                             f"this one is a {type(self.program).__name__}")
        # speculation: steps run async only while the adaptive controller holds drafts off (high load), so a
        # fixed draft length never would
        why_not = ("KV eviction" if self.eviction is not None else
                   "speculative decoding with a fixed draft length (adaptive=False)"
                   if self.proposer is not None and not self.draft_controller.adaptive else None)
        if async_scheduling and why_not:
            raise ValueError(f"async_scheduling=True cannot run with {why_not}: its next step needs this step's "
                             "tokens on the host")
        self.async_scheduling = supported and why_not is None and async_scheduling is not False
        self._inflight: _Inflight | None = None
        self._drafts_held = False  # speculation: the controller chose no drafts and holds that for a few steps
        self._decided_k: int | None = None  # a draft length chosen during an async step, for the next _propose
        self._step_serial = 0
        self.num_async_steps = 0  # steps launched before their predecessor's tokens were back
        self.scheduler.on_release.append(self._drop_placeholder)
        self._no_host_drafts = False  # this step: device speculation chose plain steps (no drafts on the host)
        self._setup_spec_on_device(spec_on_device)

    def _setup_speculation(self, model, speculative, max_num_seqs: int, program_options: dict | None) -> None:
        from runtime import speculative as spec_lib

        if speculative is None:
            speculative = getattr(model, "speculative", None)
        if speculative is True:
            raise ValueError("speculative=True is ambiguous: pass a lowering.Speculative(method=...)")
        self.speculative = speculative or None
        self.proposer = None
        self.spec_stats = spec_lib.SpecStats()
        self.draft_controller = None
        # hidden-state proposers: whether the next step computes the features they read (off while the adaptive
        # controller keeps choosing no drafts; one step after it wants drafts again they are back)
        self._hidden_next = True
        self._last_had_hidden = False
        if self.speculative is None:
            return
        if not isinstance(self.speculative, spec_lib.Speculative):
            raise ValueError(f"speculative must be a lowering.Speculative, False or None, got {type(speculative).__name__}")
        self.speculative.validate()
        meta = getattr(getattr(model, "graph", None), "meta", None)
        policy = meta.get("kv_policy") if isinstance(meta, dict) else None
        if policy and self.speculative.method != "ngram":
            from lowering.passes.evict_kv import check_kv_policy

            check_kv_policy(model.graph, policy, speculative={"method": self.speculative.method})
        graph = getattr(model, "graph", None)
        if self.speculative.needs_hidden and graph is not None and len(graph.outputs) < 2:
            raise ValueError(f"speculative method {self.speculative.method!r} reads the target's hidden states: compile "
                             f"the model with compile_model(..., speculative=Speculative(method="
                             f"{self.speculative.method!r}, ...))")
        self.proposer = spec_lib.make_proposer(self.speculative, target=model, program=self.program,
                                               max_num_seqs=max_num_seqs, max_model_len=self.max_model_len,
                                               program_options=program_options)
        self.draft_controller = spec_lib.DraftLengthController(self.speculative.num_tokens,
                                                               adaptive=self.speculative.adaptive)
        self.spec_stats.method = self.speculative.method
        self.scheduler.on_release.append(self.proposer.release)
        self.scheduler.on_release.append(self.draft_controller.release)

    # -- public API ----------------------------------------------------------------------------

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[Sequence[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
        use_tqdm: bool = False,
        on_token: "Callable[[str, int], None] | None" = None,
        drafts: "Sequence[Sequence[int] | None] | None" = None,
        track_entropy: bool = False,
    ) -> list[RequestOutput]:
        """Generate a completion for each prompt; outputs come back in prompt order.

        A prompt is a string (encoded with the tokenizer's special tokens, or wrapped as one user
        message through the chat template when chat=True) or a list of token ids. Every prompt is
        checked before anything runs. `on_token(request_id, token_id)` is called for every sampled
        token as soon as it is known (streaming, timing).

        drafts[i]: another model's answer to prompt i in this model's token ids (cascade-as-speculation,
        runtime/router.py). The step that computes the prompt's last chunk also runs the draft and accepts its
        longest prefix this model agrees with, so the output is what this model alone would produce (greedy
        requests; others ignore the draft). track_entropy: with SamplingParams.logprobs set, each output also
        carries the entropy of every generated token's distribution.
        """
        prompt_list = _as_prompt_list(prompts)
        params_list = self._as_params_list(sampling_params, len(prompt_list))
        if drafts is not None and len(drafts) != len(prompt_list):
            raise ValueError(f"got {len(drafts)} drafts for {len(prompt_list)} prompts")
        requests = [self._make_request(i, p, sp, chat, draft=drafts[i] if drafts is not None else None,
                                       track_entropy=track_entropy)
                    for i, (p, sp) in enumerate(zip(prompt_list, params_list))]
        for req in requests:
            self.scheduler.add_request(req)

        progress = None
        if use_tqdm:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(requests), desc="generate", unit="req")
        try:
            while self.scheduler.has_unfinished_requests():
                finished = self._step(on_token)
                if progress is not None:
                    progress.update(len(finished))
        except BaseException:
            self._inflight = self._burst = None
            self.scheduler.abort_all_requests()
            raise
        finally:
            if progress is not None:
                progress.close()
        return [_make_output(req) for req in requests]

    # -- one step --------------------------------------------------------------------------------

    def _step(self, on_token=None) -> list[Request]:
        """One engine step; returns the requests that finished. A device-speculation burst while one runs or should
        start (_step_device_spec); with async scheduling, a step launched while every request can take its tokens
        late (_step_async); otherwise the in-flight step is collected first."""
        if self._burst is not None:
            return self._step_device_spec(on_token)
        device = self._device_spec_state()
        finished: list[Request] = []
        if device == "burst":
            if self._inflight is not None:
                finished = self._collect(self._inflight, on_token)
                self._inflight = None
            if not self.scheduler.has_unfinished_requests() or self._start_burst():
                return finished
            device = "plain"
        self._no_host_drafts = device == "plain"  # the requests could burst, and plain steps beat it: no drafts
        if self.async_scheduling:
            if self._can_launch_early() and (self.proposer is None or self._drafts_held or self._no_host_drafts):
                return finished + self._step_async(on_token)
            decided, self._decided_k = self._decided_k, None
            if self._inflight is not None:
                finished += self._collect(self._inflight, on_token)
                self._inflight = None
                if not self.scheduler.has_unfinished_requests():
                    return finished
                if self.proposer is not None and not self._no_host_drafts:  # the next step's drafts (async: none)
                    self._propose(decided)
                return finished + self._step_sync(on_token)
        return finished + self._step_sync(on_token)

    def _step_sync(self, on_token=None) -> list[Request]:
        """Schedule, run the Program once, sample (or verify drafts), append; return the requests that finished."""
        step_start = time.perf_counter()
        sched = self.scheduler.schedule()
        if not sched.chunks:
            raise RuntimeError("the scheduler could not schedule any request (this is a bug)")
        step, sampled = build_step_input(
            sched.chunks, block_size=self.block_size, max_blocks_per_seq=self.program.max_blocks_per_seq,
            two_groups=getattr(self.program, "num_blocks_w", None) is not None,
            cache_positions=self.eviction is not None and self.eviction.cache_positions,
        )
        if sched.compactions:  # KV eviction: caches past their capacity shrink to the budget before the step
            self.program.compact_kv(sched.compactions)
            self.num_compactions += len(sched.compactions)
        groups = [c for c in sched.chunks if c.wants_logits]  # one per sampled request, in logit-row order
        num_spec = [c.num_spec for c in groups]
        with_hidden = self.proposer is not None and self.proposer.needs_hidden and self._hidden_next
        self._last_had_hidden = with_hidden
        new_tokens, logits, hidden = self._run_program(step, sampled, any(num_spec), with_hidden)
        compiled = bool(getattr(self.program, "last_step_compiled", False))
        self.num_steps += 1

        # rows -> emitted tokens per request (one, or the accepted drafts and one more)
        emitted: list[list[int]] = []
        first_rows = np.cumsum([0] + [k + 1 for k in num_spec[:-1]])  # each request's first logit row
        plain = [i for i, k in enumerate(num_spec) if k == 0]
        if logits is not None and plain:  # rows without a draft: the sampler (penalties, logprobs) as before
            picked = sample(logits[first_rows[plain]], [sampled[i].params for i in plain],
                            [sampled[i].generator for i in plain], [sampled[i].output_token_ids for i in plain],
                            self.eos_token_ids, [sampled[i].prompt_token_ids for i in plain])
            plain_tokens = dict(zip(plain, picked.tolist()))
        for i, (req, k) in enumerate(zip(sampled, num_spec)):
            row = int(first_rows[i])
            if k == 0:
                token = plain_tokens[i] if logits is not None else int(new_tokens[row])
                if logits is not None and req.params.logprobs is not None:
                    req.output_logprobs.append(token_logprobs(logits[row], token, req.params.logprobs))
                    if req.track_entropy:
                        req.output_entropies.append(entropy(logits[row, :self.vocab_size]))
                emitted.append([token])
            else:
                emitted.append(self._verify(req, k, row, new_tokens, logits))

        # rejected drafts: their K/V lie past the accepted tokens and are overwritten later
        for chunk, out in zip(groups, emitted):
            if chunk.num_spec:
                chunk.request.num_computed_tokens -= chunk.num_spec - (len(out) - 1)
        if with_hidden:
            self._observe(sched.chunks, step, hidden, dict(zip(map(id, groups), emitted)))
        self.scheduler.update_after_step(sched)  # the step wrote its K/V: cache the blocks it filled

        finished = []
        for req, out in zip(sampled, emitted):
            req.spec_token_ids, req.spec_draft, req.draft_source = [], None, None
            for token in out:
                self._append_token(req, token)
                if on_token is not None:
                    on_token(req.request_id, token)
                if req.finish_reason is not None:
                    break
            if req.finish_reason is not None:
                self.scheduler.finish_request(req)
                finished.append(req)
            elif req.cascade_draft is not None:
                self._continue_draft(req)
        # (with async scheduling a step without drafts is launched early when drafts are held off, and costs what
        # such steps cost: this synchronous one, run around a drafting step, would make no drafts look dearer)
        if self.draft_controller is not None and not compiled and (any(num_spec) or not self.async_scheduling):
            # the whole step (scheduling, the Program, the accept rule, appending): verification rows cost host
            # time too, which the controller must weigh; proposing is measured apart
            self.draft_controller.record_step(step.num_tokens, time.perf_counter() - step_start)
        if self.proposer is not None and not self._no_host_drafts:
            self._propose()
        return finished

    # -- async scheduling ------------------------------------------------------------------------
    #
    # step t is launched, then step t-1's tokens are collected (stop checks, detokenizing, callbacks) while the GPU
    # runs step t. A request whose token is still in flight ends its token_ids with PLACEHOLDER; the scheduler
    # counts it like any token, and step t+1 reads it on the device (the Program's feed). A request that stops at
    # step t-1 also had a row in step t: that token is dropped, and the K/V it wrote lie past the request's end (its
    # blocks are freed after step t was launched, so any later step that reuses them runs after it).

    def _can_launch_early(self) -> bool:
        """Every request can take its tokens one step late: none reads logits on the host (penalties, logprobs) or
        checks a cascade draft against its output."""
        sched = self.scheduler
        return all(not r.params.needs_host_logits and r.cascade_draft is None and not r.spec_token_ids
                   for r in itertools.chain(sched.running, sched.waiting))

    def _step_async(self, on_token=None) -> list[Request]:
        """Launch the next step, feeding it the tokens still in flight, then collect the previous step's tokens."""
        start = time.perf_counter()
        prev, self._inflight = self._inflight, None
        sched = self.scheduler.schedule()
        launched = None
        if sched.chunks:
            launched = self._launch(sched, prev)
        elif prev is None:
            raise RuntimeError("the scheduler could not schedule any request (this is a bug)")
        compiled = bool(getattr(self.program, "last_step_compiled", False))
        finished = self._collect(prev, on_token) if prev is not None else []
        if launched is not None:
            self.scheduler.update_after_step(sched)  # (after the collect: the blocks it caches hold real tokens now)
            if any(req.status is not RequestStatus.FINISHED for req, _ in launched.places):
                self._inflight = launched  # (else every row it computes is dropped: nothing to wait for)
        if self.proposer is not None:  # a step of the controller's hold on drafts (what _propose counts in sync steps)
            self._last_had_hidden = False
            if launched is not None and not compiled:
                # the controller weighs drafts against plain steps as they run now: launched ahead, collected late
                self.draft_controller.record_step(sched.num_tokens, time.perf_counter() - start)
            if self._no_host_drafts:  # (device speculation measures these plain steps against its bursts)
                self.spec_stats.record_draft_length(0)
            elif self.draft_controller.hold_off():
                self.spec_stats.record_draft_length(0)
                if self.proposer.needs_hidden:
                    self._hidden_next = False
            else:  # the controller decides again now: a draft length needs no token in flight, drafts do
                ready, caps, num_decoding = self._draft_candidates()
                k = self._choose_draft_length(ready, caps, num_decoding) if ready else 0
                if k or (self.proposer.needs_hidden and self._hidden_next):
                    self._drafts_held = False  # the next step collects this one, then drafts (or computes features)
                    self._decided_k = k or None
        return finished

    def _launch(self, sched: SchedulerOutput, prev: "_Inflight | None") -> "_Inflight":
        if sched.compactions:
            raise RuntimeError("async scheduling met a KV compaction (this is a bug)")
        step, sampled = build_step_input(
            sched.chunks, block_size=self.block_size, max_blocks_per_seq=self.program.max_blocks_per_seq,
            two_groups=getattr(self.program, "num_blocks_w", None) is not None,
        )
        feed_rows, feed_from = [], []
        for s, chunk in enumerate(sched.chunks):
            req = chunk.request
            if req.inflight is None:
                continue
            serial, row = req.inflight
            last = int(step.query_start[s + 1]) - 1
            if prev is None or serial != prev.serial or not chunk.wants_logits or chunk.num_spec:
                raise RuntimeError(f"request {req.request_id}: a token still in flight is not the last input of a "
                                   "decode (this is a bug)")
            feed_rows.append(last)
            feed_from.append(row)
            step.token_ids[last] = 0  # (a valid id; the feed overwrites it on the device)
        if (step.token_ids < 0).any():
            raise RuntimeError("a step's token ids hold a placeholder the feed does not cover (this is a bug)")
        sampling = None if all(r.params.temperature == 0 for r in sampled) else self._device_sampling(sampled)
        pending = self.program.step_async(step, feed_rows=feed_rows, feed_from=feed_from, sampling=sampling)
        self.num_steps += 1
        self.num_async_steps += prev is not None
        self._step_serial += 1
        places = []
        for row, req in enumerate(sampled):
            num_out = len(req.output_token_ids) + (req.inflight is not None) + 1  # once this step's token is back
            req.inflight = (self._step_serial, row)
            places.append((req, len(req.token_ids)))
            req.token_ids.append(PLACEHOLDER)
            if num_out >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                req.final_pending = True
        return _Inflight(self._step_serial, pending, places)

    def _collect(self, inflight: "_Inflight", on_token=None) -> list[Request]:
        """Wait for an in-flight step's tokens; append them, check stops; return the requests that finished."""
        tokens = inflight.pending.result()
        if tokens.shape != (len(inflight.places),):
            raise RuntimeError(f"the Program returned {tokens.shape} tokens, expected ({len(inflight.places)},)")
        finished = []
        for (req, index), token in zip(inflight.places, tokens.tolist()):
            if req.inflight is not None and req.inflight[0] == inflight.serial:
                req.inflight = None
            if req.status is RequestStatus.FINISHED:  # aborted, or stopped a step earlier: the token is dropped
                continue
            req.token_ids[index] = token
            req.output_token_ids.append(token)
            self._check_stop(req, token, num_tokens=index + 1)
            if on_token is not None:
                on_token(req.request_id, token)
            if req.finish_reason is not None:
                del req.token_ids[index + 1:]  # the token the step in flight picks for it (dropped when it lands)
                req.inflight, req.final_pending = None, False
                if req.status is RequestStatus.RUNNING:
                    self.scheduler.finish_request(req)
                else:  # preempted while its token was in flight
                    self.scheduler.abort_request(req)
                finished.append(req)
        return finished

    # -- speculation on the device -----------------------------------------------------------------
    #
    # At low batch, n-gram speculation with a verification step that must come back to the host before the next
    # draft loses to plain steps launched ahead (async scheduling). A Program with start_ngram_loop keeps the token
    # histories on the device and runs draft -> verify -> accept there, so the engine launches chunks of iterations
    # back to back and collects each chunk's emitted tokens while the next one runs. A burst lasts while the same
    # requests decode: an arrival the scheduler could admit, an abort or a finished request ends it (the chunks in
    # flight are collected first; a finished request's extra tokens are dropped, and the K/V they wrote lie past its
    # end).

    # bursts run for at most this many decoding requests
    # NOTE: at batch 8 (SmolLM2, H200) bursts ran 0.43x of plain steps against 0.94x for host drafts: requests finish
    # at different steps, each finish ends a burst, and the next one, with fewer requests, often needs a new CUDA
    # graph (batch bucket, q, context); at batch 1 they ran 0.95-1.07x (BENCHMARKS.md, twenty-second session)
    DEVICE_SPEC_MAX_SEQS = 1
    DEVICE_SPEC_CHUNK = 2  # iterations a launch runs (two launches in flight)
    DEVICE_SPEC_PROBE_EVERY = 64  # after a burst lost to plain steps, plain steps this long before trying again
    DEVICE_SPEC_PLAIN_PROBE = 8  # plain steps run once per batch size to measure them against bursts
    DEVICE_SPEC_MIN_ITERS = 8  # an adaptive burst runs at least this many iterations before it may stop for losing

    def _setup_spec_on_device(self, spec_on_device: bool | None) -> None:
        program = self.program
        why_not = None
        if self.speculative is None or self.speculative.method != "ngram":
            why_not = "a model that does not speculate with method='ngram'"
        elif not getattr(program, "supports_ngram_loop", False):
            why_not = f"this Program ({type(program).__name__}: no start_ngram_loop for it)"
        if spec_on_device and why_not:
            raise ValueError(f"spec_on_device=True cannot run with {why_not}")
        self.spec_on_device = why_not is None and spec_on_device is not False
        self._burst: _Burst | None = None
        self.num_device_spec_iterations = 0  # steps run by device bursts (verifications and plain decodes)
        self.num_device_spec_bursts = 0
        self._burst_rate: dict[int, float] = {}  # batch size -> tokens a request gets per second in bursts
        self._burst_cost: dict[tuple[int, int], float] = {}  # (batch size, q) -> seconds per iteration (reported)
        self._burst_hold = 0  # eligible steps left that run plain before a burst is tried again
        self._plain_probed: set[int] = set()

    def _device_spec_eligible(self) -> bool:
        """Whether the running requests could run a device burst next step: a few, all greedy and decoding, with room
        for two iterations, and no request the scheduler could admit waiting. (Host drafts are then never made.)"""
        if not self.spec_on_device:
            return False
        sched = self.scheduler
        if not sched.running or len(sched.running) > self.DEVICE_SPEC_MAX_SEQS or self._admissible():
            return False
        q = self.speculative.num_tokens + 1
        for r in sched.running:
            params = r.params
            num_out = len(r.output_token_ids) + (r.inflight is not None)
            if (r.num_uncomputed_tokens != 1 or r.final_pending or params.temperature != 0 or params.needs_host_logits
                    or r.cascade_draft is not None or r.spec_token_ids or params.max_tokens - num_out < 2
                    or len(r.token_ids) + 2 * q > self.max_model_len):
                return False
        return True

    def _device_spec_state(self) -> str | None:
        """"burst" when the next step should start a device burst, "plain" when the requests could burst but plain
        steps are measured faster (no drafts at all then), None when device speculation does not apply."""
        if not self._device_spec_eligible():
            return None
        if not self.draft_controller.adaptive:
            return "burst"
        if self._burst_hold > 0:
            self._burst_hold -= 1
            # the last held step: burst again, a probe (acceptance is learned only from bursts; a probe that loses
            # stops after DEVICE_SPEC_MIN_ITERS iterations, see _collect_burst_chunk)
            return "plain" if self._burst_hold else "burst"
        b = len(self.scheduler.running)
        rate = self._burst_rate.get(b)
        if rate is None:
            return "burst"
        plain = self.draft_controller.step_cost.get(cost_bucket(b))
        if plain is None:
            if b not in self._plain_probed:  # measure plain steps at this batch size once
                self._plain_probed.add(b)
                self._burst_hold = self.DEVICE_SPEC_PLAIN_PROBE - 1  # (this step is the first)
                return "plain"
            return "burst"
        if rate < (1.0 + self.draft_controller.GAIN_MARGIN) / plain:
            self._burst_hold = self.DEVICE_SPEC_PROBE_EVERY - 1
            return "plain"
        return "burst"

    def _admissible(self) -> bool:
        """A request waits that the scheduler could admit now (a burst would keep it waiting)."""
        sched = self.scheduler
        return bool(sched.waiting) and len(sched.running) < self.max_num_seqs

    def _start_burst(self) -> bool:
        """Start a device burst over the running requests (all decoding, nothing in flight); False if it cannot."""
        reqs = list(self.scheduler.running)
        if not reqs or any(r.inflight is not None or r.num_uncomputed_tokens != 1 for r in reqs):
            return False
        spec = self.speculative
        q = spec.num_tokens + 1
        burst = _Burst(reqs=reqs, q=q, next_q=q)
        if not self._grow_burst_blocks(burst, q):
            return False
        burst.loop = self.program.start_ngram_loop(
            [r.token_ids for r in reqs], self._burst_tables(reqs), k=spec.num_tokens, ngram_min=spec.ngram_min,
            ngram_max=spec.ngram_max, capacity=self.max_model_len + q, max_chunk=self.DEVICE_SPEC_CHUNK)
        self._burst = burst
        self.num_device_spec_bursts += 1
        burst.mark = time.perf_counter()
        self._launch_burst_chunk(burst)
        if not burst.inflight:
            self._burst = None
            return False
        return True

    @staticmethod
    def _burst_tables(reqs: list[Request]) -> np.ndarray:
        width = max(len(r.block_ids) for r in reqs)
        tables = np.zeros((len(reqs), width), np.int32)
        for i, r in enumerate(reqs):
            tables[i, : len(r.block_ids)] = r.block_ids
        return tables

    def _burst_limit(self, burst: "_Burst", rows: int) -> int:
        """The longest a request of the burst may be once iterations of `rows` more rows a sequence (after those in
        flight) ran."""
        return max(len(r.token_ids) for r in burst.reqs) + burst.inflight_rows + rows

    def _grow_burst_blocks(self, burst: "_Burst", rows: int) -> bool:
        """Blocks for every K/V slot iterations of `rows` more rows may write; False when the pool is short."""
        kv = self.scheduler.kv
        for r in burst.reqs:
            need = len(r.token_ids) + burst.inflight_rows + rows - 1
            if not kv.allocate_for(r, 0, max(0, need - r.num_computed_tokens)):
                return False
        return True

    def _launch_burst_chunk(self, burst: "_Burst") -> None:
        """Launch up to DEVICE_SPEC_CHUNK more iterations of burst.next_q rows, as far as lengths, max_tokens and
        blocks allow; none: the burst stops."""
        q, n = burst.next_q, 0
        for _ in range(self.DEVICE_SPEC_CHUNK):
            if self._burst_limit(burst, q * (n + 1)) + burst.q > self.max_model_len + 1:
                break
            # an iteration emits at least one token: no more are needed once every in-flight one could end a request
            if any(len(r.output_token_ids) + burst.inflight_iters + n >= r.params.max_tokens for r in burst.reqs):
                break
            blocks = [len(r.block_ids) for r in burst.reqs]
            if not self._grow_burst_blocks(burst, q * (n + 1)):
                break
            if [len(r.block_ids) for r in burst.reqs] != blocks:
                burst.loop.set_block_tables(self._burst_tables(burst.reqs))
            n += 1
        if n == 0:
            burst.stopping = True
            return
        burst.inflight.append(burst.loop.launch(n, self._burst_limit(burst, q * n), q))
        burst.inflight_iters += n
        burst.inflight_rows += q * n

    def _step_device_spec(self, on_token=None) -> list[Request]:
        """One engine step of a device burst: launch the next chunk (unless the burst is ending), collect the oldest
        one in flight; once it ends, collect the rest and hand the requests back to the scheduler."""
        burst = self._burst
        try:
            if self._admissible() or any(r.status is not RequestStatus.RUNNING for r in burst.reqs):
                burst.stopping = True
            if not burst.stopping:
                self._launch_burst_chunk(burst)
            finished = self._collect_burst_chunk(burst, on_token) if burst.inflight else []
            while burst.stopping and burst.inflight:
                finished += self._collect_burst_chunk(burst, on_token)
        except BaseException:
            self._burst = None
            raise
        if not burst.inflight:
            self._burst = None
        return finished

    def _collect_burst_chunk(self, burst: "_Burst", on_token=None) -> list[Request]:
        """Wait for the oldest chunk in flight; append each iteration's tokens, check stops, count acceptance, and
        pick the next chunk's rows: a draft's k + 1 while the last iteration found n-gram matches, else 1."""
        pending = burst.inflight.pop(0)
        res = pending.result()
        num_iters, q = res.counts.shape[0], res.q
        burst.inflight_iters -= num_iters
        burst.inflight_rows -= q * num_iters
        now = time.perf_counter()
        b = len(burst.reqs)
        if burst.num_iters:  # (the first chunk may hold a CUDA graph capture or a compile: no cost sample)
            seconds = now - burst.mark
            self._update_estimate(self._burst_cost, (b, q), seconds / num_iters)
            self._update_estimate(self._burst_rate, b, float(res.counts.sum()) / b / max(seconds, 1e-9))
        burst.mark = now
        burst.num_iters += num_iters
        stats, ctl = self.spec_stats, self.draft_controller
        finished = []
        for it in range(num_iters):
            self.num_steps += 1
            self.num_device_spec_iterations += 1
            stats.num_device_steps += 1
            stats.record_draft_length(q - 1)
            for i, req in enumerate(burst.reqs):
                if req.status is not RequestStatus.RUNNING:
                    continue
                count, real = int(res.counts[it, i]), min(int(res.real[it, i]), q - 1)
                if real > 0:
                    accepted = min(count - 1, real)
                    stats.num_verifications += 1
                    stats.num_draft_tokens += real
                    stats.num_accepted_tokens += accepted
                    stats.num_emitted_tokens += accepted + 1
                    ctl.record_acceptance(req, real, accepted)
                for token in res.tokens[it, i, :count].tolist():
                    self._append_token(req, token)
                    if on_token is not None:
                        on_token(req.request_id, token)
                    if req.finish_reason is not None:
                        break
                req.num_computed_tokens = len(req.token_ids) - 1
                if req.finish_reason is not None:
                    self.scheduler.finish_request(req)
                    finished.append(req)
                    burst.stopping = True
        for req in burst.reqs:
            if req.status is RequestStatus.RUNNING:
                self.scheduler.kv.cache_full_blocks(req)
        burst.next_q = burst.q if (res.real[-1] > 0).any() else 1
        if self.draft_controller.adaptive and not burst.stopping and burst.num_iters >= self.DEVICE_SPEC_MIN_ITERS:
            # a burst that gets fewer tokens a second than plain steps do stops, and bursts are held off a while
            rate = self._burst_rate.get(b)
            plain = self.draft_controller.step_cost.get(cost_bucket(b))
            if rate is not None and plain is not None and rate < 1.0 / plain:
                burst.stopping = True
                self._burst_hold = self.DEVICE_SPEC_PROBE_EVERY
        return finished

    def _update_estimate(self, table: dict, key, value: float) -> None:
        ctl = self.draft_controller
        table[key] = decayed_mean(table.get(key), value, ctl.DECAY, ctl.OUTLIER)

    def _drop_placeholder(self, req: Request) -> None:
        """on_release: a request that finished (or was aborted) with a token in flight ends at its known tokens."""
        if req.status is RequestStatus.FINISHED:
            while req.token_ids and req.token_ids[-1] == PLACEHOLDER:
                req.token_ids.pop()
            req.inflight, req.final_pending = None, False

    def _run_program(self, step: StepInput, sampled: list[Request], has_drafts: bool, with_hidden: bool):
        """-> (tokens i32[L] or None, logits f32[L, V] or None, hidden f32[T, D] or None)."""
        step_greedy = getattr(self.program, "step_greedy", None)
        step_sample = getattr(self.program, "step_sample", None)
        hidden = None
        kw = {"with_hidden": True} if with_hidden else {}
        if any(r.params.needs_host_logits for r in sampled):  # penalties and logprobs read the logits here
            step_greedy = step_sample = None
        if step_greedy is not None and all(r.params.temperature == 0 for r in sampled):
            # every row is greedy: the Program picks the tokens where the logits are (no logits copy back)
            out = step_greedy(step, **kw)
            tokens, hidden = out if with_hidden else (out, None)
            tokens = np.asarray(tokens)
            if tokens.shape != (step.logit_rows.shape[0],):
                raise RuntimeError(f"the Program returned {tokens.shape} tokens, expected ({step.logit_rows.shape[0]},)")
            return tokens, None, hidden
        if step_sample is not None and not has_drafts and not with_hidden:
            # the Program samples on its device: Philox keyed by each request's seed, counter = tokens so far
            tokens = np.asarray(step_sample(step, **self._device_sampling(sampled)))
            if tokens.shape != (len(sampled),):
                raise RuntimeError(f"the Program returned {tokens.shape} tokens, expected ({len(sampled)},)")
            return tokens, None, None
        out = self.program.step(step, **kw)
        logits, hidden = out if with_hidden else (out, None)
        logits = np.asarray(logits)  # f32[L, V]
        if logits.ndim != 2 or logits.shape[0] != step.logit_rows.shape[0]:
            raise RuntimeError(f"Program.step returned logits of shape {logits.shape}, expected "
                               f"({step.logit_rows.shape[0]}, V)")
        return None, logits, hidden

    def _verify(self, req: Request, k: int, row: int, tokens, logits) -> list[int]:
        """Accept rule for one request's k-token draft on rows row..row+k; returns the tokens it emits."""
        from runtime import speculative as spec_lib

        draft = req.spec_draft
        draft_tokens = req.spec_token_ids[:k]
        if req.draft_source == "cascade":  # another model's answer, checked in one pass (greedy requests only)
            targets = tokens[row:row + k + 1] if logits is None else np.argmax(logits[row:row + k + 1], axis=-1)
            out = spec_lib.accept_greedy(targets, draft_tokens)
            req.num_draft_tokens += k
            req.num_accepted_draft_tokens += len(out) - 1
            self.cascade_stats["num_draft_tokens"] += k
            self.cascade_stats["num_accepted_tokens"] += len(out) - 1
            return out
        if req.params.is_greedy:
            targets = tokens[row:row + k + 1] if logits is None else np.argmax(logits[row:row + k + 1], axis=-1)
            out = spec_lib.accept_greedy(targets, draft_tokens)
        else:
            probs = draft.probs[:k] if draft is not None and draft.probs is not None else None  # filler rows included
            out = spec_lib.accept_sampled(logits[row:row + k + 1, :self.vocab_size],
                                          spec_lib.Draft(draft_tokens, probs), req.params, req.generator)
        real = min(k, len(draft.tokens) - draft.num_filler) if draft is not None else k  # proposed, not filler
        if real > 0:
            accepted = min(len(out) - 1, real)
            stats = self.spec_stats
            stats.num_verifications += 1
            stats.num_draft_tokens += real
            stats.num_accepted_tokens += accepted
            stats.num_emitted_tokens += accepted + 1
            self.draft_controller.record_acceptance(req, real, accepted)
        return out

    def _observe(self, chunks: list[ScheduledChunk], step: StepInput, hidden, emitted_by_chunk: dict) -> None:
        """Give a hidden-state proposer the rows this step computed for each request."""
        from runtime.speculative import StepRows

        hidden = np.asarray(hidden)
        rows = []
        for s, chunk in enumerate(chunks):
            if chunk.request.status is not RequestStatus.RUNNING:
                continue
            a, b = int(step.query_start[s]), int(step.query_start[s + 1])
            out = emitted_by_chunk.get(id(chunk))
            num_valid = chunk.num_tokens - (chunk.num_spec - (len(out) - 1) if out is not None else 0)
            rows.append(StepRows(chunk.request, chunk.start, step.token_ids[a:b], hidden[a:b], num_valid,
                                 out[-1] if out is not None else None))
        if rows:
            self.proposer.observe(rows)

    def _draft_candidates(self) -> tuple[list[Request], list[int], int]:
        """(requests that may draft next step, each one's longest draft, how many requests decode next step)."""
        ready, caps, num_decoding = [], [], 0
        k_max, max_len = self.speculative.num_tokens, self.max_model_len - 1
        for req in self.scheduler.running:
            n = len(req.token_ids)
            if n - req.num_computed_tokens != 1 or req.draft_source == "cascade" or req.final_pending:
                continue
            num_decoding += 1
            params = req.params
            if params.needs_host_logits:
                continue
            num_out = len(req.output_token_ids) + (req.inflight is not None)  # (a token in flight counts)
            cap = min(k_max, params.max_tokens - num_out - 1, max_len - n)
            if cap >= 1:
                ready.append(req)
                caps.append(cap)
        return ready, caps, num_decoding

    def _choose_draft_length(self, ready: list[Request], caps: list[int], num_decoding: int) -> int:
        """The controller's draft length for the next step (recorded in spec_stats); 0: no drafts."""
        # the next step also runs prefill chunks (requests still prefilling, then waiting ones) within its budget
        pending = sum(len(r.token_ids) - r.num_computed_tokens for r in self.scheduler.running) - num_decoding
        pending += sum(len(r.token_ids) for r in self.scheduler.waiting[: self.max_num_seqs])
        # a Program that replays CUDA graphs for uniform steps (every sequence the same number of rows) gets one
        # draft length for all: a ragged verification step would run eagerly, several times slower there
        uniform = bool(getattr(self.program, "prefers_uniform_drafts", False))
        ctl = self.draft_controller
        k = ctl.choose(ready, prefill_tokens=pending, max_tokens=self.scheduler.max_num_batched_tokens,
                       uniform=uniform)
        if uniform:
            k = min(k, min(caps)) if len(ready) == num_decoding else 0
        would_compile = getattr(self.program, "would_compile", None)
        if k and ctl.probing and would_compile is not None and \
                would_compile(len(ready), k + 1, max(len(r.token_ids) for r in ready) + k):
            k = 0  # a probe is worth one step, not a CUDA graph capture or an XLA compile
            ctl.skip_probe()
        if self.proposer.needs_hidden and ctl.adaptive:
            # no drafts chosen: the next step skips the hidden states (their copy and observe() cost host time);
            # drafts chosen right after such a step wait one step for the features to be back
            self._hidden_next = k > 0
            if not self._last_had_hidden:
                k = 0
        self.spec_stats.record_draft_length(k)
        return k

    def _propose(self, decided: int | None = None) -> None:
        """Draft for the requests the next step decodes; the draft length comes from the controller (decided: the
        length it chose during an async step, before the tokens then in flight were known)."""
        ctl = self.draft_controller
        if self._device_spec_eligible():  # the next step bursts on the device, or runs plain steps measured faster
            return
        if decided is None:
            self._drafts_held = False
            if ctl.hold_off():
                # the controller chose no drafts a moment ago and re-decides only every few steps: at high load this
                # step-by-step decision (a pass over every request) would cost more than it could gain
                self.spec_stats.record_draft_length(0)
                if self.proposer.needs_hidden:
                    self._hidden_next = False
                self._drafts_held = True  # (async scheduling: the next steps may be launched early)
                return
        ready, caps, num_decoding = self._draft_candidates()
        if not ready:
            return
        uniform = bool(getattr(self.program, "prefers_uniform_drafts", False))
        if decided is None:
            k = self._choose_draft_length(ready, caps, num_decoding)
        elif uniform:  # (requests may have finished since the decision)
            k = min(decided, min(caps)) if len(ready) == num_decoding else 0
        else:
            k = decided
        if k == 0:
            self._drafts_held = ctl.holding
            return
        lengths = [min(k, c) for c in caps]
        start = time.perf_counter()
        drafts = self.proposer.propose(ready, lengths)
        seconds = time.perf_counter() - start
        # ... and every draft filled up to that length
        vocab, drafted = self.vocab_size, 0
        for req, n, draft in zip(ready, lengths, drafts):
            tokens = list(map(int, draft.tokens[:n]))
            if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
                bad = [t for t in tokens if not 0 <= t < vocab]
                raise RuntimeError(f"the {self.proposer.name} proposer drafted token ids outside the vocabulary: {bad[:3]}")
            if uniform and len(tokens) < n:
                filler = n - len(tokens)
                probs = draft.probs[: len(tokens)] if draft.probs is not None else None
                tokens += [tokens[-1] if tokens else req.token_ids[-1]] * filler
                if probs is not None:  # a filler token is a deterministic guess: q is one-hot on it
                    one_hot = np.zeros((filler, probs.shape[1]), np.float32)
                    one_hot[:, tokens[-1]] = 1.0
                    probs = np.concatenate([probs, one_hot])
                draft = Draft(tokens, probs, num_filler=filler)
            req.spec_token_ids = tokens
            req.spec_draft = draft
            drafted += len(tokens)
        compiled = bool(getattr(self.proposer, "last_propose_compiled", False))  # a JAX compile is no cost to learn
        self.draft_controller.record_draft(k, None if compiled else seconds, fill=drafted / (k * len(ready)))

    def _device_sampling(self, sampled: list[Request]) -> dict:
        """step_sample's per-row parameters for these requests: Philox keyed by each request's seed, counter = its
        tokens so far (a token still in flight counts)."""
        return dict(
            temperature=[r.params.temperature for r in sampled],
            top_k=[r.params.top_k if r.params.top_k > 0 else 0 for r in sampled],
            top_p=[r.params.top_p for r in sampled],
            min_p=[r.params.min_p for r in sampled],
            seeds=[self._device_seed(r) for r in sampled],
            offsets=[len(r.output_token_ids) + (r.inflight is not None) for r in sampled],
        )

    @staticmethod
    def _device_seed(req: Request) -> int:
        """The request's seed for device-side sampling: its own, or one drawn once from its generator."""
        if req.device_seed is None:
            seed = req.params.seed if req.params.seed is not None else int(req.generator.integers(0, 2**62))
            req.device_seed = seed % 2**63  # the kernel's seeds are int64
        return req.device_seed

    def _append_token(self, req: Request, token: int) -> None:
        """Add a sampled token and decide whether the request stops."""
        req.token_ids.append(token)
        req.output_token_ids.append(token)
        self._check_stop(req, token, num_tokens=req.num_tokens)

    def _check_stop(self, req: Request, token: int, *, num_tokens: int) -> None:
        """Decide whether the request stops at its newest output token (the num_tokens-th of prompt + output)."""
        params = req.params
        stops = len(req.output_token_ids) >= params.min_tokens  # before min_tokens only the length ends a request
        is_eos = token in self.eos_token_ids and not params.ignore_eos
        if stops and (is_eos or (params.stop_token_ids and token in params.stop_token_ids)):
            self._add_text(req, req.detokenizer.flush())
            req.finish_reason = "stop"
            return
        if self._add_text(req, req.detokenizer.add_token(token), find_stops=stops):
            req.finish_reason = "stop"
            return
        if len(req.output_token_ids) >= params.max_tokens or num_tokens >= self.max_model_len:
            req.finish_reason = "stop" if self._add_text(req, req.detokenizer.flush()) else "length"

    def _add_text(self, req: Request, delta: str, *, find_stops: bool = True) -> bool:
        """Append delta to req.text; on a stop string cut the text before it and return True."""
        if not delta:
            return False
        new_from = len(req.text)
        req.text += delta
        stops = req.params.stop_strings
        if stops and find_stops:
            i = find_stop_string(req.text, stops, new_from)
            if i >= 0:
                req.text = req.text[:i]
                return True
        return False

    # -- request construction and validation -----------------------------------------------------

    def _as_params_list(self, sampling_params, num_prompts: int) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * num_prompts
        else:
            params_list = list(sampling_params)
            if len(params_list) != num_prompts:
                raise ValueError(f"got {len(params_list)} SamplingParams for {num_prompts} prompts")
        for sp in params_list:
            if not isinstance(sp, SamplingParams):
                raise ValueError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
            sp.validate()
        return params_list

    def _make_request(self, index: int, prompt: Prompt, params: SamplingParams, chat: bool, *,
                      draft: Sequence[int] | None = None, track_entropy: bool = False) -> Request:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as token ids")
            if chat:
                messages = [{"role": "user", "content": prompt}]
                text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                # NOTE: chat templates already contain BOS etc.; adding special tokens again would double them.
                prompt_ids = list(self.tokenizer.encode(text, add_special_tokens=False))
            elif prompt == "":
                raise ValueError(f"prompt {index} is empty")
            else:
                prompt_ids = list(self.tokenizer.encode(prompt, add_special_tokens=True))
        else:
            if chat:
                raise ValueError("chat=True needs string prompts, got token ids")
            prompt_ids = [int(t) for t in prompt]
            bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {index} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}"
                )
        self._check_fits(index, len(prompt_ids), params)
        bad = [t for t in params.logit_bias or () if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")

        request_id = str(next(self._request_counter))
        req = Request(
            request_id=request_id,
            arrival=int(request_id),
            prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=prompt_ids,
            params=params,
            generator=make_generator(params.seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer, prompt_ids),
            token_ids=list(prompt_ids),
            track_entropy=bool(track_entropy),
        )
        if draft is not None:
            self._attach_draft(req, index, draft)
        return req

    def _attach_draft(self, req: Request, index: int, draft: Sequence[int]) -> None:
        """A cascade draft for req's first step: validated, cut to what can be emitted (max_tokens - 1, so the
        model still picks the last token, and the context), and kept only where the exact greedy check applies."""
        try:
            tokens = [int(t) for t in draft]
        except (TypeError, ValueError):
            raise ValueError(f"draft {index} must be a sequence of token ids") from None
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"draft {index} has token ids outside the vocabulary [0, {self.vocab_size}): {bad[:5]}")
        params = req.params
        # sampling (its distribution would need the drafting model's probabilities) and host-logit requests (the
        # verification rows carry no logprobs) generate from scratch
        if not params.is_greedy or params.needs_host_logits:
            return
        if tokens:
            req.cascade_draft = tokens
            self.cascade_stats["num_drafts"] += 1
            self._continue_draft(req)

    def _continue_draft(self, req: Request) -> None:
        """Give req the part of its cascade draft past its output so far as the draft its next chunk checks, while
        the output agrees with the draft; a step's token budget may have checked only part of it."""
        n = len(req.output_token_ids)
        draft = req.cascade_draft
        room = min(req.params.max_tokens - n - 1, self.max_model_len - 1 - len(req.token_ids))
        if room < 1 or len(draft) <= n or draft[:n] != req.output_token_ids:
            req.cascade_draft = None
            return
        tokens = draft[n:n + room]
        req.spec_token_ids, req.spec_draft, req.draft_source = tokens, Draft(tokens), "cascade"

    def _check_fits(self, index: int, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens == 0:
            raise ValueError(f"prompt {index} is empty (0 tokens)")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt {index} has {num_prompt_tokens} tokens, which leaves no room to generate within "
                f"max_model_len={self.max_model_len}"
            )
        # The last token is sampled but never run, so it needs no K/V slot.
        num_kv_tokens = min(num_prompt_tokens + params.max_tokens, self.max_model_len) - 1
        num_blocks = blocks_needed(num_kv_tokens, self.block_size)
        if self.eviction is not None:  # a compacted cache never grows past the policy's capacity
            num_blocks = min(num_blocks, self.eviction.max_blocks(self.block_size))
        if num_blocks > self.program.num_blocks:
            raise ValueError(
                f"prompt {index} ({num_prompt_tokens} tokens) with max_tokens={params.max_tokens} needs "
                f"{num_blocks} KV blocks of {self.block_size} tokens, but the pool has only "
                f"{self.program.num_blocks}; lower max_tokens or raise num_blocks"
            )


def check_prefix_caching(eviction, enable_prefix_caching: bool | None) -> bool:
    """Whether the engine caches prefixes under this eviction plan; ValueError for an explicit combination that
    cannot work. None means "on where it can"."""
    if eviction is not None and eviction.kind == "h2o":
        if enable_prefix_caching:
            raise ValueError("enable_prefix_caching=True with an H2O KV policy is refused: H2O picks the tokens to keep "
                             "from the attention mass each request accumulated over its own cache slots, and blocks "
                             "shared through the prefix cache cannot hold a mass per request; leave prefix caching "
                             "off (the default under H2O), or compile with StreamingLLM, which composes with it")
        return False
    return True if enable_prefix_caching is None else bool(enable_prefix_caching)


def _as_prompt_list(prompts) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompt_list = list(prompts)
    for i, p in enumerate(prompt_list):
        if isinstance(p, str):
            continue
        if isinstance(p, (int, np.integer)):
            raise ValueError("pass token-id prompts as a list of lists, e.g. [[1, 2, 3]]")
        if not isinstance(p, (list, tuple, np.ndarray)) or not all(isinstance(t, (int, np.integer)) for t in p):
            raise ValueError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
    return prompt_list


def _make_output(req: Request) -> RequestOutput:
    return RequestOutput(
        request_id=req.request_id,
        prompt=req.prompt,
        prompt_token_ids=list(req.prompt_token_ids),
        text=req.text,
        token_ids=list(req.output_token_ids),
        finish_reason=req.finish_reason,
        logprobs=list(req.output_logprobs) if req.params.logprobs is not None else None,
        entropies=list(req.output_entropies) if req.track_entropy else None,
        num_draft_tokens=req.num_draft_tokens,
        num_accepted_draft_tokens=req.num_accepted_draft_tokens,
    )
