"""attention_mass (Triton, in place) against the op's jnp reference (lowering.ops.ref_attention_mass), which
tests/lowering/test_attention_mass.py ties to float64 loops; ragged mixed batches, all KV formats."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lowering import ops

if torch.cuda.is_available():  # the jnp reference then runs through XLA on the GPU: make its float32 dots exact
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
from tests.lowering.attention_mass_cases import MIXED, make_case, op_args, padded_case, seen_slots

GPU_MIXED = [(300, 1500), (1, 4000), (4, 2049), (1, 17), (0, 64), (128, 128), (1, 777), (9, 3001)]


def _torch(a, device, dtype=None):
    """numpy (ml_dtypes bf16 / e4m3 included) -> a torch copy on device (never sharing the numpy memory)."""
    a = np.asarray(a)
    if a.dtype == jnp.bfloat16:
        return torch.from_numpy(a.astype(np.float32)).to(device=device, dtype=torch.bfloat16)
    if a.dtype == jnp.float8_e4m3fn:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn).to(device)
    t = torch.from_numpy(a.copy()).to(device)
    return t if dtype is None else t.to(dtype)


def _run(am, case, device, **kwargs):
    """The kernel on the case's data (mass pool updated in place) -> f32 numpy [N, Bs, Hkv]."""
    a = case["attrs"]
    q = _torch(case["q"], device).view(-1, a["num_heads"], a["head_dim"])
    mass = _torch(case["mass"], device)
    extras = [_torch(e, device) for e in case["extras"]]
    fmt = a["kv_format"]
    kw = {}
    if fmt == "fp8":
        kw = dict(k_scale=extras[0], v_scale=extras[1]) if extras else {}
    elif fmt == "nvfp4":
        kw = dict(k_block_scale=extras[0], v_block_scale=extras[1], k_scale=extras[2].reshape(()),
                  v_scale=extras[3].reshape(()))
    got = am.attention_mass(q, _torch(case["k_pool"], device), *(_torch(case[n], device) for n in (
        "query_start", "seq_lens", "block_tables", "slot_mapping")), mass, scale=a["scale"], kv_format=fmt,
        **kw, **kwargs)
    assert got is mass
    return mass.cpu().numpy()


def _mass_f64_torch(case, device):
    """The op's contract in float64 torch, per sequence (for shapes whose jnp reference, which gathers the
    context of every row, would not fit): K from the case's dequantized pool."""
    a = case["attrs"]
    kf = torch.from_numpy(case["k_f32"]).to(device, torch.float64)  # f64[N, Bs, Hkv, D]
    block_size, hkv = kf.shape[1], kf.shape[2]
    group = a["num_heads"] // hkv
    q = torch.from_numpy(np.asarray(case["q"], np.float32)).to(device, torch.float64).view(-1, a["num_heads"],
                                                                                          a["head_dim"])
    out = torch.from_numpy(case["mass"]).to(device, torch.float64).view(-1, hkv)  # f64[N * Bs, Hkv]
    slots = torch.from_numpy(case["slot_mapping"]).to(device).long()
    out[slots[slots >= 0]] = 0.0
    qs = case["query_start"].tolist()
    for s, seq_len in enumerate(case["seq_lens"].tolist()):
        t0, t1 = qs[s], qs[s + 1]
        if t1 == t0:
            continue
        idx = torch.arange(seq_len, device=device)
        blocks = torch.from_numpy(case["block_tables"][s]).to(device).long()[idx // block_size]
        k = kf[blocks, idx % block_size].repeat_interleave(group, dim=1)  # f64[ctx, Hq, D]
        scores = torch.einsum("thd,chd->htc", q[t0:t1], k) * a["scale"]  # f64[Hq, q_len, ctx]
        pos = seq_len - (t1 - t0) + torch.arange(t1 - t0, device=device)
        scores = scores.masked_fill((idx[None, :] > pos[:, None])[None], float("-inf"))
        p = torch.softmax(scores, dim=-1).sum(1).view(hkv, group, seq_len).sum(1)  # f64[Hkv, ctx]
        out.index_add_(0, blocks * block_size + idx % block_size, p.T)
    return out.view(case["mass"].shape).cpu().numpy()


def _check(got, case, rtol, want=None):
    """got against `want` (default: the op's jnp reference) on the slots the step sees; the rest unchanged."""
    if want is None:
        args, attrs = op_args(case)
        want = np.asarray(ops.ref_attention_mass(*args, **attrs))
    seen = seen_slots(case)
    assert np.isfinite(got[seen]).all()
    np.testing.assert_allclose(got[seen], want[seen], rtol=rtol, atol=rtol / 10)
    # every slot no step sequence sees is bit for bit what it was (NaN included)
    np.testing.assert_array_equal(got[~seen].view(np.uint32), case["mass"][~seen].view(np.uint32))


@pytest.fixture
def am(kernel_module):
    return kernel_module("attention_mass")


@pytest.mark.parametrize("kv_format", [None, "fp8", "nvfp4"])
@pytest.mark.parametrize("block_size,num_heads,num_kv_heads", [(16, 4, 2), (5, 2, 2)])
def test_mixed_batch(am, device, kv_format, block_size, num_heads, num_kv_heads):
    head_dim = 32 if kv_format == "nvfp4" else 16
    case = make_case(MIXED, block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, kv_format=kv_format, seed=block_size + num_heads)
    rtol = 1e-4 if kv_format is None else 1e-3
    hints = dict(max_q_len=7, max_seq_len=13) if block_size == 5 else {}  # else max_q_len from the device
    _check(_run(am, case, device, **hints), case, rtol)


def test_float64_torch_reference_agrees(device):
    # the large GPU cases are checked against _mass_f64_torch: tie it to the op reference here
    case = make_case(MIXED, block_size=5, kv_format="fp8", seed=2)
    args, attrs = op_args(case)
    np.testing.assert_allclose(_mass_f64_torch(case, device), np.asarray(ops.ref_attention_mass(*args, **attrs)),
                               rtol=1e-5, atol=1e-6)


def test_bf16_queries_and_pool(am, device):
    case = make_case(MIXED, block_size=8, num_heads=6, num_kv_heads=2, head_dim=32, q_dtype=jnp.bfloat16,
                     pool_dtype=jnp.bfloat16, seed=3)
    _check(_run(am, case, device, max_q_len=7), case, 1e-4)


def test_validation(am, device):
    case = make_case(MIXED[:2], seed=4)
    with pytest.raises(ValueError, match="kv_format must be"):
        _run(am, dict(case, attrs=dict(case["attrs"], kv_format="int4")), device)
    bad = dict(case, mass=case["mass"][:, :, :1].copy())
    with pytest.raises(ValueError, match="mass_pool must be f32"):
        _run(am, bad, device)
    with pytest.raises(ValueError, match="fp8 KV format needs"):
        _run(am, dict(case, attrs=dict(case["attrs"], kv_format="fp8")), device)


@pytest.mark.parametrize("kv_format", [None, "fp8", "nvfp4"])
def test_large_mixed_batch_cuda(am, device, kv_format):
    if device != "cuda":
        pytest.skip("large shapes run on the GPU only")
    case = make_case(GPU_MIXED, block_size=16, num_heads=32, num_kv_heads=8, head_dim=128, kv_format=kv_format,
                     q_dtype=jnp.bfloat16, pool_dtype=jnp.bfloat16, seed=13)
    _check(_run(am, case, device, max_q_len=300, max_seq_len=4000), case, 1e-4 if kv_format is None else 1e-3,
           want=_mass_f64_torch(case, device))


def test_cuda_graph_capture(am, device):
    if device != "cuda":
        pytest.skip("CUDA graphs need a GPU")
    case = make_case([(1, 40), (1, 3), (1, 77)], block_size=16, num_heads=8, num_kv_heads=2, head_dim=64,
                     q_dtype=jnp.bfloat16, pool_dtype=jnp.bfloat16, pad_rows=0, seed=14)
    a = case["attrs"]
    q = _torch(case["q"], device).view(-1, a["num_heads"], a["head_dim"])
    k_pool = _torch(case["k_pool"], device)
    meta = [_torch(case[n], device) for n in ("query_start", "seq_lens", "block_tables", "slot_mapping")]
    mass = _torch(case["mass"], device)
    call = lambda: am.attention_mass(q, k_pool, *meta, mass, scale=a["scale"], max_q_len=1, max_seq_len=77)  # noqa
    call()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    mass.copy_(_torch(case["mass"], device))
    graph.replay()
    torch.cuda.synchronize()
    _check(mass.cpu().numpy(), case, 1e-4)


@pytest.mark.parametrize("kv_format", [None, "nvfp4"])
def test_cuda_lowering_updates_the_pool_in_place(am, device, kv_format):
    # the cuda backend's lowering of a graph node: q [T, Hq*Dh] viewed per head, the kv extras as keywords
    from types import SimpleNamespace

    from lowering.backends import cuda
    from lowering.ir import Graph, IRError, Node

    case = make_case(MIXED, block_size=5, head_dim=32, kv_format=kv_format, seed=21)
    names = ["q", "k_pool", "query_start", "seq_lens", "block_tables", "slot_mapping", "mass"]
    extras = [f"extra{i}" for i in range(len(case["extras"]))]
    attrs = {k: v for k, v in case["attrs"].items() if v is not None}
    node = Node("attention_mass", names + extras, ["mass_out"], attrs)
    graph = Graph(nodes=[node], state=["mass"], state_updates={"mass": "mass_out"})
    fn = cuda._LOWERINGS["attention_mass"](node, graph, SimpleNamespace(device=torch.device(device)), {},
                                           graph.users())
    mass = _torch(case["mass"], device)
    args = [_torch(case[n], device) for n in names[:6]] + [mass] + [_torch(e, device) for e in case["extras"]]
    (out,) = fn(SimpleNamespace(max_q_len=7, max_seq_len=13), *args)
    assert out is mass
    _check(mass.cpu().numpy(), case, 1e-4 if kv_format is None else 1e-3)
    # a later node reading the pool's old value would see it overwritten: refused when the program is planned
    graph.nodes.append(Node("reduce_sum", ["mass"], ["total"], {}))
    with pytest.raises(IRError, match="in place"):
        cuda._LOWERINGS["attention_mass"](node, graph, SimpleNamespace(device=torch.device(device)), {},
                                          graph.users())


def test_padding_rows_add_no_mass(am, device):
    """CUDA-graph batch padding: rows with slot -1 (seq_len = their count, table of block 0) add nothing."""
    case, padded = padded_case(block_size=16, seed=4)
    want, got = _run(am, case, device), _run(am, padded, device)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-6, atol=1e-7)
