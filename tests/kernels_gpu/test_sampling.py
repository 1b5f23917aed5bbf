"""GPU sampling: greedy == argmax, kernel == float64 reference token for token (uniforms hook),
tie cut-offs as runtime/sampler.py, determinism, support and a chi-square check of the draws."""
import math

import numpy as np
import pytest
import torch

from runtime.sampler import filter_top_k_top_p

# (temperature, top_k, top_p, min_p) per row: greedy, each filter alone, combinations
SETTINGS = [
    (0.0, 0, 1.0, 0.0),
    (1.0, 0, 1.0, 0.0),
    (0.7, 40, 1.0, 0.0),
    (1.3, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.05),
    (0.8, 50, 0.8, 0.02),
    (2.0, 7, 1.0, 0.0),
    (0.5, 0, 0.5, 0.0),
    (1.0, 1, 1.0, 0.0),
    (3.0, 200, 0.95, 0.1),
    (0.0, 10, 0.5, 0.3),  # greedy ignores the filters
    (1.0, 0, 0.3, 0.0),
]
# chi-square 0.999 quantiles by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}


def _params(settings, device, seed=0, offset=0):
    temperature, top_k, top_p, min_p = zip(*settings)
    n = len(settings)
    return dict(
        temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
        top_k=torch.tensor(top_k, dtype=torch.int32, device=device),
        top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
        min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
        seeds=torch.full((n,), seed, dtype=torch.int64, device=device) + torch.arange(n, device=device),
        offsets=torch.full((n,), offset, dtype=torch.int64, device=device),
    )


def _filters(p):
    return p["temperature"], p["top_k"], p["top_p"], p["min_p"]


def test_greedy_is_argmax_with_ties_and_neg_inf(kernel_module, device):
    sampling = kernel_module("sampling")
    gen = torch.Generator().manual_seed(0)
    for num_rows, vocab in [(1, 1), (5, 7), (9, 1000), (3, 4100)]:
        logits = torch.randint(-3, 4, (num_rows, vocab), generator=gen).float()  # many ties
        logits[torch.rand(num_rows, vocab, generator=gen) < 0.3] = float("-inf")
        logits[0] = float("-inf")  # a row of -inf: argmax 0
        if num_rows > 2:
            logits[1] = 2.0  # all equal
            logits[2, -1] = 100.0  # maximum in the last column
        logits = logits.to(device)
        expected = torch.argmax(logits.cpu(), dim=1).to(torch.int32)
        assert torch.equal(sampling.greedy(logits).cpu(), expected)
        half = logits.to(torch.bfloat16)
        assert torch.equal(sampling.greedy(half).cpu(), torch.argmax(half.cpu().float(), dim=1).to(torch.int32))
        params = _params([(0.0, 3, 0.5, 0.1)] * num_rows, device)
        assert torch.equal(sampling.sample(logits, **params).cpu(), expected)


@pytest.mark.parametrize("vocab, dtype", [(1000, torch.float32), (1000, torch.bfloat16), (50257, torch.float32)])
def test_sample_matches_reference_with_uniforms(kernel_module, device, vocab, dtype):
    sampling = kernel_module("sampling")
    settings = SETTINGS if vocab < 10000 else [SETTINGS[3], SETTINGS[5]]  # the interpreter is slow
    gen = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(len(settings), vocab, generator=gen) * 3).to(dtype).to(device)  # bf16: many ties
    uniforms = torch.rand(len(settings), vocab, generator=gen).to(device)
    params = _params(settings, device)
    got = sampling.sample(logits, **params, uniforms=uniforms).cpu()
    want = sampling.ref_sample(logits, **params, uniforms=uniforms).cpu()
    assert torch.equal(got, want), (got, want)
    keep, _ = sampling.ref_filter(logits, *_filters(params))
    assert keep.cpu()[torch.arange(len(settings)), got.long()].all()


def test_tie_cutoffs_keep_lowest_ids(kernel_module, device):
    """Rows of equal logits (and a few distinct values): with uniforms rising along the row, the
    draw picks the highest-id survivor among equal logits, so it shows exactly where ties are cut."""
    sampling = kernel_module("sampling")
    vocab = 1000
    # NOTE: top_p * count is kept off integers (0.45 * 1000 = 449.99998 in float32): at an exact
    # integer the runtime's own float64 rounding decides the last tie.
    settings = [(1.0, 5, 1.0, 0.0), (1.0, 0, 0.45, 0.0), (1.0, 0, 0.3, 0.0), (0.7, 0, 0.9, 0.0),
                (1.0, 300, 0.55, 0.0), (1.0, 300, 0.3, 0.0), (1.0, 100, 0.45, 0.0), (1.0, 999, 1.0, 0.5)]
    logits = torch.zeros(len(settings) * 2, vocab)
    logits[len(settings):] = torch.arange(vocab).remainder(3).float()  # values 0, 1, 2 in turn
    settings = settings * 2
    logits = logits.to(device)
    params = _params(settings, device)
    uniforms = torch.linspace(0.01, 0.99, vocab).expand(len(settings), vocab).contiguous().to(device)
    got = sampling.sample(logits, **params, uniforms=uniforms).cpu()
    assert torch.equal(got, sampling.ref_sample(logits, **params, uniforms=uniforms).cpu())
    keep, _ = sampling.ref_filter(logits, *_filters(params))
    keep = keep.cpu()
    # equal rows: survivors are the first j ids; the draw is the last of them
    for row in range(len(settings) // 2):
        count = int(keep[row].sum())
        assert keep[row, :count].all() and int(got[row]) == count - 1
    assert [int(keep[r].sum()) for r in range(4)] == [5, 450, 301, 900]
    # the filter is runtime/sampler.py's (no min-p there)
    for row, (temperature, top_k, top_p, min_p) in enumerate(settings):
        if min_p == 0:
            scaled = logits[row].cpu().double().numpy() / temperature
            runtime_keep = np.isfinite(filter_top_k_top_p(scaled, top_k, float(np.float32(top_p))))
            assert np.array_equal(keep[row].numpy(), runtime_keep), row


def test_reference_filter_matches_runtime_sampler(kernel_module):
    sampling = kernel_module("sampling")
    gen = torch.Generator().manual_seed(3)
    settings = [s for s in SETTINGS if s[0] > 0 and s[3] == 0]
    logits = torch.randn(len(settings), 3000, generator=gen) * 2
    logits[:, ::7] = logits[:, :1]  # ties with each row's first value
    params = _params(settings, "cpu")
    keep, _ = sampling.ref_filter(logits, *_filters(params))
    for row, (temperature, top_k, top_p, _) in enumerate(settings):
        scaled = logits[row].double().numpy() / temperature
        runtime_keep = np.isfinite(filter_top_k_top_p(scaled, top_k, float(np.float32(top_p))))
        assert np.array_equal(keep[row].numpy(), runtime_keep), row


def test_sample_is_deterministic_and_inside_filter(kernel_module, device):
    sampling = kernel_module("sampling")
    gen = torch.Generator().manual_seed(1)
    settings = [s for s in SETTINGS if s[0] > 0]
    logits = (torch.randn(len(settings), 1000, generator=gen) * 2).to(device)
    params = _params(settings, device, seed=7, offset=5)
    first = sampling.sample(logits, **params).cpu()
    assert torch.equal(first, sampling.sample(logits, **params).cpu())
    keep, _ = sampling.ref_filter(logits, *_filters(params))
    assert keep.cpu()[torch.arange(len(settings)), first.long()].all()
    # a row alone gives the same token as in the batch
    row = 3
    alone = {k: v[row:row + 1] for k, v in params.items()}
    assert int(sampling.sample(logits[row:row + 1], **alone)) == int(first[row])
    # other offsets (and other seeds) give other tokens, still inside the filter
    tokens = [first]
    for offset in (6, 1 << 40):
        tokens.append(sampling.sample(logits, **{**params, "offsets": params["offsets"] * 0 + offset}).cpu())
    tokens.append(sampling.sample(logits, **{**params, "seeds": params["seeds"] + 1000}).cpu())
    for t in tokens:
        assert keep.cpu()[torch.arange(len(settings)), t.long()].all()
    wide = [r for r in range(len(settings)) if keep[r].sum() > 20]
    for t in tokens[1:]:
        assert (t[wide] != first[wide]).float().mean() > 0.5


@pytest.mark.parametrize("setting", [(1.0, 0, 1.0, 0.0), (0.7, 6, 0.9, 0.02)])
def test_sample_frequencies_chi_square(kernel_module, device, setting):
    sampling = kernel_module("sampling")
    num_draws = 4096
    logits = torch.tensor([1.0, 2.5, 0.0, 2.0, -1.0, 1.5, 2.5, 0.5]).expand(num_draws, 8).contiguous().to(device)
    params = _params([setting] * num_draws, device, seed=11)
    params["seeds"].fill_(11)
    params["offsets"] = torch.arange(num_draws, dtype=torch.int64, device=device)
    tokens = sampling.sample(logits, **params).cpu()
    probs = sampling.ref_probs(logits[:1].cpu(), *(v[:1].cpu() for v in _filters(params)))[0]
    counts = torch.bincount(tokens.long(), minlength=8).double()
    allowed = probs > 0
    assert counts[~allowed].sum() == 0
    expected = probs[allowed] * num_draws
    chi2 = float(((counts[allowed] - expected) ** 2 / expected).sum())
    assert chi2 < CHI2_999[int(allowed.sum()) - 1], (chi2, counts, expected)


def test_out_empty_and_unchecked_values(kernel_module, device):
    sampling = kernel_module("sampling")
    logits = torch.randn(3, 50, device=device)
    params = _params([(1.0, 0, 1.0, 0.0)] * 3, device)
    out = torch.full((3,), -1, dtype=torch.int32, device=device)
    assert sampling.sample(logits, **params, out=out) is out and (out >= 0).all()
    assert sampling.greedy(torch.empty(0, 5, device=device)).shape == (0,)
    assert sampling.sample(logits[:0], **{k: v[:0] for k, v in params.items()}).shape == (0,)
    # without the value check, bad rows fall back to greedy instead of raising
    bad = {**params, "temperature": torch.tensor([-1.0, float("nan"), 1.0], device=device),
           "top_p": torch.tensor([1.0, 1.0, 0.0], device=device)}
    assert torch.equal(sampling.sample(logits, **bad, check_values=False), logits.argmax(1).to(torch.int32))


def test_sample_rejects_bad_input(kernel_module, device):
    sampling = kernel_module("sampling")
    logits = torch.randn(2, 10, device=device)
    params = _params([(1.0, 0, 1.0, 0.0)] * 2, device)

    def call(match, logits=logits, **overrides):
        with pytest.raises(ValueError, match=match):
            sampling.sample(logits, **{**params, **overrides}, check_values=True)

    call(r"\[L, V\]", logits=logits[0])
    call("dtype", logits=logits.to(torch.int32))
    call("empty vocabulary", logits=logits[:, :0])
    call("shape", temperature=params["temperature"][:1])
    call("int32", top_k=params["top_k"].long())
    call("int64", seeds=params["seeds"].int())
    call("temperature must be a finite number >= 0", temperature=torch.tensor([1.0, -0.5], device=device))
    call("temperature", temperature=torch.tensor([float("inf"), 1.0], device=device))
    call("top_p must be in", top_p=torch.tensor([0.0, 1.0], device=device))
    call("top_p", top_p=torch.tensor([1.0, 1.5], device=device))
    call("min_p", min_p=torch.tensor([1.0, -0.1], device=device))
    call("top_k", top_k=torch.tensor([5, -2], dtype=torch.int32, device=device))
    call("uniforms", uniforms=torch.rand(2, 9, device=device))
    call("out", out=torch.empty(2, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="logits"):
        sampling.greedy(torch.randn(4, device=device))
    assert math.isfinite(sampling.UNIFORM_MIN) and 0 < sampling.UNIFORM_MIN < sampling.UNIFORM_MAX < 1


def test_feed_tokens_matches_reference(kernel_module, device):
    """Async scheduling's feed: rows of a step's token ids taken from the previous step's tokens, on the device."""
    sampling = kernel_module("sampling")
    gen = torch.Generator().manual_seed(1)
    for num_rows, num_src, count in [(1, 1, 1), (7, 3, 3), (300, 290, 257), (64, 64, 0)]:
        dst = torch.randint(0, 1000, (num_rows,), generator=gen, dtype=torch.int32)
        src = torch.randint(0, 1000, (num_src,), generator=gen, dtype=torch.int32)
        rows = torch.randperm(num_rows, generator=gen)[:count].to(torch.int32)  # distinct destinations
        sources = torch.randint(0, num_src, (count,), generator=gen, dtype=torch.int32)  # repeats allowed
        index = torch.cat([rows, sources, torch.full((5,), -7, dtype=torch.int32)])  # a longer buffer: only 2*count read
        expected = sampling.ref_feed_tokens(dst, src, index, count)
        d = dst.to(device)
        sampling.feed_tokens(d, src.to(device), index.to(device), count)
        assert torch.equal(d.cpu(), expected)
        untouched = torch.ones(num_rows, dtype=torch.bool)
        untouched[rows.long()] = False
        assert torch.equal(d.cpu()[untouched], dst[untouched])


def test_feed_tokens_rejects_bad_input(kernel_module, device):
    sampling = kernel_module("sampling")
    dst = torch.zeros(4, dtype=torch.int32, device=device)
    src = torch.zeros(4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="index must be an int32 vector"):
        sampling.feed_tokens(dst, src, torch.zeros(4, dtype=torch.int64, device=device), 1)
    with pytest.raises(ValueError, match="needs an index of >= 6"):
        sampling.feed_tokens(dst, src, torch.zeros(4, dtype=torch.int32, device=device), 3)
    with pytest.raises(ValueError, match="dst must be an int32 vector"):
        sampling.feed_tokens(dst.view(2, 2), src, torch.zeros(4, dtype=torch.int32, device=device), 1)
