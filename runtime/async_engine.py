"""AsyncEngine: an Engine's step loop on a background thread, with per-request asyncio streams and abort.

The server (runtime/server.py) and any asyncio application submit requests with `add_request()` and
read `RequestEvent`s (new text, new token ids, finish reason) as they are produced; all requests share
the engine's continuous batching. `abort()` (a client that went away) frees the request's KV blocks
at the next step boundary. An exception raised while running a step fails the requests of that step
(their streams end with the error) and the loop goes on serving the others.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from typing import AsyncIterator, Sequence

from runtime.engine import Engine, Request, RequestStatus
from runtime.sampler import SamplingParams


class QueueFullError(RuntimeError):
    """More requests are in flight than the engine was told to hold (the server answers 429)."""


@dataclasses.dataclass
class RequestEvent:
    """What one step added to one request: text delta, token ids, and the finish reason once done."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    logprobs: list | None = None  # per new token: (token text, logprob, [(text, logprob)] best first)
    entropies: list | None = None  # add_request(track_entropy=True): per new token, its distribution's entropy
    num_draft_tokens: int = 0  # add_request(draft=): the draft's tokens checked, and accepted (so far)
    num_accepted_draft_tokens: int = 0


@dataclasses.dataclass
class _Tracked:
    request: Request
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    sent_text: int = 0
    sent_tokens: int = 0
    sent_entropies: int = 0
    arrival_time: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    last_token_time: float | None = None


@dataclasses.dataclass
class EngineStats:
    """Counters since start (for /metrics): the server turns them into Prometheus series."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks: int = 0
    num_blocks_used: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    failed_requests: int = 0
    ttft_s: list[float] = dataclasses.field(default_factory=list)  # drained by the reader
    itl_s: list[float] = dataclasses.field(default_factory=list)
    speculative: dict | None = None  # SpecStats.to_json() when the engine speculates


class AsyncEngine:
    """Serve many concurrent requests from one Engine.

        async_engine = AsyncEngine(Engine(load("artifacts/smollm2")))
        async for event in async_engine.generate("Hi", SamplingParams(max_tokens=8)):
            print(event.text, end="")
    """

    def __init__(self, engine: Engine, *, max_pending: int = 1024):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self.engine = engine
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._incoming: deque[_Tracked] = deque()
        self._aborts: set[str] = set()
        self._tracked: dict[str, _Tracked] = {}
        self._stats = EngineStats(num_blocks=engine.program.num_blocks)
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmc-engine", daemon=True)
        self._thread.start()

    # -- public API ----------------------------------------------------------------------------

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._tracked) + len(self._incoming)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams, *, chat: bool = False,
                    messages: list[dict] | None = None, draft: Sequence[int] | None = None,
                    track_entropy: bool = False, prompt_index: int = 0) -> tuple[str, asyncio.Queue]:
        """Validate and enqueue one request; returns (request id, queue of RequestEvent).

        Must be called from a running event loop. Raises ValueError for a bad prompt or parameters
        and QueueFullError when `max_pending` requests are already in flight. draft / track_entropy: as
        Engine.generate's drafts / track_entropy (runtime/router.py's cascade). prompt_index: how error
        messages number the prompt (the server's batches of prompts).
        """
        engine = self.engine
        params.validate()
        if messages is not None:
            if engine.tokenizer is None:
                raise ValueError("this model has no tokenizer, so chat messages cannot be rendered")
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            prompt = list(engine.tokenizer.encode(text, add_special_tokens=False))
        # validates length, vocabulary, fit in the pool
        req = engine._make_request(prompt_index, prompt, params, chat, draft=draft, track_entropy=track_entropy)
        loop = asyncio.get_running_loop()
        tracked = _Tracked(req, asyncio.Queue(), loop)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shut down")
            if len(self._tracked) + len(self._incoming) >= self.max_pending:
                raise QueueFullError(f"{self.max_pending} requests are already in flight; retry later")
            self._incoming.append(tracked)
            self._wakeup.notify()
        return req.request_id, tracked.queue

    async def generate(self, prompt, params: SamplingParams, *, chat: bool = False,
                       messages: list[dict] | None = None) -> AsyncIterator[RequestEvent]:
        """Stream one request's events; leaving the loop early (or being cancelled) aborts it."""
        request_id, queue = self.add_request(prompt, params, chat=chat, messages=messages)
        done = False
        try:
            while True:
                event = await queue.get()
                if event.finish_reason is not None:
                    done = True
                yield event
                if done:
                    return
        finally:
            if not done:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request (if it is still running) and free its KV blocks at the next step boundary."""
        with self._lock:
            self._aborts.add(request_id)
            self._wakeup.notify()

    def stats(self) -> EngineStats:
        """A snapshot of the counters; the latency samples are handed over (and cleared)."""
        with self._lock:
            snap = dataclasses.replace(self._stats, ttft_s=list(self._stats.ttft_s), itl_s=list(self._stats.itl_s))
            self._stats.ttft_s.clear()
            self._stats.itl_s.clear()
            sched = self.engine.scheduler
            snap.num_running, snap.num_waiting = len(sched.running), len(sched.waiting)
            snap.num_blocks_used = self.num_blocks_used()
            snap.num_preemptions = sched.num_preemptions
            if getattr(self.engine, "speculative", None) is not None:
                snap.speculative = self.engine.spec_stats.to_json()
        return snap

    def num_blocks_used(self) -> int:
        """Blocks held by requests (a prefix block shared by several counts once; cached free ones do not)."""
        return self.engine.scheduler.allocator.num_used_blocks

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wakeup.notify()
        self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (self._stopping or self._incoming or self._aborts or engine.scheduler.has_unfinished_requests()):
                    self._wakeup.wait()
                if self._stopping:
                    break
                incoming, self._incoming = list(self._incoming), deque()
                aborts, self._aborts = self._aborts, set()
                for tracked in incoming:
                    self._tracked[tracked.request.request_id] = tracked
            for tracked in incoming:
                engine.scheduler.add_request(tracked.request)
                self._stats.prompt_tokens += len(tracked.request.prompt_token_ids)
            for request_id in aborts:
                tracked = self._tracked.get(request_id)
                if tracked is not None:
                    self._remove(tracked.request)
                    self._finish(tracked, "abort")
            if not engine.scheduler.has_unfinished_requests():
                continue
            try:
                engine._step(self._on_token)
            except Exception as e:  # noqa: BLE001 - one failed step must not take the server down
                self._fail_running(e)
                continue
            for tracked in list(self._tracked.values()):
                if tracked.request.finish_reason is not None:
                    self._finish(tracked, tracked.request.finish_reason)
        self._fail_running(RuntimeError("the engine was shut down"))

    def _on_token(self, request_id: str, token: int) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return
        now = time.perf_counter()
        if tracked.first_token_time is None:
            tracked.first_token_time = now
            self._stats.ttft_s.append(now - tracked.arrival_time)
        else:
            self._stats.itl_s.append(now - tracked.last_token_time)
        tracked.last_token_time = now
        self._stats.generation_tokens += 1
        if tracked.request.finish_reason is None:
            self._emit(tracked, None)

    def _emit(self, tracked: _Tracked, finish_reason: str | None, error: str | None = None) -> None:
        req = tracked.request
        text = req.text[tracked.sent_text:]
        tokens = req.output_token_ids[tracked.sent_tokens:]
        if not (text or tokens or finish_reason):
            return
        logprobs = None
        if req.params.logprobs is not None:
            decode = self._token_text
            logprobs = [(decode(t), lp, [(decode(a), b) for a, b in top])
                        for t, (lp, top) in zip(tokens, req.output_logprobs[tracked.sent_tokens:])]
        entropies = req.output_entropies[tracked.sent_entropies:] if req.track_entropy else None
        tracked.sent_text, tracked.sent_tokens = len(req.text), len(req.output_token_ids)
        tracked.sent_entropies = len(req.output_entropies)
        event = RequestEvent(text, list(tokens), finish_reason, error, len(req.prompt_token_ids),
                             len(req.output_token_ids), logprobs, entropies, req.num_draft_tokens,
                             req.num_accepted_draft_tokens)
        tracked.loop.call_soon_threadsafe(tracked.queue.put_nowait, event)

    def _token_text(self, token: int) -> str:
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token], skip_special_tokens=False) if tokenizer is not None else str(token)

    def _finish(self, tracked: _Tracked, reason: str, error: str | None = None) -> None:
        self._tracked.pop(tracked.request.request_id, None)
        if reason == "abort":
            self._stats.aborted_requests += 1
        elif reason == "error":
            self._stats.failed_requests += 1
        else:
            self._stats.finished_requests += 1
        try:
            self._emit(tracked, reason, error)
        except RuntimeError:  # the client's event loop is gone
            pass

    def _remove(self, req: Request) -> None:
        """Take a request out of the scheduler, freeing its blocks (no-op once it finished)."""
        self.engine.scheduler.abort_request(req)
        req.status = RequestStatus.FINISHED
        if req.finish_reason is None:
            req.finish_reason = "abort"

    def _fail_running(self, error: Exception) -> None:
        message = f"{type(error).__name__}: {error}"
        for tracked in list(self._tracked.values()):
            self._remove(tracked.request)
            self._finish(tracked, "error", message)
