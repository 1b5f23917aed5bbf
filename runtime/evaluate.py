"""Accuracy and memory evaluation of a compiled model or a loaded artifact (`llmc eval`).

Three measurements, each deterministic, so two builds of one checkpoint (float32 vs a quantized
format, say) can be compared number for number:

- `perplexity`: fixed non-overlapping windows of a text, each run as one prefill through the
  model's own paged Program (the path serving uses), logits for every row, NLL in float64;
- `gsm8k_accuracy`: few-shot greedy generation through the `Engine` on GSM8K problems, exact
  match of the final number;
- `memory_report`: bytes of weights (per dtype) and of KV cache per token, from the params and
  the graph's state buffers (every state buffer counts, so quantized KV scale pools show up).

`evaluate` runs the ones asked for and `format_report` prints them as a small table.
"""
from __future__ import annotations

import dataclasses
import decimal
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lowering.ir import state_bytes_per_block
from runtime.step import mirror_kv_groups, mirror_pool_options, window_step

PPL_FILE = "tinyshakespeare.txt"
GSM8K_FILE = "gsm8k_train.jsonl"
GSM8K_STOP = ["\n\nQuestion:", "Question:"]


# ---------------------------------------------------------------------------------------------
# Data files


def default_data_dir() -> Path:
    """$LLMC_DATA if set, else `<repo root>/../shared/data` (repo root = the folder above `runtime/`)."""
    env = os.environ.get("LLMC_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_file(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The path of data file `name`; FileNotFoundError saying how to point llmc at it when missing."""
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(
            f"evaluation data file {name} not found at {path}; pass --data DIR (or set $LLMC_DATA) to a "
            f"folder that holds {name}"
        )
    return path


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _tokenizer_of(model):
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer, so text cannot be evaluated; compile it from a checkpoint "
                         "that carries one (or pass tokenizer= to compile_model)")
    return tok


# ---------------------------------------------------------------------------------------------
# Perplexity


@dataclasses.dataclass
class PerplexityResult:
    ppl: float  # exp(nll)
    nll: float  # mean negative log-likelihood (nats) per predicted token
    num_tokens: int  # predicted tokens: num_windows * (window - 1)
    num_windows: int
    window: int
    window_nll: list[float]  # mean NLL of each window, in order

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def perplexity_windows(token_ids: Sequence[int], *, window: int, num_windows: int) -> np.ndarray:
    """i32[W, window]: the first `num_windows` non-overlapping windows from token 0 (fewer if the text is short)."""
    window = _check_int("window", window, 2)
    num_windows = _check_int("num_windows", num_windows, 1)
    ids = np.asarray(token_ids, dtype=np.int32)
    available = ids.shape[0] // window
    if available == 0:
        raise ValueError(f"the text has {ids.shape[0]} tokens, fewer than one window of {window}; "
                         "use a longer text or a smaller window")
    n = min(num_windows, available)
    return ids[: n * window].reshape(n, window)


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """f64[n]: -log softmax(logits[i])[targets[i]], computed in float64."""
    x = np.asarray(logits, dtype=np.float64)  # f64[n, V]
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return lse - x[np.arange(x.shape[0]), targets]


def perplexity(model, text: str, *, window: int = 256, num_windows: int = 16, batch_windows: int = 4,
               program=None) -> PerplexityResult:
    """Perplexity of `model` on the first `num_windows` non-overlapping `window`-token windows of `text`.

    The text is tokenized once with `model.tokenizer.encode(text)` (the tokenizer's default special
    tokens: a BOS only if the tokenizer itself adds one; SmolLM2's adds none), and windows start at
    token 0. Every window is scored on its own: token i+1 given tokens 0..i of the window, so each
    window predicts window-1 tokens. `batch_windows` windows run as one prefill step, each in its own
    KV blocks; ppl = exp(sum of NLL / number of predicted tokens). A text with fewer windows than
    asked uses the ones it has (`num_windows` of the result says how many).

    `program`: a Program of `model` to run on (its pool is overwritten); by default one is built just
    big enough for `batch_windows` windows.
    """
    window = _check_int("window", window, 2)
    num_windows = _check_int("num_windows", num_windows, 1)
    batch_windows = _check_int("batch_windows", batch_windows, 1)
    if not isinstance(text, str) or not text:
        raise ValueError("perplexity needs a non-empty text")
    tok = _tokenizer_of(model)
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and window > max_positions:
        raise ValueError(f"window={window} exceeds the model's max_position_embeddings={max_positions}")

    windows = perplexity_windows(tok.encode(text), window=window, num_windows=num_windows)
    n = windows.shape[0]
    batch = min(batch_windows, n)
    block_size = int(model.block_size)
    blocks_per_window = -(-window // block_size)
    if program is None:
        program = model.make_program(num_blocks=batch * blocks_per_window, max_num_seqs=batch + 1,
                                     max_model_len=blocks_per_window * block_size,
                                     **mirror_pool_options(model.graph, batch * blocks_per_window))
    else:
        if int(program.block_size) != block_size:
            raise ValueError(f"program has block_size {program.block_size} but the model {block_size}")
        if program.max_blocks_per_seq < blocks_per_window:
            raise ValueError(f"program allows {program.max_blocks_per_seq * block_size} tokens per sequence, "
                             f"fewer than window={window}")
        batch = min(batch, program.num_blocks // blocks_per_window)
        if batch < 1:
            raise ValueError(f"program's pool of {program.num_blocks} blocks cannot hold one window of {window}")

    window_nll = []
    for first in range(0, n, batch):
        chunk = windows[first : first + batch]  # i32[b, window]
        step = mirror_kv_groups(window_step(chunk, block_size=block_size), program)
        logits = np.asarray(program.step(step))  # f32[b*window, V]
        if logits.shape[0] != chunk.size:
            raise RuntimeError(f"Program.step returned {logits.shape[0]} logit rows, expected {chunk.size}")
        for s in range(chunk.shape[0]):
            rows = logits[s * window : (s + 1) * window - 1]  # predictions for tokens 1..window-1
            window_nll.append(float(token_nll(rows, chunk[s, 1:]).mean()))
    num_tokens = n * (window - 1)
    nll = float(np.mean(window_nll))  # every window predicts the same number of tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, num_tokens=num_tokens, num_windows=n, window=window,
                            window_nll=window_nll)


# ---------------------------------------------------------------------------------------------
# GSM8K


@dataclasses.dataclass
class Gsm8kRecord:
    id: int  # record index in the jsonl file (0-based)
    question: str
    predicted: str | None  # normalised number, None if the completion has none
    reference: str
    correct: bool
    completion: str


@dataclasses.dataclass
class Gsm8kResult:
    accuracy: float
    correct: int
    total: int
    shots: int
    records: list[Gsm8kRecord]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_CALCULATOR = re.compile(r"<<[^>]*>>")
_NUMBER = re.compile(r"-?\$?\s?-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def normalize_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '-7.' -> '-7', '3.0' -> '3'; None if `s` is not a number."""
    t = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if t.startswith("--"):
        t = t[2:]
    try:
        d = decimal.Decimal(t)
    except decimal.InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    if d == 0:
        return "0"
    out = format(d, "f")
    return out


def extract_answer(completion: str) -> str | None:
    """The normalised number after '####' if there is one, else the last number in the text, else None."""
    head, sep, tail = completion.partition("####")
    if sep:
        m = _NUMBER.search(tail)
        if m is not None:
            return normalize_number(m.group(0))
    found = _NUMBER.findall(completion)
    for candidate in reversed(found):
        value = normalize_number(candidate)
        if value is not None:
            return value
    return None


def reference_answer(answer: str) -> str:
    """The normalised number after '####' of a GSM8K reference answer (ValueError if there is none)."""
    _, sep, tail = answer.rpartition("####")
    value = normalize_number(tail) if sep else None
    if value is None:
        raise ValueError(f"GSM8K answer does not end in '#### <number>': {answer[-60:]!r}")
    return value


def strip_calculator(answer: str) -> str:
    """Remove GSM8K's '<<48/2=24>>' calculator annotations."""
    return _CALCULATOR.sub("", answer)


def load_gsm8k(path: str | os.PathLike) -> list[dict]:
    """Records {"question", "answer"} of a jsonl file, in file order (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file not found: {path}; pass --data DIR (or set $LLMC_DATA) to a folder "
                                f"that holds {GSM8K_FILE}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if (not isinstance(rec, dict) or not isinstance(rec.get("question"), str)
                    or not isinstance(rec.get("answer"), str)):
                raise ValueError(f"{path}:{lineno}: expected an object with string 'question' and 'answer'")
            records.append({"question": rec["question"], "answer": rec["answer"]})
    return records


def gsm8k_prompt(question: str, exemplars: Sequence[dict]) -> str:
    """Plain-text few-shot prompt: 'Question: q\\nAnswer: a\\n\\n' per exemplar, then 'Question: q\\nAnswer:'."""
    shots = "".join(f"Question: {ex['question']}\nAnswer: {strip_calculator(ex['answer'])}\n\n" for ex in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


def gsm8k_accuracy(model, path: str | os.PathLike, *, num_problems: int = 32, shots: int = 4,
                   max_tokens: int = 256, batch: int = 16) -> Gsm8kResult:
    """Exact-match accuracy of greedy few-shot answers on GSM8K problems.

    Records 0..shots-1 of `path` are the exemplars, the next `num_problems` records the problems.
    Generation runs through `runtime.Engine` (temperature 0, stop at 'Question:'), `batch` requests
    at a time; the prediction is the number after '####', else the last number of the completion.
    """
    from runtime.block_pool import blocks_needed
    from runtime.engine import Engine
    from runtime.sampler import SamplingParams

    num_problems = _check_int("num_problems", num_problems, 1)
    shots = _check_int("shots", shots, 0)
    max_tokens = _check_int("max_tokens", max_tokens, 1)
    batch = _check_int("batch", batch, 1)
    tok = _tokenizer_of(model)
    records = load_gsm8k(path)
    if len(records) < shots + num_problems:
        raise ValueError(f"{path} has {len(records)} records, fewer than shots + num_problems = "
                         f"{shots + num_problems}")
    exemplars = records[:shots]
    problems = records[shots : shots + num_problems]
    references = [reference_answer(p["answer"]) for p in problems]
    prompts = [gsm8k_prompt(p["question"], exemplars) for p in problems]

    longest = max(len(tok.encode(p)) for p in prompts)
    limit = getattr(model, "max_model_len", None)
    max_model_len = longest + max_tokens
    if limit is not None:
        if longest >= limit:
            raise ValueError(f"the longest GSM8K prompt has {longest} tokens, which leaves no room to generate within "
                             f"the model's max_model_len={limit}; use fewer shots")
        max_model_len = min(max_model_len, limit)
    batch = min(batch, num_problems)
    engine = Engine(model, max_num_seqs=batch, max_model_len=max_model_len,
                    num_blocks=batch * blocks_needed(max_model_len, int(model.block_size)))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=list(GSM8K_STOP))
    outputs = engine.generate(prompts, params)

    out_records = []
    for i, (prob, ref, out) in enumerate(zip(problems, references, outputs)):
        predicted = extract_answer(out.text)
        out_records.append(Gsm8kRecord(id=shots + i, question=prob["question"], predicted=predicted, reference=ref,
                                       correct=predicted is not None and predicted == ref, completion=out.text))
    correct = sum(r.correct for r in out_records)
    return Gsm8kResult(accuracy=correct / len(out_records), correct=correct, total=len(out_records), shots=shots,
                       records=out_records)


# ---------------------------------------------------------------------------------------------
# Memory


def memory_report(model, program=None) -> dict:
    """Weight bytes (total and per dtype), KV bytes per block and per token, and the program's pool if given.

    KV bytes count every state buffer of the graph (K and V pools, and any scale pools a quantized
    KV format adds): sum over buffers of prod(shape[1:]) * itemsize per block, / block_size per token.
    """
    weight_bytes = 0
    by_dtype: dict[str, int] = {}
    num_params = 0
    for value in model.params.values():
        nbytes = int(value.nbytes) if hasattr(value, "nbytes") else int(np.asarray(value).nbytes)
        dtype = str(value.dtype)
        weight_bytes += nbytes
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
        num_params += int(np.prod(value.shape))
    graph = model.graph
    block_size = int(model.block_size)
    per_state = state_bytes_per_block(graph)
    kv_per_block = sum(per_state.values())
    kv_by_dtype: dict[str, int] = {}
    for name, nbytes in per_state.items():
        dtype = graph.types[name].dtype
        kv_by_dtype[dtype] = kv_by_dtype.get(dtype, 0) + nbytes
    per_token = kv_per_block / block_size
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_layers", None)
    if num_layers is None:
        num_layers = graph.meta.get("num_kv_layers")
    report = {
        "weight_bytes": weight_bytes,
        "weight_bytes_by_dtype": dict(sorted(by_dtype.items())),
        "num_params": num_params,
        "kv_bytes_per_block": kv_per_block,
        "kv_bytes_per_token": int(per_token) if per_token == int(per_token) else per_token,
        "kv_bytes_per_block_by_dtype": dict(sorted(kv_by_dtype.items())),
        "num_kv_buffers": len(graph.state),
        "block_size": block_size,
        "num_layers": num_layers,
        "kv_shared_layers": list(graph.meta.get("kv_shared_layers") or []),  # share_kv_layers: [[i, i + 1], ...]
    }
    if program is not None:
        report["kv_cache_bytes"] = int(program.kv_cache_bytes())
        report["num_blocks"] = int(program.num_blocks)
    return report


# ---------------------------------------------------------------------------------------------
# All together


def evaluate(model, *, ppl_text_path: str | os.PathLike | None = None, gsm8k_path: str | os.PathLike | None = None,
             ppl_window: int = 256, ppl_num_windows: int = 16, ppl_batch_windows: int = 4,
             gsm8k_problems: int = 32, gsm8k_shots: int = 4, max_tokens: int = 256, gsm8k_batch: int = 16) -> dict:
    """memory_report always; perplexity if `ppl_text_path`, GSM8K if `gsm8k_path`; JSON-able, with seconds."""
    result: dict[str, Any] = {"memory": memory_report(model), "seconds": {}}
    if ppl_text_path is not None:
        path = Path(ppl_text_path)
        if not path.is_file():
            raise FileNotFoundError(f"perplexity text not found: {path}; pass --data DIR (or set $LLMC_DATA) to a "
                                    f"folder that holds {PPL_FILE}")
        text = path.read_text(encoding="utf-8")
        start = time.perf_counter()
        ppl = perplexity(model, text, window=ppl_window, num_windows=ppl_num_windows,
                         batch_windows=ppl_batch_windows)
        result["seconds"]["ppl"] = time.perf_counter() - start
        result["ppl"] = {**ppl.to_json(), "path": str(path)}
    if gsm8k_path is not None:
        start = time.perf_counter()
        gsm = gsm8k_accuracy(model, gsm8k_path, num_problems=gsm8k_problems, shots=gsm8k_shots,
                             max_tokens=max_tokens, batch=gsm8k_batch)
        result["seconds"]["gsm8k"] = time.perf_counter() - start
        result["gsm8k"] = {**gsm.to_json(), "path": str(gsm8k_path)}
    return result


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def format_report(result: dict) -> str:
    """A short aligned table of an `evaluate` result."""
    rows: list[tuple[str, str, str]] = []
    mem = result.get("memory")
    if mem:
        dtypes = ", ".join(f"{k} {_bytes(v)}" for k, v in mem["weight_bytes_by_dtype"].items())
        rows.append(("weights", _bytes(mem["weight_bytes"]), dtypes))
        shared = mem.get("kv_shared_layers") or []
        rows.append(("kv cache / token", _bytes(mem["kv_bytes_per_token"]),
                     f"{mem['num_kv_buffers']} buffers, {mem['num_layers']} layers"
                     + (f", shared {' '.join(f'{i}+{j}' for i, j in shared)}" if shared else "")))
    seconds = result.get("seconds", {})
    if "ppl" in result:
        p = result["ppl"]
        rows.append(("perplexity", f"{p['ppl']:.4f}",
                     f"{p['num_windows']} x {p['window']} tokens, {p['num_tokens']} predicted, "
                     f"{seconds.get('ppl', 0):.1f} s"))
    if "gsm8k" in result:
        g = result["gsm8k"]
        rows.append(("gsm8k accuracy", f"{g['accuracy']:.4f}",
                     f"{g['correct']}/{g['total']}, {g['shots']}-shot, {seconds.get('gsm8k', 0):.1f} s"))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)
