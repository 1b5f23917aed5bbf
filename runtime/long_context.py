"""Long-context accuracy vs KV memory (`llmc eval --long`): perplexity over long windows and needle retrieval, for
each KV setting (the full cache, H2O, StreamingLLM with and without sinks, cross-layer sharing).

- `stream_nll`: one sequence streamed through a Program in chunks, logits for every token, the cache compacted
  under the program's eviction policy exactly as the serving engine does it (KVCacheManager.plan_compaction
  before a chunk would pass the capacity, chunks no longer than the capacity leaves room for). Reports the NLL
  of every token and the most KV blocks the sequence held.
- `long_perplexity`: `stream_nll` over non-overlapping windows of a text (8k tokens of tinyshakespeare).
- `needle_retrieval`: a sentence with a random five-digit number hidden at several depths of a long stretch of
  the same text; the prompt ends by asking for it; greedy decoding through the Engine must reproduce it.
- `sweep`: both, for a list of settings ("full", "h2o:0.2", "streaming:4:1024", "streaming:0:1024",
  "share:2", ...), each compiled from the same source, with KV bytes per sequence beside every number.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import numpy as np

from lowering.ir import kv_bytes_per_block
from runtime.block_pool import blocks_needed
from runtime.evaluate import token_nll
from runtime.kv_manager import KVCacheManager


class _Seq:
    """The request fields KVCacheManager and build_step_input read (one sequence, no sampling)."""

    def __init__(self, token_ids: Sequence[int]):
        self.request_id = "long-context"
        self.token_ids = list(token_ids)
        self.num_computed_tokens = 0
        self.num_evicted = 0
        self.num_preemptions = 0
        self.block_ids: list[int] = []
        self.block_ids_w: list[int] = []
        self.block_hashes: list[bytes] = []
        self.spec_token_ids: list[int] = []

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclasses.dataclass
class StreamResult:
    nll: np.ndarray  # f64[n - 1]: -log p(token i+1 | the cache after token i)
    peak_blocks: int  # the most KV blocks the sequence held
    kv_bytes: int  # peak_blocks * bytes per block (every state buffer with a block dim, all layers)
    num_compactions: int


def stream_nll(model, token_ids: Sequence[int], *, chunk: int = 512, program=None) -> StreamResult:
    """Score every token of one sequence streamed through `model`'s paged Program (see the module doc)."""
    from runtime.engine import ScheduledChunk, build_step_input

    n = len(token_ids)
    if n < 2:
        raise ValueError("stream_nll needs at least 2 tokens")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    bs = int(model.block_size)
    if program is None:
        program = model.make_program(num_blocks=blocks_needed(n, bs), max_num_seqs=1, max_model_len=n)
    kv = KVCacheManager.for_program(program, enable_prefix_caching=False)
    e = kv.eviction
    seq = _Seq(token_ids)
    nll = np.zeros(n - 1, np.float64)
    peak = compactions = 0
    two_groups = getattr(program, "num_blocks_w", None) is not None
    while seq.num_computed_tokens < n:
        take = min(chunk, n - seq.num_computed_tokens)
        if e is not None:
            if kv.needs_compaction(seq, take):
                program.compact_kv([kv.plan_compaction(seq)])
                compactions += 1
            take = min(take, e.capacity - kv.cache_len(seq))
        if not kv.allocate_for(seq, take):
            raise RuntimeError(f"the program's pool of {program.num_blocks} blocks cannot hold this sequence")
        peak = max(peak, kv.num_held_blocks(seq))
        start = seq.num_computed_tokens
        sc = ScheduledChunk(seq, start, take, num_evicted=seq.num_evicted)
        step, _ = build_step_input([sc], block_size=bs, max_blocks_per_seq=program.max_blocks_per_seq,
                                   two_groups=two_groups, cache_positions=e is not None and e.cache_positions)
        step.logit_rows = np.arange(take, dtype=np.int32)
        # few table widths for the whole stream (the jitted step compiles once per chunk size and width): the
        # capacity under eviction, else the context so far rounded up to 64 blocks
        need = step.block_tables.shape[1]
        width = min(program.max_blocks_per_seq, e.max_blocks(bs) if e is not None else -(-need // 64) * 64)
        tables = np.zeros((1, max(width, step.block_tables.shape[1])), np.int32)
        tables[:, : step.block_tables.shape[1]] = step.block_tables
        step.block_tables = tables
        logits = np.asarray(program.step(step))
        seq.num_computed_tokens += take
        stop = min(start + take, n - 1)  # the last token predicts nothing
        if stop > start:
            nll[start:stop] = token_nll(logits[: stop - start], np.asarray(token_ids[start + 1 : stop + 1]))
    kv.free(seq)
    return StreamResult(nll, peak, peak * kv_bytes_per_block(program.graph), compactions)


@dataclasses.dataclass
class LongPerplexity:
    ppl: float
    nll: float
    num_windows: int
    window: int
    kv_bytes: int  # the most KV bytes one window's sequence held
    seconds: float
    num_compactions: int


def long_perplexity(model, token_ids: Sequence[int], *, window: int = 8192, num_windows: int = 1,
                    chunk: int = 512) -> LongPerplexity:
    """Perplexity over the first num_windows non-overlapping windows of `window` tokens, each streamed alone."""
    if len(token_ids) < window * num_windows:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than {num_windows} windows of {window}")
    start = time.perf_counter()
    bs = int(model.block_size)
    program = model.make_program(num_blocks=blocks_needed(window, bs), max_num_seqs=1, max_model_len=window)
    results = [stream_nll(model, token_ids[i * window:(i + 1) * window], chunk=chunk, program=program)
               for i in range(num_windows)]
    nll = float(np.mean([r.nll.mean() for r in results]))
    return LongPerplexity(math.exp(nll), nll, num_windows, window, max(r.kv_bytes for r in results),
                          time.perf_counter() - start, sum(r.num_compactions for r in results))


NEEDLE = " The secret number is {code}. Remember it."
QUESTION = "\n\nQuestion: What is the secret number? Answer: The secret number is"


@dataclasses.dataclass
class NeedleResult:
    accuracy: float
    trials: list[dict]  # depth, code, answer, found
    context: int


def needle_retrieval(model, haystack_ids: Sequence[int], *, context: int = 4096,
                     depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0) -> NeedleResult:
    """Hide NEEDLE (a random five-digit number) at each depth of `context` tokens of haystack, ask QUESTION, decode
    greedily through the Engine, and count the answers that contain the number."""
    from runtime.engine import Engine
    from runtime.sampler import SamplingParams

    tok = model.tokenizer
    rng = np.random.default_rng(seed)
    question = tok.encode(QUESTION, add_special_tokens=False)
    trials = []
    engine = Engine(model, max_num_seqs=1, max_model_len=context + 16, max_num_batched_tokens=512)
    for depth in depths:
        code = str(int(rng.integers(10000, 100000)))
        needle = tok.encode(NEEDLE.format(code=code), add_special_tokens=False)
        body = context - len(needle) - len(question)
        at = int(depth * body)
        prompt = list(haystack_ids[:at]) + needle + list(haystack_ids[at:body]) + question
        out = engine.generate([prompt], SamplingParams(max_tokens=8, temperature=0.0))[0]
        trials.append({"depth": depth, "code": code, "answer": out.text.strip(), "found": code in out.text})
    return NeedleResult(float(np.mean([t["found"] for t in trials])), trials, context)


# ---------------------------------------------------------------------------------------------
# Settings and the sweep


def parse_setting(spec: str) -> dict[str, Any]:
    """compile_model keyword arguments of one KV setting:

    full | h2o:<budget>[:<recent>] | streaming:<sinks>:<window>[:original] | share:<pairs | auto>
    (budget: a fraction of the context, e.g. 0.2, or a token count; recent likewise a fraction of the budget)."""
    from lowering.kv_policy import H2O, StreamingLLM

    parts = spec.strip().split(":")
    kind, args = parts[0], parts[1:]
    try:
        if kind == "full" and not args:
            return {}
        if kind == "h2o" and 1 <= len(args) <= 2:
            num = lambda s: float(s) if "." in s else int(s)  # noqa: E731
            return {"kv_policy": H2O(budget=num(args[0]), **({"recent": num(args[1])} if len(args) > 1 else {}))}
        if kind == "streaming" and len(args) in (2, 3) and (len(args) == 2 or args[2] in ("original", "cache")):
            return {"kv_policy": StreamingLLM(sinks=int(args[0]), window=int(args[1]),
                                              positions=args[2] if len(args) == 3 else "cache")}
        if kind == "share" and len(args) == 1:
            return {"share_kv_layers": "auto" if args[0] == "auto" else int(args[0])}
    except ValueError:
        pass
    raise ValueError(f"bad KV setting {spec!r}: use full | h2o:<budget>[:<recent>] | streaming:<sinks>:<window>"
                     "[:original] | share:<pairs|auto>")


DEFAULT_SETTINGS = ("full", "h2o:0.2", "streaming:4:1024", "streaming:0:1024", "streaming:4:1024:original",
                    "share:1", "share:2", "share:4")


def sweep(source, text: str, *, settings: Sequence[str] = DEFAULT_SETTINGS, window: int = 8192,
          num_windows: int = 1, chunk: int = 512, needle_context: int = 4096,
          depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), compile_kw: dict | None = None, log=print) -> dict:
    """Every setting compiled from `source`: long perplexity and needle accuracy with the KV bytes they held."""
    from lowering import compile_model

    rows = []
    token_ids = None
    for spec in settings:
        kw = parse_setting(spec)
        t0 = time.perf_counter()
        model = compile_model(source, progress=False, max_model_len=max(window, needle_context + 16),
                              **(compile_kw or {}), **kw)
        if token_ids is None:
            token_ids = model.tokenizer.encode(text)
        ppl = long_perplexity(model, token_ids, window=window, num_windows=num_windows, chunk=chunk)
        row = {"setting": spec, "ppl": ppl.ppl, "kv_bytes": ppl.kv_bytes, "ppl_seconds": ppl.seconds,
               "compactions": ppl.num_compactions, "shared_pairs": model.graph.meta.get("kv_shared_layers")}
        if needle_context:
            needle = needle_retrieval(model, token_ids[window * num_windows:] or token_ids, context=needle_context,
                                      depths=depths)
            row.update(needle_accuracy=needle.accuracy, needle_trials=needle.trials)
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        log(format_row(row, rows[0]))
    return {"window": window, "num_windows": num_windows, "needle_context": needle_context, "rows": rows}


def format_row(row: dict, base: dict) -> str:
    d = row["ppl"] / base["ppl"] - 1
    needle = f"{row['needle_accuracy']:5.0%}" if "needle_accuracy" in row else "    -"
    return (f"{row['setting']:<28s} ppl {row['ppl']:8.3f} ({d:+7.2%})  KV/seq {row['kv_bytes'] / 2**20:7.2f} MiB "
            f"({row['kv_bytes'] / base['kv_bytes']:6.1%})  needle {needle}  {row['seconds']:6.0f} s")


def plot(result: dict, out_dir) -> list[str]:
    """PNG plots of perplexity and needle accuracy against KV bytes per sequence; returns their paths."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    paths = []
    for key, label in (("ppl", f"perplexity over {result['window']}-token windows"),
                       ("needle_accuracy", f"needle retrieval accuracy at {result['needle_context']} tokens")):
        have = [r for r in rows if key in r]  # (settings run without the needle test have no needle point)
        if not have:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for r in have:
            ax.scatter(r["kv_bytes"] / 2**20, r[key], s=36)
            ax.annotate(r["setting"], (r["kv_bytes"] / 2**20, r[key]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("KV cache per sequence (MiB)")
        ax.set_ylabel(label)
        if key == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"long_context_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths
