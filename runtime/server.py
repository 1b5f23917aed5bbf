"""OpenAI-compatible HTTP server over an AsyncEngine (FastAPI + uvicorn).

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events, `usage` in responses and, with stream_options.include_usage, in
the last chunk), GET /metrics (Prometheus text). Bad input gets HTTP 400 with an OpenAI-style error
body, a wrong or missing API key 401, a full queue 429; a client that disconnects mid-stream has its
request aborted and its KV blocks freed.

Several models (an AsyncRouter, runtime/router.py): each is served under its name, and `"model": "auto"`
lets the router pick one. A routed response names the model that answered in "model", carries the decision
in a "route" field and an `x-llmc-route` header; /metrics counts decisions, escalations, fallbacks and cost.

    llmc serve smollm2-135m --port 8000        # then: OpenAI(base_url="http://localhost:8000/v1", api_key="x")
    llmc serve --router router.json            # several models and a routing policy
"""

import asyncio
import dataclasses
import json
import math
import time
import uuid
from typing import Any

from runtime.async_engine import AsyncEngine, QueueFullError
from runtime.sampler import SamplingParams

SUPPORTED_FIELDS = {
    "completions": {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
                    "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logprobs",
                    "ignore_eos", "stop_token_ids", "echo", "best_of", "suffix", "logit_bias", "min_tokens",
                    "repetition_penalty"},
    "chat": {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
             "stop", "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty", "logprobs",
             "top_logprobs", "ignore_eos", "stop_token_ids", "logit_bias", "min_tokens", "repetition_penalty"},
}


MAX_CHOICES = 16  # the most choices (`n`) per prompt
MAX_PROMPTS = 256  # the most prompts in one completions request (OpenAI's batch form: "prompt": [...])
MAX_TOTAL_CHOICES = 256  # prompts x n


class RequestError(ValueError):
    """A request the server refuses: becomes an OpenAI-style error body with this status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.kind, self.code = status, param, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------
# Request parsing: JSON body -> (prompt or messages, SamplingParams, stream options)
# ---------------------------------------------------------------------------------------------


def _number(body, name, default, *, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise RequestError(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", param=name)
    if not math.isfinite(value):
        raise RequestError(f"'{name}' must be finite, got {value!r}", param=name)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise RequestError(f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {value!r}", param=name)
    if hi is not None and value > hi:
        raise RequestError(f"'{name}' must be <= {hi}, got {value!r}", param=name)
    return value


def _is_token_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                            for t in value)


@dataclasses.dataclass
class ParsedRequest:
    model: str
    prompts: list | None  # completions: each prompt a string or a list of token ids
    messages: list | None  # chat
    params: SamplingParams
    stream: bool
    usage_in_stream: bool
    n: int  # choices per prompt
    echo: bool  # completions: each choice's text starts with its prompt


def _logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's logit_bias {"token id": bias in [-100, 100]} -> {int: float}."""
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise RequestError("'logit_bias' must be an object mapping token ids to biases", param="logit_bias")
    out = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
        if token < 0:
            raise RequestError(f"'logit_bias' keys must be token ids >= 0, got {key!r}", param="logit_bias")
        out[token] = _number({"logit_bias": bias}, "logit_bias", 0.0, lo=-100.0, hi=100.0)
    return out


def parse_request(body: Any, kind: str, *, models: dict[str, int], max_prompt_chars: int):
    """Validate an OpenAI request body against the served models (name -> max_model_len) -> ParsedRequest."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - SUPPORTED_FIELDS[kind])
    if unknown:
        raise RequestError(f"unsupported field(s) {unknown}", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str):
        raise RequestError("'model' is required and must be a string", param="model")
    if model not in models:
        raise RequestError(f"model {model!r} is not served here (available: {', '.join(map(repr, models))})",
                           param="model", code="model_not_found")
    max_model_len = models[model]
    n = _number(body, "n", 1, lo=1, hi=MAX_CHOICES, integer=True)
    if body.get("best_of") not in (None, n):
        raise RequestError("'best_of' other than n is not supported", param="best_of")
    if body.get("suffix") is not None:
        raise RequestError("'suffix' is not supported yet", param="suffix")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError("'echo' must be a boolean", param="echo")
    if echo and body.get("logprobs") is not None:
        raise RequestError("'echo' with 'logprobs' (the prompt's log-probabilities) is not supported yet",
                           param="echo")
    if kind == "completions":
        logprobs = _number(body, "logprobs", None, lo=0, hi=20, integer=True)
    else:
        wants = body.get("logprobs", False)
        if not isinstance(wants, bool):
            raise RequestError("'logprobs' must be a boolean for chat completions", param="logprobs")
        top = _number(body, "top_logprobs", 0, lo=0, hi=20, integer=True)
        if top and not wants:
            raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs = top if wants else None

    prompt = messages = None
    if kind == "completions":  # prompt -> a list of prompts, each a string or a list of token ids
        raw = body.get("prompt")
        prompt = raw if isinstance(raw, list) and raw and not _is_token_ids(raw) else [raw]
        if len(prompt) > MAX_PROMPTS:
            raise RequestError(f"at most {MAX_PROMPTS} prompts in one request, got {len(prompt)}", param="prompt")
        chars = 0
        for one in prompt:
            if isinstance(one, str):
                if not one:
                    raise RequestError("'prompt' must not be empty", param="prompt")
                chars += len(one)
            elif not _is_token_ids(one):
                raise RequestError("'prompt' must be a non-empty string or a list of token ids, or a list of those",
                                   param="prompt")
        if chars > max_prompt_chars:
            raise RequestError(f"'prompt' is longer than {max_prompt_chars} characters", param="prompt")
    else:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("'messages' must be a non-empty list", param="messages")
        total = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                    or not isinstance(m.get("content"), str):
                raise RequestError(f"messages[{i}] must be {{'role': system|user|assistant, 'content': string}}",
                                   param=f"messages[{i}]")
            total += len(m["content"])
        if total > max_prompt_chars:
            raise RequestError(f"the messages are longer than {max_prompt_chars} characters", param="messages")

    max_name = "max_completion_tokens" if kind == "chat" and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, max_name, 16 if kind == "completions" else max_model_len, lo=1, integer=True)
    if max_tokens >= max_model_len:
        if max_name in body:
            raise RequestError(f"'{max_name}'={max_tokens} does not fit the context of {max_model_len} tokens",
                               param=max_name)
        max_tokens = max_model_len - 1
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
        raise RequestError("'stop' must be a string or a list of strings", param="stop")
    if isinstance(stop, list) and len(stop) > 16:
        raise RequestError("at most 16 stop strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", param="stream_options")
    if not isinstance(options.get("include_usage", False), bool):
        raise RequestError("'stream_options.include_usage' must be a boolean", param="stream_options")
    if not isinstance(body.get("user", ""), str):
        raise RequestError("'user' must be a string", param="user")
    if not isinstance(body.get("ignore_eos", False), bool):
        raise RequestError("'ignore_eos' must be a boolean", param="ignore_eos")
    logit_bias = _logit_bias(body.get("logit_bias"))
    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 1.0, lo=0.0, hi=2.0),
            top_p=_number(body, "top_p", 1.0, lo=0.0, hi=1.0, lo_open=True),
            top_k=_number(body, "top_k", 0, lo=-1, integer=True),
            min_p=_number(body, "min_p", 0.0, lo=0.0, hi=1.0),
            presence_penalty=_number(body, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
            frequency_penalty=_number(body, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
            logprobs=logprobs,
            seed=_number(body, "seed", None, lo=0, integer=True),
            stop=stop or None,
            stop_token_ids=body.get("stop_token_ids"),
            ignore_eos=body.get("ignore_eos", False),
            logit_bias=logit_bias,
            min_tokens=_number(body, "min_tokens", 0, lo=0, integer=True),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, lo=0.0, hi=10.0, lo_open=True),
        )
    except ValueError as e:
        raise RequestError(str(e)) from None
    return ParsedRequest(model, prompt, messages, params, stream, bool(options.get("include_usage", False)), n, echo)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus series fed from each model's AsyncEngine.stats() (label `model`) and the router's counters."""

    def __init__(self, async_engines: dict, router=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.engines, self.router = async_engines, router
        self.registry = CollectorRegistry()
        reg = self.registry
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
        m = ["model"]
        self.ttft = Histogram("llmc_time_to_first_token_seconds", "Time to first token", m, buckets=buckets,
                              registry=reg)
        self.itl = Histogram("llmc_inter_token_latency_seconds", "Time between tokens of a request", m,
                             buckets=buckets, registry=reg)
        gauges = {
            "running": ("llmc_requests_running", "Requests being computed"),
            "waiting": ("llmc_requests_waiting", "Requests waiting for admission"),
            "blocks_used": ("llmc_kv_blocks_used", "KV blocks held by requests"),
            "blocks_total": ("llmc_kv_blocks_total", "KV blocks in the pool"),
            "prefix_hit_rate": ("llmc_prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache"),
            "preemptions": ("llmc_preemptions_total", "Requests preempted (recomputed later)"),
            "prompt_tokens": ("llmc_prompt_tokens_total", "Prompt tokens admitted"),
            "generation_tokens": ("llmc_generation_tokens_total", "Tokens generated"),
            "tokens_per_s": ("llmc_generation_tokens_per_second", "Generated tokens per second since the last scrape"),
            "spec_acceptance": ("llmc_spec_acceptance_rate", "Speculative decoding: accepted / drafted tokens"),
            "spec_mean_len": ("llmc_spec_mean_accepted_length", "Speculative decoding: tokens emitted per "
                              "verification (accepted drafts + one)"),
            "spec_draft_len": ("llmc_spec_draft_length", "Speculative decoding: the draft length the last step "
                               "chose (0 = off)"),
            "spec_mean_draft_len": ("llmc_spec_mean_draft_length", "Speculative decoding: mean chosen draft length"),
            "spec_draft_tokens": ("llmc_spec_draft_tokens_total", "Speculative decoding: drafted tokens verified"),
            "spec_accepted_tokens": ("llmc_spec_accepted_tokens_total", "Speculative decoding: accepted tokens"),
            "spec_device_steps": ("llmc_spec_device_steps_total", "Speculative decoding: steps run on the device "
                                  "(drafting, verification and the accept rule without the host)"),
        }
        for attr, (name, doc) in gauges.items():
            setattr(self, attr, Gauge(name, doc, m, registry=reg))
        self.requests = Counter("llmc_http_requests_total", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=reg)
        if router is not None:
            self.route_decisions = Gauge("llmc_router_decisions_total", "Routed requests by policy and the model "
                                         "that answered", ["policy", "model"], registry=reg)
            self.route_escalations = Gauge("llmc_router_escalations_total", "Cascade escalations by models",
                                           ["from_model", "to_model"], registry=reg)
            self.route_fallbacks = Gauge("llmc_router_fallbacks_total", "Requests the default model answered "
                                         "because routing failed, by what failed", ["kind"], registry=reg)
            self.route_cost = Gauge("llmc_router_cost_seconds_total", "Routed requests' cost, in the model's "
                                    "measured seconds per token", m, registry=reg)
            self.route_reference_cost = Gauge("llmc_router_reference_cost_seconds_total", "What the same answers "
                                              "would have cost on the reference model", registry=reg)
            self.route_saved = Gauge("llmc_router_cost_saved_seconds_total", "Reference cost minus cost",
                                     registry=reg)
            self.route_drafts = Gauge("llmc_router_cascade_draft_tokens_total", "Cascade-as-speculation: small "
                                      "answers' tokens the large model checked", registry=reg)
            self.route_accepted = Gauge("llmc_router_cascade_accepted_tokens_total", "Cascade-as-speculation: "
                                        "of those, the tokens it accepted", registry=reg)
            self.route_ms = Histogram("llmc_router_decision_seconds", "Time the routing policy took",
                                      buckets=(1e-5, 1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 5e-2), registry=reg)
        self._last = {name: (time.perf_counter(), 0) for name in async_engines}

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        for name, async_engine in self.engines.items():
            self._engine(name, async_engine)
        if self.router is not None:
            r = self.router.stats.snapshot()
            for (policy, model), n in r["decisions"].items():
                self.route_decisions.labels(policy, model).set(n)
            for (a, b), n in r["escalations"].items():
                self.route_escalations.labels(a, b).set(n)
            for kind, n in r["fallbacks"].items():
                self.route_fallbacks.labels(kind).set(n)
            for model, cost in r["cost_s"].items():
                self.route_cost.labels(model).set(cost)
            self.route_reference_cost.set(r["reference_cost_s"])
            self.route_saved.set(r["cost_saved_s"])
            self.route_drafts.set(r["draft_tokens"])
            self.route_accepted.set(r["accepted_draft_tokens"])
            for ms in r["router_ms"]:
                self.route_ms.observe(ms / 1e3)
        return generate_latest(self.registry)

    def _engine(self, name: str, async_engine: AsyncEngine) -> None:
        s = async_engine.stats()
        for v in s.ttft_s:
            self.ttft.labels(name).observe(v)
        for v in s.itl_s:
            self.itl.labels(name).observe(v)
        self.running.labels(name).set(s.num_running)
        self.waiting.labels(name).set(s.num_waiting)
        self.blocks_used.labels(name).set(s.num_blocks_used)
        self.blocks_total.labels(name).set(s.num_blocks)
        self.preemptions.labels(name).set(s.num_preemptions)
        self.prompt_tokens.labels(name).set(s.prompt_tokens)
        self.generation_tokens.labels(name).set(s.generation_tokens)
        if s.speculative is not None:
            sp = s.speculative
            self.spec_acceptance.labels(name).set(sp["acceptance_rate"])
            self.spec_mean_len.labels(name).set(sp["mean_accepted_length"])
            self.spec_draft_len.labels(name).set(sp["last_draft_length"])
            self.spec_mean_draft_len.labels(name).set(sp["mean_draft_length"])
            self.spec_draft_tokens.labels(name).set(sp["num_draft_tokens"])
            self.spec_accepted_tokens.labels(name).set(sp["num_accepted_tokens"])
            self.spec_device_steps.labels(name).set(sp["num_device_steps"])
        sched = async_engine.engine.scheduler
        queries = getattr(sched, "prefix_cache_queries", 0)
        if queries:
            self.prefix_hit_rate.labels(name).set(getattr(sched, "prefix_cache_hits", 0) / queries)
        now = time.perf_counter()
        t0, n0 = self._last[name]
        self.tokens_per_s.labels(name).set((s.generation_tokens - n0) / max(now - t0, 1e-9))
        self._last[name] = (now, s.generation_tokens)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def build_app(async_engine, *, model_name: str | None = None, api_key: str | None = None,
              max_body_bytes: int = 1 << 20, max_prompt_chars: int = 200_000):
    """A FastAPI app serving `async_engine` under the OpenAI API, as model `model_name`; or, given an
    AsyncRouter, each of its models under its own name and the router as `router.name` ("auto")."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    from runtime.router import AsyncRouter, RoutedStream

    router = async_engine if isinstance(async_engine, AsyncRouter) else None
    if router is not None:
        engines = dict(router.async_engines)
    elif model_name is None:
        raise ValueError("build_app needs model_name for a single AsyncEngine")
    else:
        engines = {model_name: async_engine}
    served = {name: a.engine.max_model_len for name, a in engines.items()}
    if router is not None:  # "auto" takes what every model takes (a prompt one refuses falls back to the default)
        served[router.name] = min(served.values())
    app = FastAPI(title="llmc", docs_url=None, redoc_url=None)
    metrics = Metrics(engines, router)
    created = int(time.time())

    def fail(status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = request.url.path
        if api_key is not None and endpoint.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                metrics.requests.labels(endpoint, "401").inc()
                return fail(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                            "authentication_error", code="invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            metrics.requests.labels(endpoint, "413").inc()
            return fail(413, f"the request body is larger than {max_body_bytes} bytes")
        response = await call_next(request)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "requests_in_flight": sum(a.num_in_flight for a in engines.values())}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llmc",
                                            "max_model_len": length} for name, length in served.items()]}

    async def serve(request: Request, kind: str):
        raw = await request.body()
        if len(raw) > max_body_bytes:
            return fail(413, f"the request body is larger than {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return fail(400, f"the request body is not valid JSON: {e}")
        try:
            req = parse_request(body, kind, models=served, max_prompt_chars=max_prompt_chars)
            prompts = req.prompts if req.prompts is not None else [None]  # (chat: the messages, once)
            if len(prompts) * req.n > MAX_TOTAL_CHOICES:
                raise RequestError(f"{len(prompts)} prompts x n={req.n} is more than {MAX_TOTAL_CHOICES} choices",
                                   param="n")
        except RequestError as e:
            return fail(e.status, str(e), e.kind, e.param, e.code)
        model, messages, params, stream, n = req.model, req.messages, req.params, req.stream, req.n
        # one request per choice, choice index = prompt index x n + i (OpenAI's order); n requests of one prompt
        # share its blocks through the prefix cache
        handles, prompt_of, echoes = [], [], []
        try:
            if router is not None and model == router.name:
                if len(prompts) * n != 1:
                    raise RequestError("several prompts or n > 1 are not supported for routed requests", param="n")
                handle = await router.start(prompts[0], params, messages=messages,
                                            is_disconnected=request.is_disconnected)
                if handle is None:  # the client left while the cascade's small model answered
                    return Response(status_code=499)
                handles.append(handle)
                prompt_of.append(0)
            else:
                for index, prompt in enumerate(prompts):
                    for i in range(n):  # a seeded request gives choice i the seed + i: distinct, reproducible
                        p = params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                        request_id, queue = engines[model].add_request(prompt, p, messages=messages,
                                                                       prompt_index=index)
                        handles.append(RoutedStream(None, queue, engines[model], request_id))
                        prompt_of.append(index)
            for index in prompt_of:
                echoes.append(_prompt_text(prompts[index], engines.get(model)) if req.echo else "")
        except (RequestError, QueueFullError, ValueError) as e:
            for h in handles:  # the choices already queued
                h.abort()
            if isinstance(e, RequestError):
                return fail(e.status, str(e), e.kind, e.param, e.code)
            if isinstance(e, QueueFullError):
                return fail(429, str(e), "rate_limit_error", code="queue_full")
            return fail(400, str(e))  # the engine's own checks: prompt too long for the context, bad token ids, ...
        handle = handles[0]
        rid = ("cmpl-" if kind == "completions" else "chatcmpl-") + uuid.uuid4().hex[:24]
        obj = "text_completion" if kind == "completions" else "chat.completion"
        decision = handle.decision
        answered = decision.model if decision is not None else model
        headers = {"x-llmc-route": decision.header()} if decision is not None else None
        if stream:
            return StreamingResponse(_stream(handles, request, rid, obj, kind, req.usage_in_stream,
                                             params.logprobs is not None, answered, prompt_of, echoes),
                                     media_type="text/event-stream", headers=headers)
        choices, finals = [], {}
        try:
            for index, h in enumerate(handles):  # the engine runs them together; their queues hold what is done
                text, reason, logprobs = [echoes[index]], None, []
                while reason is None:
                    event = await _next_event(h.queue, request)
                    if event is None:
                        for other in handles:
                            other.abort()
                        return Response(status_code=499)
                    text.append(event.text)
                    logprobs.extend(event.logprobs or [])
                    reason = event.finish_reason
                if reason == "error":
                    for other in handles:
                        other.abort()
                    return fail(500, f"the request failed: {event.error}", "server_error")
                if h.on_finish is not None:
                    h.on_finish(event)
                finals[index] = event
                body = "".join(text)
                lp = _logprobs_json(logprobs, kind) if params.logprobs is not None else None
                choices.append({"index": index, "text": body, "logprobs": lp, "finish_reason": reason}
                               if kind == "completions" else
                               {"index": index, "message": {"role": "assistant", "content": body}, "logprobs": lp,
                                "finish_reason": reason})
        except asyncio.CancelledError:
            for h in handles:
                h.abort()
            raise
        out = {"id": rid, "object": obj, "created": int(time.time()), "model": answered, "choices": choices,
               "usage": _total_usage(finals, prompt_of)}
        if decision is not None:
            out["route"] = decision.to_json()
        return JSONResponse(out, headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, "completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await serve(request, "chat")

    return app


def _total_usage(finals: dict, prompt_of: list[int]) -> dict:
    """Usage over the choices of one request (their final events by choice index): each prompt counted once, the
    completions summed (OpenAI's)."""
    prompt_tokens = {prompt_of[i]: e.num_prompt_tokens for i, e in finals.items()}
    done = sum(e.num_output_tokens for e in finals.values())
    total = sum(prompt_tokens.values())
    return {"prompt_tokens": total, "completion_tokens": done, "total_tokens": total + done}


def _prompt_text(prompt, async_engine) -> str:
    """What `echo` puts before a completion: the prompt string, or its token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    tokenizer = getattr(getattr(async_engine, "engine", None), "tokenizer", None)
    if tokenizer is None:
        raise RequestError("'echo' of a token-id prompt needs the model's tokenizer", param="echo")
    return tokenizer.decode(list(prompt), skip_special_tokens=True)


async def _first_done(futures, request, poll_s: float = 0.5):
    """The futures among `futures` that are done once any is, or None once the client has disconnected (checked
    every poll_s)."""
    while True:
        done, _ = await asyncio.wait(futures, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
        if done:
            return done
        if await request.is_disconnected():
            return None


async def _next_event(queue: asyncio.Queue, request):
    """The request's next RequestEvent, or None once the client has disconnected."""
    get = asyncio.ensure_future(queue.get())
    if await _first_done({get}, request) is None:
        get.cancel()
        return None
    return get.result()


def _logprobs_json(entries, kind: str):
    """RequestEvent.logprobs entries (token text, logprob, [(text, logprob)]) in the OpenAI format of `kind`."""
    if kind == "completions":
        offsets, at = [], 0
        for text, _, _ in entries:
            offsets.append(at)
            at += len(text)
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8")),
                         "top_logprobs": [{"token": a, "logprob": b, "bytes": list(a.encode("utf-8"))} for a, b in top]}
                        for t, lp, top in entries]}


async def _stream(handles, request, rid, obj, kind, usage_in_stream, with_logprobs, model_name, prompt_of, echoes):
    """Server-sent events: one chunk per step's delta of each choice (its `index`; the first one starts with the
    echoed prompt), each choice's finish reason (with the route of a routed request), optionally usage, then
    [DONE]."""
    created = int(time.time())
    obj = obj + ".chunk" if kind == "chat" else obj
    pending = set(range(len(handles)))  # the choices still running
    finals = {}

    def chunk(index, delta_text, reason, first=False, logprobs=None):
        lp = _logprobs_json(logprobs or [], kind) if with_logprobs else None
        if kind == "completions":
            choice = {"index": index, "text": delta_text, "logprobs": lp, "finish_reason": reason}
        else:
            delta = {"role": "assistant", "content": delta_text} if first else ({"content": delta_text} if delta_text else {})
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [choice]}

    gets: dict[int, asyncio.Future] = {}
    try:
        first = set(pending)
        while pending:
            for i in pending - set(gets):
                gets[i] = asyncio.ensure_future(handles[i].queue.get())
            done = await _first_done(set(gets.values()), request)
            if done is None:
                return  # the client went away: the finally clause aborts the requests
            for i in sorted(i for i, f in gets.items() if f in done):
                event, handle = gets.pop(i).result(), handles[i]
                if event.finish_reason == "error":
                    pending.discard(i)
                    yield f"data: {json.dumps(error_body(f'the request failed: {event.error}', 'server_error'))}\n\n"
                    yield "data: [DONE]\n\n"
                    return  # the finally clause aborts the other choices
                if event.finish_reason is not None and handle.on_finish is not None:
                    handle.on_finish(event)
                if event.text or event.finish_reason is not None or i in first or event.logprobs:
                    text = echoes[i] + event.text if i in first else event.text
                    body = chunk(i, text, event.finish_reason, i in first, event.logprobs)
                    if event.finish_reason is not None and handle.decision is not None:
                        body["route"] = handle.decision.to_json()
                    yield f"data: {json.dumps(body)}\n\n"
                    first.discard(i)
                if event.finish_reason is not None:
                    pending.discard(i)
                    finals[i] = event
        if usage_in_stream:
            tail = {"id": rid, "object": obj, "created": created, "model": model_name, "choices": [],
                    "usage": _total_usage(finals, prompt_of)}
            yield f"data: {json.dumps(tail)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for f in gets.values():
            f.cancel()
        for i in pending:  # the client went away (or the server is stopping): free those requests' blocks
            handles[i].abort()


class BackgroundServer:
    """The app on a uvicorn server in a daemon thread (tests, benchmarks, notebooks); `stop()` ends both."""

    def __init__(self, async_engine, *, model_name: str | None = None, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, startup_timeout: float = 30.0, **app_kwargs):
        import socket
        import threading

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.async_engine, self.host, self.port = async_engine, host, port
        app = build_app(async_engine, model_name=model_name, api_key=api_key, **app_kwargs)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="llmc-http", daemon=True)
        self.thread.start()
        deadline = time.time() + startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port}")
            time.sleep(0.02)
        self.url = f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.async_engine.shutdown()


def serve_forever(async_engine, *, model_name: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                  api_key: str | None = None, log_level: str = "info") -> None:
    import uvicorn

    app = build_app(async_engine, model_name=model_name, api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
