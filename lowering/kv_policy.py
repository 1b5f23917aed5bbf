"""KV eviction policies: what compile_model(..., kv_policy=H2O(...) | StreamingLLM(...)) records.

A policy bounds the KV cache each sequence holds. The pass that applies one is lowering/passes/evict_kv.py (it
records the policy in graph.meta["kv_policy"] and, for H2O, adds the attention-mass state each layer
accumulates); the runtime compacts a sequence's cache when it grows past its budget
(runtime/kv_manager.py plans which blocks, the Program's `compact_kv` moves the kept tokens):

    kept tokens  ->  slots 0 .. budget - 1 of the sequence's blocks, in their original order
    freed        ->  the whole blocks past the budget go back to the pool

Compaction happens in batches: a sequence grows to `budget + evict_every` tokens, then drops back to `budget`,
so the cost of moving the kept tokens is paid once per `evict_every` new tokens. A sequence therefore never
holds more than blocks_needed(budget + evict_every) blocks (`max_tokens`).

H2O (Zhang et al., 2023): per layer and KV head, keep the `recent` newest tokens and the heavy hitters: the
    older tokens with the most attention mass accumulated so far (summed over queries and the query heads of
    the KV head). Keys keep their original positions.
StreamingLLM (Xiao et al., 2023): keep the first `sinks` tokens (attention sinks) and the newest `window`.
    positions="cache" (the paper's rule): a token's position is its index in the cache, not in the text, so
    the query after compaction sits at budget + i and every moved key is re-rotated to its new index (RoPE
    composes: R(a) R(b) = R(a + b)); positions="original" keeps text positions (what a plain sliding window
    with sinks does).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

POSITIONS = ("cache", "original")


class KVPolicyError(ValueError):
    """A KV policy's options are invalid, or it cannot be combined with the rest of the compile options."""


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise KVPolicyError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class H2O:
    """Heavy-hitter oracle eviction.

    budget       tokens kept per sequence: an int, or a float in (0, 1] = that fraction of max_model_len
    recent       of the budget, the fraction (float in [0, 1]) or number (int) of newest tokens always kept;
                 the rest go to the heavy hitters (the paper splits half and half)
    evict_every  tokens a sequence may grow past its budget before it is compacted again (memory slack per
                 sequence vs. how often the kept tokens move); None: max(16, budget // 8) rounded up to blocks
    """

    budget: float | int = 0.2
    recent: float | int = 0.5
    evict_every: int | None = None

    kind = "h2o"

    def validate(self) -> "H2O":
        _check_budget(self.budget)
        if isinstance(self.recent, bool) or not isinstance(self.recent, (int, float)):
            raise KVPolicyError(f"H2O recent must be an int or a float in [0, 1], got {self.recent!r}")
        if isinstance(self.recent, float) and not 0.0 <= self.recent <= 1.0:
            raise KVPolicyError(f"H2O recent as a fraction must be in [0, 1], got {self.recent!r}")
        if isinstance(self.recent, int) and self.recent < 0:
            raise KVPolicyError(f"H2O recent must be >= 0, got {self.recent!r}")
        if self.evict_every is not None:
            _check_int("H2O evict_every", self.evict_every, 1)
        return self

    def to_json(self) -> dict:
        return {"kind": self.kind, "budget": self.budget, "recent": self.recent, "evict_every": self.evict_every}


@dataclasses.dataclass(frozen=True)
class StreamingLLM:
    """Attention sinks + a sliding window of recent tokens.

    sinks        the first tokens of the sequence, always kept (the paper: 4)
    window       the newest tokens kept
    positions    "cache" (the paper's rule, see the module doc) | "original"
    evict_every  as for H2O; None: max(16, window // 8) rounded up to blocks
    """

    sinks: int = 4
    window: int = 1024
    positions: str = "cache"
    evict_every: int | None = None

    kind = "streaming"

    def validate(self) -> "StreamingLLM":
        _check_int("StreamingLLM sinks", self.sinks, 0)
        _check_int("StreamingLLM window", self.window, 1)
        if self.positions not in POSITIONS:
            raise KVPolicyError(f"StreamingLLM positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.evict_every is not None:
            _check_int("StreamingLLM evict_every", self.evict_every, 1)
        return self

    @property
    def budget(self) -> int:
        return self.sinks + self.window

    def to_json(self) -> dict:
        return {"kind": self.kind, "sinks": self.sinks, "window": self.window, "positions": self.positions,
                "evict_every": self.evict_every}


KVPolicy = H2O | StreamingLLM


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise KVPolicyError(f"H2O budget must be a token count (int) or a fraction of max_model_len (float), "
                            f"got {budget!r}")
    if isinstance(budget, float) and not 0.0 < budget <= 1.0:
        raise KVPolicyError(f"H2O budget as a fraction of max_model_len must be in (0, 1], got {budget!r}")
    if isinstance(budget, int) and budget < 2:
        raise KVPolicyError(f"H2O budget must be at least 2 tokens, got {budget!r}")


def policy_from_json(data: Any) -> KVPolicy | None:
    """The policy a graph's meta (or CompileOptions) records; None for None."""
    if data is None:
        return None
    if isinstance(data, (H2O, StreamingLLM)):
        return data.validate()
    if not isinstance(data, dict) or data.get("kind") not in ("h2o", "streaming"):
        raise KVPolicyError(f"kv_policy must be lowering.H2O(...), lowering.StreamingLLM(...) or None, got {data!r}")
    fields = {k: v for k, v in data.items() if k != "kind"}
    cls = H2O if data["kind"] == "h2o" else StreamingLLM
    try:
        return cls(**fields).validate()
    except TypeError as e:
        raise KVPolicyError(f"bad {cls.__name__} options {fields}: {e}") from None


@dataclasses.dataclass(frozen=True)
class EvictionPlan:
    """A policy resolved for one program: token counts per sequence.

    budget       tokens kept after a compaction
    capacity     the most tokens a sequence's cache holds (budget + evict_every): reaching it triggers the next
                 compaction before more tokens are written
    recent       newest tokens always kept (H2O: the recent window; StreamingLLM: the window)
    sinks        leading tokens always kept (StreamingLLM)
    """

    kind: str
    budget: int
    capacity: int
    recent: int
    sinks: int = 0
    cache_positions: bool = False

    @property
    def evict_every(self) -> int:
        return self.capacity - self.budget

    def max_blocks(self, block_size: int) -> int:
        """The most blocks one sequence holds under this plan."""
        return -(-self.capacity // block_size)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EvictionPlan":
        return cls(**data)


def resolve_plan(policy: KVPolicy, *, max_model_len: int, block_size: int) -> EvictionPlan:
    """Token counts of `policy` for a program of max_model_len tokens per sequence and pages of block_size."""
    policy = policy_from_json(policy)
    if isinstance(policy, H2O):
        budget = policy.budget if isinstance(policy.budget, int) else max(2, int(math.floor(policy.budget * max_model_len)))
        recent = policy.recent if isinstance(policy.recent, int) else int(round(policy.recent * budget))
        if recent > budget:
            raise KVPolicyError(f"H2O recent ({recent}) exceeds the budget ({budget} tokens)")
        recent = max(recent, 1)  # the newest token is always kept
        every = policy.evict_every or -(-max(16, budget // 8) // block_size) * block_size
        return EvictionPlan("h2o", budget, budget + every, recent)
    budget = policy.budget
    every = policy.evict_every or -(-max(16, policy.window // 8) // block_size) * block_size
    return EvictionPlan("streaming", budget, budget + every, policy.window, policy.sinks,
                        cache_positions=policy.positions == "cache")


def plan_for_graph(graph, max_model_len: int) -> EvictionPlan | None:
    """The eviction plan of a compiled graph (graph.meta["kv_policy"]) for a program of max_model_len tokens."""
    policy = graph.meta.get("kv_policy")
    if policy is None:
        return None
    plan = resolve_plan(policy, max_model_len=max_model_len, block_size=int(graph.meta["block_size"]))
    if plan.budget >= max_model_len:
        return None  # the budget holds any sequence whole: nothing is ever evicted
    return plan
