"""Model routing inside the engine: several compiled models behind one endpoint, each request sent to the
cheapest one that will do.

Policies (each `choose(context) -> Route`, deterministic for a fixed configuration):
  SizePolicy     rules on prompt length, requested max_tokens and cheap complexity features
                 (`prompt_features`, `size_score`); the first rule a request satisfies names its model.
  TaskPolicy     a trained classifier (runtime/route_classifier.py, `llmc train-router`) maps the prompt
                 to a label, the label to a model.
  CascadePolicy  the small model answers first; a confidence score over its tokens (`confidence_score`:
                 mean token log-prob, minimum log-prob or minus the mean entropy) keeps the answer or
                 escalates to the large model. When both speak the same token ids, the escalation hands
                 the small model's answer to the large one as a draft (`Engine.generate(drafts=)`): the
                 large model checks all of it in the pass that computes the prompt and keeps the longest
                 prefix it agrees with, so a greedy request gets exactly the large model's own answer
                 while skipping the decode steps of the agreed part (cascade-as-speculation).
  RandomPolicy   a seeded coin per prompt (the baseline the evaluation compares against).

`Router` runs on Engines (offline batches, benchmarks); `AsyncRouter` on AsyncEngines (the server's
`"model": "auto"`). Both record every decision in `RouterStats`: decisions by policy and model,
escalations, fallbacks, and the cost of each request from each model's measured cost per token
(`measure_cost`), with the cost saved against sending everything to the reference (most expensive)
model. A policy that raises, or a model that refuses or fails a request, falls back to the configured
default model: a routing error never fails a request.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import threading
import time
import zlib
from typing import Any, Mapping, Sequence

import numpy as np

from runtime.async_engine import QueueFullError
from runtime.sampler import SamplingParams

__all__ = ["prompt_features", "size_score", "CONFIDENCE_KINDS", "confidence_score", "ModelCost", "measure_cost",
           "RouteContext", "Route", "SizeRule", "SizePolicy", "TaskPolicy", "CascadePolicy", "RandomPolicy",
           "RouteDecision", "RoutedOutput", "RouterStats", "Router", "AsyncRouter", "policy_from_config",
           "shares_tokenizer"]

_WORD = re.compile(r"\w+", re.UNICODE)
_MATH_WORDS = frozenset("calculate compute solve equation sum product total how many much percent average "
                        "prove derivative integral probability".split())
_MATH_CHARS = re.compile(r"[0-9]\s*[-+*/^=%]\s*[0-9]")
_CODE = re.compile(r"```|\bdef |\bclass |\breturn\b|#include|\bfunction\b|=>|;\s*$|\{\s*$", re.MULTILINE)
_REASONING = frozenset("why explain compare analyze analyse step reason prove derive evaluate".split())


# ---------------------------------------------------------------------------------------------
# Cheap features and scores


def prompt_features(text: str, num_prompt_tokens: int, max_tokens: int) -> dict[str, float]:
    """Cheap complexity features of one request (microseconds; no model involved)."""
    words = [w.lower() for w in _WORD.findall(text)]
    chars = max(len(text), 1)
    return {
        "num_prompt_tokens": float(num_prompt_tokens),
        "max_tokens": float(max_tokens),
        "chars": float(len(text)),
        "words": float(len(words)),
        "lines": float(text.count("\n") + 1),
        "digit_frac": sum(c.isdigit() for c in text) / chars,
        "math": float(sum(w in _MATH_WORDS for w in words) + len(_MATH_CHARS.findall(text))),
        "code": float(len(_CODE.findall(text))),
        "reasoning": float(sum(w in _REASONING for w in words)),
        "questions": float(text.count("?")),
    }


def size_score(features: Mapping[str, float]) -> float:
    """A monotone "needs the large model" score: longer prompts and answers and more math, code and
    reasoning cues score higher. SizePolicy rules can bound it; the evaluation sweeps a threshold on it."""
    f = features
    return (math.log1p(f["num_prompt_tokens"]) + 0.5 * math.log1p(f["max_tokens"]) + 4.0 * f["digit_frac"]
            + 0.5 * min(f["math"], 4.0) + 0.5 * min(f["code"], 4.0) + 0.5 * min(f["reasoning"], 4.0)
            + 0.25 * min(f["questions"], 4.0))


CONFIDENCE_KINDS = ("mean_logprob", "min_logprob", "neg_mean_entropy")


def confidence_score(logprobs: Sequence[float], entropies: Sequence[float] | None, kind: str) -> float:
    """How sure the small model was of its answer (higher = more confident); -inf for an empty answer.

    mean_logprob: mean log-probability of the tokens it produced; min_logprob: the least likely one;
    neg_mean_entropy: minus the mean entropy (nats) of the distributions they were drawn from."""
    if kind not in CONFIDENCE_KINDS:
        raise ValueError(f"unknown confidence kind {kind!r}; choose one of {list(CONFIDENCE_KINDS)}")
    if kind == "neg_mean_entropy":
        if entropies is None:
            raise ValueError("confidence 'neg_mean_entropy' needs the entropies of the answer's tokens")
        values = np.asarray(entropies, np.float64)
        return -float(values.mean()) if values.size else -math.inf
    values = np.asarray(logprobs, np.float64)
    if not values.size:
        return -math.inf
    return float(values.mean() if kind == "mean_logprob" else values.min())


# ---------------------------------------------------------------------------------------------
# Cost per token


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Seconds per prompt token (prefill) and per generated token (decode, batch of one), as measured."""

    prefill_s: float
    decode_s: float

    def request(self, num_prompt_tokens: int, num_output_tokens: int) -> float:
        return num_prompt_tokens * self.prefill_s + num_output_tokens * self.decode_s

    def to_json(self) -> dict:
        return {"prefill_s_per_token": self.prefill_s, "decode_s_per_token": self.decode_s}


def measure_cost(engine, *, prompt_tokens: int = 128, decode_tokens: int = 16, repeats: int = 2) -> ModelCost:
    """Time a prefill of `prompt_tokens` and `decode_tokens` greedy decode steps (batch of one) on `engine`.

    Prompts are fresh random token ids each run (no prefix-cache hit); one untimed warm-up of the same
    shapes first (a JIT compile or a CUDA-graph capture is no cost per token). Medians of `repeats`."""
    vocab = engine.vocab_size
    rng = np.random.default_rng(0)
    n = max(2, min(prompt_tokens, engine.max_model_len - decode_tokens - 2))

    def run(max_tokens: int) -> float:
        ids = [int(t) for t in rng.integers(3, vocab, n)]
        start = time.perf_counter()
        engine.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - start

    run(1), run(decode_tokens + 1)  # warm-up
    prefill = sorted(run(1) for _ in range(repeats))[repeats // 2]
    total = sorted(run(decode_tokens + 1) for _ in range(repeats))[repeats // 2]
    return ModelCost(prefill_s=prefill / n, decode_s=max(total - prefill, 1e-9) / decode_tokens)


# ---------------------------------------------------------------------------------------------
# Policies


@dataclasses.dataclass
class RouteContext:
    """What a policy sees of a request."""

    text: str  # the prompt's text (chat messages rendered as "role: content" lines)
    num_prompt_tokens: int  # under the default model's tokenizer
    max_tokens: int
    features: dict[str, float]


@dataclasses.dataclass(frozen=True)
class Route:
    """A policy's choice: run `model`; with `cascade_to`, escalate to that model unless confident."""

    model: str
    reason: str
    score: float | None = None
    cascade_to: str | None = None


@dataclasses.dataclass(frozen=True)
class SizeRule:
    """Matches a request when every bound set holds (None: no bound)."""

    model: str
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None
    max_score: float | None = None  # bound on size_score(features)

    def matches(self, ctx: RouteContext) -> bool:
        return ((self.max_prompt_tokens is None or ctx.num_prompt_tokens <= self.max_prompt_tokens)
                and (self.max_tokens is None or ctx.max_tokens <= self.max_tokens)
                and (self.max_score is None or size_score(ctx.features) <= self.max_score))


class SizePolicy:
    """Rules in order, the first that matches names the model; otherwise `otherwise`."""

    name = "size"

    def __init__(self, rules: Sequence[SizeRule], otherwise: str):
        self.rules, self.otherwise = list(rules), otherwise
        for rule in self.rules:
            if not isinstance(rule, SizeRule):
                raise ValueError(f"SizePolicy rules must be SizeRule, got {type(rule).__name__}")

    def models(self) -> set[str]:
        return {r.model for r in self.rules} | {self.otherwise}

    def choose(self, ctx: RouteContext) -> Route:
        score = size_score(ctx.features)
        for i, rule in enumerate(self.rules):
            if rule.matches(ctx):
                return Route(rule.model, f"size rule {i}", score)
        return Route(self.otherwise, "no size rule matched", score)


class TaskPolicy:
    """A RouteClassifier's label for the prompt picks the model (`routes`: label -> model; labels that name
    models map to themselves). With `threshold`, the request goes to routes[positive] when the classifier
    gives `positive` at least that probability, else to routes[negative] (the other label of a binary
    classifier): the knob that trades quality for cost."""

    name = "task"

    def __init__(self, classifier, routes: Mapping[str, str] | None = None, *, threshold: float | None = None,
                 positive: str | None = None):
        if isinstance(classifier, str):
            from runtime.route_classifier import RouteClassifier

            classifier = RouteClassifier.load(classifier)
        self.classifier = classifier
        labels = list(classifier.labels)
        self.routes = {label: label for label in labels} | dict(routes or {})
        missing = [label for label in labels if label not in self.routes]
        if missing:
            raise ValueError(f"TaskPolicy has no model for the classifier's label(s) {missing}")
        self.threshold, self.positive, self.negative = threshold, positive, None
        if threshold is not None:
            if len(labels) != 2 or positive not in labels:
                raise ValueError(f"TaskPolicy threshold needs a two-label classifier and positive= one of {labels}")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"TaskPolicy threshold must be in [0, 1], got {threshold}")
            self.negative = labels[1 - labels.index(positive)]

    def models(self) -> set[str]:
        return set(self.routes.values())

    def choose(self, ctx: RouteContext) -> Route:
        probs = np.asarray(self.classifier.predict_proba([ctx.text]))[0]
        labels = list(self.classifier.labels)
        if self.threshold is not None:
            p = float(probs[labels.index(self.positive)])
            label = self.positive if p >= self.threshold else self.negative
            return Route(self.routes[label], f"P({self.positive})={p:.3f} vs {self.threshold}", p)
        best = int(np.argmax(probs))
        return Route(self.routes[labels[best]], f"label {labels[best]!r}", float(probs[best]))


class CascadePolicy:
    """`small` answers; its answer stands when confidence_score(kind) >= threshold, else `large` answers
    (with the small answer as a draft when `speculate` and the two share token ids)."""

    name = "cascade"

    def __init__(self, small: str, large: str, *, confidence: str = "mean_logprob", threshold: float = -1.0,
                 speculate: bool = True):
        if confidence not in CONFIDENCE_KINDS:
            raise ValueError(f"unknown confidence kind {confidence!r}; choose one of {list(CONFIDENCE_KINDS)}")
        if not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"CascadePolicy threshold must be a number, got {threshold!r}")
        if small == large:
            raise ValueError("CascadePolicy needs two different models")
        self.small, self.large, self.confidence = small, large, confidence
        self.threshold, self.speculate = float(threshold), bool(speculate)

    def models(self) -> set[str]:
        return {self.small, self.large}

    def choose(self, ctx: RouteContext) -> Route:
        return Route(self.small, "cascade: small model first", None, cascade_to=self.large)

    def keeps(self, logprobs: Sequence[float], entropies: Sequence[float] | None) -> tuple[bool, float]:
        score = confidence_score(logprobs, entropies, self.confidence)
        return score >= self.threshold, score


class RandomPolicy:
    """Sends a request to `models[1]` with probability `p_large` (a seeded hash of its text, so the same
    prompt always goes the same way), else to `models[0]`."""

    name = "random"

    def __init__(self, small: str, large: str, *, p_large: float = 0.5, seed: int = 0):
        if not 0.0 <= p_large <= 1.0:
            raise ValueError(f"RandomPolicy p_large must be in [0, 1], got {p_large}")
        self.small, self.large, self.p_large, self.seed = small, large, float(p_large), int(seed)

    def models(self) -> set[str]:
        return {self.small, self.large}

    def choose(self, ctx: RouteContext) -> Route:
        u = zlib.crc32(f"{self.seed}:{ctx.text}".encode("utf-8")) / 2**32
        return Route(self.large if u < self.p_large else self.small, f"coin {u:.3f} vs {self.p_large}", u)


def policy_from_config(config: Mapping[str, Any]):
    """A policy from its JSON form, e.g. {"kind": "cascade", "small": "a", "large": "b", "threshold": -0.8},
    {"kind": "size", "rules": [{"model": "a", "max_prompt_tokens": 256}], "otherwise": "b"},
    {"kind": "task", "classifier": "router.json", "routes": {...}, "threshold": 0.5, "positive": "b"},
    {"kind": "random", "small": "a", "large": "b", "p_large": 0.3}."""
    if not isinstance(config, Mapping) or "kind" not in config:
        raise ValueError("a routing policy config must be an object with a 'kind' (size, task, cascade, random)")
    kind, rest = config["kind"], {k: v for k, v in config.items() if k != "kind"}
    try:
        if kind == "size":
            rules = [SizeRule(**r) for r in rest.pop("rules", [])]
            return SizePolicy(rules, **rest)
        if kind == "task":
            return TaskPolicy(rest.pop("classifier"), **rest)
        if kind == "cascade":
            return CascadePolicy(**rest)
        if kind == "random":
            return RandomPolicy(**rest)
    except (TypeError, KeyError) as e:
        raise ValueError(f"bad {kind!r} routing policy config: {e}") from None
    raise ValueError(f"unknown routing policy kind {kind!r} (size, task, cascade, random)")


def shares_tokenizer(a, b) -> bool:
    """True when two engines' models speak the same token ids (vocabulary size and a probe text's encoding)."""
    from runtime.speculative import _check_same_tokenizer

    try:
        _check_same_tokenizer(a.model, b.model)  # vocabulary sizes; a probe text's ids when both have tokenizers
    except ValueError:
        return False
    return (a.tokenizer is None) == (b.tokenizer is None)


# ---------------------------------------------------------------------------------------------
# Decisions and their accounting


@dataclasses.dataclass
class RouteDecision:
    """What the router did with one request (returned in responses and counted in /metrics)."""

    model: str  # the model whose answer is returned
    policy: str
    reason: str
    first_model: str | None = None  # a cascade's small model (== model when its answer was kept)
    escalated: bool = False
    confidence: float | None = None
    score: float | None = None
    fallback: str | None = None  # why the default model answered instead (a routing error), if it did
    num_draft_tokens: int = 0  # cascade-as-speculation: the small answer's tokens the large model checked
    num_accepted_draft_tokens: int = 0
    cost_s: float = 0.0  # from the models' measured cost per token
    reference_cost_s: float = 0.0  # the same answer from the reference model
    router_ms: float = 0.0  # time the policy took (the cascade's small answer not included)

    @property
    def cost_saved_s(self) -> float:
        return self.reference_cost_s - self.cost_s

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["cost_saved_s"] = self.cost_saved_s
        return out

    def header(self) -> str:
        """A one-line summary for the x-llmc-route response header."""
        parts = [f"model={self.model}", f"policy={self.policy}"]
        if self.first_model is not None:
            parts.append(f"escalated={int(self.escalated)}")
        if self.fallback is not None:
            parts.append("fallback=1")
        return "; ".join(parts)


@dataclasses.dataclass
class RoutedOutput:
    output: Any  # the RequestOutput of the model that answered
    route: RouteDecision


class RouterStats:
    """Counters since start, per decision (thread-safe: the server's engine threads and its event loop)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.decisions: dict[tuple[str, str], int] = {}  # (policy, model) -> requests
        self.escalations: dict[tuple[str, str], int] = {}  # (from, to) -> requests
        self.fallbacks: dict[str, int] = {}  # kind of error -> requests
        self.cost_s: dict[str, float] = {}  # model -> estimated seconds spent
        self.reference_cost_s = 0.0
        self.cost_saved_s = 0.0
        self.num_requests = 0
        self.draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.router_ms: list[float] = []  # drained by the metrics reader

    def record(self, d: RouteDecision, costs: Mapping[str, float]) -> None:
        with self._lock:
            self.num_requests += 1
            key = (d.policy, d.model)
            self.decisions[key] = self.decisions.get(key, 0) + 1
            if d.escalated:
                esc = (d.first_model, d.model)
                self.escalations[esc] = self.escalations.get(esc, 0) + 1
            if d.fallback is not None:
                kind = d.fallback.split(":", 1)[0]
                self.fallbacks[kind] = self.fallbacks.get(kind, 0) + 1
            for model, cost in costs.items():
                self.cost_s[model] = self.cost_s.get(model, 0.0) + cost
            self.reference_cost_s += d.reference_cost_s
            self.cost_saved_s += d.cost_saved_s
            self.draft_tokens += d.num_draft_tokens
            self.accepted_draft_tokens += d.num_accepted_draft_tokens
            self.router_ms.append(d.router_ms)

    def snapshot(self) -> dict:
        with self._lock:
            snap = {"num_requests": self.num_requests, "decisions": dict(self.decisions),
                    "escalations": dict(self.escalations), "fallbacks": dict(self.fallbacks),
                    "cost_s": dict(self.cost_s), "reference_cost_s": self.reference_cost_s,
                    "cost_saved_s": self.cost_saved_s, "draft_tokens": self.draft_tokens,
                    "accepted_draft_tokens": self.accepted_draft_tokens, "router_ms": list(self.router_ms)}
            self.router_ms.clear()
        return snap


def _messages_text(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


class _RouterCore:
    """Decisions, fallbacks and cost accounting over named engines; Router and AsyncRouter run them."""

    def __init__(self, engines: Mapping[str, Any], policy, *, default: str,
                 costs: Mapping[str, ModelCost] | str | None = "measure", reference: str | None = None):
        if not engines:
            raise ValueError("a router needs at least one model")
        self.engines = dict(engines)
        if default not in self.engines:
            raise ValueError(f"default model {default!r} is not among the router's models {sorted(self.engines)}")
        unknown = sorted(policy.models() - set(self.engines)) if hasattr(policy, "models") else []
        if unknown:
            raise ValueError(f"the {getattr(policy, 'name', 'routing')} policy names model(s) {unknown} the router "
                             f"does not have (models: {sorted(self.engines)})")
        self.policy, self.default = policy, default
        if costs == "measure":
            costs = {name: measure_cost(engine) for name, engine in self.engines.items()}
        elif costs is None:  # no measurement: every token costs the same (cost saved then counts tokens)
            costs = {name: ModelCost(1.0, 1.0) for name in self.engines}
        missing = sorted(set(self.engines) - set(costs))
        if missing:
            raise ValueError(f"no cost for model(s) {missing}")
        self.costs = {name: costs[name] for name in self.engines}
        if reference is None:
            reference = max(self.engines, key=lambda n: (self.costs[n].decode_s, self.costs[n].prefill_s))
        if reference not in self.engines:
            raise ValueError(f"reference model {reference!r} is not among the router's models")
        self.reference = reference
        self.stats = RouterStats()
        self._shared: dict[tuple[str, str], bool] = {}

    def _shares(self, a: str, b: str) -> bool:
        if (a, b) not in self._shared:
            self._shared[(a, b)] = shares_tokenizer(self.engines[a], self.engines[b])
        return self._shared[(a, b)]

    def _num_tokens(self, model: str, prompt, messages, chat: bool) -> int:
        engine = self.engines[model]
        if not isinstance(prompt, str) and messages is None:
            return len(prompt)
        tok = engine.tokenizer
        if tok is None:
            return len(prompt or "") // 4 + 1
        if messages is not None or chat:
            msgs = messages if messages is not None else [{"role": "user", "content": prompt}]
            return len(tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True), add_special_tokens=False))
        return len(tok.encode(prompt, add_special_tokens=True))

    def decide(self, prompt, params: SamplingParams, *, messages=None, chat: bool = False) -> tuple[Route, RouteDecision]:
        """The policy's Route for one request, or the default model's when the policy fails."""
        start = time.perf_counter()
        policy_name = getattr(self.policy, "name", type(self.policy).__name__)
        try:
            if messages is not None:
                text = _messages_text(messages)
            elif isinstance(prompt, str):
                text = prompt
            else:
                tok = self.engines[self.default].tokenizer
                text = tok.decode(list(prompt)) if tok is not None else ""
            n = self._num_tokens(self.default, prompt, messages, chat)
            ctx = RouteContext(text, n, params.max_tokens, prompt_features(text, n, params.max_tokens))
            route = self.policy.choose(ctx)
            if route.model not in self.engines or (route.cascade_to is not None and route.cascade_to not in self.engines):
                raise ValueError(f"the policy chose an unknown model {route.model!r}")
            decision = RouteDecision(route.model, policy_name, route.reason, score=route.score)
        except Exception as e:  # noqa: BLE001 - a routing error must not fail the request
            route = Route(self.default, "fallback")
            decision = RouteDecision(self.default, policy_name, "fallback", fallback=f"policy: {type(e).__name__}: {e}")
        decision.router_ms = (time.perf_counter() - start) * 1e3
        return route, decision

    def _cascade_params(self, params: SamplingParams) -> SamplingParams:
        """The small model's params in a cascade: logprobs on (the confidence reads them)."""
        return params if params.logprobs is not None else dataclasses.replace(params, logprobs=0)

    def _account(self, decision: RouteDecision, prompt, messages, chat: bool, runs: Sequence[tuple[str, int, int]],
                 num_output_tokens: int) -> None:
        """runs: (model, prompt-side tokens, decode tokens) of each model that ran for the request."""
        spent: dict[str, float] = {}
        for model, n_prefill, n_decode in runs:
            spent[model] = spent.get(model, 0.0) + self.costs[model].request(n_prefill, n_decode)
        decision.cost_s = sum(spent.values())
        ref = self.reference
        n_ref = next((p for m, p, _ in runs if m == ref), None)
        if n_ref is None:
            n_ref = self._num_tokens(ref, prompt, messages, chat)
        decision.reference_cost_s = self.costs[ref].request(n_ref, num_output_tokens)
        self.stats.record(decision, spent)


def _run_tokens(model: str, n_prompt: int, n_out: int, n_draft: int, n_accepted: int) -> tuple[str, int, int]:
    """(model, prompt-side tokens, decode tokens) of one model's answer: a draft it checked counts as prompt
    tokens (the pass that computed the prompt), the tokens past the accepted part and its bonus token as decode."""
    if n_draft:
        return model, n_prompt + n_draft, max(n_out - n_accepted - 1, 0)
    return model, n_prompt, n_out


class Router(_RouterCore):
    """Route a batch of prompts over several Engines (offline use, benchmarks, evaluation).

        router = Router({"small": Engine(small), "large": Engine(large)},
                        CascadePolicy("small", "large", threshold=-0.8), default="large")
        outs = router.generate(["What is 2+2?"], SamplingParams(max_tokens=32, temperature=0), chat=True)
        outs[0].output.text, outs[0].route.model
    """

    def generate(self, prompts, sampling_params: SamplingParams | None = None, *, chat: bool = False) -> list[RoutedOutput]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = sampling_params or SamplingParams()
        params.validate()
        routes = [self.decide(p, params, chat=chat) for p in prompts]
        results: list[RoutedOutput | None] = [None] * len(prompts)
        groups: dict[tuple[str, bool], list[int]] = {}  # (model, first step of a cascade) -> prompts
        for i, (route, _) in enumerate(routes):
            groups.setdefault((route.model, route.cascade_to is not None), []).append(i)
        escalate: dict[str, list[tuple[int, Any]]] = {}
        for (model, casc), idx in groups.items():
            outs = self._run(model, [prompts[i] for i in idx], params, chat, idx, routes, casc)
            for i, out in zip(idx, outs):
                route, decision = routes[i]
                if isinstance(out, RoutedOutput):  # the model refused it: the default model answered
                    results[i] = out
                    continue
                if casc:
                    keep, conf = self.policy.keeps([lp for lp, _ in out.logprobs], out.entropies)
                    decision.first_model, decision.confidence = model, conf
                    if not keep:
                        escalate.setdefault(route.cascade_to, []).append((i, out))
                        continue
                    if params.logprobs is None:
                        out.logprobs = None
                    out.entropies = None
                n_prompt = len(out.prompt_token_ids)
                self._account(decision, prompts[i], None, chat, [(model, n_prompt, len(out.token_ids))],
                              len(out.token_ids))
                results[i] = RoutedOutput(out, decision)
        for large, items in escalate.items():
            small_outs = {i: out for i, out in items}
            idx = [i for i, _ in items]
            small = routes[idx[0]][0].model
            drafts = None
            if self.policy.speculate and self._shares(small, large):
                drafts = [small_outs[i].token_ids for i in idx]
            outs = self.engines[large].generate([prompts[i] for i in idx], params, chat=chat, drafts=drafts)
            for i, out in zip(idx, outs):
                decision = routes[i][1]
                decision.model, decision.escalated = large, True
                decision.num_draft_tokens, decision.num_accepted_draft_tokens = out.num_draft_tokens, \
                    out.num_accepted_draft_tokens
                s = small_outs[i]
                runs = [(small, len(s.prompt_token_ids), len(s.token_ids)),
                        _run_tokens(large, len(out.prompt_token_ids), len(out.token_ids), out.num_draft_tokens,
                                    out.num_accepted_draft_tokens)]
                self._account(decision, prompts[i], None, chat, runs, len(out.token_ids))
                results[i] = RoutedOutput(out, decision)
        return results

    def _run(self, model, prompts, params, chat, idx, routes, cascading: bool):
        """Generate on `model`; if it refuses the batch (a prompt too long for it, ...), each prompt alone, and a
        prompt it refuses goes to the default model (counted as a fallback)."""
        engine = self.engines[model]
        try:
            if cascading:  # the small model's answers, with what the confidence reads
                return engine.generate(prompts, self._cascade_params(params), chat=chat, track_entropy=True)
            return engine.generate(prompts, params, chat=chat)
        except ValueError:
            if len(prompts) > 1:
                outs = []
                for p, i in zip(prompts, idx):
                    outs.extend(self._run(model, [p], params, chat, [i], routes, cascading))
                return outs
            if model == self.default:
                raise
            route, decision = routes[idx[0]]
            out = self.engines[self.default].generate(prompts, params, chat=chat)[0]
            decision.model, decision.fallback = self.default, f"model: {model!r} refused the request"
            self._account(decision, prompts[0], None, chat, [(self.default, len(out.prompt_token_ids),
                                                              len(out.token_ids))], len(out.token_ids))
            return [RoutedOutput(out, decision)]


# ---------------------------------------------------------------------------------------------
# The server's router: AsyncEngines


@dataclasses.dataclass
class RoutedStream:
    """One routed request in flight: read `queue` (RequestEvents) until a finish reason; `abort()` stops it."""

    decision: RouteDecision
    queue: asyncio.Queue
    async_engine: Any | None
    request_id: str | None
    on_finish: Any = None  # called with the final RequestEvent (cost accounting)

    def abort(self) -> None:
        if self.async_engine is not None and self.request_id is not None:
            self.async_engine.abort(self.request_id)


class AsyncRouter(_RouterCore):
    """Route requests over several AsyncEngines (`"model": "auto"` in the server).

    `await start(prompt, params, messages=...)` -> RoutedStream. A cascade runs the small model to its end
    first (its answer is needed to judge it), so the response starts once the decision is made."""

    def __init__(self, async_engines: Mapping[str, Any], policy, *, default: str,
                 costs: Mapping[str, ModelCost] | str | None = "measure", reference: str | None = None,
                 name: str = "auto"):
        self.async_engines = dict(async_engines)
        self.name = name
        if name in self.async_engines:
            raise ValueError(f"the router's name {name!r} is also a model's name")
        super().__init__({n: a.engine for n, a in self.async_engines.items()}, policy, default=default, costs=costs,
                         reference=reference)

    @property
    def num_in_flight(self) -> int:
        return sum(a.num_in_flight for a in self.async_engines.values())

    def shutdown(self, timeout: float = 10.0) -> None:
        for async_engine in self.async_engines.values():
            async_engine.shutdown(timeout)

    async def start(self, prompt, params: SamplingParams, *, messages=None, chat: bool = False,
                    is_disconnected=None) -> RoutedStream | None:
        """Route and submit one request; None when the client went away during a cascade's first answer.
        A model that refuses the request (too long for its context, its queue full) hands it to the default
        model; what the default model's AsyncEngine raises (bad input, a full queue) is raised."""
        route, decision = self.decide(prompt, params, messages=messages, chat=chat)
        model = route.model
        if route.cascade_to is not None:
            return await self._cascade(route, decision, prompt, params, messages, chat, is_disconnected)
        return self._submit(model, decision, prompt, params, messages, chat)

    def _submit(self, model, decision, prompt, params, messages, chat, *, draft=None, runs_before=()):
        async_engine = self.async_engines[model]
        try:
            request_id, queue = async_engine.add_request(prompt, params, chat=chat, messages=messages, draft=draft)
        except (ValueError, QueueFullError) as e:
            if model == self.default:
                raise
            decision.model, decision.fallback = self.default, f"model: {model!r} refused the request: {e}"
            model, async_engine, draft = self.default, self.async_engines[self.default], None
            request_id, queue = async_engine.add_request(prompt, params, chat=chat, messages=messages)
        decision.model = model

        def on_finish(event) -> None:
            decision.num_draft_tokens = event.num_draft_tokens
            decision.num_accepted_draft_tokens = event.num_accepted_draft_tokens
            run = _run_tokens(model, event.num_prompt_tokens, event.num_output_tokens, event.num_draft_tokens,
                              event.num_accepted_draft_tokens)
            self._account(decision, prompt, messages, chat, [*runs_before, run], event.num_output_tokens)

        return RoutedStream(decision, queue, async_engine, request_id, on_finish)

    async def _cascade(self, route, decision, prompt, params, messages, chat, is_disconnected):
        small, large = route.model, route.cascade_to
        decision.first_model = small
        try:
            request_id, queue = self.async_engines[small].add_request(
                prompt, self._cascade_params(params), chat=chat, messages=messages, track_entropy=True)
        except (ValueError, QueueFullError) as e:  # the small model cannot take it (too long for its context, ...): the large one
            decision.fallback = f"model: {small!r} refused the request: {e}"
            decision.escalated = True
            return self._submit(large, decision, prompt, params, messages, chat)
        events = []
        while True:
            event = await _wait(queue, is_disconnected)
            if event is None:
                self.async_engines[small].abort(request_id)
                return None
            events.append(event)
            if event.finish_reason is not None:
                break
        last = events[-1]
        if last.finish_reason == "error":
            decision.fallback = f"model: {small!r} failed: {last.error}"
            decision.escalated = True
            return self._submit(large, decision, prompt, params, messages, chat)
        logprobs = [lp for e in events for _, lp, _ in (e.logprobs or [])]
        entropies = [h for e in events for h in (e.entropies or [])]
        keep, conf = self.policy.keeps(logprobs, entropies)
        decision.confidence = conf
        small_run = (small, last.num_prompt_tokens, last.num_output_tokens)
        if keep:
            merged = _merge_events(events, keep_logprobs=params.logprobs is not None)
            self._account(decision, prompt, messages, chat, [small_run], last.num_output_tokens)
            out: asyncio.Queue = asyncio.Queue()
            out.put_nowait(merged)
            return RoutedStream(decision, out, None, None)
        decision.escalated = True
        draft = None
        if self.policy.speculate and self._shares(small, large):
            draft = [t for e in events for t in e.token_ids]
        return self._submit(large, decision, prompt, params, messages, chat, draft=draft, runs_before=[small_run])


async def _wait(queue: asyncio.Queue, is_disconnected, poll_s: float = 0.5):
    """The queue's next item, or None once is_disconnected() says the client left (checked every poll_s)."""
    if is_disconnected is None:
        return await queue.get()
    get = asyncio.ensure_future(queue.get())
    while True:
        done, _ = await asyncio.wait({get}, timeout=poll_s)
        if done:
            return get.result()
        if await is_disconnected():
            get.cancel()
            return None


def _merge_events(events, *, keep_logprobs: bool):
    """A cascade's kept answer as one finished RequestEvent."""
    last = events[-1]
    return dataclasses.replace(
        last, text="".join(e.text for e in events), token_ids=[t for e in events for t in e.token_ids],
        logprobs=[x for e in events for x in (e.logprobs or [])] if keep_logprobs else None, entropies=None)


def load_router_config(path) -> dict:
    """A router config file (JSON): {"models": {name: {"source": ..., compile options}}, "default": name,
    "policy": {...}, "costs": "measure" | {name: {"prefill_s_per_token": x, "decode_s_per_token": y}}}."""
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"router config {path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"router config {path} must be a JSON object")
    for key in ("models", "default", "policy"):
        if key not in config:
            raise ValueError(f"router config {path} has no {key!r}")
    models = config["models"]
    if not isinstance(models, dict) or not models or not all(
            isinstance(m, dict) and isinstance(m.get("source"), str) for m in models.values()):
        raise ValueError(f"router config {path}: 'models' must map names to objects with a 'source'")
    costs = config.get("costs", "measure")
    if isinstance(costs, dict):
        try:
            costs = {n: ModelCost(float(c["prefill_s_per_token"]), float(c["decode_s_per_token"]))
                     for n, c in costs.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"router config {path}: bad 'costs' ({e})") from None
        config["costs"] = costs
    elif costs not in ("measure", None):
        raise ValueError(f"router config {path}: 'costs' must be \"measure\", null or per-model costs")
    return config
