"""Sliding-window attention in the paged runtime: KV groups (insert_paged_kv), blocks freed out of the window
(KVCacheManager), prefix caching over windowed groups, and engine output equal to the unpaged model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowering import compile_model, ops
from lowering.ir import IRError
from runtime import Engine, SamplingParams
from runtime.kv_manager import FREED, KVCacheManager
from tests.runtime.test_kv_manager import Req

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM = 61, 32, 4, 2, 8


class TinyWindowed(nnx.Module):
    """A small decoder whose layer i attends with windows[i] (None: full attention); random weights."""

    def __init__(self, windows, seed: int = 0, head_dim: int = HEAD_DIM):
        rngs = nnx.Rngs(seed)
        self.head_dim = hd = head_dim

        def w(*shape, scale=0.3):
            return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32) * scale)

        self.windows = tuple(windows)
        self.embed = w(VOCAB, DIM, scale=1.0)
        self.norms = nnx.List([nnx.Param(jnp.ones((DIM,), jnp.float32)) for _ in windows])
        self.wq = nnx.List([w(HEADS * hd, DIM) for _ in windows])
        self.wk = nnx.List([w(KV_HEADS * hd, DIM) for _ in windows])
        self.wv = nnx.List([w(KV_HEADS * hd, DIM) for _ in windows])
        self.wo = nnx.List([w(DIM, HEADS * hd) for _ in windows])

    def __call__(self, token_ids, positions, query_start, logit_rows):
        x = ops.embed_tokens(token_ids, self.embed[...])
        for i, window in enumerate(self.windows):
            h = ops.rms_normalize(x, self.norms[i][...], 1e-5)
            q = ops.apply_rope(ops.project(h, self.wq[i][...]), positions, num_heads=HEADS, head_dim=self.head_dim,
                               theta=10000.0)
            k = ops.apply_rope(ops.project(h, self.wk[i][...]), positions, num_heads=KV_HEADS, head_dim=self.head_dim,
                               theta=10000.0)
            o = ops.causal_attention(q, k, ops.project(h, self.wv[i][...]), query_start, num_heads=HEADS,
                                     num_kv_heads=KV_HEADS, head_dim=self.head_dim, window=window)
            x = x + ops.project(o, self.wo[i][...])
        return ops.compute_logits(x, logit_rows, self.embed[...])


PAD_TO = 64  # the reference runs padded to one length: one XLA compile per model


def reference_logits(model, tokens, rows):
    """f32[len(rows), V]: the unpaged model over one sequence (padded with a second, ignored one)."""
    fn = model.__dict__.get("_ref_fn")
    if fn is None:
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
        model.__dict__["_ref_fn"] = fn = (fn, state)
    t = len(tokens)
    assert t <= PAD_TO and len(rows) <= PAD_TO
    ids = np.zeros(PAD_TO, np.int32)
    ids[:t] = tokens
    picked = np.zeros(PAD_TO, np.int32)
    picked[: len(rows)] = rows
    out = fn[0](fn[1], jnp.asarray(ids), jnp.arange(PAD_TO, dtype=jnp.int32), jnp.asarray([0, t, PAD_TO], jnp.int32),
                jnp.asarray(picked))
    return np.asarray(out)[: len(rows)]


def reference_greedy(model, prompt, n):
    """Greedy tokens from the unpaged model, one full forward per token."""
    tokens = list(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(reference_logits(model, tokens, [len(tokens) - 1])[0])))
    return tokens[len(prompt):]


def prompts(seed=1, lengths=(37, 21)):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("windows", [(None, 8, 8, None), (6, 6)], ids=["global+local", "all-local"])
def test_engine_matches_the_unpaged_model_and_holds_only_window_blocks(windows):
    model = TinyWindowed(windows)
    cm = compile_model(model, target="cpu", block_size=4, max_model_len=128)
    window = [w for w in windows if w is not None][0]
    two_groups = None in windows
    assert cm.graph.meta["kv_window"] == (None if two_groups else window)
    assert cm.graph.meta.get("kv_window_w") == (window if two_groups else None)
    assert ("block_tables_w" in cm.graph.inputs) == two_groups

    engine = Engine(cm, num_blocks=96, max_num_seqs=4, max_num_batched_tokens=24)  # chunked prefills
    program = engine.program
    assert (program.num_blocks_w is not None) == two_groups
    kv = engine.scheduler.kv
    group = len(kv.groups) - 1  # the windowed group
    limit = -(-(window - 1) // 4) + 1
    held = []
    original = engine.scheduler.update_after_step

    def record(out):
        original(out)
        for chunk in out.chunks:
            req = chunk.request
            if chunk.num_tokens == 1 and req.block_ids:  # a decode step
                held.append(kv.num_held_blocks(req, group))

    engine.scheduler.update_after_step = record
    ps = prompts()
    outs = engine.generate(ps, SamplingParams(max_tokens=8, temperature=0.0))
    for p, out in zip(ps, outs):
        assert out.token_ids == reference_greedy(model, p, 8)
    assert held and max(held) <= limit, (max(held), limit)
    if two_groups:  # the global layers keep every block
        assert kv.groups[0].window is None
    assert kv.groups[group].pool.num_used_blocks == 0  # everything freed at the end


def test_prefix_cache_reuses_the_window_tail_of_a_windowed_group():
    model = TinyWindowed((None, 8))
    cm = compile_model(model, target="cpu", block_size=4, max_model_len=128)
    engine = Engine(cm, num_blocks=64, max_num_seqs=2, max_num_batched_tokens=64)
    shared = prompts(2, (40,))[0]  # + up to 3 + 6 tokens: fits PAD_TO
    first, second = shared + [3, 5], shared + [7, 9, 11]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    a = engine.generate([first], params)[0]
    b = engine.generate([second], params)[0]
    assert a.token_ids == reference_greedy(model, first, 6)
    assert b.token_ids == reference_greedy(model, second, 6)
    stats = engine.scheduler.kv.stats
    assert stats.hit_tokens == 40  # the 10 shared full blocks: all of them in the global group, the tail in the local


def test_manager_frees_blocks_before_the_window_and_finds_tails_in_the_cache():
    kv = KVCacheManager(32, 4, window_group=(32, 6))
    a = Req("a", list(range(30)))
    assert kv.allocate_for(a, 30, computed_blocks=kv.get_computed_blocks(a))
    a.num_computed_tokens = 30
    kv.cache_full_blocks(a)
    assert len(a.block_ids) == 8 and kv.num_held_blocks(a, 1) == 8
    a.token_ids.append(99)
    assert kv.allocate_for(a, 1)  # next query at 30 sees keys 25..30: blocks 6, 7
    assert a.block_ids_w[:6] == [FREED] * 6 and kv.num_held_blocks(a, 1) == 2 and kv.num_held_blocks(a, 0) == 8
    assert kv.groups[1].pool.num_used_blocks == 2
    kv.free(a)
    # a second request with the same 28 leading tokens: the global group has every block cached, the local group
    # only blocks 5, 6 (the window of position 28: keys 23..28) -> a hit of 7 blocks
    b = Req("b", list(range(28)) + [1, 2, 3])
    hit = kv.get_computed_blocks(b)
    assert len(hit) == 7 and hit.tables[1][:5] == (FREED,) * 5
    assert kv.allocate_for(b, 3, computed_blocks=hit)
    assert b.num_computed_tokens == 28 and kv.num_held_blocks(b, 1) == 3
    c = Req("c", list(range(12)) + [0] * 5)  # its window tail (blocks 1, 2) was freed by a but stays cached
    assert len(kv.get_computed_blocks(c)) == 3
    with pytest.raises(TypeError, match="get_computed_blocks"):
        kv.allocate_for(Req("d", [1, 2, 3]), 1, computed_blocks=[])


def test_two_window_sizes_are_refused():
    with pytest.raises(IRError, match="one window size"):
        compile_model(TinyWindowed((4, 8)), target="cpu", block_size=4, max_model_len=64)


@pytest.mark.parametrize("windows", [(None, 8, 8, None), (6, 6)], ids=["global+local", "all-local"])
def test_cuda_engine_with_graphs_matches_the_unpaged_model(windows):
    """The CUDA program (decode steps as CUDA graph replays with both KV groups' tables) on a GPU."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("CUDA graphs need a GPU (the interpreter path is covered by the kernel tests)")
    model = TinyWindowed(windows, head_dim=16)  # the Triton attention kernels take head_dim in multiples of 16
    cm = compile_model(model, target="cuda", block_size=4, max_model_len=128, dtype="float32")
    engine = Engine(cm, num_blocks=96, max_num_seqs=4, max_num_batched_tokens=16)
    assert engine.program.cuda_graphs
    ps = prompts()
    outs = engine.generate(ps, SamplingParams(max_tokens=12, temperature=0.0))
    for p, out in zip(ps, outs):  # every token is the reference's argmax, up to near-ties (TF32 dots on the GPU)
        seq = p + out.token_ids
        logits = reference_logits(model, seq, list(range(len(p) - 1, len(seq) - 1)))
        picked = logits[np.arange(len(out.token_ids)), out.token_ids]
        assert np.all(picked >= logits.max(axis=1) - 1e-2), (picked, logits.max(axis=1))
    assert engine.program.num_graph_replays > 0
