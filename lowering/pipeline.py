"""The ordered pass pipeline built from CompileOptions, with optional IR dumps after each pass."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from lowering.ir import Graph, format_graph, verify
from lowering.passes import canonicalize, fuse_projections, insert_paged_kv

TARGETS = ("cpu", "cuda", "tpu")
GGUF_WEIGHTS = "gguf"  # compile_model(weights="gguf"): keep a GGUF checkpoint's quantized tensors as stored
DTYPES = ("float32", "bfloat16", "float16")


class OptionsError(ValueError):
    """CompileOptions asked for something unknown or contradictory."""


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"
    block_size: int = 16
    dtype: str = "float32"
    kv_cache_dtype: str | None = None  # None: the activation dtype
    fuse_projections: bool = True
    max_model_len: int | None = None
    # quantization (lowering/quant): weight format or {pattern: format}, KV format, rotation, method, guard
    weights: Any = None
    kv_cache: str | None = None
    kv_rotation: bool = False
    kv_rounding: str = "nearest"  # nvfp4 K: "nearest" | "score" (error feedback, formats.quantize_nvfp4_feedback)
    quant_method: str = "auto"
    max_ppl_increase: float | None = 0.01
    # speculative decoding (lowering/passes/insert_speculation.py): Speculative.to_json(), or None
    speculative: dict | None = None
    # cross-layer KV sharing (lowering/passes/share_kv_layers.py): None | "auto" | n pairs | [[i, i + 1], ...]
    share_kv_layers: Any = None
    # KV eviction (lowering/kv_policy.py, lowering/passes/evict_kv.py): H2O / StreamingLLM .to_json(), or None
    kv_policy: dict | None = None
    # tensor parallelism (lowering/passes/shard_tensor_parallel.py): ranks the graph is split over; 1 = off
    tensor_parallel: int = 1

    def validate(self) -> "CompileOptions":
        if self.target not in TARGETS:
            raise OptionsError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or not 1 <= self.block_size <= 1024:
            raise OptionsError(f"block_size must be an integer in [1, 1024], got {self.block_size!r}")
        if self.dtype not in DTYPES:
            raise OptionsError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in (None, *DTYPES):
            raise OptionsError(f"kv_cache_dtype must be None or one of {', '.join(DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 1):
            raise OptionsError(f"max_model_len must be a positive integer, got {self.max_model_len!r}")
        if self.weights == GGUF_WEIGHTS and self.target not in ("cpu", "tpu"):
            raise OptionsError(f"weights='gguf' (keep a GGUF file's Q4_1/Q8_0 blocks) runs on the cpu and tpu targets' "
                               f"kernels; for target {self.target!r} quantize with weights='int4' | 'int8' | 'nvfp4' | "
                               "'fp8' instead")
        try:
            self.quant_options().validate()
            self.speculation()
            self.kv_sharing()
            from lowering.kv_policy import policy_from_json

            policy_from_json(self.kv_policy)
        except ValueError as e:
            raise OptionsError(str(e)) from None
        self._check_tensor_parallel()
        return self

    def _check_tensor_parallel(self) -> None:
        tp = self.tensor_parallel
        if isinstance(tp, bool) or not isinstance(tp, int) or not 1 <= tp <= 64:
            raise OptionsError(f"tensor_parallel must be an integer in [1, 64], got {tp!r}")
        if tp == 1:
            return
        quant = self.quant_options()
        refused = [(self.weights == GGUF_WEIGHTS or quant.active,
                    f"quantization (weights={self.weights!r}, kv_cache={self.kv_cache!r}, "
                    f"kv_rotation={self.kv_rotation})"),
                   (self.share_kv_layers not in (None, 0, []), "share_kv_layers"),
                   (self.kv_policy is not None, "kv_policy"),
                   (self.speculative is not None and self.speculative.get("method") != "ngram",
                    f"speculative method {(self.speculative or {}).get('method')!r} (n-gram speculation works)")]
        for bad, what in refused:
            if bad:
                raise OptionsError(f"tensor_parallel={tp} shards unquantized dense models in this build; it cannot be "
                                   f"combined with {what}")

    def kv_sharing(self):
        """The share_kv_layers option normalized (None when off); ValueError when it is malformed or asks to share
        a quantized KV cache."""
        from lowering.passes.share_kv_layers import check_option
        from lowering.quant import formats
        from lowering.quant.passes import UNQUANTIZED, normalize_format

        value = check_option(self.share_kv_layers)
        kv_quantized = normalize_format(self.kv_cache, what="kv_cache", allowed=formats.KV_FORMATS) != UNQUANTIZED
        if value is not None and value != 0 and value != [] and kv_quantized:
            raise ValueError(f"share_kv_layers merges unquantized KV only; it cannot be combined with "
                             f"kv_cache={self.kv_cache!r}")
        return None if value == 0 or value == [] else value

    def speculation(self):
        """The Speculative these options ask for (a draft model object shows as "<object>"), or None."""
        if self.speculative is None:
            return None
        from lowering.speculation import Speculative

        return Speculative.from_json(dict(self.speculative))

    def quant_options(self, **extra):
        from lowering.quant.passes import QuantOptions

        weights = None if self.weights == GGUF_WEIGHTS else self.weights  # kept as loaded, not quantized
        return QuantOptions(weights=weights, kv_cache=self.kv_cache, kv_rotation=self.kv_rotation,
                            kv_rounding=self.kv_rounding, method=self.quant_method,
                            max_ppl_increase=self.max_ppl_increase, **extra)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CompileOptions":
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise OptionsError(f"bad compile options {data!r}")
        return cls(**data)


Pass = Callable[[Graph], Graph]


def build_pipeline(options: CompileOptions) -> list[tuple[str, Pass]]:
    """The passes, in order, for these options."""
    pipeline: list[tuple[str, Pass]] = [
        # phase 1: clean up what tracing produced
        ("canonicalize", canonicalize),
    ]
    # phase 2: fusions that change params (derived weights)
    if options.fuse_projections:
        pipeline.append(("fuse_projections", fuse_projections))
    # phase 3: memory: the paged KV cache and the step contract
    pipeline.append(("insert_paged_kv", lambda g: insert_paged_kv(g, block_size=options.block_size,
                                                                  kv_dtype=options.kv_cache_dtype)))
    pipeline.append(("canonicalize", canonicalize))
    return pipeline


@dataclasses.dataclass
class PassRecord:
    name: str
    seconds: float
    num_nodes: int


def dump_ir(dump_dir: str | os.PathLike | None, index: int, name: str, graph: Graph) -> None:
    """Write the IR as `<index>_<name>.txt` under `dump_dir` (or $LLMC_DUMP_IR); nothing when neither is set."""
    dump_dir = dump_dir or os.environ.get("LLMC_DUMP_IR")
    if dump_dir:
        Path(dump_dir).mkdir(parents=True, exist_ok=True)
        (Path(dump_dir) / f"{index:02d}_{name}.txt").write_text(format_graph(graph) + "\n")


def run_pipeline(graph: Graph, options: CompileOptions, *, verbose: bool = False, progress: bool = False,
                 dump_dir: str | os.PathLike | None = None) -> tuple[Graph, list[PassRecord]]:
    """Run every pass, verifying between them; `dump_dir` (or $LLMC_DUMP_IR) gets the IR after each."""
    dump_ir(dump_dir, 0, "traced", graph)
    records = []
    passes = build_pipeline(options)
    bar = None
    if progress and not verbose:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(passes), desc="compile", unit="pass", leave=False)
    for i, (name, fn) in enumerate(passes, start=1):
        start = time.perf_counter()
        graph = fn(graph)
        verify(graph)
        records.append(PassRecord(name, time.perf_counter() - start, len(graph.nodes)))
        if verbose:
            print(f"llmc:   pass {i:2d} {name:<18s} {records[-1].seconds * 1e3:8.1f} ms  {len(graph.nodes):5d} nodes",
                  file=sys.stderr)
        dump_ir(dump_dir, i, name, graph)
        if bar is not None:
            bar.set_postfix_str(name)
            bar.update()
    if bar is not None:
        bar.close()
    verify(graph, check_types=True)
    return graph, records
