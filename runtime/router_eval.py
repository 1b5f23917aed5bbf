"""Evaluation of routing policies as RouteLLM (Ong et al. 2024) does it (`llmc eval-router`).

A labeled multiple-choice task is scored by a weak and a strong model (log-likelihood of each choice
given the context, through each model's own paged Program); q_weak[i], q_strong[i] = 1 when the
model's best choice is the right one. Every policy gives each held-out item a score (higher = send it
to the strong model); sweeping a threshold over the scores traces quality against the share of items
sent to the strong model:

    PGR(share) = (quality(share) - mean(q_weak)) / (mean(q_strong) - mean(q_weak))
    APGR       = integral of PGR over share in [0, 1]     (random routing: 0.5)
    CPT(x)     = the smallest share of strong calls with PGR >= x

Items with equal scores are routed together: between two distinct thresholds the curve is the straight
line that random tie-breaking gives on average, so a policy with one score for everything is exactly
the random line. Where the gap between the models is small, APGR (a ratio over that gap) is noisy;
the gain over random, integral of (quality - random line) over share = (APGR - 0.5) * gap, is not, and
comes with a bootstrap standard deviation too. The cost of an item for a model is its tokens times the
model's measured seconds per token over the scoring run itself (runtime.router.measure_cost's prefill and
decode figures are reported beside it); a cascade always pays the weak model and pays the strong one for
the items it escalates.

Tasks (built from ../shared/data, deterministic for a seed):
  shakespeare  a few lines of a play; the true next line against distractor lines of similar length
               from elsewhere in the plays;
  gsm8k        a GSM8K problem with its worked solution up to (not including) the last step; the final
               answer against numbers from the problem and perturbations of the answer.
"""
from __future__ import annotations

import dataclasses
import decimal
import hashlib
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from runtime import evaluate as ev
from runtime.step import StepInput, mirror_kv_groups, mirror_pool_options

TASKS = ("shakespeare", "gsm8k")
NUM_CHOICES = 4
CPT_LEVELS = (0.5, 0.8)
CLASS_WEIGHTS = ("balanced", "none")
WEAK, STRONG = "weak", "strong"

_SPEAKER = re.compile(r"^[A-Z][A-Za-z' ,.&-]*:$")
_DIGITS = re.compile(r"\d[\d,]*(?:\.\d+)?")


# ---------------------------------------------------------------------------------------------
# Tasks


@dataclasses.dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice item: the context (the prompt a router sees) and its continuations."""

    id: str  # "<task>:<where in the data file>"
    context: str
    choices: tuple[str, ...]
    answer: int  # index of the right choice

    def to_json(self) -> dict:
        return {"id": self.id, "context": self.context, "choices": list(self.choices), "answer": self.answer}


def build_task(task: str, num_items: int, *, seed: int = 0, data_dir: str | os.PathLike | None = None,
               num_choices: int = NUM_CHOICES) -> list[ChoiceItem]:
    """`num_items` items of `task` (one of TASKS) from the data folder, the same ones for the same seed."""
    num_items = ev._check_int("num_items", num_items, 1)
    num_choices = ev._check_int("num_choices", num_choices, 2)
    if task == "shakespeare":
        text = ev.data_file(ev.PPL_FILE, data_dir).read_text(encoding="utf-8")
        return shakespeare_items(text, num_items, seed=seed, num_choices=num_choices)
    if task == "gsm8k":
        records = ev.load_gsm8k(ev.data_file(ev.GSM8K_FILE, data_dir))
        return gsm8k_items(records, num_items, seed=seed, num_choices=num_choices)
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def _is_speech(line: str) -> bool:
    return bool(line.strip()) and not _SPEAKER.match(line.strip())


def shakespeare_items(text: str, num_items: int, *, seed: int = 0, num_choices: int = NUM_CHOICES,
                      context_lines: int = 8, min_chars: int = 20, max_chars: int = 80,
                      min_distance: int = 50) -> list[ChoiceItem]:
    """Next-line items: `context_lines` lines of a play, then the true next line against `num_choices - 1`
    speech lines of similar length (within max(3, 10%) characters) at least `min_distance` lines away.

    The answer is a speech line of min_chars..max_chars characters that continues a speech (the line above
    is speech too); every choice ends in a newline, as the line does in the play.
    """
    lines = text.split("\n")
    fits = np.array([_is_speech(s) and min_chars <= len(s.strip()) <= max_chars for s in lines])  # bool[L]
    pool = np.flatnonzero(fits)  # i64[P]: lines that may be answers or distractors
    pool_len = np.array([len(lines[j]) for j in pool])  # i64[P]
    speech_above = np.array([False] + [_is_speech(s) for s in lines[:-1]])
    targets = pool[(pool >= context_lines) & speech_above[pool]]
    if len(targets) < num_items:
        raise ValueError(f"the text has {len(targets)} usable next-line items, fewer than num_items={num_items}")
    rng = np.random.default_rng(seed)
    items = []
    for i in rng.choice(targets, size=num_items, replace=False).tolist():
        answer = lines[i]
        tol = max(3, len(answer) // 10)
        distractors: list[str] = []
        while len(distractors) < num_choices - 1:
            near = pool[(np.abs(pool_len - len(answer)) <= tol) & (np.abs(pool - i) >= min_distance)]
            for j in rng.permutation(near).tolist():
                if lines[j] != answer and lines[j] not in distractors:
                    distractors.append(lines[j])
                    if len(distractors) == num_choices - 1:
                        break
            tol *= 2  # NOTE: only for a text too short to have enough lines of one length
            if tol > 10 * max_chars:
                raise ValueError(f"not enough distinct lines in the text to draw {num_choices - 1} distractors")
        context = "\n".join(lines[i - context_lines : i]) + "\n"
        items.append(_shuffled_item(f"shakespeare:{i + 1}", context, answer + "\n",
                                    [d + "\n" for d in distractors], rng))
    return items


def gsm8k_items(records: Sequence[dict], num_items: int, *, seed: int = 0, num_choices: int = NUM_CHOICES,
                text_distractors: int = 2) -> list[ChoiceItem]:
    """Final-step items: 'Question: q\\nAnswer: <worked solution minus its last step>The answer is', then the
    final answer (' 72.') against up to `text_distractors` other numbers of the problem and perturbations of the answer
    (+-1, +-2, +-10, x2, /2, x10), all distinct and, for a non-negative answer, non-negative."""
    if len(records) < num_items:
        raise ValueError(f"the GSM8K file has {len(records)} problems, fewer than num_items={num_items}")
    rng = np.random.default_rng(seed)
    items = []
    for r in rng.choice(len(records), size=num_items, replace=False).tolist():
        rec = records[r]
        answer = ev.reference_answer(rec["answer"])
        steps = [s for s in ev.strip_calculator(rec["answer"]).split("\n") if s.strip() and not s.startswith("####")]
        context = f"Question: {rec['question']}\nAnswer: " + "".join(s + "\n" for s in steps[:-1]) + "The answer is"
        seen = {answer}
        in_text = []
        for m in _DIGITS.findall(context):
            value = ev.normalize_number(m)
            if value is not None and value not in seen:
                seen.add(value)
                in_text.append(value)
        num_text = min(text_distractors, num_choices - 1)
        distractors = [in_text[k] for k in rng.permutation(len(in_text))[:num_text].tolist()]
        for value in rng.permutation(_perturbations(answer)).tolist():
            if len(distractors) == num_choices - 1:
                break
            if value not in distractors and value != answer:
                distractors.append(value)
        items.append(_shuffled_item(f"gsm8k:{r}", context, f" {answer}.", [f" {d}." for d in distractors], rng))
    return items


def _perturbations(answer: str) -> list[str]:
    a = decimal.Decimal(answer)
    values = [a + 1, a - 1, a + 2, a - 2, a + 10, a - 10, a * 2, a * 10]
    if a == a.to_integral_value() and a % 2 == 0:
        values.append(a / 2)
    out = []
    for v in values:
        text = ev.normalize_number(str(v))
        if text is not None and text != answer and (a < 0 or v >= 0) and text not in out:
            out.append(text)
    return out


def _shuffled_item(item_id: str, context: str, answer: str, distractors: list[str], rng) -> ChoiceItem:
    choices = [answer] + distractors
    order = rng.permutation(len(choices)).tolist()
    return ChoiceItem(item_id, context, tuple(choices[k] for k in order), order.index(0))


def items_digest(items: Sequence[ChoiceItem]) -> str:
    """A short hash of the items (cache key: any change in task construction invalidates cached scores)."""
    blob = json.dumps([it.to_json() for it in items], ensure_ascii=False, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Scoring


@dataclasses.dataclass
class ItemScores:
    """One model's reading of one item: per choice, the log-prob (and entropy of the next-token
    distribution) at each of its tokens given the context and the tokens before it."""

    num_context_tokens: int
    token_logprobs: list[list[float]]  # [choice][token]
    token_entropies: list[list[float]] | None  # [choice][token]; None when not recorded

    def sum_logprobs(self) -> np.ndarray:  # f64[C]
        return np.array([sum(lp) for lp in self.token_logprobs])

    def mean_logprobs(self) -> np.ndarray:  # f64[C]
        return np.array([sum(lp) / len(lp) for lp in self.token_logprobs])

    def choice(self, normalize: bool = False) -> int:
        """The best choice: highest summed (normalize: per-token mean) log-prob; ties to the first."""
        return int(np.argmax(self.mean_logprobs() if normalize else self.sum_logprobs()))

    def max_choice_prob(self) -> float:
        """The largest probability of softmax over the choices' summed log-probs."""
        s = self.sum_logprobs()
        p = np.exp(s - s.max())
        return float(p.max() / p.sum())

    def num_tokens(self) -> int:
        """Tokens the scoring reads: the context once plus every choice."""
        return self.num_context_tokens + sum(len(lp) for lp in self.token_logprobs)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def encode_item(tokenizer, item: ChoiceItem) -> tuple[list[int], list[list[int]]]:
    """(context ids, [choice ids]): a choice's ids are those encode(context + choice) adds after
    encode(context) when that is a prefix of it, else the choice encoded on its own."""
    ctx = list(tokenizer.encode(item.context))
    if not ctx:
        raise ValueError(f"item {item.id}: the context encodes to no tokens")
    choices = []
    for text in item.choices:
        whole = list(tokenizer.encode(item.context + text))
        cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else []
        if not cont:
            cont = list(tokenizer.encode(text, add_special_tokens=False))
        if not cont:
            raise ValueError(f"item {item.id}: choice {text!r} encodes to no tokens")
        choices.append(cont)
    return ctx, choices


def row_entropy(logits: np.ndarray) -> np.ndarray:
    """f64[n]: entropy (nats) of softmax(logits[i]), computed in float64."""
    x = np.asarray(logits, dtype=np.float64)  # f64[n, V]
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    z = e.sum(axis=-1)
    return np.log(z) - (e * x).sum(axis=-1) / z


@dataclasses.dataclass
class _Seq:
    """A sequence of one step: `tokens` at positions start.., KV in `blocks` (covering its real tokens)."""

    tokens: list[int]
    start: int
    blocks: list[int]
    rows: list[int]  # offsets into tokens whose logits are wanted


def _round_up(n: int, quantum: int) -> int:
    return max(quantum, -(-n // quantum) * quantum)


def _step_input(seqs: list[_Seq], *, num_seqs: int, q_len: int, num_logits: int, width: int,
                block_size: int) -> StepInput:
    """Every sequence padded to `q_len` rows (pad rows write nowhere: slot -1), `num_seqs` sequences (empty
    ones all padding), block tables `width` wide, `num_logits` logit rows (padding repeats row 0): a few fixed
    shapes, so the Program compiles a handful of times however the items vary."""
    seqs = seqs + [_Seq([], 0, [], [])] * (num_seqs - len(seqs))
    tokens = np.zeros(num_seqs * q_len, np.int32)
    positions = np.zeros(num_seqs * q_len, np.int32)
    slots = np.full(num_seqs * q_len, -1, np.int32)
    tables = np.zeros((num_seqs, width), np.int32)
    rows = []
    for s, seq in enumerate(seqs):
        n, base = len(seq.tokens), s * q_len
        if n > q_len or -(-(seq.start + q_len) // block_size) > width:
            raise AssertionError("step planning error: a sequence does not fit its padded shape")
        tokens[base : base + n] = seq.tokens
        pos = seq.start + np.arange(q_len, dtype=np.int32)
        positions[base : base + q_len] = pos
        blocks = np.asarray(seq.blocks, np.int32)
        slots[base : base + n] = blocks[pos[:n] // block_size] * block_size + pos[:n] % block_size
        tables[s, : len(seq.blocks)] = seq.blocks
        rows.extend(base + r for r in seq.rows)
    logit_rows = np.zeros(num_logits, np.int32)
    logit_rows[: len(rows)] = rows
    return StepInput(token_ids=tokens, positions=positions, slot_mapping=slots,
                     query_start=(np.arange(num_seqs + 1) * q_len).astype(np.int32),
                     seq_lens=np.array([seq.start + q_len for seq in seqs], np.int32), block_tables=tables,
                     logit_rows=logit_rows)


def _plan(encoded, order: list[int], block_size: int):
    """Per batch of item indices: (prefix lengths, step-B query length, logit rows, blocks needed)."""
    plans = []
    for batch in order:
        prefix = [(len(encoded[i][0]) - 1) // block_size * block_size for i in batch]
        q_b = max(len(encoded[i][0]) - p + len(c) for i, p in zip(batch, prefix) for c in encoded[i][1])
        num_rows = sum(len(c) for i in batch for c in encoded[i][1])
        blocks = sum(p // block_size for p in prefix) + sum(
            -(-(len(encoded[i][0]) - p + len(c)) // block_size) for i, p in zip(batch, prefix) for c in encoded[i][1])
        plans.append((prefix, _round_up(q_b, 8), num_rows, blocks))
    return plans


def score_items(model, items: Sequence[ChoiceItem], *, batch_items: int = 8, entropies: bool = True,
                log: Callable[[str], None] | None = None) -> tuple[list[ItemScores], dict]:
    """Score every choice of every item with `model`'s own paged Program; returns (scores, timing).

    Items go in batches of `batch_items` (similar context lengths together). Each batch is two prefill
    steps: the contexts' whole blocks (all but the last token's block) once per item, then every choice as
    its own sequence that reads those blocks, recomputes the rest of the context and appends the choice,
    with logits for the rows that predict the choice's tokens. Log-probs come from
    runtime.evaluate.token_nll (float64). timing: seconds and tokens of steps that did not compile.
    """
    batch_items = ev._check_int("batch_items", batch_items, 1)
    if not items:
        raise ValueError("no items to score")
    tok = ev._tokenizer_of(model)
    bs = int(model.block_size)
    num_choices = len(items[0].choices) if items else 0
    if any(len(it.choices) != num_choices for it in items):
        raise ValueError("every item must have the same number of choices")
    encoded = [encode_item(tok, it) for it in items]
    by_length = sorted(range(len(items)), key=lambda i: (len(encoded[i][0]), i))
    order = [by_length[k : k + batch_items] for k in range(0, len(by_length), batch_items)]
    plans = _plan(encoded, order, bs)
    q_a_max = max((_round_up(max(p), 32) for p, *_ in plans), default=32)
    longest = max(max(p) + q_b for p, q_b, *_ in plans) if plans else bs
    width = -(-max(q_a_max, longest) // bs)
    config = getattr(model, "config", None)
    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions is not None and width * bs > max_positions:
        raise ValueError(f"an item needs {width * bs} positions (padded), more than the model's "
                         f"max_position_embeddings={max_positions}; use shorter items")
    num_blocks = max(b for *_, b in plans) + 1
    program = model.make_program(num_blocks=num_blocks, max_num_seqs=batch_items * num_choices + 1,
                                 max_model_len=width * bs, **mirror_pool_options(model.graph, num_blocks))

    out: list[ItemScores | None] = [None] * len(items)
    timing = {"seconds": 0.0, "tokens": 0, "num_steps": 0, "num_compiled_steps": 0, "compile_seconds": 0.0}
    start_all = time.perf_counter()

    def run(step: StepInput, num_real_tokens: int) -> np.ndarray:
        t0 = time.perf_counter()
        logits = np.asarray(program.step(mirror_kv_groups(step, program)))
        dt = time.perf_counter() - t0
        if getattr(program, "last_step_compiled", False):
            timing["num_compiled_steps"] += 1
            timing["compile_seconds"] += dt
        else:
            timing["num_steps"] += 1
            timing["seconds"] += dt
            timing["tokens"] += num_real_tokens
        return logits

    for n, (batch, (prefix, q_b, num_rows, _)) in enumerate(zip(order, plans)):
        next_block = 0
        prefix_blocks = []
        seqs_a = []
        for i, p in zip(batch, prefix):
            blocks = list(range(next_block, next_block + p // bs))
            next_block += len(blocks)
            prefix_blocks.append(blocks)
            seqs_a.append(_Seq(encoded[i][0][:p], 0, blocks, []))
        if max(prefix) > 0:  # the contexts' whole blocks, once per item
            run(_step_input(seqs_a, num_seqs=batch_items, q_len=_round_up(max(prefix), 32), num_logits=1,
                            width=width, block_size=bs), sum(prefix))
        seqs_b, targets = [], []
        for i, p, blocks in zip(batch, prefix, prefix_blocks):
            ctx, choices = encoded[i]
            tail = ctx[p:]
            for cont in choices:
                own = list(range(next_block, next_block + -(-(len(tail) + len(cont)) // bs)))
                next_block += len(own)
                seqs_b.append(_Seq(tail + cont, p, blocks + own, [len(tail) - 1 + k for k in range(len(cont))]))
                targets.extend(cont)
        logits = run(_step_input(seqs_b, num_seqs=batch_items * num_choices, q_len=q_b,
                                 num_logits=_round_up(num_rows, 64), width=width, block_size=bs),
                     sum(len(s.tokens) for s in seqs_b))[:num_rows]  # f32[num_rows, V]
        target_ids = np.asarray(targets, np.int64)
        lp = np.empty(num_rows)
        ent = np.empty(num_rows) if entropies else None
        for c0 in range(0, num_rows, 32):  # NOTE: float64 copies of 32 rows at a time bound the memory
            lp[c0 : c0 + 32] = -ev.token_nll(logits[c0 : c0 + 32], target_ids[c0 : c0 + 32])
            if entropies:
                ent[c0 : c0 + 32] = row_entropy(logits[c0 : c0 + 32])
        at = 0
        for i in batch:
            lps, ents = [], []
            for cont in encoded[i][1]:
                lps.append(lp[at : at + len(cont)].tolist())
                if entropies:
                    ents.append(ent[at : at + len(cont)].tolist())
                at += len(cont)
            out[i] = ItemScores(len(encoded[i][0]), lps, ents if entropies else None)
        if log is not None and (n + 1) % 10 == 0:
            log(f"scored {sum(len(b) for b in order[: n + 1])}/{len(items)} items "
                f"({time.perf_counter() - start_all:.0f} s)")
    timing["wall_seconds"] = time.perf_counter() - start_all
    timing["s_per_token"] = timing["seconds"] / timing["tokens"] if timing["tokens"] else None
    return out, timing


# ---------------------------------------------------------------------------------------------
# Routing curves and metrics


@dataclasses.dataclass
class RoutingCurve:
    """Quality and mean cost per request against the share of items sent to the strong model, at every
    distinct threshold of a policy's scores (linear in between: random tie-breaking on average)."""

    share: np.ndarray  # f64[K]: 0 .. 1, rising
    quality: np.ndarray  # f64[K]
    cost: np.ndarray  # f64[K]: mean cost per request

    def at_share(self, share: float) -> tuple[float, float]:
        """(quality, cost) at a share in [0, 1]."""
        return (float(np.interp(share, self.share, self.quality)), float(np.interp(share, self.share, self.cost)))


def routing_curve(scores: Sequence[float], q_weak: Sequence[float], q_strong: Sequence[float],
                  cost_weak: Sequence[float] | None = None, cost_strong: Sequence[float] | None = None, *,
                  cascade: bool = False) -> RoutingCurve:
    """The curve of a policy with per-item `scores` (higher = strong first). Items are sent to the strong
    model in order of falling score, a group of equal scores at once. Costs default to 0 (weak) and 1
    (strong) per request; `cascade`: the weak model's cost is paid for every item."""
    s = np.asarray(scores, np.float64)
    qw, qs = np.asarray(q_weak, np.float64), np.asarray(q_strong, np.float64)
    n = s.shape[0]
    if n == 0 or qw.shape != (n,) or qs.shape != (n,):
        raise ValueError(f"scores, q_weak and q_strong must be non-empty and of one length, got "
                         f"{n}, {qw.shape}, {qs.shape}")
    if np.any(np.isnan(s)):
        raise ValueError("a routing score is NaN")
    cw = np.zeros(n) if cost_weak is None else np.asarray(cost_weak, np.float64)
    cs = np.ones(n) if cost_strong is None else np.asarray(cost_strong, np.float64)
    order = np.lexsort((np.arange(n), -s))  # falling score; equal scores stay together
    gain = (qs - qw)[order]
    extra = (cs - (0.0 if cascade else cw))[order]
    sorted_s = s[order]
    ends = np.concatenate([np.flatnonzero(sorted_s[1:] != sorted_s[:-1]) + 1, [n]])  # group boundaries
    counts = np.concatenate([[0], ends])
    quality = qw.mean() + np.concatenate([[0.0], np.cumsum(gain)])[counts] / n
    cost = cw.mean() + np.concatenate([[0.0], np.cumsum(extra)])[counts] / n
    return RoutingCurve(share=counts / n, quality=quality, cost=cost)


def pgr(quality, q_weak_mean: float, q_strong_mean: float) -> np.ndarray:
    """Performance gap recovered: (quality - weak) / (strong - weak); ValueError when strong is not better."""
    gap = q_strong_mean - q_weak_mean
    if not gap > 0:
        raise ValueError(f"the strong model is not better than the weak one on these items (quality "
                         f"{q_strong_mean:.4f} vs {q_weak_mean:.4f}): PGR is undefined")
    return (np.asarray(quality, np.float64) - q_weak_mean) / gap


def apgr(curve: RoutingCurve, q_weak_mean: float, q_strong_mean: float) -> float:
    """Area under PGR against share on [0, 1] (exact for the piecewise-linear curve)."""
    p = pgr(curve.quality, q_weak_mean, q_strong_mean)
    return float(np.sum(np.diff(curve.share) * (p[1:] + p[:-1]) / 2))


def cpt(curve: RoutingCurve, level: float, q_weak_mean: float, q_strong_mean: float) -> float | None:
    """Call-performance threshold: the smallest share with PGR >= level; None if the curve never gets there."""
    p = pgr(curve.quality, q_weak_mean, q_strong_mean)
    eps = 1e-12
    hit = np.flatnonzero(p >= level - eps)
    if hit.size == 0:
        return None
    j = int(hit[0])
    if j == 0:
        return 0.0
    x0, x1, y0, y1 = curve.share[j - 1], curve.share[j], p[j - 1], p[j]
    return float(x0 + (level - y0) / (y1 - y0) * (x1 - x0))


def policy_metrics(curve: RoutingCurve, q_weak_mean: float, q_strong_mean: float,
                   all_strong_cost: float) -> dict:
    """APGR, CPT at CPT_LEVELS and at 100% (the strong model's quality), each with its cost per request and
    the cost saved against sending everything to the strong model."""
    out: dict[str, Any] = {"apgr": apgr(curve, q_weak_mean, q_strong_mean),
                           "gain": gain_over_random(curve, q_weak_mean, q_strong_mean)}
    for level in CPT_LEVELS + (1.0,):
        key = f"cpt{int(round(level * 100))}"
        share = cpt(curve, level, q_weak_mean, q_strong_mean)
        cost = curve.at_share(share)[1] if share is not None else None
        out[key] = {"share": share, "cost": cost,
                    "saved": None if cost is None else 1.0 - cost / all_strong_cost}
    best = int(np.argmax(curve.quality))
    out["best"] = {"share": float(curve.share[best]), "quality": float(curve.quality[best])}
    return out


def gain_over_random(curve: RoutingCurve, q_weak_mean: float, q_strong_mean: float) -> float:
    """Integral over share of (quality - the random line): mean accuracy gained over random routing."""
    area = float(np.sum(np.diff(curve.share) * (curve.quality[1:] + curve.quality[:-1]) / 2))
    return area - (q_weak_mean + q_strong_mean) / 2


def bootstrap_std(scores: np.ndarray, q_weak: np.ndarray, q_strong: np.ndarray, *, num_resamples: int = 200,
                  seed: int = 0) -> dict:
    """Standard deviations of APGR and of the gain over random over resamples of the items (with replacement).
    APGR uses the resamples that keep the strong model ahead (None if fewer than half do)."""
    rng = np.random.default_rng(seed)
    apgrs, gains = [], []
    n = len(scores)
    for _ in range(num_resamples):
        idx = rng.integers(0, n, n)
        qw, qs = q_weak[idx].mean(), q_strong[idx].mean()
        curve = routing_curve(scores[idx], q_weak[idx], q_strong[idx])
        gains.append(gain_over_random(curve, qw, qs))
        if qs - qw > 0:
            apgrs.append(apgr(curve, qw, qs))
    return {"apgr_std": float(np.std(apgrs)) if len(apgrs) >= num_resamples // 2 else None,
            "gain_std": float(np.std(gains))}


# ---------------------------------------------------------------------------------------------
# Policies


def policy_scores(items: Sequence[ChoiceItem], weak: Sequence[ItemScores], strong: Sequence[ItemScores],
                  train: np.ndarray, test: np.ndarray, *, class_weight: str = "balanced",
                  num_random_seeds: int = 100, seed: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Per policy, its scores on the `test` items (higher = strong) and how it is routed and described.

    {name: {"scores": f64[len(test)], "cascade": bool, "note": str}}, plus "random (seeds)" as a list of
    score arrays. Policies that cannot run here (no classifier training data) are left out with a note."""
    from runtime import router

    q_w = np.array([float(s.choice() == it.answer) for s, it in zip(weak, items)])
    q_s = np.array([float(s.choice() == it.answer) for s, it in zip(strong, items)])
    texts = [it.context for it in items]
    out: dict[str, dict] = {}
    out["random"] = {"scores": np.zeros(len(test)), "cascade": False,
                     "note": "expected curve of random routing (all scores tie)"}
    coins = []
    for k in range(num_random_seeds):
        rp = router.RandomPolicy(WEAK, STRONG, seed=k)
        coins.append(np.array([-random_coin(rp, texts[i]) for i in test]))
    out["random (seeds)"] = {"scores": coins, "cascade": False,
                             "note": f"runtime.router.RandomPolicy, seeds 0..{num_random_seeds - 1}: mean (std)"}

    sizes = []
    for i in test:
        ctx_tokens = weak[i].num_context_tokens
        max_tokens = max(len(lp) for lp in weak[i].token_logprobs)
        sizes.append(router.size_score(router.prompt_features(texts[i], ctx_tokens, max_tokens)))
    out["size"] = {"scores": np.array(sizes), "cascade": False,
                   "note": "runtime.router.size_score(prompt_features(context))"}

    labels = [STRONG if q_s[i] > q_w[i] else WEAK for i in train]
    num_pos = labels.count(STRONG)
    if len(train) and 0 < num_pos < len(labels):
        from runtime.route_classifier import RouteClassifier

        clf = RouteClassifier([WEAK, STRONG], seed=seed, class_weight=None if class_weight == "none" else class_weight)
        clf.fit([texts[i] for i in train], labels)
        proba = clf.predict_proba([texts[i] for i in test])[:, clf.labels.index(STRONG)]
        out["task classifier"] = {"scores": proba, "cascade": False,
                                  "note": f"RouteClassifier on {len(train)} train items ({num_pos} 'strong': strong "
                                          f"right, weak wrong), class_weight={class_weight}"}
    elif log is not None:
        log(f"task classifier skipped: {num_pos} of {len(train)} train items are labeled 'strong'")

    for kind in router.CONFIDENCE_KINDS:
        conf = []
        for i in test:
            c = weak[i].choice()
            ent = weak[i].token_entropies[c] if weak[i].token_entropies is not None else None
            conf.append(router.confidence_score(weak[i].token_logprobs[c], ent, kind))
        out[f"cascade {kind}"] = {"scores": -np.array(conf), "cascade": True,
                                  "note": f"weak model's {kind} over its chosen continuation's tokens"}
    out["cascade choice max-prob"] = {"scores": -np.array([weak[i].max_choice_prob() for i in test]),
                                      "cascade": True, "note": "softmax over the weak model's choice log-probs"}
    out["oracle"] = {"scores": q_s[test] - q_w[test], "cascade": False,
                     "note": "upper bound: knows both answers (strong only where it alone is right)"}
    return out


def random_coin(policy, text: str) -> float:
    """The coin a runtime.router.RandomPolicy draws for `text` (its Route.score)."""
    from runtime.router import RouteContext

    return float(policy.choose(RouteContext(text=text, num_prompt_tokens=0, max_tokens=0, features={})).score)


def evaluate_policies(items: Sequence[ChoiceItem], weak: Sequence[ItemScores], strong: Sequence[ItemScores], *,
                      cost_weak: np.ndarray, cost_strong: np.ndarray, train_fraction: float = 0.5, seed: int = 0,
                      class_weight: str = "balanced", num_random_seeds: int = 100, num_bootstrap: int = 200,
                      log: Callable[[str], None] | None = None) -> dict:
    """Split the items (seeded), train what needs training on the train part, and measure every policy on
    the held-out part: APGR (with a bootstrap standard deviation), CPT(50%), CPT(80%), CPT(100%) and the
    cost per request there. cost_weak / cost_strong: f64[N] seconds per item for each model."""
    n = len(items)
    if not (len(weak) == len(strong) == n == len(cost_weak) == len(cost_strong)):
        raise ValueError("items, scores and costs must have one length")
    if not 0.0 <= train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in [0, 1), got {train_fraction}")
    if class_weight not in CLASS_WEIGHTS:
        raise ValueError(f"class_weight must be one of {list(CLASS_WEIGHTS)}, got {class_weight!r}")
    perm = np.random.default_rng(seed).permutation(n)
    num_train = int(round(train_fraction * n))
    train, test = np.sort(perm[:num_train]), np.sort(perm[num_train:])
    if len(test) < 2:
        raise ValueError(f"the held-out split has {len(test)} items; use more items or a smaller train fraction")
    q_w = np.array([float(s.choice() == it.answer) for s, it in zip(weak, items)])[test]
    q_s = np.array([float(s.choice() == it.answer) for s, it in zip(strong, items)])[test]
    cw, cs = np.asarray(cost_weak, np.float64)[test], np.asarray(cost_strong, np.float64)[test]
    mw, ms = float(q_w.mean()), float(q_s.mean())
    diff = q_s - q_w
    result: dict[str, Any] = {
        "num_train": int(len(train)), "num_test": int(len(test)),
        "test": {"q_weak": mw, "q_strong": ms, "q_weak_se": _se(q_w), "q_strong_se": _se(q_s),
                 "gap": ms - mw, "gap_se": float(diff.std(ddof=1) / math.sqrt(len(diff))),
                 "only_strong_right": int((diff > 0).sum()), "only_weak_right": int((diff < 0).sum()),
                 "both_right": int(((q_w > 0) & (q_s > 0)).sum()), "both_wrong": int(((q_w == 0) & (q_s == 0)).sum()),
                 "cost_weak": float(cw.mean()), "cost_strong": float(cs.mean())},
        "policies": {},
    }
    if not ms > mw:
        result["note"] = ("the strong model is not better than the weak one on the held-out items: PGR, APGR and "
                          "CPT are undefined")
        return result
    pols = policy_scores(items, weak, strong, train, test, class_weight=class_weight,
                         num_random_seeds=num_random_seeds, seed=seed, log=log)
    all_strong = float(cs.mean())
    for name, pol in pols.items():
        if name == "random (seeds)":
            runs = [policy_metrics(routing_curve(s, q_w, q_s, cw, cs), mw, ms, all_strong) for s in pol["scores"]]
            entry = {"apgr": float(np.mean([r["apgr"] for r in runs])),
                     "apgr_std": float(np.std([r["apgr"] for r in runs])),
                     "gain": float(np.mean([r["gain"] for r in runs])),
                     "gain_std": float(np.std([r["gain"] for r in runs])),
                     "cascade": False, "note": pol["note"]}
            for key in ("cpt50", "cpt80", "cpt100"):
                shares = [r[key]["share"] for r in runs if r[key]["share"] is not None]
                costs = [r[key]["cost"] for r in runs if r[key]["cost"] is not None]
                entry[key] = {"share": float(np.mean(shares)) if shares else None,
                              "cost": float(np.mean(costs)) if costs else None,
                              "saved": 1.0 - float(np.mean(costs)) / all_strong if costs else None}
            result["policies"][name] = entry
            continue
        curve = routing_curve(pol["scores"], q_w, q_s, cw, cs, cascade=pol["cascade"])
        entry = policy_metrics(curve, mw, ms, all_strong)
        if name != "random" and num_bootstrap:
            entry.update(bootstrap_std(np.asarray(pol["scores"]), q_w, q_s, num_resamples=num_bootstrap, seed=seed))
        else:
            entry.update(apgr_std=0.0, gain_std=0.0)
        entry.update(cascade=pol["cascade"], note=pol["note"],
                     curve={"share": curve.share.tolist(), "quality": curve.quality.tolist(),
                            "cost": curve.cost.tolist()})
        result["policies"][name] = entry
    return result


def _se(q: np.ndarray) -> float:
    return float(math.sqrt(q.mean() * (1 - q.mean()) / len(q)))


# ---------------------------------------------------------------------------------------------
# Models, costs, caching, the whole run


def load_model(source: str, *, weights: str | None = None, max_ppl_increase: float | None = None):
    """An artifact directory (loaded) or anything compile_model takes, compiled for the CPU."""
    from runtime import load_if_artifact

    model = load_if_artifact(str(source), set_options=["--weights"] if weights else [])
    if model is not None:
        return model
    from lowering import compile_model

    return compile_model(source, target="cpu", weights=weights, max_ppl_increase=max_ppl_increase, progress=False)


def measure_model_cost(model):
    """runtime.router.measure_cost on a small Engine of `model` (a 128-token prefill, 16 decode steps)."""
    from runtime.engine import Engine
    from runtime.router import measure_cost

    engine = Engine(model, max_num_seqs=2, max_model_len=256, num_blocks=2 * (256 // int(model.block_size)) + 2,
                    speculative=False)
    return measure_cost(engine, prompt_tokens=128, decode_tokens=16, repeats=3)


def _cache_path(cache_dir: str | os.PathLike, source: str, weights: str | None, max_ppl_increase, digest: str) -> Path:
    key = json.dumps([str(source), weights, max_ppl_increase, digest])
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(str(source))))
    digest12 = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"router_scores_{name}_{weights or 'f32'}_{digest12}.json"


def model_scores(source: str, items: Sequence[ChoiceItem], *, weights: str | None = None,
                 max_ppl_increase: float | None = None, batch_items: int = 8, cache_dir=None,
                 log: Callable[[str], None] | None = None) -> dict:
    """Compile/load a model, score the items and measure its cost per token; read from / written to a JSON
    cache in `cache_dir` keyed by the source, its weights format and the items' digest."""
    digest = items_digest(items)
    path = _cache_path(cache_dir, source, weights, max_ppl_increase, digest) if cache_dir is not None else None
    if path is not None and path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("items_digest") == digest and len(data.get("scores", [])) == len(items):
            if log is not None:
                log(f"{source} ({weights or 'float32'}): cached scores from {path}")
            data["scores"] = [ItemScores(**s) for s in data["scores"]]
            return data
    start = time.perf_counter()
    model = load_model(source, weights=weights, max_ppl_increase=max_ppl_increase)
    compile_s = time.perf_counter() - start
    if log is not None:
        log(f"{source} ({weights or 'float32'}): ready in {compile_s:.1f} s; scoring {len(items)} items")
    scores, timing = score_items(model, items, batch_items=batch_items, log=log)
    cost = measure_model_cost(model)
    if log is not None:
        log(f"{source} ({weights or 'float32'}): scored in {timing['wall_seconds']:.0f} s; prefill "
            f"{cost.prefill_s * 1e3:.2f} ms/token, decode {cost.decode_s * 1e3:.1f} ms/token")
    data = {"source": str(source), "weights": weights, "max_ppl_increase": max_ppl_increase,
            "items_digest": digest, "load_seconds": compile_s, "scoring": timing, "cost": cost.to_json(),
            "weight_bytes": ev.memory_report(model)["weight_bytes"], "scores": scores}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {**data, "scores": [s.to_json() for s in scores]}
        path.write_text(json.dumps(blob) + "\n", encoding="utf-8")
    return data


def eval_router(weak: str, strong: str, *, task: str = "shakespeare", num_items: int = 600,
                train_fraction: float = 0.5, seed: int = 0, data_dir=None, weak_weights: str | None = None,
                strong_weights: str | None = None, max_ppl_increase: float | None = None, batch_items: int = 8,
                class_weight: str = "balanced", num_random_seeds: int = 100, cache_dir=None,
                log: Callable[[str], None] | None = None) -> dict:
    """The whole evaluation: build the task, score it with both models, evaluate every policy. JSON-able."""
    items = build_task(task, num_items, seed=seed, data_dir=data_dir)
    sides = {}
    for role, source, w in ((WEAK, weak, weak_weights), (STRONG, strong, strong_weights)):
        sides[role] = model_scores(source, items, weights=w, max_ppl_increase=max_ppl_increase,
                                   batch_items=batch_items, cache_dir=cache_dir, log=log)
    costs = {}
    models = {}
    for role, data in sides.items():
        scores = data["scores"]
        per_token = data["scoring"]["s_per_token"]
        costs[role] = np.array([per_token * s.num_tokens() for s in scores])  # seconds per item
        q = np.array([float(s.choice() == it.answer) for s, it in zip(scores, items)])
        q_norm = np.array([float(s.choice(normalize=True) == it.answer) for s, it in zip(scores, items)])
        models[role] = {"source": data["source"], "weights": data["weights"] or "float32",
                        "accuracy": float(q.mean()), "accuracy_se": _se(q),
                        "accuracy_per_token_mean": float(q_norm.mean()), "cost": data["cost"],
                        "scoring": data["scoring"], "weight_bytes": data.get("weight_bytes"),
                        "mean_tokens_per_item": float(np.mean([s.num_tokens() for s in scores])),
                        "mean_cost_per_item": float(costs[role].mean())}
    q_w = np.array([float(s.choice() == it.answer) for s, it in zip(sides[WEAK]["scores"], items)])
    q_s = np.array([float(s.choice() == it.answer) for s, it in zip(sides[STRONG]["scores"], items)])
    d = q_s - q_w
    result = {"task": task, "num_items": num_items, "seed": seed, "train_fraction": train_fraction,
              "class_weight": class_weight, "items_digest": items_digest(items), "models": models,
              "all_items": {"gap": float(d.mean()), "gap_se": float(d.std(ddof=1) / math.sqrt(len(d)))}}
    result.update(evaluate_policies(items, sides[WEAK]["scores"], sides[STRONG]["scores"], cost_weak=costs[WEAK],
                                    cost_strong=costs[STRONG], train_fraction=train_fraction, seed=seed,
                                    class_weight=class_weight, num_random_seeds=num_random_seeds, log=log))
    return result


# ---------------------------------------------------------------------------------------------
# Report


def _pct(x: float | None) -> str:
    return "never" if x is None else f"{100 * x:.1f}%"


def _cost(x: float | None) -> str:
    return "-" if x is None else f"{1e3 * x:.1f} ms"


def format_report(result: dict) -> str:
    """Markdown: the models' accuracies and costs, then one row per policy (APGR, CPT, cost at equal quality)."""
    lines = []
    models = result["models"]
    lines.append(f"task {result['task']}: {result['num_items']} items (seed {result['seed']}), "
                 f"{result['num_train']} train / {result['num_test']} held out")
    lines.append("")
    lines.append("| model | weights | weight MiB | accuracy (all items) | per-token-mean accuracy | prefill ms/token | "
                 "decode ms/token | scoring ms/token | tokens/item | cost/item |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for role in (WEAK, STRONG):
        m = models[role]
        mib = "-" if m.get("weight_bytes") is None else f"{m['weight_bytes'] / 2**20:.0f}"
        per_token = (m.get("scoring") or {}).get("s_per_token")
        lines.append(f"| {role}: {m['source']} | {m['weights']} | {mib} | "
                     f"{m['accuracy']:.3f} ± {m['accuracy_se']:.3f} | "
                     f"{m['accuracy_per_token_mean']:.3f} | {m['cost']['prefill_s_per_token'] * 1e3:.2f} | "
                     f"{m['cost']['decode_s_per_token'] * 1e3:.1f} | "
                     f"{'-' if per_token is None else f'{per_token * 1e3:.2f}'} | {m['mean_tokens_per_item']:.0f} | "
                     f"{_cost(m['mean_cost_per_item'])} |")
    t = result["test"]
    lines.append("")
    lines.append(f"held out: weak {t['q_weak']:.3f} ± {t['q_weak_se']:.3f}, strong {t['q_strong']:.3f} ± "
                 f"{t['q_strong_se']:.3f}, gap {t['gap']:+.3f} ± {t['gap_se']:.3f} (paired SE); only strong right "
                 f"{t['only_strong_right']}, only weak right {t['only_weak_right']}, both {t['both_right']}, "
                 f"neither {t['both_wrong']}; all-strong {_cost(t['cost_strong'])}/request, all-weak "
                 f"{_cost(t['cost_weak'])}/request")
    if result.get("note"):
        lines.append("")
        lines.append(f"note: {result['note']}")
        return "\n".join(lines)
    lines.append("")
    lines.append("| policy | APGR | gain over random (points) | CPT(50%) | CPT(80%) | CPT(100%) | "
                 "cost/request at equal quality | saved vs all-strong | best quality (at share) |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, p in result["policies"].items():
        # NOTE: a cascade's share is the share it escalates; it pays the weak model on every request
        apgr_text = f"{p['apgr']:.3f}" + (f" ± {p['apgr_std']:.3f}" if p.get("apgr_std") else "")
        gain_text = f"{100 * p['gain']:+.2f}" + (f" ± {100 * p['gain_std']:.2f}" if p.get("gain_std") else "")
        eq = p["cpt100"]
        saved = "-" if eq["saved"] is None else f"{100 * eq['saved']:+.1f}%"
        lines.append(f"| {name} | {apgr_text} | {gain_text} | {_pct(p['cpt50']['share'])} | "
                     f"{_pct(p['cpt80']['share'])} | {_pct(eq['share'])} | {_cost(eq['cost'])} | {saved} | "
                     + (f"{p['best']['quality']:.3f} ({_pct(p['best']['share'])}) |" if "best" in p else "- |"))
    return "\n".join(lines)


def print_log(line: str) -> None:
    print(f"llmc: {line}", file=sys.stderr, flush=True)
