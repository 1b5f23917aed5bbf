"""A tiny numpy language model that honours the Program contract, with a byte tokenizer and a model handle."""
from __future__ import annotations

import dataclasses

import numpy as np

from lowering.models.config import ModelConfig
from runtime.step import StepInput

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS = {"<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID}
NUM_SPECIAL = len(SPECIAL_TOKENS)
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256


class ByteTokenizer:
    """Special tokens 0..2, then one token per byte, so a multi-byte character spans several tokens."""

    def __init__(self, eos_token_ids: tuple[int, ...] = (EOS_ID,)):
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = BOS_ID

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [BOS_ID] if add_special_tokens else []
        i = 0
        while i < len(text):
            special = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
            if special is not None:
                ids.append(SPECIAL_TOKENS[special])
                i += len(special)
            else:
                ids.extend(NUM_SPECIAL + b for b in text[i].encode("utf-8"))
                i += 1
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        names = {v: k for k, v in SPECIAL_TOKENS.items()}
        pieces, run = [], bytearray()
        for t in ids:
            if t >= NUM_SPECIAL:
                run.append(t - NUM_SPECIAL)
                continue
            pieces.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            if not skip_special_tokens:
                pieces.append(names[t])
        pieces.append(run.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        text = "<s>" + "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


@dataclasses.dataclass
class StepRecord:
    num_tokens: int
    num_seqs: int
    num_logit_rows: int


class ToyProgram:
    """A 2-layer attention model over a real paged KV pool, in float64 numpy.

    Every layer writes K/V of the step's tokens at slot_mapping, then each token attends causally
    over its sequence's context, read back through block_tables[s, :ceil(seq_lens[s] / block_size)].
    Pages start as NaN and a read of an unwritten slot raises, so block-table, slot or position
    mistakes change the output or fail loudly. `script` (optional) biases the next token at
    absolute position p + 1 towards script[p + 1] (EOS past its end): a model that "knows" a text.
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        block_size: int,
        num_blocks: int,
        max_blocks_per_seq: int,
        num_layers: int = 2,
        num_heads: int = 2,
        head_dim: int = 8,
        seed: int = 0,
        script: list[int] | None = None,
        suppressed_ids: tuple[int, ...] = (PAD_ID, BOS_ID, EOS_ID),
    ):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = max_blocks_per_seq
        self.vocab_size = vocab_size
        self.num_heads, self.head_dim = num_heads, head_dim
        self.script = script
        self.suppressed_ids = list(suppressed_ids)
        dim = num_heads * head_dim
        rng = np.random.default_rng(seed)
        self.embed = rng.normal(size=(vocab_size, dim))  # f64[V, D]
        self.layers = [
            {name: rng.normal(size=(dim, dim)) / np.sqrt(dim) for name in ("wq", "wk", "wv", "wo")}
            for _ in range(num_layers)
        ]
        self.unembed = rng.normal(size=(dim, vocab_size)) * 3.0  # f64[D, V]
        pool_shape = (num_layers, num_blocks, block_size, num_heads, head_dim)
        self.k_pool = np.full(pool_shape, np.nan)  # f64[layers, N, block_size, H, Dh]
        self.v_pool = np.full(pool_shape, np.nan)
        self.steps: list[StepRecord] = []

    def step(self, inp: StepInput) -> np.ndarray:  # -> f32[L, V]
        inp.validate(block_size=self.block_size, num_blocks=self.num_blocks)
        self.check_positions(inp)
        t, h, d = inp.num_tokens, self.num_heads, self.head_dim
        x = self.embed[inp.token_ids] + encode_positions(inp.positions, h * d)  # f64[T, D]
        write = inp.slot_mapping >= 0  # bool[T]
        for layer, w in enumerate(self.layers):
            q = (x @ w["wq"]).reshape(t, h, d)  # f64[T, H, Dh]
            k = (x @ w["wk"]).reshape(t, h, d)
            v = (x @ w["wv"]).reshape(t, h, d)
            k_slots = self.k_pool[layer].reshape(-1, h, d)  # f64[N * block_size, H, Dh] (a view)
            v_slots = self.v_pool[layer].reshape(-1, h, d)
            k_slots[inp.slot_mapping[write]] = k[write]
            v_slots[inp.slot_mapping[write]] = v[write]
            out = np.zeros((t, h, d))
            for s in range(inp.num_seqs):
                rows = slice(inp.query_start[s], inp.query_start[s + 1])
                out[rows] = self.attend(layer, q[rows], inp.positions[rows], inp.block_tables[s], int(inp.seq_lens[s]))
            x = x + out.reshape(t, h * d) @ w["wo"]
            x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6)

        logits = x[inp.logit_rows] @ self.unembed  # f64[L, V]
        logits[:, self.suppressed_ids] -= 1e3
        if self.script is not None:
            for i, pos in enumerate(inp.positions[inp.logit_rows]):
                nxt = pos + 1
                logits[i, self.script[nxt] if nxt < len(self.script) else EOS_ID] += 1e4
        self.steps.append(StepRecord(t, inp.num_seqs, len(inp.logit_rows)))
        return logits.astype(np.float32)

    def attend(
        self,
        layer: int,
        q: np.ndarray,  # f64[n, H, Dh]
        positions: np.ndarray,  # i32[n]
        block_table: np.ndarray,  # i32[B]
        seq_len: int,
    ) -> np.ndarray:  # f64[n, H, Dh]
        num_ctx_blocks = -(-seq_len // self.block_size)
        pages = block_table[:num_ctx_blocks]
        ctx_k = self.k_pool[layer][pages].reshape(-1, self.num_heads, self.head_dim)[:seq_len]  # f64[C, H, Dh]
        ctx_v = self.v_pool[layer][pages].reshape(-1, self.num_heads, self.head_dim)[:seq_len]
        if not (np.isfinite(ctx_k).all() and np.isfinite(ctx_v).all()):
            raise AssertionError(f"attention read an unwritten KV slot (blocks {pages.tolist()}, seq_len {seq_len})")
        scores = np.einsum("nhd,chd->hnc", q, ctx_k) / np.sqrt(self.head_dim)  # f64[H, n, C]
        causal = np.arange(seq_len)[None, :] <= positions[:, None]  # bool[n, C]
        scores = np.where(causal[None], scores, -np.inf)
        probs = np.exp(scores - scores.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.einsum("hnc,chd->nhd", probs, ctx_v)

    def check_positions(self, inp: StepInput) -> None:
        """The contract implies a sequence's new tokens sit at positions seq_len - n .. seq_len - 1."""
        for s in range(inp.num_seqs):
            lo, hi = inp.query_start[s], inp.query_start[s + 1]
            expected = np.arange(inp.seq_lens[s] - (hi - lo), inp.seq_lens[s])
            if not np.array_equal(inp.positions[lo:hi], expected):
                got = inp.positions[lo:hi].tolist()
                raise AssertionError(f"sequence {s} has positions {got}, expected {expected.tolist()}")

    def reset_pool(self) -> None:
        self.k_pool[:] = np.nan
        self.v_pool[:] = np.nan


def encode_positions(positions: np.ndarray, dim: int) -> np.ndarray:  # i32[T] -> f64[T, D]
    freqs = 1.0 / (10.0 ** (np.arange(dim // 2) / (dim // 2)))
    angles = positions[:, None].astype(np.float64) * freqs[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


class ToyModel:
    """The model handle the Engine expects: tokenizer, config, block_size, make_program."""

    def __init__(
        self,
        *,
        block_size: int = 16,
        default_num_blocks: int = 64,
        max_position_embeddings: int = 256,
        eos_token_ids: tuple[int, ...] = (EOS_ID,),
        script_text: str | None = None,
        seed: int = 0,
    ):
        self.tokenizer = ByteTokenizer(eos_token_ids)
        self.config = ModelConfig(
            architecture="llama",
            vocab_size=BYTE_VOCAB_SIZE,
            hidden_size=16,
            intermediate_size=32,
            num_layers=2,
            num_heads=2,
            num_kv_heads=2,
            head_dim=8,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=BOS_ID,
            eos_token_ids=tuple(eos_token_ids),
        )
        self.block_size = block_size
        self.max_model_len = max_position_embeddings
        self.default_num_blocks = default_num_blocks
        self.script = self.tokenizer.encode(script_text) if script_text is not None else None
        self.seed = seed
        self.programs: list[ToyProgram] = []

    program_class = ToyProgram  # what make_program builds (subclasses: programs with more of CudaProgram's interface)

    def make_program(self, *, num_blocks: int | None = None, max_num_seqs: int = 64, max_model_len: int | None = None):
        max_len = max_model_len or self.max_model_len
        program = self.program_class(
            vocab_size=BYTE_VOCAB_SIZE,
            block_size=self.block_size,
            num_blocks=num_blocks or self.default_num_blocks,
            max_blocks_per_seq=-(-max_len // self.block_size),
            seed=self.seed,
            script=self.script,
        )
        self.programs.append(program)
        return program


def reference_greedy(program: ToyProgram, prompt_ids: list[int], num_tokens: int) -> list[int]:
    """Greedy tokens computed without any engine: each step re-runs the whole sequence in blocks 0.."""
    ids = list(prompt_ids)
    for _ in range(num_tokens):
        n = len(ids)
        num_blocks = -(-n // program.block_size)
        assert num_blocks <= program.num_blocks
        program.reset_pool()
        inp = StepInput(
            token_ids=np.array(ids, np.int32),
            positions=np.arange(n, dtype=np.int32),
            slot_mapping=np.arange(n, dtype=np.int32),
            query_start=np.array([0, n], np.int32),
            seq_lens=np.array([n], np.int32),
            block_tables=np.arange(program.max_blocks_per_seq, dtype=np.int32)[None, :] % program.num_blocks,
            logit_rows=np.array([n - 1], np.int32),
        )
        ids.append(int(np.argmax(program.step(inp)[0])))
    program.reset_pool()
    return ids[len(prompt_ids) :]


class _ToyPending:
    def __init__(self, program: "AsyncToyProgram", generation: int, tokens: np.ndarray):
        self._program, self._generation, self._tokens = program, generation, tokens

    def result(self) -> np.ndarray:
        if self._program.generation - self._generation >= 2:
            raise AssertionError("a step's tokens were read after two later steps were launched")
        self._program.num_results += 1
        return self._tokens


class AsyncToyProgram(ToyProgram):
    """ToyProgram with CudaProgram's async-scheduling interface (step_async with a token feed) and device-style
    sampling (step_sample: a Gumbel draw keyed by (seed, offset), so a token does not depend on the batch).

    step_async runs the step at once (a GPU stream's order) and keeps its tokens for the next step's feed; a fed
    row must hold a valid id and gets the kept token. Reading a result after two later launches fails, as
    CudaProgram's does."""

    supports_async_steps = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.generation = 0
        self.num_results = 0
        self.num_fed_rows = 0
        self._last_tokens = np.zeros(0, np.int32)

    def step_greedy(self, inp: StepInput) -> np.ndarray:
        return np.argmax(self.step(inp), axis=-1).astype(np.int32)

    def step_sample(self, inp, *, temperature, top_k, top_p, seeds, offsets, min_p=None) -> np.ndarray:
        logits = self.step(inp).astype(np.float64)
        out = np.argmax(logits, axis=-1).astype(np.int32)
        for i, t in enumerate(temperature):
            if t > 0:
                g = np.random.default_rng([int(seeds[i]), int(offsets[i])]).gumbel(size=logits.shape[1])
                out[i] = int(np.argmax(logits[i] / t + g))
        return out

    def step_async(self, inp: StepInput, *, feed_rows=None, feed_from=None, sampling=None) -> _ToyPending:
        rows = np.asarray(feed_rows if feed_rows is not None else [], np.int64)
        sources = np.asarray(feed_from if feed_from is not None else [], np.int64)
        assert rows.shape == sources.shape and np.unique(rows).size == rows.size
        assert (sources < self._last_tokens.size).all(), "feed from a row the last async step did not have"
        assert (inp.token_ids >= 0).all(), "a fed row must hold a valid token id"
        inp.token_ids[rows] = self._last_tokens[sources]
        self.num_fed_rows += rows.size
        tokens = self.step_greedy(inp) if sampling is None else self.step_sample(inp, **sampling)
        self._last_tokens = tokens
        self.generation += 1
        return _ToyPending(self, self.generation, tokens)


class AsyncToyModel(ToyModel):
    """ToyModel whose programs are AsyncToyPrograms."""

    program_class = AsyncToyProgram


class _ToyChunk:
    def __init__(self, loop: "ToyNgramLoop", buffer: int, generation: int, result):
        self._loop, self._buffer, self._generation, self._result = loop, buffer, generation, result
        self.num_iters = result.counts.shape[0]

    def result(self):
        if self._loop.generation[self._buffer] != self._generation:
            raise AssertionError("a chunk was read after two later chunks were launched")
        return self._result


class ToyNgramLoop:
    """CudaProgram.start_ngram_loop's contract on the toy model: each iteration drafts by
    kernels_gpu.spec_ngram's reference rule from the history it holds, runs the uniform verification step through
    the NaN-paged pool (a slot outside the blocks given, or a bound the engine got wrong, fails) and accepts greedily;
    launch runs its iterations at once (a GPU stream's order) and a chunk read after two later launches fails."""

    def __init__(self, program, histories, block_tables, *, k, ngram_min, ngram_max, capacity, max_chunk):
        self.program, self.k, self.q = program, k, k + 1
        self.ngram_min, self.ngram_max, self.capacity, self.max_chunk = ngram_min, ngram_max, capacity, max_chunk
        self.hist = [list(map(int, h)) for h in histories]
        self.generation, self.buffer = [0, 0], 0
        self.set_block_tables(block_tables)

    def set_block_tables(self, block_tables) -> None:
        tables = np.asarray(block_tables, np.int32)
        assert tables.shape[0] == len(self.hist) and tables.shape[1] <= self.program.max_blocks_per_seq
        self.tables = np.zeros((len(self.hist), self.program.max_blocks_per_seq), np.int32)
        self.tables[:, : tables.shape[1]] = tables
        self.width = tables.shape[1]

    def launch(self, num_iters: int, max_seq_len: int, q: int | None = None):
        from kernels_gpu.spec_ngram import ref_accept_greedy, ref_ngram_propose
        from lowering.backends.cuda_spec import ChunkResult

        assert 1 <= num_iters <= self.max_chunk
        s, q = len(self.hist), self.q if q is None else q
        assert 1 <= q <= self.q
        self.program.launched_q.append(q)
        tokens = np.zeros((num_iters, s, self.q), np.int32)
        counts = np.zeros((num_iters, s), np.int32)
        real = np.zeros((num_iters, s), np.int32)
        for it in range(num_iters):
            n = np.array([len(h) for h in self.hist], np.int32)
            assert int(n.max()) - 1 + q <= max_seq_len <= self.capacity - 1, "launch's max_seq_len bound is wrong"
            assert int(n.max()) - 1 + q <= self.width * self.program.block_size, "the block tables are too short"
            hist = np.zeros((s, int(n.max())), np.int32)
            for i, h in enumerate(self.hist):
                hist[i, : len(h)] = h
            rows = ref_ngram_propose(hist, n, self.tables, q=q, block_size=self.program.block_size,
                                     ngram_min=self.ngram_min, ngram_max=self.ngram_max, max_draft=self.k)
            inp = StepInput(token_ids=rows["token_ids"], positions=rows["positions"],
                            slot_mapping=rows["slot_mapping"], query_start=np.arange(s + 1, dtype=np.int32) * q,
                            seq_lens=rows["seq_lens"], block_tables=self.tables,
                            logit_rows=np.arange(s * q, dtype=np.int32))
            targets = self.program.step_greedy(inp)
            for i in range(s):
                a = ref_accept_greedy(targets[i * q:(i + 1) * q], rows["token_ids"][i * q + 1:(i + 1) * q])
                self.hist[i] += targets[i * q: i * q + a + 1].tolist()
                tokens[it, i, :q] = targets[i * q:(i + 1) * q]
                counts[it, i], real[it, i] = a + 1, rows["real"][i]
        buf = self.buffer
        self.buffer ^= 1
        self.generation[buf] += 1
        self.program.num_loop_iterations += num_iters
        return _ToyChunk(self, buf, self.generation[buf], ChunkResult(tokens, counts, real, q))


class SpecToyProgram(AsyncToyProgram):
    """AsyncToyProgram with CudaProgram's device-side n-gram loop (start_ngram_loop, ToyNgramLoop)."""

    supports_ngram_loop = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.num_loop_iterations = 0
        self.loops: list[ToyNgramLoop] = []
        self.launched_q: list[int] = []  # each launch's rows a sequence

    def start_ngram_loop(self, histories, block_tables, *, k, ngram_min=1, ngram_max=4, capacity=None, max_chunk=8):
        loop = ToyNgramLoop(self, histories, block_tables, k=k, ngram_min=ngram_min, ngram_max=ngram_max,
                            capacity=capacity or self.max_blocks_per_seq * self.block_size + k + 1,
                            max_chunk=max_chunk)
        self.loops.append(loop)
        return loop


class SpecToyModel(ToyModel):
    """ToyModel whose programs are SpecToyPrograms."""

    program_class = SpecToyProgram
