"""Device-side n-gram speculation kernels (kernels_gpu/spec_ngram.py) against their numpy references, bit for bit:
drafts by NgramProposer's rule over ragged histories (short ones, no match, matches near the end, many sizes), the
step rows they write through shuffled block tables, and the greedy accept rule updating the history."""
import numpy as np
import pytest
import torch

from runtime.speculative import NgramProposer


@pytest.fixture(scope="module")
def sn(kernel_module):
    return kernel_module("spec_ngram")


class _Req:  # what NgramProposer reads
    def __init__(self, tokens):
        self.token_ids = list(tokens)


@pytest.mark.parametrize("seed", range(6))
def test_reference_draft_is_the_host_proposers(sn, seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        n = int(rng.integers(1, 60))
        tokens = rng.integers(0, int(rng.integers(2, 12)), size=n).tolist()
        k = int(rng.integers(1, 8))
        lo = int(rng.integers(1, 4))
        hi = lo + int(rng.integers(0, 3))
        want = NgramProposer(lo, hi)._lookup(_Req(tokens), k)
        draft, real = sn.ref_ngram_draft(tokens, k, lo, hi)
        assert draft[:real] == want and real == len(want)
        assert len(draft) == k and draft[real:] == [want[-1] if want else tokens[-1]] * (k - real)


def _case(rng, s, width, q, bs, vocab):
    hist = rng.integers(0, vocab, size=(s, width)).astype(np.int32)
    n = rng.integers(1, width - q, size=s).astype(np.int32)
    n[0] = 1  # shorter than the n-gram sizes (the draft is the last token repeated)
    if s > 3:
        n[1] = 2
    per_seq = -(-(width + q) // bs)
    tables = rng.permutation(s * per_seq + 7).astype(np.int32)[: s * per_seq].reshape(s, per_seq)
    return hist, n, tables


@pytest.mark.parametrize("s,width,q,bs,vocab,sizes,max_draft", [
    (5, 300, 5, 4, 3, (1, 4), None),  # few symbols: matches everywhere
    (4, 157, 4, 16, 40, (2, 3), 6),
    (7, 90, 2, 8, 6, (1, 1), None),
    (6, 120, 1, 8, 4, (1, 3), 4),  # a plain decode step that still counts the drafts to be had
    (3, 2100, 9, 16, 5, (3, 5), None),  # more than one pass of the cuda block
])
def test_propose_matches_reference(sn, device, s, width, q, bs, vocab, sizes, max_draft):
    rng = np.random.default_rng(s * width)
    hist, n, tables = _case(rng, s, width, q, bs, vocab)
    want = sn.ref_ngram_propose(hist, n, tables, q=q, block_size=bs, ngram_min=sizes[0], ngram_max=sizes[1],
                                max_draft=max_draft)
    out = {name: torch.full((s * q + 5,), -7, dtype=torch.int32, device=device)
           for name in ("token_ids", "positions", "slot_mapping")}
    out.update(seq_lens=torch.full((s + 2,), -7, dtype=torch.int32, device=device),
               real=torch.full((s,), -7, dtype=torch.int32, device=device))
    dev = {name: torch.from_numpy(a.copy()).to(device) for name, a in (("hist", hist), ("n", n), ("bt", tables))}
    sn.ngram_propose(dev["hist"], dev["n"], dev["bt"], q=q, block_size=bs, ngram_min=sizes[0], ngram_max=sizes[1],
                     max_draft=max_draft, **out)
    for name, ref in want.items():
        got = out[name].cpu().numpy()
        np.testing.assert_array_equal(got[: ref.size], ref, err_msg=name)
        assert (got[ref.size:] == -7).all(), f"{name} written past its rows"
    assert (want["real"] > 0).any() and want["real"][0] == 0 or vocab > 10
    np.testing.assert_array_equal(dev["hist"].cpu().numpy(), hist)  # proposing reads the history only


@pytest.mark.parametrize("q", [1, 2, 4, 7])
def test_accept_matches_reference(sn, device, q):
    rng = np.random.default_rng(q)
    s, width = 6, 64
    hist = rng.integers(0, 50, size=(s, width)).astype(np.int32)
    n = rng.integers(1, width - q - 1, size=s).astype(np.int32)
    token_ids = rng.integers(0, 5, size=s * q).astype(np.int32)
    # targets agreeing with the drafts for a random number of leading rows
    targets = rng.integers(0, 5, size=s * q).astype(np.int32)
    for i in range(s):
        a = int(rng.integers(0, q))
        targets[i * q: i * q + a] = token_ids[i * q + 1: i * q + 1 + a]
    real = rng.integers(0, q, size=s).astype(np.int32)
    dev = {name: torch.from_numpy(a.copy()).to(device) for name, a in
           (("targets", targets), ("token_ids", token_ids), ("hist", hist), ("n", n), ("real", real))}
    ring_t = torch.full((s, q + 2), -1, dtype=torch.int32, device=device)  # rows wider than the step's
    ring_c = torch.full((s,), -1, dtype=torch.int32, device=device)
    ring_r = torch.full((s,), -1, dtype=torch.int32, device=device)
    sn.spec_accept_greedy(dev["targets"], dev["token_ids"], dev["hist"], dev["n"], dev["real"], ring_t, ring_c,
                          ring_r, q=q)
    new_hist, new_n = hist.copy(), n.copy()
    for i in range(s):
        a = sn.ref_accept_greedy(targets[i * q:(i + 1) * q], token_ids[i * q + 1:(i + 1) * q])
        new_hist[i, n[i]: n[i] + a + 1] = targets[i * q: i * q + a + 1]
        new_n[i] = n[i] + a + 1
        assert int(ring_c[i]) == a + 1
    np.testing.assert_array_equal(dev["hist"].cpu().numpy(), new_hist)
    np.testing.assert_array_equal(dev["n"].cpu().numpy(), new_n)
    np.testing.assert_array_equal(ring_t.cpu().numpy()[:, :q], targets.reshape(s, q))
    assert (ring_t.cpu().numpy()[:, q:] == -1).all()
    np.testing.assert_array_equal(ring_r.cpu().numpy(), real)


def test_bad_arguments_name_the_problem(sn, device):
    hist = torch.zeros(2, 16, dtype=torch.int32, device=device)
    n = torch.ones(2, dtype=torch.int32, device=device)
    bt = torch.zeros(2, 4, dtype=torch.int32, device=device)
    rows = {name: torch.zeros(8, dtype=torch.int32, device=device)
            for name in ("token_ids", "positions", "slot_mapping", "seq_lens", "real")}
    with pytest.raises(ValueError, match="hist must be an int32"):
        sn.ngram_propose(hist.long(), n, bt, q=4, block_size=4, ngram_min=1, ngram_max=2, **rows)
    with pytest.raises(ValueError, match="ngram_min <= ngram_max"):
        sn.ngram_propose(hist, n, bt, q=4, block_size=4, ngram_min=3, ngram_max=2, **rows)
    with pytest.raises(ValueError, match="do not fit"):
        sn.ngram_propose(hist, n, bt, q=5, block_size=4, ngram_min=1, ngram_max=2, **rows)
    with pytest.raises(ValueError, match="shorter than the step's draft"):
        sn.ngram_propose(hist, n, bt, q=4, block_size=4, ngram_min=1, ngram_max=2, max_draft=2, **rows)
    with pytest.raises(ValueError, match="do not fit"):
        sn.spec_accept_greedy(rows["token_ids"], rows["token_ids"], hist, n, rows["real"],
                              torch.zeros(2, 3, dtype=torch.int32, device=device), rows["seq_lens"], rows["real"], q=4)
