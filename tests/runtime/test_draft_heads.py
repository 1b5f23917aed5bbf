"""Medusa / EAGLE draft heads on a tiny random Llama: features, training, save/load, proposers."""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lowering.models.config import ModelConfig
from lowering.models.llama import build_model
from runtime import draft_heads as dh
from runtime.sampler import SamplingParams
from runtime.speculative import StepRows

CFG = ModelConfig(architecture="llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def model():
    return build_model(CFG, seed=0)


@pytest.fixture(scope="module")
def arrays(model):
    embed = np.asarray(model.model.embed_tokens.weight[...], np.float32)
    return {"model.embed_tokens.weight": embed}


@pytest.fixture(scope="module")
def data(model):
    """Sequences of the tiny model's own greedy continuations (a few prompts), with features."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(model)
    width = 32

    @jax.jit
    def next_token(tokens, length):  # tokens i32[width], the first `length` real
        logits = nnx.merge(graphdef, state)(tokens, jnp.arange(width, dtype=jnp.int32),
                                            jnp.stack([0, length, width]).astype(jnp.int32), (length - 1)[None])
        return jnp.argmax(logits[0])

    rng = np.random.default_rng(0)
    seqs, plens = [], []
    for n in (5, 7, 9, 6, 8, 4):
        toks = list(rng.integers(1, CFG.vocab_size, n))
        for _ in range(20):  # greedy continuation with the flax model (no cache: tiny)
            t = np.zeros(width, np.int32)
            t[:len(toks)] = toks
            toks.append(int(next_token(t, np.int32(len(toks)))))
        seqs.append(np.asarray(toks, np.int32))
        plens.append(n)
    feats = dh.compute_features(model, seqs, tokens_per_batch=64)
    return dh.TrainingSet(seqs, plens, feats)


class Req:
    def __init__(self, token_ids, params=None, seed=0):
        self.token_ids = list(token_ids)
        self.params = params or SamplingParams(max_tokens=8, temperature=0)
        self.generator = np.random.default_rng(seed)


def test_hidden_states_match_logits(model, arrays):
    rng = np.random.default_rng(1)
    toks = rng.integers(0, CFG.vocab_size, 11).astype(np.int32)
    pos = np.concatenate([np.arange(5), np.arange(6)]).astype(np.int32)
    qs = np.array([0, 5, 11], np.int32)
    rows = np.arange(11, dtype=np.int32)
    h = np.asarray(model.hidden_states(toks, pos, qs))
    assert h.shape == (11, CFG.hidden_size)
    logits = np.asarray(model(toks, pos, qs, rows))
    np.testing.assert_allclose(h @ arrays["model.embed_tokens.weight"].T, logits, rtol=1e-4, atol=1e-4)


def test_compute_features_ragged_matches_single(model, data):
    one = np.asarray(model.hidden_states(data.tokens[1], np.arange(len(data.tokens[1]), dtype=np.int32),
                                         np.array([0, len(data.tokens[1])], np.int32)))
    np.testing.assert_allclose(data.features[1], one, rtol=1e-4, atol=1e-4)


def test_medusa_training_reduces_loss_and_round_trips(tmp_path, data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    heads = dh.init_medusa(CFG, embed, num_heads=3)
    trained, losses = dh.train_medusa(data, heads, embed, batch_size=32, lr=3e-3, max_steps=30)
    assert np.mean(losses[-5:]) < losses[0]
    path = str(tmp_path / "medusa")
    dh.save_heads(path, trained)
    loaded = dh.load_heads(path)
    assert loaded.method == "medusa" and loaded.num_heads == 3
    for k, v in trained.params.items():
        np.testing.assert_array_equal(loaded.params[k], v)
    p1 = dh.make_head_proposer("medusa", path, arrays, CFG)
    p2 = dh.MedusaProposer(trained, lm_head=embed)
    seq, f = data.tokens[0], data.features[0]
    outs = []
    for p in (p1, p2):
        r = Req(seq[:10])
        p.observe([StepRows(r, 0, seq[:9], f[:9], 9, int(seq[9]))])
        outs.append(p.propose([r], [3])[0].tokens)
        assert p.propose([r], [3])[0].tokens == outs[-1]  # deterministic
        assert len(p.propose([r], [2])[0].tokens) == 2
        assert len(p.propose([r], [9])[0].tokens) == 3  # at most K
    assert outs[0] == outs[1]


def test_medusa_proposal_uses_the_newest_feature_only(data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    p = dh.MedusaProposer(dh.init_medusa(CFG, embed, num_heads=2), lm_head=embed)
    seq, f = data.tokens[0], data.features[0]
    r = Req(seq[:10])
    assert p.propose([r], [2])[0].tokens == []  # nothing observed yet
    p.observe([StepRows(r, 0, seq[:9], f[:9], 9, int(seq[9]))])
    # zero-initialised heads are the identity: every head proposes the target's own next token
    assert p.propose([r], [2])[0].tokens == [int(np.argmax(f[8] @ embed.T))] * 2
    r.token_ids.append(7)  # the feature no longer matches the newest token
    assert p.propose([r], [2])[0].tokens == []
    p.release(r)
    assert r not in p._last


def test_medusa_sampling_probs(data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    heads = dh.init_medusa(CFG, embed, num_heads=3)
    heads.params["weight"] = np.random.default_rng(0).normal(0, 0.1, heads.params["weight"].shape).astype(np.float32)
    p = dh.MedusaProposer(heads, lm_head=embed)
    seq, f = data.tokens[2], data.features[2]
    greedy = Req(seq[:12])
    sampled = Req(seq[:12], SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9), seed=3)
    rows = [StepRows(r, 0, seq[:11], f[:11], 11, int(seq[11])) for r in (greedy, sampled)]
    p.observe(rows)
    d_greedy, d_sampled = p.propose([greedy, sampled], [3, 3])
    assert d_greedy.probs is None and len(d_greedy.tokens) == 3
    assert d_sampled.probs.shape == (3, CFG.vocab_size) and d_sampled.probs.dtype == np.float32
    np.testing.assert_allclose(d_sampled.probs.sum(axis=1), 1.0, rtol=1e-5)
    for j, tok in enumerate(d_sampled.tokens):
        assert d_sampled.probs[j, tok] > 0
        assert np.count_nonzero(d_sampled.probs[j]) <= 20  # top-k applied


def test_load_errors(tmp_path, data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    path = str(tmp_path / "h")
    dh.save_heads(path, dh.init_medusa(CFG, embed, num_heads=2))
    with pytest.raises(ValueError, match="does not exist"):
        dh.load_heads(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="holds medusa heads"):
        dh.make_head_proposer("eagle", path, arrays, CFG)
    with pytest.raises(ValueError, match="unknown draft-head method"):
        dh.make_head_proposer("beam", path, arrays, CFG)
    # heads for another model: a different embedding table, or a different size
    other = {"model.embed_tokens.weight": embed + 1.0}
    with pytest.raises(ValueError, match="different target"):
        dh.make_head_proposer("medusa", path, other, CFG)
    import dataclasses

    wider = dataclasses.replace(CFG, num_layers=3)
    with pytest.raises(ValueError, match="different target"):
        dh.make_head_proposer("medusa", path, arrays, wider)
    with pytest.raises(ValueError, match="lm_head"):
        dh.make_head_proposer("medusa", path, arrays, dataclasses.replace(CFG, tie_word_embeddings=False))
    # a corrupt config, wrong shapes, an unknown method, a missing weights file
    cfg_path = os.path.join(path, "config.json")
    good = json.load(open(cfg_path))
    for change, match in ((dict(method="tree"), "unknown draft-head method"), (dict(num_heads=5), "shape"),
                          (dict(hidden_size=-1), "hidden_size")):
        json.dump({**good, **change}, open(cfg_path, "w"))
        with pytest.raises(ValueError, match=match):
            dh.load_heads(path)
    open(cfg_path, "w").write("{not json")
    with pytest.raises(ValueError, match="JSON"):
        dh.load_heads(path)
    json.dump(good, open(cfg_path, "w"))
    np.savez(os.path.join(path, "weights.npz"), weight=np.zeros((2, 64, 64), np.float32))
    with pytest.raises(ValueError, match="missing"):
        dh.load_heads(path)
    open(os.path.join(path, "weights.npz"), "wb").write(b"garbage")
    with pytest.raises(ValueError, match="cannot read"):
        dh.load_heads(path)
    os.remove(os.path.join(path, "weights.npz"))
    with pytest.raises(ValueError, match="no weights.npz"):
        dh.load_heads(path)


@pytest.fixture(scope="module")
def eagle(data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    heads = dh.init_eagle(CFG, embed, seed=0)
    trained, losses = dh.train_eagle(data, heads, embed, embed, batch_size=2, lr=3e-3, max_steps=25)
    assert np.mean(losses[-5:]) < losses[0]
    return trained


def _eagle_proposer(heads, arrays):
    embed = arrays["model.embed_tokens.weight"]
    return dh.EagleProposer(heads, embed=embed, lm_head=embed, config=CFG)


def test_eagle_save_load_and_chain(tmp_path, eagle, data, arrays):
    path = str(tmp_path / "eagle")
    dh.save_heads(path, eagle)
    p1 = dh.make_head_proposer("eagle", path, arrays, CFG)
    p2 = _eagle_proposer(eagle, arrays)
    seq, f = data.tokens[3], data.features[3]
    outs = []
    for p in (p1, p2):
        r = Req(seq[:12])
        p.observe([StepRows(r, 0, seq[:11], f[:11], 11, int(seq[11]))])
        d = p.propose([r], [4])[0]
        assert len(d.tokens) == 4 and d.probs is None
        assert p.propose([r], [4])[0].tokens == d.tokens  # proposing does not disturb the cache
        assert p.propose([r], [2])[0].tokens == d.tokens[:2]  # a chain: shorter drafts are prefixes
        outs.append(d.tokens)
    assert outs[0] == outs[1]


def test_eagle_observe_with_rejections_matches_one_observe(eagle, data, arrays):
    seq, f = data.tokens[4], data.features[4]
    n = len(seq)
    # one prefill of everything but the last token
    a = _eagle_proposer(eagle, arrays)
    ra = Req(seq)
    a.observe([StepRows(ra, 0, seq[:n - 1], f[:n - 1], n - 1, int(seq[n - 1]))])
    want = a.propose([ra], [3])[0].tokens
    # chunked prefill, then verification windows whose tails are rejected (junk hidden rows past num_valid)
    b = _eagle_proposer(eagle, arrays)
    rb = Req(seq[:5])
    b.observe([StepRows(rb, 0, seq[:3], f[:3], 3, None)])
    b.observe([StepRows(rb, 3, seq[3:4], f[3:4], 1, int(seq[4]))])
    pos = 5
    rng = np.random.default_rng(0)
    while pos < n:
        b.propose([rb], [3])  # writes draft entries into the head's cache that must not survive
        acc = min(int(rng.integers(0, 3)), n - 1 - pos)
        k = acc + 2
        window = np.concatenate([[seq[pos - 1]], rng.integers(0, 300, k)]).astype(np.int32)
        hid = rng.normal(0, 1, (k + 1, CFG.hidden_size)).astype(np.float32)
        hid[:acc + 1] = f[pos - 1:pos + acc]
        rb.token_ids = list(seq[:pos + acc + 1])
        b.observe([StepRows(rb, pos - 1, window, hid, acc + 1, int(seq[pos + acc]))])
        pos += acc + 1
    assert rb.token_ids == list(seq)
    got = b.propose([rb], [3])[0].tokens
    assert got == want
    # the head's cache holds the same entries either way
    sa, sb = a._states[ra], b._states[rb]
    assert sa.n_cached == sb.n_cached == n - 1
    np.testing.assert_allclose(a.cached_keys(ra), b.cached_keys(rb), rtol=1e-4, atol=1e-4)
    b.release(rb)
    assert rb not in b._states


def test_eagle_batched_and_sampling(eagle, data, arrays):
    p = _eagle_proposer(eagle, arrays)
    reqs, rows = [], []
    for i, s in enumerate((0, 1, 2)):
        seq, f = data.tokens[s], data.features[s]
        m = 8 + i
        params = SamplingParams(max_tokens=8, temperature=0) if i != 1 else SamplingParams(max_tokens=8, temperature=1.0)
        r = Req(seq[:m + 1], params, seed=i)
        reqs.append(r)
        rows.append(StepRows(r, 0, seq[:m], f[:m], m, int(seq[m])))
    p.observe(rows)
    drafts = p.propose(reqs, [3, 2, 1])
    assert [len(d.tokens) for d in drafts] == [3, 2, 1]
    assert drafts[0].probs is None and drafts[2].probs is None
    q = drafts[1].probs
    assert q.shape == (2, CFG.vocab_size)
    np.testing.assert_allclose(q.sum(axis=1), 1.0, rtol=1e-5)
    assert all(q[j, t] > 0 for j, t in enumerate(drafts[1].tokens))
    # greedy requests get the same drafts alone as in a batch
    for i in (0, 2):
        alone = _eagle_proposer(eagle, arrays)
        alone.observe([rows[i]])
        assert alone.propose([reqs[i]], [3 - i])[0].tokens == drafts[i].tokens


def test_simulated_acceptance_runs(eagle, data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    res = dh.simulate_acceptance(_eagle_proposer(eagle, arrays), data, num_tokens=3)
    assert 1.0 <= res["mean_accepted_length"] <= 4.0
    res = dh.simulate_acceptance(dh.MedusaProposer(dh.init_medusa(CFG, embed, 2), lm_head=embed), data, num_tokens=2)
    assert 1.0 <= res["mean_accepted_length"] <= 3.0
    acc = dh.evaluate_heads(eagle, data, embed=embed, lm_head=embed)
    assert 0.0 <= acc["top1"] <= 1.0 and acc["num_examples"] > 0


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_engine_with_heads_is_token_identical(tmp_path, model, arrays, method):
    """Greedy speculative decoding with the heads emits exactly the target's own tokens."""
    from lowering import Speculative, compile_model
    from runtime import Engine

    embed = arrays["model.embed_tokens.weight"]
    heads = dh.init_medusa(CFG, embed, 3) if method == "medusa" else dh.init_eagle(CFG, embed)
    dh.save_heads(str(tmp_path / method), heads)
    prompts = [list(np.random.default_rng(i).integers(1, 300, 5 + i)) for i in range(3)]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = [o.token_ids for o in Engine(compile_model(model, config=CFG, progress=False)).generate(prompts, params)]
    spec = Speculative(method, num_tokens=3, heads=str(tmp_path / method), adaptive=False)
    engine = Engine(compile_model(model, config=CFG, progress=False, speculative=spec))
    assert [o.token_ids for o in engine.generate(prompts, params)] == ref
    assert engine.spec_stats.num_draft_tokens > 0


def test_eagle_unrolled_training_matches_chain_drafting(data, arrays):
    """Depth m of the training-time unroll at position u is chain step m-1 started from the real entry u-m+1."""
    import jax

    embed = arrays["model.embed_tokens.weight"]
    heads = dh.init_eagle(CFG, embed, seed=1)
    rng = np.random.default_rng(3)  # random weights everywhere (init_eagle starts some at zero)
    params = {k: jnp.asarray(rng.normal(0, 0.2, v.shape).astype(np.float32)) for k, v in heads.params.items()}
    lay = dict(heads.config["layer"])
    seq, f = data.tokens[1], data.features[1]
    w = len(seq) - 1
    tokens_next = jnp.asarray(seq[1:][None])
    pos = jnp.arange(w, dtype=jnp.int32)[None]
    outs = jax.jit(lambda p: dh._eagle_unrolled(p, lay, jnp.asarray(embed), tokens_next, jnp.asarray(f[None, :w]),
                                                pos, 3))(params)
    full, _, _ = dh._eagle_layer(params, lay, dh._eagle_inputs(params, embed, tokens_next, jnp.asarray(f[None, :w])), pos)
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(full), rtol=1e-5, atol=1e-5)
    for u in (2, 7, w - 1):
        t = u - 2  # the chain starts from the real entry at t
        c = 32
        ck = jnp.zeros((1, c, lay["num_kv_heads"] * lay["head_dim"]), jnp.float32)
        cv = jnp.zeros_like(ck)
        x = dh._eagle_inputs(params, embed, tokens_next[:, :t + 1], jnp.asarray(f[None, :t + 1]))
        out, ck, cv = dh._eagle_layer(params, lay, x, pos[:, :t + 1], ck, cv, jnp.zeros(1, jnp.int32))
        pred = out[:, t]
        for j in (1, 2):  # chain steps at positions t+1, t+2 with the real next tokens (all accepted)
            x = dh._eagle_inputs(params, embed, tokens_next[:, t + j:t + j + 1], pred[:, None])
            out, ck, cv = dh._eagle_layer(params, lay, x, pos[:, t + j:t + j + 1], ck, cv,
                                          jnp.asarray([t + j], jnp.int32))
            pred = out[:, 0]
            np.testing.assert_allclose(np.asarray(pred[0]), np.asarray(outs[j][0, t + j]), rtol=1e-4, atol=1e-4)


def test_eagle_training_with_depth_reduces_loss(data, arrays):
    embed = arrays["model.embed_tokens.weight"]
    heads = dh.init_eagle(CFG, embed, seed=0)
    _, losses = dh.train_eagle(data, heads, embed, embed, batch_size=2, lr=3e-3, max_steps=15, depth=3)
    assert np.all(np.isfinite(losses)) and np.mean(losses[-4:]) < losses[0]
    with pytest.raises(ValueError, match="depth"):
        dh.train_eagle(data, heads, embed, embed, depth=0)


def test_features_from_the_program_match_the_model(model, data):
    """compute_features_with_program (the compiled Program's own hidden output, ragged prefills on a private
    pool) gives the flax model's features; several steps when the sequences exceed tokens_per_step."""
    from lowering import compile_model

    compiled = compile_model(model, config=CFG, progress=False)
    got = dh.compute_features_with_program(compiled, data.tokens, tokens_per_step=64)
    assert len(got) == len(data.features)
    for g, f in zip(got, data.features):
        np.testing.assert_allclose(g, f, rtol=2e-4, atol=2e-4)
    assert len(compiled.graph.outputs) == 1  # the compiled model itself is left as it was


def test_torch_eagle_backend_matches_jax(eagle, data, arrays):
    """The torch head (what a CUDA Program's engine uses; here on the CPU, eagerly) drafts what the JAX head does,
    through prefill, growing slabs, verification windows and sampling."""
    embed = arrays["model.embed_tokens.weight"]
    jx = dh.EagleProposer(eagle, embed=embed, lm_head=embed, config=CFG)
    pt = dh.EagleProposer(eagle, embed=embed, lm_head=embed, config=CFG, device="cpu")
    reqs = {}
    for p in (jx, pt):
        rs = []
        for s in range(4):
            seq, f = data.tokens[s], data.features[s]
            params = SamplingParams(max_tokens=8, temperature=0 if s != 2 else 0.8)
            r = Req(seq[:10], params, seed=s)
            rs.append(r)
            p.observe([StepRows(r, 0, seq[:9], f[:9], 9, int(seq[9]))])
        reqs[id(p)] = rs
    for rnd in range(3):
        outs = []
        for p in (jx, pt):
            rs = reqs[id(p)]
            greedy = [r for r in rs if r.params.is_greedy]
            d = p.propose(greedy, [3, 2, 4])
            ds = p.propose(rs, [2, 2, 2, 2])  # a sampling request in the batch: the stepwise path
            outs.append(([x.tokens for x in d], [x.tokens for x in ds], ds[2].probs))
            for s, r in enumerate(rs):  # accept one token, then observe the 2-row window
                seq, f = data.tokens[s], data.features[s]
                n = len(r.token_ids)
                r.token_ids = list(seq[:n + 2])
                r.generator = np.random.default_rng(100 + rnd)
                p.observe([StepRows(r, n - 1, seq[n - 1:n + 1], f[n - 1:n + 1], 2, int(seq[n + 1]))])
        assert outs[0][0] == outs[1][0]
        assert outs[0][1] == outs[1][1]
        np.testing.assert_allclose(outs[0][2], outs[1][2], rtol=1e-4, atol=1e-6)
    for rj, rt in zip(reqs[id(jx)], reqs[id(pt)]):
        np.testing.assert_allclose(jx.cached_keys(rj), pt.cached_keys(rt), rtol=1e-4, atol=1e-5)
