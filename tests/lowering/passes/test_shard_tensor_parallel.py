"""shard_tensor_parallel: the per-rank graph, its collectives' reference semantics and the param pieces.

The reference of a sharded graph is every rank's graph run together: jax.vmap over the ranks with the axis named
"tp", so all_reduce / all_gather / embed_shard see their named axis. It must equal the unsharded graph.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import compile_model, ops
from lowering.ir import IRError, interpret, verify
from lowering.models import llama
from lowering.passes.shard_tensor_parallel import (RankParams, ShardSpec, shard_param, shard_params,
                                                   shard_tensor_parallel, tp_plan)
from lowering.pipeline import OptionsError
from tests.lowering.helpers import PagedLayout, tiny_config

CONFIGS = {
    "llama": dict(),
    "qwen2_bias_tied": dict(architecture="qwen2", attention_bias=True, tie_word_embeddings=True),
    "qwen3_qk_norm": dict(architecture="qwen3", qk_norm=True),
    "gemma3": dict(architecture="gemma3", qk_norm=True, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", sliding_window=8, rope_local_theta=1000.0,
                   layer_types=("sliding_attention", "full_attention"), query_pre_attn_scalar=12.0),
}


def config(name="llama", **kw):
    # 8 query / 4 KV heads and a vocabulary of 97 (padded to 98 and 100 for tp 2 and 4)
    return tiny_config(**{"num_heads": 8, "num_kv_heads": 4, "hidden_size": 64, "intermediate_size": 96,
                          **CONFIGS[name], **kw})


@pytest.fixture(scope="module")
def compiled():
    return {name: compile_model(llama.random_model(config(name), seed=i), progress=False, max_model_len=128)
            for i, name in enumerate(CONFIGS)}


def run_ranks(graph, params, arrays, state_shapes, tp):
    """Every rank's graph at once (vmap over ranks, axis "tp"): the reference semantics of the sharded graph."""
    pieces = [shard_params(graph, params, r) for r in range(tp)]
    stacked = {p: jnp.stack([jnp.asarray(piece[p]) for piece in pieces]) for p in graph.params}
    state = {s: jnp.zeros((tp, *state_shapes[s]), graph.types[s].dtype) for s in graph.state}
    outs, _ = jax.vmap(lambda p, s: interpret(graph, arrays, p, s), axis_name="tp")(stacked, state)
    return [np.asarray(o) for o in outs]


def steps():
    lay = PagedLayout(16, 16, seed=3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (5, 23, 1)]
    first = lay.step([(i, p, 0) for i, p in enumerate(prompts)])
    return lay, first


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("tp", [2, 4])
def test_sharded_graph_equals_the_whole_model(compiled, name, tp):
    cm = compiled[name]
    graph = shard_tensor_parallel(cm.graph, tp)
    verify(graph, check_types=True)
    _, inp = steps()
    arrays = {k: getattr(inp, k) for k in cm.graph.inputs}
    if "block_tables_w" in cm.graph.inputs:  # gemma3's sliding layers: a second KV group, same block ids
        arrays["block_tables_w"], arrays["slot_mapping_w"] = inp.block_tables, inp.slot_mapping
    whole_state = {s: jnp.zeros((16, *cm.graph.types[s].shape[1:]), cm.graph.types[s].dtype) for s in cm.graph.state}
    want, _ = interpret(cm.graph, arrays, cm.params, whole_state)
    local_shapes = {s: (16, *graph.types[s].shape[1:]) for s in graph.state}
    got = run_ranks(graph, cm.params, arrays, local_shapes, tp)
    for r in range(tp):  # every rank returns the whole logits
        np.testing.assert_allclose(got[0][r], np.asarray(want[0]), rtol=2e-5, atol=2e-5)
    assert (np.argmax(got[0][0], -1) == np.argmax(np.asarray(want[0]), -1)).all()


def test_the_graph_is_megatron_sharded(compiled):
    cm = compiled["llama"]
    layers = cm.config.num_layers
    graph = shard_tensor_parallel(cm.graph, 2)
    counts = graph.ops_count()
    assert counts["all_reduce"] == 2 * layers + 1  # o_proj and down_proj of each layer, and the embedding
    assert counts["all_gather"] == 1 and counts["embed_shard"] == 1 and "embed" not in counts
    tp, specs = tp_plan(graph)
    assert tp == 2 and graph.meta["tensor_parallel"]["axis_name"] == "tp"
    qkv = "model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"
    assert specs[qkv] == ShardSpec("split", 0, (64, 32, 32)) and graph.types[qkv].shape == (64, 64)
    assert specs["model.layers.0.self_attn.o_proj.weight"] == ShardSpec("split", 1, (64,))
    assert specs["model.layers.0.mlp.gate_proj+up_proj.weight"] == ShardSpec("split", 0, (96, 96))
    assert specs["model.layers.0.mlp.down_proj.weight"] == ShardSpec("split", 1, (96,))
    assert specs["model.embed_tokens.weight"] == ShardSpec("split", 0, (98,), 98)  # 97 rows padded to 98
    assert graph.types["model.embed_tokens.weight"].shape == (49, 64)
    assert specs["model.layers.0.input_layernorm.weight"] == ShardSpec("replicate")
    assert graph.types["kv.0.k"].shape[2] == 2  # 4 KV heads, 2 per rank
    att = next(n for n in graph.nodes if n.op == "paged_attention")
    assert (att.attrs["num_heads"], att.attrs["num_kv_heads"]) == (4, 2)
    assert graph.types[graph.outputs[0]].shape[-1] == 97  # whole logits, padding dropped
    # the pass does not touch its input, and the sharded graph survives a JSON round trip
    assert "tensor_parallel" not in cm.graph.meta
    from lowering.ir import Graph

    again = Graph.loads(graph.dumps())
    assert tp_plan(again) == (tp, specs)


def test_row_parallel_bias_is_added_once():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(shard_param(x, ShardSpec("rank0"), 0, 2), x)
    assert not shard_param(x, ShardSpec("rank0"), 1, 2).any()


def test_shard_param_cuts_segments_and_pads(tmp_path):
    w = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)  # segments 6 + 4 rows
    spec = ShardSpec("split", 0, (6, 4))
    r0, r1 = (shard_param(w, spec, r, 2) for r in (0, 1))
    assert np.array_equal(r0, np.concatenate([w[0:3], w[6:8]])) and np.array_equal(r1, np.concatenate([w[3:6], w[8:10]]))
    vocab = np.arange(7 * 2, dtype=np.float32).reshape(7, 2)  # 7 rows over 4 ranks: padded to 8
    pieces = [shard_param(vocab, ShardSpec("split", 0, (8,), 8), r, 4) for r in range(4)]
    assert all(p.shape == (2, 2) for p in pieces)
    assert np.array_equal(np.concatenate(pieces)[:7], vocab) and not pieces[3][1].any()
    cols = shard_param(w.T, ShardSpec("split", 1, (6, 4)), 1, 2)
    assert np.array_equal(cols, np.concatenate([w.T[:, 3:6], w.T[:, 8:10]], axis=1))
    on_disk = np.lib.format.open_memmap(str(tmp_path / "w.npy"), mode="w+", dtype=np.float32, shape=w.shape)
    on_disk[:] = w
    assert np.array_equal(shard_param(on_disk, spec, 1, 2), r1)  # a memmap is cut by slicing
    with pytest.raises(ValueError, match="outside"):
        shard_param(w, spec, 2, 2)


def test_collective_references_under_a_named_axis():
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)  # 2 ranks' [3, 5] values
    summed = jax.vmap(lambda v: ops.ref_all_reduce(v, tp=2, axis_name="tp"), axis_name="tp")(x)
    np.testing.assert_allclose(summed, np.broadcast_to(x.sum(0), x.shape), rtol=1e-6)
    gathered = jax.vmap(lambda v: ops.ref_all_gather(v, tp=2, axis_name="tp", axis=1, size=9), axis_name="tp")(x)
    assert gathered.shape == (2, 3, 9)
    np.testing.assert_array_equal(gathered[1], np.concatenate([x[0], x[1]], axis=1)[:, :9])
    table = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # 8 rows, 4 per rank
    ids = np.array([0, 5, 3, 7, 4], np.int32)
    parts = jax.vmap(lambda t: ops.ref_embed_shard(ids, t, tp=2, axis_name="tp", scale=2.0),
                     axis_name="tp")(table.reshape(2, 4, 2))
    np.testing.assert_array_equal(np.asarray(parts).sum(0), table[ids] * 2.0)
    assert not np.asarray(parts[0])[[1, 3, 4]].any()  # ids 5, 7, 4 live on rank 1


def test_refusals_name_the_problem(compiled):
    cm = compiled["llama"]
    with pytest.raises(IRError, match="8 attention heads and 4 KV heads; tp=8 must divide both"):
        shard_tensor_parallel(cm.graph, 8)
    with pytest.raises(IRError, match="integer tp"):
        shard_tensor_parallel(cm.graph, 0)
    assert shard_tensor_parallel(cm.graph, 1) is cm.graph
    with pytest.raises(IRError, match="already sharded"):
        shard_tensor_parallel(shard_tensor_parallel(cm.graph, 2), 2)
    model = llama.random_model(config(), seed=0)
    for kwargs, what in ((dict(weights="int8"), "quantization"), (dict(kv_cache="fp8"), "quantization"),
                         (dict(speculative={"method": "draft", "num_tokens": 2, "draft": "x"}), "speculative"),
                         (dict(tensor_parallel=-1), "tensor_parallel must be"),
                         (dict(tensor_parallel=2.0), "tensor_parallel must be")):
        kwargs.setdefault("tensor_parallel", 2)
        with pytest.raises(OptionsError, match=what):
            compile_model(model, progress=False, **kwargs)
    with pytest.raises(IRError, match="not divisible"):  # MLP width 90 over 4 ranks
        compile_model(llama.random_model(config(intermediate_size=90), seed=0), progress=False, tensor_parallel=4)


def test_rank_params_check_the_pieces(compiled):
    cm = compiled["llama"]
    graph = shard_tensor_parallel(cm.graph, 2)
    pieces = shard_params(graph, cm.params, 1)
    assert isinstance(pieces, RankParams) and set(pieces) == set(graph.params)
    assert pieces["model.embed_tokens.weight"].shape == (49, 64)
    wrong = dict(cm.params, **{"model.norm.weight": np.ones(7, np.float32)})
    with pytest.raises(IRError, match="model.norm.weight"):
        shard_params(graph, wrong, 0)["model.norm.weight"]
    with pytest.raises(IRError, match="not sharded"):
        shard_params(cm.graph, cm.params, 0)


def test_compile_model_runs_the_pass_last_and_loaded_models_shard(compiled, tmp_path):
    cm = compile_model(llama.random_model(config(), seed=5), progress=False, tensor_parallel=2, max_model_len=128)
    assert cm.pass_records[-1].name == "shard_tensor_parallel" and cm.tensor_parallel == 2
    assert cm.options.tensor_parallel == 2
    # params stay whole (each rank cuts its pieces when its Program is built)
    assert cm.params["model.embed_tokens.weight"].shape == (97, 64)
    from runtime import load

    loaded = load(cm.export(tmp_path / "tp2"))
    assert loaded.tensor_parallel == 2 and tp_plan(loaded.graph)[1] == tp_plan(cm.graph)[1]
    whole = load(compiled["llama"].export(tmp_path / "whole"))
    four = whole.with_tensor_parallel(4)
    assert four.tensor_parallel == 4 and whole.tensor_parallel == 1 and four.options.tensor_parallel == 4
    assert whole.with_tensor_parallel(1) is whole
    with pytest.raises(OptionsError, match="compiled for tensor_parallel=2"):
        loaded.with_tensor_parallel(4)
    from runtime import load_if_artifact

    assert load_if_artifact(tmp_path / "whole", tensor_parallel=2).tensor_parallel == 2  # sharded at load
    assert load_if_artifact(tmp_path / "missing") is None  # not an artifact: the caller compiles it
    with pytest.raises(ValueError, match="compiled artifact: --weights applies when compiling"):
        load_if_artifact(tmp_path / "whole", set_options=["--weights"])
