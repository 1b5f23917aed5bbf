"""compile_model: checkpoint or Flax model -> traced graph -> passes -> CompiledModel (exportable)."""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowering.ir import Graph
from lowering.models.config import ModelConfig
from lowering.params import DERIVED_KEY, finalize_params
from lowering.pipeline import GGUF_WEIGHTS, CompileOptions, OptionsError, PassRecord, run_pipeline
from lowering.pipeline import dump_ir as dump_graph  # (compile_model's dump_ir argument names the directory)
from lowering.program_source import ProgramSource


@dataclasses.dataclass
class CompiledModel(ProgramSource):
    """A compiled graph with its params, ready to build a Program or to export as an artifact."""

    graph: Graph
    params: dict[str, np.ndarray]
    options: CompileOptions
    config: ModelConfig | None = None
    tokenizer: Any = None
    pass_records: list[PassRecord] = dataclasses.field(default_factory=list)
    quant_report: Any = None  # lowering.quant.guard.QuantReport when quantization ran
    speculative: Any = None  # lowering.passes.Speculative (with the draft model object, if any)

    def export(self, path: str | os.PathLike) -> Path:
        """Write manifest.json, graph.json, params/ (orbax) and tokenizer/ to `path`."""
        from lowering.export import export_artifact

        return export_artifact(self, Path(path))


def compile_model(source: Any, *, target: str = "cpu", block_size: int | None = None, dtype: str | None = None,
                  kv_cache_dtype: str | None = None, fuse_projections: bool = True,
                  max_model_len: int | None = None, tokenizer: Any = None, config: ModelConfig | None = None,
                  weights: Any = None, kv_cache: str | None = None, kv_rotation: bool = False,
                  kv_rounding: str = "nearest", quant_method: str = "auto", max_ppl_increase: float | None = 0.01,
                  calibration: Any = None,
                  calibration_windows: int = 8, calibration_window: int = 128, speculative: Any = None,
                  kv_policy: Any = None, share_kv_layers: Any = None, num_layers: int | None = None,
                  tensor_parallel: int = 1, verbose: bool = False, progress: bool = True, dump_ir: str | None = None) -> CompiledModel:
    """Compile a registry name, checkpoint path (GGUF file, HF or orbax dir) or Flax NNX model.

    A Flax model must be called as model(token_ids i32[T], positions i32[T], query_start i32[S+1],
    logit_rows i32[L]) -> f32[L, V] and use lowering.ops.causal_attention for attention.

    `block_size` (tokens per KV page) defaults to 16; for target="tpu" on a TPU, to
    kernels_pallas.tuning.RECOMMENDED_PAGE_SIZE of its generation (16 off-TPU).
    `weights="gguf"` (GGUF sources; cpu and tpu targets) keeps the file's Q4_1 / Q8_0 tensors as stored and
    multiplies them with a native kernel: the same weight values in 5 / 8.5 bits instead of 32.
    Quantization (lowering/quant): `weights` "int8" | "fp8" (W8A8) | "int4" | "nvfp4", or {glob: format}
    over linear names (later patterns win; "lm_head" is the logits weight; None keeps the model dtype);
    `kv_cache` "fp8" | "nvfp4"; `kv_rotation` Hadamard-rotates K/V head dims first; `kv_rounding` (nvfp4 K)
    "nearest" codes each value on its own, "score" rounds each key to minimize the calibration queries' score
    error (GPTQ-style error feedback: about half the divergence from the unquantized model, at a slower,
    element-by-element KV write); `quant_method` "auto"
    (GPTQ for int4/nvfp4/fp8, RTN for int8) | "rtn" | "gptq". The accuracy guard keeps the most sensitive units
    in the model dtype until perplexity on `calibration` (None: llmc's bundled text; a str, path or token
    windows) rises by at most `max_ppl_increase` (relative; None turns the guard off). The plan and the
    measured deltas are printed and stored in `quant_report` (and the artifact manifest).
    `speculative=Speculative(method="ngram" | "draft" | "medusa" | "eagle", num_tokens=k, ...)` (from
    lowering.passes) runs insert_speculation last: the Engine then drafts and verifies up to k tokens a step
    (runtime/speculative.py); a dict of Speculative's fields works too.
    `kv_policy=H2O(budget=0.2) | StreamingLLM(sinks=4, window=1024)` (lowering.kv_policy) bounds each sequence's
    KV cache: the runtime compacts it past its budget, whole blocks return to the pool (evict_kv checks the
    combination with KV formats, sharing and speculation, and refuses what cannot work, saying why).
    `share_kv_layers` (lowering/passes/share_kv_layers.py; unquantized, full-attention KV): adjacent layers i, i+1
    keep one merged K/V pool pair. [[i, i + 1], ...] shares those pairs; n the n pairs of the deeper half whose K/V
    are most similar on the calibration windows; "auto" as many of those as keep the perplexity increase within
    `max_ppl_increase`. The choice, similarities and measured perplexity go to graph.meta["kv_sharing"].
    `num_layers=N` (checkpoint sources) keeps the first N decoder layers and the model's own final norm and
    lm_head: a layer-truncated copy of a model, e.g. a draft model for speculative decoding.
    `tensor_parallel=N` runs shard_tensor_parallel last: the graph is each of N ranks' share of the model
    (Megatron-style; lowering/passes/shard_tensor_parallel.py) and params stay whole, each rank's piece cut when
    a Program is built: target "cuda" starts one process per GPU (NCCL), "cpu" / "tpu" run over a JAX device mesh.
    """
    from lowering.speculation import Speculative

    if isinstance(speculative, dict):
        try:
            speculative = Speculative(**speculative)
        except TypeError as e:
            raise OptionsError(f"bad speculative options: {e}") from None
    if speculative is not None and not isinstance(speculative, Speculative):
        raise OptionsError(f"speculative must be a lowering.passes.Speculative, a dict or None, "
                           f"got {type(speculative).__name__}")
    if speculative is not None:
        try:
            speculative.validate()
        except ValueError as e:
            raise OptionsError(str(e)) from None
    from flax import nnx

    model_dtype = None  # a Flax model given without dtype keeps its own parameter dtype
    if dtype is None:
        if isinstance(source, nnx.Module):
            model_dtype = _float_param_dtype(source)
        dtype = model_dtype or ("float32" if target == "cpu" else "bfloat16")
    if block_size is None:  # KV page size: 16, or on a TPU the page the roofline model prefers for its generation
        block_size = 16
        if target == "tpu":
            from kernels_pallas.tuning import recommended_page_size

            block_size = recommended_page_size()
    options = CompileOptions(target=target, block_size=block_size, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                             fuse_projections=fuse_projections, max_model_len=max_model_len, weights=weights,
                             kv_cache=kv_cache, kv_rotation=kv_rotation, kv_rounding=kv_rounding,
                             quant_method=quant_method,
                             max_ppl_increase=max_ppl_increase,
                             speculative=speculative.to_json() if speculative is not None else None,
                             kv_policy=_policy_json(kv_policy),
                             share_kv_layers=_share_kv_option(share_kv_layers),
                             tensor_parallel=tensor_parallel).validate()

    from lowering import frontend
    from lowering.models import llama, nnx_params

    start = time.perf_counter()
    if isinstance(source, nnx.Module):
        model = source
        cfg = config if config is not None else getattr(source, "config", None)
        if not isinstance(cfg, ModelConfig):
            cfg = None
    elif isinstance(source, (str, os.PathLike)):
        from lowering.checkpoints import load_checkpoint

        ckpt = load_checkpoint(source, progress=progress, keep_native=options.weights == GGUF_WEIGHTS)
        cfg = ckpt.config
        if num_layers is not None:
            ckpt, cfg = _truncate_layers(ckpt, num_layers)
        tokenizer = tokenizer if tokenizer is not None else ckpt.tokenizer
        model = llama.build_model(cfg, ckpt.weights, dtype=jnp.dtype(dtype))
    else:
        raise OptionsError(f"cannot compile a {type(source).__name__}: pass a registry name, a checkpoint path "
                           "or a Flax NNX model")
    if num_layers is not None and isinstance(source, nnx.Module):
        raise OptionsError("num_layers= truncates a checkpoint; build the Flax model with fewer layers instead")
    if options.max_model_len and cfg and options.max_model_len > cfg.max_position_embeddings:
        raise OptionsError(f"max_model_len {options.max_model_len} exceeds the model's "
                           f"max_position_embeddings {cfg.max_position_embeddings}")
    if verbose:
        print(f"llmc: loaded model in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    fn, weights = nnx_params.forward_fn(model)
    if isinstance(source, nnx.Module) and model_dtype is None:  # an explicit dtype: cast the model's float params
        weights = jax.tree_util.tree_map(
            lambda w: w.astype(options.dtype) if jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating) else w, weights)
    trace_start = time.perf_counter()
    graph, values = frontend.trace(fn, weights)
    if verbose:
        print(f"llmc: traced {len(graph.nodes)} nodes in {(time.perf_counter() - trace_start) * 1e3:.0f} ms",
              file=sys.stderr)
    graph, records = run_pipeline(graph, options, verbose=verbose, progress=progress, dump_dir=dump_ir)
    derived = dict(graph.meta.get(DERIVED_KEY, {}))
    graph, params = finalize_params(graph, {k: np.asarray(v) for k, v in values.items()})
    if options.weights == GGUF_WEIGHTS:
        from lowering.quant.native import keep_native_weights

        n_start = time.perf_counter()
        graph, params, kept = keep_native_weights(graph, params, ckpt.native if isinstance(source, (str, os.PathLike))
                                                  else {}, derived)
        records.append(PassRecord("keep_gguf_weights", time.perf_counter() - n_start, len(graph.nodes)))
        dump_graph(dump_ir, len(records), "keep_gguf_weights", graph)
        if verbose or progress:
            counts = {f: list(kept.values()).count(f) for f in sorted(set(kept.values()))}
            print(f"llmc: kept {len(kept)} weights as the GGUF file stores them "
                  f"({', '.join(f'{n} {f}' for f, n in counts.items())})", file=sys.stderr)
    report = None
    quant = options.quant_options(calibration=calibration, calibration_windows=calibration_windows,
                                  calibration_window=calibration_window)
    if quant.active:
        from lowering.ir import verify
        from lowering.quant.passes import quantize_model

        quiet = not (verbose or progress)
        q_start = time.perf_counter()
        graph, params, report = quantize_model(
            graph, params, quant, tokenizer=tokenizer, vocab_size=cfg.vocab_size if cfg else None,
            log=(lambda msg: None) if quiet else (lambda msg: print(f"llmc: {msg}", file=sys.stderr)))
        verify(graph, check_types=True)
        records.append(PassRecord("quantize", time.perf_counter() - q_start, len(graph.nodes)))
        dump_graph(dump_ir, len(records), "quantize", graph)
        if not quiet:
            print(report.format(), file=sys.stderr)
    if options.kv_sharing() is not None:  # after quantization (unquantized KV only), before eviction and speculation
        from lowering.ir import verify
        from lowering.passes.share_kv_layers import apply_share_kv_layers
        from lowering.quant import calibrate

        quiet = not (verbose or progress)
        k_start = time.perf_counter()
        sharing, windows, source_name = options.kv_sharing(), None, "none"
        if not isinstance(sharing, list):  # measured choices: the quantization passes' calibration windows
            vocab = cfg.vocab_size if cfg else int(graph.types[graph.outputs[0]].shape[-1])
            windows = calibrate.calibration_windows(calibration, tokenizer, window=calibration_window,
                                                    num_windows=calibration_windows, vocab_size=vocab)
            source_name = ("bundled text" if tokenizer is not None else "random tokens") if calibration is None \
                else ("user text" if isinstance(calibration, (str, Path)) else "user tokens")
        # similarity on every calibration window; perplexity ("auto") on the guard's share, as quantization measures it
        graph = apply_share_kv_layers(graph, params, sharing, windows=windows,
                                      ppl_windows=None if windows is None else windows[:quant.guard_windows],
                                      max_ppl_increase=options.max_ppl_increase, calibration_source=source_name,
                                      log=(lambda msg: None) if quiet else (lambda msg: print(f"llmc: {msg}",
                                                                                              file=sys.stderr)))
        verify(graph, check_types=True)
        records.append(PassRecord("share_kv_layers", time.perf_counter() - k_start, len(graph.nodes)))
        dump_graph(dump_ir, len(records), "share_kv_layers", graph)
    if options.kv_policy is not None:  # after quantization (it must see the KV formats), before speculation
        from lowering.ir import verify
        from lowering.passes.evict_kv import evict_kv

        e_start = time.perf_counter()
        graph = evict_kv(graph, options.kv_policy, speculative=options.speculative)
        verify(graph, check_types=True)
        records.append(PassRecord("evict_kv", time.perf_counter() - e_start, len(graph.nodes)))
        dump_graph(dump_ir, len(records), "evict_kv", graph)
    if speculative is not None:  # last (DESIGN.md's order): after quantization, whose runners read one output
        from lowering.ir import verify
        from lowering.passes.insert_speculation import insert_speculation

        s_start = time.perf_counter()
        graph = insert_speculation(graph, speculative)
        verify(graph, check_types=True)
        records.append(PassRecord("insert_speculation", time.perf_counter() - s_start, len(graph.nodes)))
        dump_graph(dump_ir, len(records), "insert_speculation", graph)
    if options.tensor_parallel > 1:  # last: every other pass sees the whole model
        from lowering.ir import verify
        from lowering.passes.shard_tensor_parallel import shard_tensor_parallel

        t_start = time.perf_counter()
        graph = shard_tensor_parallel(graph, options.tensor_parallel)
        verify(graph, check_types=True)
        records.append(PassRecord("shard_tensor_parallel", time.perf_counter() - t_start, len(graph.nodes)))
        dump_graph(dump_ir, len(records), "shard_tensor_parallel", graph)
    return CompiledModel(graph, params, options, cfg, tokenizer, records, report, speculative)


def _share_kv_option(value):
    """share_kv_layers= as CompileOptions stores it (pairs as lists of lists: the same after a JSON round trip)."""
    from lowering.passes.share_kv_layers import check_option

    try:
        return check_option(value)
    except ValueError as e:
        raise OptionsError(str(e)) from None


def _policy_json(policy) -> dict | None:
    """kv_policy= as CompileOptions stores it: an H2O / StreamingLLM (or its dict), validated."""
    from lowering.kv_policy import KVPolicyError, policy_from_json

    try:
        policy = policy_from_json(policy)
    except KVPolicyError as e:
        raise OptionsError(str(e)) from None
    return None if policy is None else policy.to_json()


def _truncate_layers(ckpt, num_layers: int):
    """The checkpoint with only its first num_layers decoder layers (weights and native blocks)."""
    import re

    total = ckpt.config.num_layers
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= total:
        raise OptionsError(f"num_layers must be an integer in [1, {total}] for this model, got {num_layers!r}")
    keep = lambda name: (m := re.match(r"model\.layers\.(\d+)\.", name)) is None or int(m.group(1)) < num_layers  # noqa: E731
    layer_types = ckpt.config.layer_types
    cfg = dataclasses.replace(ckpt.config, num_layers=num_layers,
                              layer_types=None if layer_types is None else layer_types[:num_layers])
    changes = {"config": cfg, "weights": {k: v for k, v in ckpt.weights.items() if keep(k)}}
    if getattr(ckpt, "native", None):
        changes["native"] = {k: v for k, v in ckpt.native.items() if keep(k)}
    return dataclasses.replace(ckpt, **changes), cfg


def _float_param_dtype(model) -> str | None:
    """The dtype most of a Flax model's floating-point parameters have (None when it has none)."""
    from lowering.models.nnx_params import flat_params

    counts: dict[str, int] = {}
    for value in flat_params(model).values():
        if jnp.issubdtype(value.dtype, jnp.floating):
            counts[jnp.dtype(value.dtype).name] = counts.get(jnp.dtype(value.dtype).name, 0) + int(value.size)
    return max(counts, key=counts.get) if counts else None
