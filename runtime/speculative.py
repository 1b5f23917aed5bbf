"""Speculative decoding: configuration, proposers, the accept rule and adaptive draft lengths.

A step verifies each decoding request's draft d_1..d_k by running its last token and the k drafts as
k+1 rows of the ragged step (logits for every row). Row j holds the target's distribution for the
token after d_j (row 0: after the last real token). Accept rule:
  greedy      accept d_{j+1} while it equals argmax(row j); then emit argmax of the first rejected row
              (or of row k when all were accepted: the bonus token). Output is token-identical to the
              target alone.
  sampling    accept d_{j+1} with probability min(1, p_j(d) / q_j(d)); on the first rejection draw from
              the residual max(p_j - q_j, 0) normalised; when all are accepted draw the bonus from p_k.
              p is the target's processed distribution (temperature, top-k, top-p, min-p as the sampler
              applies them), q the distribution the draft token was drawn from (one-hot for
              deterministic proposers). The emitted tokens have exactly the target's distribution
              (Leviathan et al. 2023, Chen et al. 2023).
K/V of rejected drafts stay in the pool but past the sequence's length: the next step overwrites them.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np

from lowering.speculation import METHODS, Speculative
from runtime.sampler import SamplingParams, draw_token, sampling_weights
from runtime.step import StepInput

if TYPE_CHECKING:
    from runtime.engine import Request

__all__ = ["METHODS", "Speculative", "Draft", "StepRows", "Proposer", "accept_greedy", "accept_sampled",
           "NgramProposer", "DraftModelProposer", "DraftLengthController", "SpecStats", "make_proposer"]


@dataclasses.dataclass
class Draft:
    """A proposed continuation of one request."""

    tokens: list[int]  # the draft, at most the length asked for (may be empty)
    # f32[len(tokens), V]: the distribution each token was drawn from (sampling requests of a
    # stochastic proposer); None for a deterministic proposal (q is one-hot on the token).
    probs: np.ndarray | None = None
    # trailing tokens the engine appended so every sequence verifies the same number of rows (a CUDA graph per
    # row count); they are deterministic guesses (q one-hot), so accepting one is still exact
    num_filler: int = 0


@dataclasses.dataclass
class StepRows:
    """What one target step computed for one request, for proposers that read hidden states.

    Rows are the request's tokens at positions start .. start + len(token_ids) - 1 of this step (a
    prefill chunk, a decode row or a verification window). After the accept rule only the first
    `num_valid` of them belong to the sequence (the last real token and the accepted drafts); the
    hidden state of row num_valid - 1 produced the token just emitted (`next_token`, or None while a
    prefill is still incomplete).
    """

    request: "Request"
    start: int
    token_ids: np.ndarray  # i32[n]
    hidden: np.ndarray  # f32[n, D]  the target's final-norm hidden states (the lm_head's input)
    num_valid: int
    next_token: int | None


class Proposer(Protocol):
    """Proposes drafts for decoding requests; holds per-request state keyed by the request object."""

    name: str
    needs_hidden: bool  # True: the engine runs the target with hidden states and calls observe()

    def propose(self, requests: Sequence["Request"], lengths: Sequence[int]) -> list[Draft]:
        """A draft of at most lengths[i] tokens continuing requests[i].token_ids (lengths[i] >= 1).

        Sampling requests (request.params.temperature > 0) may be drafted stochastically with
        request.generator; the Draft then carries the distributions the tokens were drawn from.
        """
        ...

    def observe(self, rows: Sequence[StepRows]) -> None:
        """The target step's rows of every request it ran (only called when needs_hidden)."""
        ...

    def release(self, request: "Request") -> None:
        """The request finished, was aborted or preempted: drop its state."""
        ...


# ---------------------------------------------------------------------------------------------
# The accept rule


def accept_greedy(target_tokens: Sequence[int], draft_tokens: Sequence[int]) -> list[int]:
    """Greedy verification: target_tokens i32[k+1] are the argmax of the k+1 rows; returns the emitted
    tokens (the accepted drafts, then the target's token at the first mismatch or the bonus token)."""
    out = []
    for j, d in enumerate(draft_tokens):
        t = int(target_tokens[j])
        if t != int(d):
            out.append(t)
            return out
        out.append(t)
    out.append(int(target_tokens[len(draft_tokens)]))
    return out


def target_distribution(logits: np.ndarray, params: SamplingParams) -> np.ndarray:  # f32[V] -> f64[V], sums to 1
    """The distribution the sampler draws from for these logits and parameters."""
    w = sampling_weights(logits, params)
    return w / w.sum()


def accept_sampled(logits: np.ndarray, draft: Draft, params: SamplingParams, generator: np.random.Generator) -> list[int]:
    """Rejection sampling over the k+1 rows logits f32[k+1, V]; the emitted tokens are distributed exactly as
    tokens sampled one at a time from the target with `params`."""
    out = []
    for j, d in enumerate(draft.tokens):
        d = int(d)
        p = target_distribution(logits[j], params)  # f64[V]
        if draft.probs is None:  # a deterministic proposal: q is one-hot on d
            q_d, residual = 1.0, None
        else:
            q = draft.probs[j].astype(np.float64)
            q = q / q.sum()
            q_d, residual = float(q[d]), q
        # accept with probability min(1, p(d) / q(d))
        if q_d > 0.0 and generator.random() * q_d < p[d]:
            out.append(d)
            continue
        if residual is None:
            rest = p.copy()
            rest[d] = 0.0
        else:
            rest = np.maximum(p - residual, 0.0)
        if not rest.sum() > 0.0:  # p == q up to rounding: any draw from p is right
            rest = p
        out.append(draw_token(rest, generator.random()))
        return out
    out.append(draw_token(target_distribution(logits[len(draft.tokens)], params), generator.random()))
    return out


# ---------------------------------------------------------------------------------------------
# Proposers without hidden states: prompt lookup (n-gram) and a draft model


class NgramProposer:
    """Prompt lookup: find the longest recent n-gram (ngram_max down to ngram_min) equal to the request's last
    n tokens earlier in its prompt + output, and propose the tokens that followed it (most recent match)."""

    name = "ngram"
    needs_hidden = False

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4):
        self.sizes = list(range(ngram_max, ngram_min - 1, -1))
        self._index: dict[Any, tuple[int, list[dict]]] = {}  # request -> (tokens indexed, {n-gram: continuation})

    def propose(self, requests, lengths) -> list[Draft]:
        return [Draft(self._lookup(r, int(k))) for r, k in zip(requests, lengths)]

    def _lookup(self, req, k: int) -> list[int]:
        tokens = req.token_ids
        entry = self._index.get(req)
        done, tables = entry if entry is not None else (0, [{} for _ in self.sizes])
        # an n-gram ending before position e (exclusive) is indexed once token e exists: its continuation
        for e in range(max(done, 1), len(tokens)):
            for n, table in zip(self.sizes, tables):
                if e >= n:
                    table[tuple(tokens[e - n:e])] = e
        self._index[req] = (len(tokens), tables)
        for n, table in zip(self.sizes, tables):
            if len(tokens) >= n:
                at = table.get(tuple(tokens[len(tokens) - n:]))
                if at is not None:
                    return [int(t) for t in tokens[at:at + k]]
        return []

    def observe(self, rows) -> None:
        pass

    def release(self, request) -> None:
        self._index.pop(request, None)


@dataclasses.dataclass(eq=False)
class _DraftSeq:
    """A request's state in the draft model's KV pool (the fields KVCacheManager reads)."""

    request_id: str
    token_ids: list[int]  # what the draft cache was computed over (the request's tokens, then the drafts)
    num_computed_tokens: int = 0
    block_ids: list[int] = dataclasses.field(default_factory=list)
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    confirmed: int = 0  # leading tokens known to equal the request's


class DraftModelProposer:
    """A smaller model with the same tokenizer drafts k tokens autoregressively, with its own Program and KV pool.

    Each propose() first runs the tokens the draft cache lacks (the prompt at first; then the tokens the
    target emitted past the draft's accepted prefix), then k-1 one-token steps; all requests go together in
    ragged steps. Sampling requests draw each draft token from the draft's distribution processed with the
    request's sampling parameters, and the Draft carries those distributions for the accept rule.
    """

    name = "draft"
    needs_hidden = False
    CATCH_UP_TOKENS = 512  # tokens per draft step while catching up (a long prompt runs in chunks)

    def __init__(self, program, *, vocab_size: int):
        from runtime.kv_manager import KVCacheManager

        if getattr(program, "kv_window", None) is not None or getattr(program, "num_blocks_w", None) is not None:
            # NOTE: the draft cache rolls back to the last confirmed token, which may lie before blocks a window freed
            raise ValueError("a draft model with sliding-window attention layers is not supported as a proposer")
        self.program = program
        self.vocab_size = vocab_size
        self.kv = KVCacheManager(program.num_blocks, program.block_size, enable_prefix_caching=False)
        self._seqs: dict[Any, _DraftSeq] = {}
        self.num_steps = 0

    def propose(self, requests, lengths) -> list[Draft]:
        drafts = [Draft([]) for _ in requests]
        active = []  # (index, request, seq, k)
        for i, (req, k) in enumerate(zip(requests, lengths)):
            seq = self._sync(req)
            n = len(req.token_ids)
            if n > self.program.max_blocks_per_seq * self.program.block_size - k:
                continue  # the draft program's tables cannot hold this context
            if not self.kv.allocate_for(seq, n - seq.num_computed_tokens, num_lookahead=int(k) - 1):
                continue  # the draft pool is full: no draft for this request this step
            active.append((i, req, seq, int(k)))
        if not active:
            return drafts
        probs: dict[int, list[np.ndarray]] = {i: [] for i, *_ in active}
        # catch up: run every token the draft cache lacks; the last row of each gives the first draft token
        pending = {i: list(req.token_ids[seq.num_computed_tokens:]) for i, req, seq, _ in active}
        while pending:
            chunks = []
            budget = max(self.CATCH_UP_TOKENS, len(pending))
            for i, req, seq, _ in active:
                if i in pending and budget > 0:
                    take = min(len(pending[i]), max(1, budget))
                    budget -= take
                    chunks.append((i, seq, pending[i][:take], take == len(pending[i])))
            picked = self._run(chunks, active_by_index={i: (req, k) for i, req, _, k in active})
            for (i, seq, toks, last), tok in zip(chunks, picked):
                seq.num_computed_tokens += len(toks)
                pending[i] = pending[i][len(toks):]
                if last:
                    del pending[i]
                    drafts[i].tokens.append(tok[0])
                    if tok[1] is not None:
                        probs[i].append(tok[1])
        # then one token at a time until each request has its k tokens
        for j in range(1, max(k for *_, k in active)):
            chunks = [(i, seq, [drafts[i].tokens[-1]], True) for i, _, seq, k in active if k > j]
            picked = self._run(chunks, active_by_index={i: (req, k) for i, req, _, k in active})
            for (i, seq, toks, _), tok in zip(chunks, picked):
                seq.num_computed_tokens += 1
                drafts[i].tokens.append(tok[0])
                if tok[1] is not None:
                    probs[i].append(tok[1])
        for i, req, seq, k in active:
            seq.token_ids = list(req.token_ids) + drafts[i].tokens[:-1]
            seq.confirmed = len(req.token_ids)
            if probs[i]:
                drafts[i].probs = np.stack(probs[i]).astype(np.float32)
        return drafts

    def _sync(self, req) -> _DraftSeq:
        """The request's draft state, its computed prefix cut to what still matches the request's tokens."""
        seq = self._seqs.get(req)
        if seq is None:
            seq = self._seqs[req] = _DraftSeq(req.request_id, list(req.token_ids))
            return seq
        valid = seq.confirmed
        limit = min(seq.num_computed_tokens, len(req.token_ids))
        while valid < limit and seq.token_ids[valid] == req.token_ids[valid]:
            valid += 1
        # the newest token is always run again: its logits give the first draft token
        seq.num_computed_tokens = min(seq.num_computed_tokens, valid, len(req.token_ids) - 1)
        seq.token_ids = list(req.token_ids)
        seq.confirmed = len(req.token_ids)
        return seq

    def _run(self, chunks, *, active_by_index) -> list[tuple[int, np.ndarray | None]]:
        """One ragged draft step over (index, seq, tokens, wants_token) chunks -> (token, q or None) per chunk."""
        bs = self.program.block_size
        q_lens = np.array([len(t) for _, _, t, _ in chunks], np.int32)
        query_start = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
        starts = np.array([seq.num_computed_tokens for _, seq, _, _ in chunks], np.int32)
        seq_lens = starts + q_lens
        width = int(max(1, (-(-seq_lens // bs)).max()))
        tables = np.zeros((len(chunks), width), np.int32)
        for s, (_, seq, _, _) in enumerate(chunks):
            ids = seq.block_ids[:width]
            tables[s, :len(ids)] = ids
        seq_of_row = np.repeat(np.arange(len(chunks)), q_lens)
        positions = (np.arange(int(query_start[-1]), dtype=np.int32) - query_start[seq_of_row]) + starts[seq_of_row]
        slots = tables[seq_of_row, positions // bs] * bs + positions % bs
        step = StepInput(token_ids=np.concatenate([np.asarray(t, np.int32) for _, _, t, _ in chunks]),
                         positions=positions.astype(np.int32), slot_mapping=slots.astype(np.int32),
                         query_start=query_start, seq_lens=seq_lens.astype(np.int32), block_tables=tables,
                         logit_rows=(query_start[1:] - 1).astype(np.int32))
        params = [active_by_index[i][0].params for i, *_ in chunks]
        step_greedy = getattr(self.program, "step_greedy", None)
        self.num_steps += 1
        if step_greedy is not None and all(p.is_greedy for p in params):
            return [(int(t), None) for t in np.asarray(step_greedy(step))]
        logits = np.asarray(self.program.step(step))
        out = []
        for row, ((i, _, _, wants), p) in enumerate(zip(chunks, params)):
            if not wants or p.is_greedy:
                out.append((int(np.argmax(logits[row])), None))
                continue
            q = np.zeros(self.vocab_size, np.float64)  # over the target's vocabulary
            n = min(self.vocab_size, logits.shape[1])
            q[:n] = target_distribution(logits[row][:n], p)
            req = active_by_index[i][0]
            out.append((draw_token(q, req.generator.random()), q.astype(np.float32)))
        return out

    def observe(self, rows) -> None:
        pass

    def release(self, request) -> None:
        seq = self._seqs.pop(request, None)
        if seq is not None:
            self.kv.free(seq)


# ---------------------------------------------------------------------------------------------
# Adaptive draft length and metrics


def cost_bucket(num_tokens: int) -> int:
    """Step sizes whose costs are tracked together: exact up to 8, then four buckets per octave."""
    if num_tokens <= 8:
        return max(num_tokens, 1)
    p = 1 << (num_tokens - 1).bit_length() - 1  # num_tokens in (p, 2p]
    step = p // 4
    return -(-num_tokens // step) * step


def decayed_mean(old: float | None, sample: float, decay: float, outlier: float) -> float:
    """A decayed running mean: the sample itself when there is no estimate yet, else decay * old + (1 - decay) *
    sample, the sample clipped to outlier * old (one stall of the machine must not swamp the estimate)."""
    return sample if old is None else decay * old + (1 - decay) * min(sample, outlier * old)


class DraftLengthController:
    """Chooses each step's draft length k in 0..max_len from measured costs and acceptance.

    For B decoding requests a step with drafts of k tokens runs T = B (k + 1) rows and costs c(T) plus d(k).
    c(T) is the engine's whole step (scheduling, the Program, the accept rule, appending tokens), measured per
    cost bucket of T from every step that did not compile: verification rows cost host time too. d(k) is a
    propose() call, measured per k (calls that compiled a new shape are not samples). Request r with per-token
    acceptance a_r emits E_r(k) = 1 + a_r + ... + a_r^k tokens on average (a chain stops at the first
    rejection). The controller picks the k maximising sum_r E_r(k) / (c + d), so speculation is used while
    verification rows are cheap (low batch) and dropped when every row costs (high batch).

    Guards against what the model does not see: k > 0 must beat k = 0 by GAIN_MARGIN (a new step shape may
    cost a compile or a CUDA graph capture); the last choice is kept while within STICKY of the best (no
    flapping between shapes); after PROBE_EVERY choices of 0 it drafts once, since acceptance is learned only
    from verifications, unless even drafts that were always accepted would lose to no drafts; after choosing 0 it
    decides again only every RECHECK_EVERY steps (the decision is a pass over every request). The two ends
    (k = max_len, 0) are explored at most twice per batch-size bucket while their step size is unmeasured;
    unmeasured sizes between measured ones are interpolated, larger ones extrapolated in proportion to T (prefill
    chunks sharing the step count too). The first sample of each size is dropped, later ones enter a decayed mean
    with outliers clipped (a stall of the machine must not switch speculation off for good) and replaced outright
    by a sample many times smaller (the estimate held an unseen compile). a_r is a decayed count of accepted /
    tried draft tokens per request, starting from the running average of all requests.
    """

    DECAY = 0.8  # weight of the old estimate per update
    PRIOR_ACCEPTANCE = 0.5
    OUTLIER = 4.0  # a sample over this many times the estimate counts as this many times (a stall, a GC)
    STICKY = 0.03  # keep the last draft length while its expected rate is within this fraction of the best
    GAIN_MARGIN = 0.08  # speculate only where the predicted rate beats no drafts by this fraction
    PROBE_EVERY = 64  # after this many steps without drafts, draft once to refresh the acceptance estimates
    RECHECK_EVERY = 8  # after choosing no drafts, decide again only every this many steps

    def __init__(self, max_len: int, *, adaptive: bool = True):
        self.max_len = max_len
        self.adaptive = adaptive
        self.step_cost: dict[int, float] = {}  # cost bucket -> seconds (decayed mean)
        self.draft_cost: dict[int, float] = {}  # k -> seconds of one propose() call
        self._seen: set = set()  # (table, key) whose first sample was dropped: it may include a jit compile
        self._explored: dict[int, int] = {}  # step-size bucket -> times tried for it (a step may land elsewhere)
        self.fill = 1.0  # drafted tokens / (requests x k): proposers may return shorter drafts (decayed mean)
        self._acc: dict[Any, list[float]] = {}  # request -> [accepted, tried] (decayed)
        self._global = [self.PRIOR_ACCEPTANCE, 1.0]
        self._last_k: int | None = None  # the last length chosen by the cost model (not an exploration)
        self._idle = 0  # choices of no drafts since the last verification (see PROBE_EVERY)
        self.probing = False  # the last choice was a probe (the engine may skip one whose shape must compile)
        self._hold = 0  # steps left before the next re-decision after choosing no drafts

    # -- measurements ----------------------------------------------------------------------------

    def record_step(self, num_tokens: int, seconds: float) -> None:
        self._update(self.step_cost, cost_bucket(num_tokens), seconds)

    def record_draft(self, k: int, seconds: float | None, fill: float | None = None) -> None:
        """A propose() call for length k took `seconds` (None: it compiled, no cost sample); `fill` = tokens
        drafted / (requests x k)."""
        if seconds is not None:
            self._update(self.draft_cost, k, seconds)
        if fill is not None:
            self.fill = self.DECAY * self.fill + (1 - self.DECAY) * min(max(fill, 0.0), 1.0)

    def record_acceptance(self, request, num_drafted: int, num_accepted: int) -> None:
        """A verification accepted num_accepted of num_drafted tokens (a chain: one rejection ends it)."""
        if num_drafted <= 0:
            return
        self._idle = 0
        tried = num_accepted + (1 if num_accepted < num_drafted else 0)
        for acc in (self._acc.setdefault(request, list(self._global)), self._global):
            acc[0] = self.DECAY * acc[0] + num_accepted
            acc[1] = self.DECAY * acc[1] + tried

    def release(self, request) -> None:
        self._acc.pop(request, None)

    def acceptance(self, request) -> float:
        a, t = self._acc.get(request, self._global)
        return min(max(a / t, 0.0), 0.999) if t > 0 else self.PRIOR_ACCEPTANCE

    # -- the choice --------------------------------------------------------------------------------

    def choose(self, requests: Sequence[Any], prefill_tokens: int = 0, max_tokens: int | None = None,
               uniform: bool = False) -> int:
        """The draft length for this step's decoding requests (before each request's own cap). The step also
        runs up to prefill_tokens prompt tokens, all within max_tokens (the engine's token budget). uniform: the
        engine fills every draft to the chosen length (CUDA graphs), so a step runs B (k + 1) rows however
        full the proposals are."""
        self.probing = False
        if not self.adaptive or not requests:
            return self.max_len
        b = len(requests)

        def rows(k):  # the step's expected rows: decodes, their drafts (as long as proposals tend to be), prefill
            decode = b + (b * k if uniform else round(b * k * self.fill))
            t = prefill_tokens + decode
            return min(t, max(max_tokens, decode)) if max_tokens else t

        batch = cost_bucket(b)
        for k in (self.max_len, 0):  # explore the two ends first: twice per batch-size bucket (the first is dropped)
            if cost_bucket(rows(k)) not in self.step_cost and self._explored.get((batch, k), 0) < 2:
                self._explored[(batch, k)] = self._explored.get((batch, k), 0) + 1
                return k
        if not self.step_cost:
            return self.max_len
        alphas = np.array([self.acceptance(r) for r in requests])
        rates = []
        for k in range(self.max_len + 1):
            # a request without a proposal (a fraction 1 - fill of them) emits its one token
            emitted = b + self.fill * float(np.sum((1.0 - alphas ** (k + 1)) / (1.0 - alphas) - 1.0))
            cost = self._step_estimate(rows(k)) + (self._draft_estimate(k) if k else 0.0)
            rates.append(emitted / max(cost, 1e-9))
        best_k = int(np.argmax(rates))
        # speculation must clearly win: it has costs the step model does not see (a new step shape's compile or
        # CUDA graph capture, the variance of acceptance), so a small predicted gain is not taken
        if best_k and rates[best_k] < (1.0 + self.GAIN_MARGIN) * rates[0]:
            best_k = 0
        # hysteresis: keep the last length unless another is clearly better, so lengths do not flap between
        # near-equal options (each may be another shape to compile)
        last = self._last_k
        if last is not None and last <= self.max_len and rates[last] >= (1.0 - self.STICKY) * rates[best_k] \
                and (last == 0 or rates[last] >= (1.0 + self.GAIN_MARGIN) * rates[0]):
            best_k = last
        self._last_k = best_k
        if best_k == 0:
            # acceptance is learned only from verifications: now and then draft anyway, so a request whose
            # drafts would be accepted more than assumed is found; but not where drafts could not win even if every
            # one were accepted (high load: every row costs), which a probe would only pay for
            self._idle += 1
            if self._idle > self.PROBE_EVERY:
                k = self.max_len
                best_case = (b + self.fill * b * k) / max(self._step_estimate(rows(k)) + self._draft_estimate(k), 1e-9)
                if best_case >= (1.0 + self.GAIN_MARGIN) * rates[0]:
                    self.probing = True
                    return self.max_len
                self._idle = 0
            self._hold = self.RECHECK_EVERY - 1
        return best_k

    def skip_probe(self) -> None:
        """The engine did not run the probe just chosen (its step shape would compile): wait a full period."""
        self.probing = False
        self._idle = 0
        self._hold = self.RECHECK_EVERY - 1

    @property
    def holding(self) -> bool:
        """Whether the next steps draft nothing until a re-decision (see hold_off)."""
        return self.adaptive and self._hold > 0

    def hold_off(self) -> bool:
        """True for the steps after a choice of no drafts until the next re-decision (RECHECK_EVERY): the engine
        then drafts nothing without asking choose()."""
        if self._hold <= 0 or not self.adaptive:
            return False
        self._hold -= 1
        self._idle += 1
        return True

    def _step_estimate(self, num_tokens: int) -> float:
        bucket = cost_bucket(num_tokens)
        if bucket in self.step_cost:
            return self.step_cost[bucket]
        known = sorted(self.step_cost)
        lower = [t for t in known if t < bucket]
        upper = [t for t in known if t > bucket]
        if lower and upper:
            t0, t1 = lower[-1], upper[0]
            c0, c1 = self.step_cost[t0], self.step_cost[t1]
            return c0 + (c1 - c0) * (bucket - t0) / (t1 - t0)
        if lower:
            return self.step_cost[lower[-1]] * bucket / lower[-1]
        return self.step_cost[upper[0]]

    def _draft_estimate(self, k: int) -> float:
        if k in self.draft_cost:
            return self.draft_cost[k]
        if not self.draft_cost:
            return 0.0
        near = min(self.draft_cost, key=lambda j: abs(j - k))
        return self.draft_cost[near] * k / near

    def _update(self, table: dict, key, seconds: float) -> None:
        if (id(table), key) not in self._seen:  # the first step of a shape compiles it (XLA, Triton autotune)
            self._seen.add((id(table), key))
            return
        old = table.get(key)
        if old is not None and seconds * self.OUTLIER < old:  # the estimate held a stall (an unseen compile)
            old = None
        table[key] = decayed_mean(old, seconds, self.DECAY, self.OUTLIER)


@dataclasses.dataclass
class SpecStats:
    """Speculative decoding counters since the engine started."""

    method: str = ""
    num_verifications: int = 0  # request-steps that verified a non-empty draft
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_emitted_tokens: int = 0  # tokens those verifications emitted (accepted + one each)
    num_steps: int = 0  # engine steps with decoding requests
    num_device_steps: int = 0  # of those, steps run on the device by bursts (Engine(spec_on_device=...))
    draft_length_steps: dict[int, int] = dataclasses.field(default_factory=dict)  # chosen k -> steps
    last_draft_length: int = 0

    def record_draft_length(self, k: int) -> None:
        """An engine step with decoding requests drafted k tokens each (0: none)."""
        self.num_steps += 1
        self.draft_length_steps[k] = self.draft_length_steps.get(k, 0) + 1
        self.last_draft_length = k

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification (accepted drafts + the target's own token), >= 1."""
        return self.num_emitted_tokens / self.num_verifications if self.num_verifications else 0.0

    @property
    def mean_draft_length(self) -> float:
        total = sum(self.draft_length_steps.values())
        return sum(k * n for k, n in self.draft_length_steps.items()) / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "num_verifications": self.num_verifications,
                "num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens,
                "num_emitted_tokens": self.num_emitted_tokens, "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length, "mean_draft_length": self.mean_draft_length,
                "last_draft_length": self.last_draft_length, "num_device_steps": self.num_device_steps,
                "draft_length_steps": {str(k): v for k, v in sorted(self.draft_length_steps.items())}}


def make_proposer(spec: Speculative, *, target, program, max_num_seqs: int, max_model_len: int,
                  program_options: dict | None = None) -> Proposer:
    """The proposer for `spec` over a target model (CompiledModel / LoadedModel) and its Program."""
    vocab = target.config.vocab_size if getattr(target, "config", None) is not None else program.vocab_size
    if spec.method == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "draft":
        draft = spec.draft
        if isinstance(draft, str) and draft == "<object>":
            raise ValueError("this model was compiled with a draft model object that was not kept; pass "
                             "Engine(..., speculative=Speculative(method='draft', draft=<model>))")
        if isinstance(draft, str):
            from lowering.compile import compile_model

            draft = compile_model(draft, target=target.target, progress=False)
        if not hasattr(draft, "make_program"):
            raise ValueError(f"speculative draft must be a compiled model, a loaded artifact or a checkpoint "
                             f"source, got {type(draft).__name__}")
        _check_same_tokenizer(target, draft)
        target_tokens = program.num_blocks * program.block_size
        draft_blocks = -(-target_tokens // draft.block_size) + max_num_seqs
        draft_program = draft.make_program(num_blocks=draft_blocks, max_num_seqs=max_num_seqs,
                                           max_model_len=max_model_len, **(program_options or {}))
        return DraftModelProposer(draft_program, vocab_size=vocab)
    from runtime.draft_heads import make_head_proposer  # medusa, eagle

    device = getattr(program, "device", None)  # a CUDA Program's torch device: the EAGLE head runs there too
    if device is not None and type(device).__module__.split(".")[0] != "torch":
        device = None
    return make_head_proposer(spec.method, spec.heads, target.params, target.config, device=device)


def _check_same_tokenizer(target, draft) -> None:
    """A draft model must speak the target's token ids: same vocabulary size (within padding) and, when both
    have tokenizers, the same ids for a probe text."""
    tc, dc = getattr(target, "config", None), getattr(draft, "config", None)
    if tc is not None and dc is not None and dc.vocab_size != tc.vocab_size:
        raise ValueError(f"the draft model's vocabulary ({dc.vocab_size} tokens) differs from the target's "
                         f"({tc.vocab_size}): speculative decoding needs a draft with the same tokenizer")
    tt, dt = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    if tt is not None and dt is not None:
        probe = "The quick brown fox: 12 + 30 = 42, naïve café."
        if list(tt.encode(probe, add_special_tokens=False)) != list(dt.encode(probe, add_special_tokens=False)):
            raise ValueError("the draft model's tokenizer differs from the target's: speculative decoding needs a "
                             "draft with the same tokenizer")
