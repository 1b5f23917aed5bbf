"""Speculative decoding options: what compile_model(..., speculative=Speculative(...)) records.

The pass that applies them is lowering/passes/insert_speculation.py; the runtime side (proposers, accept
rule, adaptive draft length) is runtime/speculative.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

METHODS = ("ngram", "draft", "medusa", "eagle")
HIDDEN_METHODS = ("medusa", "eagle")
MAX_NUM_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class Speculative:
    """How compile_model(..., speculative=...) speculates.

    method      "ngram" (prompt lookup, no model) | "draft" (a smaller model with the same tokenizer) |
                "medusa" | "eagle" (trained heads over the target's hidden states; `llmc train-draft`)
    num_tokens  the longest draft per step (k); verification runs k+1 rows per sequence
    draft       method="draft": a CompiledModel / loaded artifact, or a source compile_model accepts
                (registry name or checkpoint path; compiled for the target's target at engine start)
    heads       method="medusa" | "eagle": the directory `llmc train-draft` wrote
    adaptive    choose the draft length each step from measured step costs and acceptance (0 = off);
                False always drafts num_tokens
    ngram_min / ngram_max: the n-gram sizes prompt lookup matches, longest first
    """

    method: str
    num_tokens: int = 4
    draft: Any = None
    heads: str | None = None
    adaptive: bool = True
    ngram_min: int = 1
    ngram_max: int = 4

    def validate(self) -> "Speculative":
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.num_tokens, int) or isinstance(self.num_tokens, bool) \
                or not 1 <= self.num_tokens <= MAX_NUM_TOKENS:
            raise ValueError(f"speculative num_tokens must be an integer in [1, {MAX_NUM_TOKENS}], got {self.num_tokens!r}")
        if not isinstance(self.adaptive, bool):
            raise ValueError(f"speculative adaptive must be a bool, got {self.adaptive!r}")
        for name in ("ngram_min", "ngram_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 64:
                raise ValueError(f"speculative {name} must be an integer in [1, 64], got {v!r}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"speculative ngram_min ({self.ngram_min}) exceeds ngram_max ({self.ngram_max})")
        if self.method == "draft" and self.draft is None:
            raise ValueError("speculative method 'draft' needs draft=<a compiled model, artifact or checkpoint>")
        if self.method != "draft" and self.draft is not None:
            raise ValueError(f"draft= is only used by method 'draft', not {self.method!r}")
        if self.method in HIDDEN_METHODS and self.heads is None:
            raise ValueError(f"speculative method {self.method!r} needs heads=<directory written by "
                             f"`llmc train-draft --method {self.method}`>")
        if self.method not in HIDDEN_METHODS and self.heads is not None:
            raise ValueError(f"heads= is only used by methods medusa and eagle, not {self.method!r}")
        if self.heads is not None and not isinstance(self.heads, str):
            raise ValueError(f"speculative heads must be a directory path (str), got {type(self.heads).__name__}")
        return self

    @property
    def needs_hidden(self) -> bool:
        return self.method in HIDDEN_METHODS

    def to_json(self) -> dict[str, Any]:
        """JSON form for graph meta / the artifact; a draft model object is written as "<object>" (export
        replaces it with the path of the draft artifact it writes next to the target)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["draft"] is not None and not isinstance(d["draft"], str):
            d["draft"] = "<object>"
        return d

    @classmethod
    def from_json(cls, data: Any) -> "Speculative":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known or "method" not in data:
            raise ValueError(f"bad speculative options {data!r}")
        return cls(**data).validate()
