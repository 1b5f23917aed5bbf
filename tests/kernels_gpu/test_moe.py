"""Mixture-of-experts kernels: routing, expert alignment (exact), grouped GEMMs vs the float32 reference."""
import pytest
import torch

# (dtype) -> (atol, rtol) of fused_experts against ref_fused_experts (a float32 loop)
MOE_TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


@pytest.fixture(scope="module")
def moe(kernel_module):
    return kernel_module("moe")


def _weights(num_experts, hidden, features, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_experts, 2 * features, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, features, generator=g) / features ** 0.5
    return gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)


def test_align_by_expert_pads_each_expert_run_to_the_block(moe, device):
    # T=3, K=2: pairs 0..5 -> experts [2, 0 | 2, 3 | 0, 2]; expert 1 gets none
    experts = torch.tensor([[2, 0], [2, 3], [0, 2]], dtype=torch.int32, device=device)
    sorted_pairs, block_expert = moe.align_by_expert(experts, num_experts=5, block_m=4)
    p = 6  # no pair
    # P_pad = ceil((6 + 5 * 3) / 4) * 4 = 24: expert 0 -> pairs 1, 4; expert 2 -> 0, 2, 5; expert 3 -> 3
    assert sorted_pairs.tolist() == [1, 4, p, p, 0, 2, 5, p, 3, p, p, p] + [p] * 12
    assert block_expert.tolist() == [0, 2, 3, 5, 5, 5]


def test_align_by_expert_full_blocks_need_no_padding(moe, device):
    experts = torch.tensor([[1], [1], [0], [0]], dtype=torch.int32, device=device)
    sorted_pairs, block_expert = moe.align_by_expert(experts, num_experts=2, block_m=2)
    assert sorted_pairs.tolist() == [2, 3, 0, 1, 4, 4]
    assert block_expert.tolist() == [0, 1, 2]


def test_tiles_follow_the_rows_per_expert(moe):
    assert moe.pick_phase(2, 8) == "decode"  # a Mixtral decode token: 2 pairs over 8 experts
    assert moe.pick_phase(512 * 8, 128) == "prefill"  # Qwen3-30B-A3B, 512 tokens: 32 rows per expert
    assert moe.pick_phase(512 * 2, 8) == "prefill_large"  # Mixtral, 512 tokens: 128 rows per expert
    for phase in ("decode", "prefill", "prefill_large"):
        tiles = moe.TILE_SIZES[("cuda", phase)]
        assert moe.fit_shared_memory(tiles, 2) == tiles  # the tables are sized for bf16
    decode = moe.TILE_SIZES[("cuda", "decode")]
    f32 = moe.fit_shared_memory(decode, 4)  # float32 tiles are twice the bytes: shorter K steps
    assert f32["BLOCK_K"] == decode["BLOCK_K"] // 2 and f32["num_stages"] == decode["num_stages"]


def test_route_topk_matches_softmax_topk(moe, device):
    g = torch.Generator().manual_seed(0)
    x, router = torch.randn(9, 24, generator=g), torch.randn(6, 24, generator=g)
    probs = torch.softmax(x.double() @ router.double().T, dim=-1)
    for renormalize in (False, True):
        weights, experts = moe.route_topk(x.to(device), router.to(device), 2, renormalize)
        assert experts.dtype == torch.int32 and weights.dtype == torch.float32
        want_w, want_e = torch.topk(probs, 2, dim=-1)
        if renormalize:
            want_w = want_w / want_w.sum(-1, keepdim=True)
        assert torch.equal(experts.cpu().long(), want_e)
        torch.testing.assert_close(weights.cpu().double(), want_w, atol=1e-6, rtol=1e-5)


# (T, E, D, F, top_k, experts used): ragged T, D and F not multiples of the tiles, experts that get no token
CASES = [
    (1, 4, 72, 40, 2, None),       # one decode token
    (7, 5, 72, 40, 1, None),       # top-1
    (13, 6, 48, 24, 2, (0, 3, 5)),  # experts 1, 2, 4 get no token
    (33, 3, 40, 56, 2, None),      # runs longer than one row block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,e,d,f,k,used", CASES, ids=[f"T{c[0]}-E{c[1]}-K{c[4]}" for c in CASES])
def test_fused_experts_matches_reference(moe, device, dtype, t, e, d, f, k, used):
    g = torch.Generator().manual_seed(t)
    gate_up, down = _weights(e, d, f, dtype, device, seed=t)
    x = torch.randn(t, d, generator=g).to(device=device, dtype=dtype)
    pool = torch.tensor(used if used else range(e))
    # distinct experts per token, drawn from the pool
    experts = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)]).to(torch.int32)
    weights = torch.rand(t, k, generator=g)
    want = moe.ref_fused_experts(x.cpu(), gate_up.cpu(), down.cpu(), weights, experts)
    atol, rtol = MOE_TOLERANCES[dtype]
    target = "interpret" if device == "cpu" else "cuda"
    for tiles in (tiles for key, tiles in moe.TILE_SIZES.items() if key[0] == target):  # every phase's tiles
        if target == "cuda":
            tiles = moe.fit_shared_memory(tiles, x.element_size())
        got = moe.fused_experts(x, gate_up, down, weights.to(device), experts.to(device), tiles=tiles)
        assert got.dtype == dtype and got.shape == (t, d)
        torch.testing.assert_close(got.float().cpu(), want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_moe_routes_then_runs_the_experts(moe, device, renormalize):
    g = torch.Generator().manual_seed(3)
    gate_up, down = _weights(5, 40, 24, torch.float32, device, seed=3)
    x = torch.randn(11, 40, generator=g).to(device)
    router = torch.randn(5, 40, generator=g).to(device)
    got = moe.fused_moe(x, router, gate_up, down, top_k=2, renormalize=renormalize)
    weights, experts = moe.route_topk(x, router, 2, renormalize)
    want = moe.ref_fused_experts(x.cpu(), gate_up.cpu(), down.cpu(), weights.cpu(), experts.cpu())
    torch.testing.assert_close(got.cpu(), want, **dict(zip(("atol", "rtol"), MOE_TOLERANCES[torch.float32])))


def test_fused_moe_rejects_bad_shapes(moe, device):
    gate_up, down = _weights(4, 32, 16, torch.float32, device, seed=0)
    x = torch.zeros(3, 32, device=device)
    with pytest.raises(ValueError, match="down must be"):
        moe.fused_moe(x, torch.zeros(4, 32, device=device), gate_up, down[:, :, :8], top_k=2, renormalize=True)
    with pytest.raises(ValueError, match="x has 24 features"):
        moe.fused_moe(x[:, :24], torch.zeros(4, 24, device=device), gate_up, down, top_k=2, renormalize=True)
    with pytest.raises(ValueError, match="top_k"):
        moe.fused_moe(x, torch.zeros(4, 32, device=device), gate_up, down, top_k=5, renormalize=True)
