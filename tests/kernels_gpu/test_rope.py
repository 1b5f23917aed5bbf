"""apply_rope against its float64 reference; rope_inv_freq against Hugging Face's rope rules."""
import pytest
import torch

from kernels_gpu.rope import apply_rope, ref_apply_rope, rope_inv_freq

TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2),
}

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens, num_q_heads, num_k_heads, head_dim", [
    (1, 4, 1, 64), (13, 9, 3, 64), (7, 12, 4, 128), (5, 3, 3, 80)])
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rope_matches_reference(device, dtype, num_tokens, num_q_heads, num_k_heads, head_dim, inplace):
    torch.manual_seed(num_tokens + 100 * num_q_heads + head_dim)
    q = torch.randn(num_tokens, num_q_heads, head_dim, device=device).to(dtype)  # [T, Hq, D]
    k = torch.randn(num_tokens, num_k_heads, head_dim, device=device).to(dtype)  # [T, Hk, D]
    positions = torch.randint(0, 40000, (num_tokens,), device=device, dtype=torch.int32)  # i32[T]
    inv_freq = rope_inv_freq(head_dim, 500000.0, LLAMA3_SCALING, device=device)  # f32[D/2]
    want_q, want_k = ref_apply_rope(q, k, positions, inv_freq)
    q_in, k_in = q.clone(), k.clone()
    got_q, got_k = apply_rope(q_in, k_in, positions, inv_freq, inplace=inplace)
    if inplace:
        assert got_q.data_ptr() == q_in.data_ptr() and got_k.data_ptr() == k_in.data_ptr()
    else:
        assert torch.equal(q_in, q) and torch.equal(k_in, k)
    assert got_q.dtype == dtype and got_k.shape == k.shape
    torch.testing.assert_close(got_q.double(), want_q, **TOLERANCES[dtype])
    torch.testing.assert_close(got_k.double(), want_k, **TOLERANCES[dtype])


def test_apply_rope_views_of_fused_qkv(device):
    num_tokens, num_q_heads, num_kv_heads, head_dim = 6, 4, 2, 64
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=device)  # [T, (Hq+2Hkv)*D]
    q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, num_q_heads * head_dim: (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].clone()
    positions = torch.arange(100, 100 + num_tokens, device=device, dtype=torch.int64)
    inv_freq = rope_inv_freq(head_dim, 10000.0, device=device)
    want_q, want_k = ref_apply_rope(q, k, positions, inv_freq)
    apply_rope(q, k, positions, inv_freq, inplace=True)
    torch.testing.assert_close(q.double(), want_q, **TOLERANCES[torch.float32])
    torch.testing.assert_close(k.double(), want_k, **TOLERANCES[torch.float32])
    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim:], v_before)


@pytest.mark.parametrize("scaling", [None, {"rope_type": "linear", "factor": 4.0}, LLAMA3_SCALING])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_inv_freq_matches_hf(scaling, head_dim):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    transformers = pytest.importorskip("transformers")
    theta = 500000.0
    params = {"rope_type": "default", "rope_theta": theta} if scaling is None else {**scaling, "rope_theta": theta}
    config = transformers.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                                      rope_parameters=params, max_position_embeddings=131072)
    want = modeling_llama.LlamaRotaryEmbedding(config).inv_freq
    torch.testing.assert_close(rope_inv_freq(head_dim, theta, scaling), want, atol=0, rtol=0)


def test_apply_rope_rejects_bad_input(device):
    q = torch.randn(3, 2, 64, device=device)
    positions = torch.arange(3, device=device, dtype=torch.int32)
    inv_freq = rope_inv_freq(64, 10000.0, device=device)
    with pytest.raises(ValueError, match="inv_freq"):
        apply_rope(q, q.clone(), positions, inv_freq[:16])
    with pytest.raises(ValueError, match="positions"):
        apply_rope(q, q.clone(), positions[:2], inv_freq)
    with pytest.raises(ValueError, match="does not match"):
        apply_rope(q, torch.randn(3, 2, 32, device=device), positions, inv_freq)
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(3, 2, 5), torch.randn(3, 2, 5), positions.cpu(), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rotary_dim", [64, 48])
@pytest.mark.parametrize("inplace", [False, True])
def test_apply_rope_longrope_and_partial_rotation(device, dtype, rotary_dim, inplace):
    """LongRoPE: positions >= long_from take the long set, cos/sin scaled; partial: features R.. pass through."""
    torch.manual_seed(rotary_dim)
    num_tokens, head_dim = 11, 64
    q = torch.randn(num_tokens, 5, head_dim, device=device).to(dtype)  # [T, Hq, D]
    k = torch.randn(num_tokens, 1, head_dim, device=device).to(dtype)  # [T, Hk, D]
    positions = torch.tensor([0, 3, 15, 16, 17, 2, 40, 1000, 15, 7, 16], device=device, dtype=torch.int32)
    base = 10000.0 ** (torch.arange(0, rotary_dim, 2, device=device).float() / rotary_dim)
    inv_freq = 1.0 / (torch.linspace(1.0, 1.2, rotary_dim // 2, device=device) * base)  # f32[R/2]
    long_inv_freq = 1.0 / (torch.linspace(1.0, 40.0, rotary_dim // 2, device=device) * base)
    extra = dict(rotary_dim=rotary_dim, long_inv_freq=long_inv_freq, long_from=16, attention_factor=1.19)
    want_q, want_k = ref_apply_rope(q, k, positions, inv_freq, **extra)
    got_q, got_k = apply_rope(q.clone(), k.clone(), positions, inv_freq, inplace=inplace, **extra)
    torch.testing.assert_close(got_q.double(), want_q, **TOLERANCES[dtype])
    torch.testing.assert_close(got_k.double(), want_k, **TOLERANCES[dtype])
    assert torch.equal(got_q[..., rotary_dim:], q[..., rotary_dim:])
    short_q, _ = ref_apply_rope(q, k, positions, inv_freq, rotary_dim=rotary_dim, attention_factor=1.19)
    assert torch.allclose(short_q[:3], want_q[:3]) and not torch.allclose(short_q[3:5], want_q[3:5])
    with pytest.raises(ValueError, match="long_inv_freq"):
        apply_rope(q, k, positions, inv_freq, rotary_dim=rotary_dim, long_inv_freq=long_inv_freq[:-1])


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("num_tokens, num_q_heads, num_k_heads, head_dim, block_size", [
    (1, 4, 1, 64, 16), (9, 9, 3, 64, 5), (5, 12, 4, 128, 16)])
@pytest.mark.parametrize("longrope", [False, True], ids=["plain", "longrope"])
def test_rope_kv_write_matches_rope_then_kv_write(device, dtype, num_tokens, num_q_heads, num_k_heads, head_dim,
                                                  block_size, longrope):
    """q rotated as apply_rope does; the rotated k and v in their slots of NaN-filled pools, padding rows (slot -1)
    writing nothing, every other slot left NaN."""
    from kernels_gpu.rope import rope_kv_write

    torch.manual_seed(num_tokens + head_dim + block_size)
    q = torch.randn(num_tokens, num_q_heads, head_dim, device=device).to(dtype)  # [T, Hq, D]
    k = torch.randn(num_tokens, num_k_heads, head_dim, device=device).to(dtype)  # [T, Hk, D]
    v = torch.randn(num_tokens, num_k_heads, head_dim, device=device).to(dtype)
    positions = torch.randint(0, 40000, (num_tokens,), device=device, dtype=torch.int32)
    inv_freq = rope_inv_freq(head_dim, 500000.0, LLAMA3_SCALING, device=device)
    extra = {}
    if longrope:
        extra = dict(long_inv_freq=inv_freq * 0.5, long_from=20000, attention_factor=1.19)
    num_blocks = 7
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(torch.int32).to(device)
    if num_tokens > 1:
        slots[-1] = -1  # padding row
    k_pool = torch.full((num_blocks, block_size, num_k_heads, head_dim), float("nan"), device=device, dtype=dtype)
    v_pool = k_pool.clone()
    q_in = q.clone()
    got_q = rope_kv_write(q_in, k, v, positions, inv_freq, slots, k_pool, v_pool, inplace=True, **extra)
    want_q, want_k = ref_apply_rope(q, k, positions, inv_freq, **extra)
    assert got_q.data_ptr() == q_in.data_ptr()
    torch.testing.assert_close(got_q.double(), want_q, **TOLERANCES[dtype])
    written = slots >= 0
    flat_k, flat_v = k_pool.view(-1, num_k_heads, head_dim), v_pool.view(-1, num_k_heads, head_dim)
    used = slots[written].long()
    torch.testing.assert_close(flat_k[used].double(), want_k[written], **TOLERANCES[dtype])
    assert torch.equal(flat_v[used], v[written])
    others = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    others[used] = False
    assert torch.isnan(flat_k[others]).all() and torch.isnan(flat_v[others]).all()


def test_rope_kv_write_refuses_bad_pools(device):
    from kernels_gpu.rope import rope_kv_write

    q, k = torch.randn(2, 4, 64, device=device), torch.randn(2, 2, 64, device=device)
    inv_freq = rope_inv_freq(64, 10000.0, device=device)
    pool = torch.zeros(3, 16, 2, 64, device=device)
    slots = torch.tensor([0, 1], dtype=torch.int32, device=device)
    narrow = torch.zeros(3, 16, 2, 32, device=device)  # pools whose head width is not k's
    with pytest.raises(ValueError, match="rope_kv_write: kv_write: cache shape"):
        rope_kv_write(q, k, k, torch.zeros(2, dtype=torch.int32, device=device), inv_freq, slots, narrow, narrow)
    with pytest.raises(ValueError, match="rope_kv_write: kv_write: k_cache and v_cache must both be"):
        rope_kv_write(q, k, k, torch.zeros(2, dtype=torch.int32, device=device), inv_freq, slots, narrow, pool)
    with pytest.raises(ValueError, match="rope_kv_write: kv_write: slot_mapping must be"):
        rope_kv_write(q, k, k, torch.zeros(2, dtype=torch.int32, device=device), inv_freq, slots[:1], pool, pool)
    with pytest.raises(ValueError, match="rope_kv_write: kv_write: k and v must both be"):
        rope_kv_write(q, k, k[:, :1], torch.zeros(2, dtype=torch.int32, device=device), inv_freq, slots, pool, pool)
