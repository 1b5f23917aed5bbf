"""Sampling: per-request parameters, greedy/temperature/top-k/top-p sampling, stop-string search."""
from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterable

import numpy as np

MAX_LOGIT_BIAS_ENTRIES = 1024  # OpenAI accepts at most 300; vLLM does not bound it
MAX_REPETITION_PENALTY = 10.0


@dataclasses.dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops.

    temperature 0 means greedy (argmax, ties go to the lowest token id). top_k 0 or -1, top_p 1.0
    and min_p 0 switch those filters off (min_p keeps tokens whose probability is >= min_p times the
    best token's, after top-k and top-p). presence_penalty / frequency_penalty (OpenAI's, in [-2, 2])
    subtract penalty (once / per occurrence) from the logits of tokens already generated, before
    everything else. logprobs N returns the log-probability of each sampled token and of the N most
    likely tokens (of the raw, unpenalised logits). seed None draws fresh OS entropy for the request.
    `stop` strings end generation; the text is cut before the first one found. logit_bias {token id: bias in
    [-100, 100]} is added to those logits before the penalties (OpenAI's; -100 in effect bans a token). min_tokens:
    until that many tokens are out, EOS and stop_token_ids cannot be sampled and stop strings do not end the text
    (vLLM's). repetition_penalty divides positive logits of tokens in the prompt or output by it and multiplies
    negative ones (Hugging Face's / vLLM's; 1 = off). logit_bias, the penalties, min_tokens and logprobs take the
    host sampler.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_real(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be a number in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ValueError(f"logprobs must be None or an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if stops is not None:
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
                raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
            if any(s == "" for s in stops):
                raise ValueError("stop strings must not be empty")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (list, tuple)) or not all(_is_int(i) and i >= 0 for i in ids):
                raise ValueError(f"stop_token_ids must be a list of non-negative integers, got {ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict {{token id: bias}}, got {self.logit_bias!r}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
                raise ValueError(f"logit_bias has {len(self.logit_bias)} entries, at most {MAX_LOGIT_BIAS_ENTRIES}")
            for token, bias in self.logit_bias.items():
                if not _is_int(token) or token < 0:
                    raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
                if not _is_real(bias) or not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias[{token}] must be a number in [-100, 100], got {bias!r}")
        rp = self.repetition_penalty
        if not _is_real(rp) or not math.isfinite(rp) or not 0.0 < rp <= MAX_REPETITION_PENALTY:
            raise ValueError(f"repetition_penalty must be a number in (0, {MAX_REPETITION_PENALTY}], got {rp!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def adjusts_logits(self) -> bool:
        """True when the sampler changes logits before picking (logit_bias, the three penalties, min_tokens)."""
        return self.has_penalties or bool(self.logit_bias) or self.min_tokens > 0 or self.repetition_penalty != 1.0

    @property
    def needs_host_logits(self) -> bool:
        """True when sampling needs the logits on the host (adjusts_logits, logprobs)."""
        return self.adjusts_logits or self.logprobs is not None


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def make_generator(seed: int | None) -> np.random.Generator:
    """One generator per request, so a seeded request samples the same tokens in any batch."""
    return np.random.default_rng(seed)


# NOTE: top-p first sorts only this many best tokens, and more only if their mass falls short of
# top_p; a full stable sort of a 50k vocabulary costs ~7 ms a row.
NUM_TOP_P_CANDIDATES = 1024


def sample(
    logits: np.ndarray,  # f32[L, V]
    params: list[SamplingParams],  # [L]
    generators: list[np.random.Generator],  # [L]
    output_tokens: list[list[int]] | None = None,  # [L] tokens generated so far (penalties, min_tokens)
    eos_token_ids: Iterable[int] = (),  # what min_tokens holds back (with each row's stop_token_ids)
    prompt_tokens: list[list[int]] | None = None,  # [L] each row's prompt (repetition_penalty)
) -> np.ndarray:  # i32[L]
    """Pick one token per logit row; row i uses params[i] and draws one number from generators[i]."""
    num_rows = logits.shape[0]
    if len(params) != num_rows or len(generators) != num_rows:
        raise ValueError(f"sample got {num_rows} logit rows, {len(params)} params and {len(generators)} generators")
    if any(p.adjusts_logits for p in params):
        logits = np.array(logits, copy=True)
        eos = tuple(eos_token_ids)
        for row, p in enumerate(params):
            if p.adjusts_logits:
                adjust_logits(logits[row], p, output_tokens[row] if output_tokens is not None else [], eos,
                              prompt_tokens[row] if prompt_tokens is not None else ())
    tokens = np.argmax(logits, axis=-1).astype(np.int32)  # i32[L]  greedy; argmax picks the lowest id on ties
    for row, (p, generator) in enumerate(zip(params, generators)):
        if not p.is_greedy:
            tokens[row] = sample_row(logits[row], p, generator)
    return tokens


def adjust_logits(logits: np.ndarray, params: SamplingParams, generated: list[int], eos_token_ids=(),
                  prompt=()) -> None:
    """In place, in this order: logit_bias, the repetition penalty (over the prompt and the generated tokens),
    the presence / frequency penalties (generated tokens), then min_tokens (EOS, unless ignore_eos, and
    stop_token_ids to -inf while fewer than min_tokens tokens are out)."""
    vocab = logits.shape[0]
    if params.logit_bias:
        ids = np.fromiter(params.logit_bias, np.int64, len(params.logit_bias))
        bias = np.fromiter(params.logit_bias.values(), np.float64, len(params.logit_bias))
        keep = ids < vocab
        logits[ids[keep]] += bias[keep].astype(logits.dtype)
    if params.repetition_penalty != 1.0:
        apply_repetition_penalty(logits, [*prompt, *generated], params.repetition_penalty)
    if params.has_penalties:
        apply_penalties(logits, generated, params.presence_penalty, params.frequency_penalty)
    if len(generated) < params.min_tokens:
        banned = [] if params.ignore_eos else list(eos_token_ids)
        banned += list(params.stop_token_ids or ())
        banned = [t for t in banned if 0 <= t < vocab]
        if len(banned) < vocab:  # never ban every token
            logits[banned] = -np.inf


def apply_repetition_penalty(logits: np.ndarray, seen, penalty: float) -> None:
    """The CTRL / Hugging Face / vLLM repetition penalty, in place: the logit of every token in `seen` is divided
    by `penalty` where positive and multiplied by it where negative (> 1 discourages repeats)."""
    ids = np.unique(np.asarray(list(seen), np.int64))
    ids = ids[(ids >= 0) & (ids < logits.shape[0])]
    if ids.size:
        row = logits[ids]
        logits[ids] = np.where(row > 0, row / penalty, row * penalty).astype(logits.dtype)


def apply_penalties(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> None:
    """OpenAI's penalties, in place: logit -= presence * [count > 0] + frequency * count."""
    if not generated:
        return
    ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
    ids, counts = ids[ids < logits.shape[0]], counts[ids < logits.shape[0]]
    logits[ids] -= presence + frequency * counts


def token_logprobs(logits: np.ndarray, token: int, top_n: int) -> tuple[float, list[tuple[int, float]]]:
    """(log-probability of token, the top_n (id, log-probability) best first) under softmax(logits)."""
    row = logits.astype(np.float64)
    shifted = row - np.max(row)
    log_z = np.log(np.sum(np.exp(shifted)))
    top = top_token_ids(row, top_n) if top_n > 0 else np.zeros(0, np.int64)
    return float(shifted[token] - log_z), [(int(t), float(shifted[t] - log_z)) for t in top]


def entropy(logits: np.ndarray) -> float:  # f32[V]
    """Entropy in nats of softmax(logits)."""
    row = logits.astype(np.float64)
    shifted = row - np.max(row)
    p = np.exp(shifted)
    z = p.sum()
    return float(np.log(z) - (p * shifted).sum() / z)


def sample_row(logits: np.ndarray, params: SamplingParams, generator: np.random.Generator) -> int:  # f32[V]
    """Temperature, then top-k, then top-p over the renormalised rest, then min-p, then one inverse-CDF draw."""
    return draw_token(sampling_weights(logits, params), generator.random())


def sampling_weights(logits: np.ndarray, params: SamplingParams) -> np.ndarray:  # f32[V] -> f64[V]
    """The unnormalised distribution sample_row draws from (removed tokens weigh 0; the best weighs 1)."""
    scaled = logits.astype(np.float64) / params.temperature  # f64[V]
    if params.top_k > 0 or params.top_p < 1.0:
        scaled = filter_top_k_top_p(scaled, params.top_k, params.top_p)
    weights = np.exp(scaled - np.max(scaled))  # f64[V]  unnormalised; removed tokens weigh 0
    if params.min_p > 0:  # the best token has weight 1: keep tokens of weight >= min_p
        weights = np.where(weights >= params.min_p, weights, 0.0)
    return weights


def filter_top_k_top_p(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:  # f64[V] -> f64[V]
    """Set to -inf all but the top_k best tokens, then all but the smallest best-first prefix of
    those whose probability (renormalised over the top_k) reaches top_p.

    Order is by logit, ties by lowest token id, so exactly top_k tokens survive the top-k filter.
    The best token always survives. top_k <= 0 and top_p >= 1 switch the filters off.
    """
    vocab = logits.shape[0]
    k = min(top_k, vocab) if top_k > 0 else vocab
    kept = top_token_ids(logits, k) if k < vocab else None  # i64[k]
    if top_p < 1.0:
        weights = np.exp(logits - np.max(logits))  # f64[V]
        total = np.sum(weights[kept]) if kept is not None else np.sum(weights)
        num_candidates = min(k, NUM_TOP_P_CANDIDATES)
        while True:
            candidates = kept[:num_candidates] if kept is not None else top_token_ids(logits, num_candidates)
            cumulative = np.cumsum(weights[candidates]) / total  # f64[n]
            # NOTE: a best-first prefix whose mass reaches top_p contains the whole nucleus.
            if cumulative[-1] >= top_p or num_candidates == k:
                break
            num_candidates = min(k, num_candidates * 8)
        exclusive = cumulative - weights[candidates] / total  # f64[n]  mass of the better tokens
        kept = candidates[exclusive < top_p]
    out = np.full_like(logits, -np.inf)
    out[kept] = logits[kept]
    return out


def top_token_ids(logits: np.ndarray, n: int) -> np.ndarray:  # f[V] -> i64[n]
    """The n best token ids, best first, ties broken by lowest id (an exact prefix of a stable sort)."""
    vocab = logits.shape[0]
    if n >= vocab:
        return np.argsort(-logits, kind="stable")
    threshold = np.partition(logits, vocab - n)[vocab - n]  # the n-th largest value
    above = np.flatnonzero(logits > threshold)  # ascending ids
    ties = np.flatnonzero(logits == threshold)[: n - above.shape[0]]
    ids = np.concatenate([above, ties])  # i64[n]
    return ids[np.argsort(-logits[ids], kind="stable")]


def draw_token(weights: np.ndarray, uniform: float) -> int:  # f64[V] >= 0, not all 0
    """Inverse-CDF draw with uniform in [0, 1); never returns a token of weight zero."""
    cdf = np.cumsum(weights)  # f64[V]
    # Token i owns [cdf[i-1], cdf[i]); searchsorted(side="right") finds it, skipping empty ranges.
    token = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    if token >= weights.shape[0]:  # rounding put the target on the very end
        token = int(np.flatnonzero(weights)[-1])
    return token


def find_stop_string(text: str, stops: tuple[str, ...], new_from: int) -> int:
    """Index in text where the earliest stop string starts, or -1.

    Only matches that end at or after `new_from` (where newly added text begins) are searched,
    so earlier text is not rescanned on every token.
    """
    best = -1
    for stop in stops:
        start = max(0, new_from - len(stop) + 1)
        i = text.find(stop, start)
        if i != -1 and (best == -1 or i < best):
            best = i
    return best
