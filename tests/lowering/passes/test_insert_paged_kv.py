"""insert_paged_kv: attention -> kv_write + paged_attention over pool state; prefill then decode match."""
import jax.numpy as jnp
import numpy as np
import pytest

from lowering import ir
from lowering.passes import insert_paged_kv
from tests.lowering.helpers import PagedLayout


def test_before_after_ir(traced_tiny):
    before, _ = traced_tiny
    after = insert_paged_kv(before, block_size=4)
    ir.verify(after, check_types=True)
    assert "attention" not in after.ops_count()
    assert after.ops_count()["kv_write"] == 2 and after.ops_count()["paged_attention"] == 2
    assert after.inputs == ["token_ids", "positions", "slot_mapping", "query_start", "seq_lens", "block_tables",
                            "logit_rows"]
    assert after.state == ["kv.0.k", "kv.0.v", "kv.1.k", "kv.1.v"]
    assert str(after.types["kv.0.k"]) == "f32[N,4,2,8]"
    text = str(after)
    assert "= kv_write(" in text and ", slot_mapping, kv.0.k, kv.0.v)" in text
    assert ", query_start, seq_lens, block_tables) {num_heads=6, num_kv_heads=2, head_dim=8" in text
    assert after.meta["block_size"] == 4


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_prefill_and_decode_match_contiguous_attention(traced_tiny, block_size):
    before, params = traced_tiny
    after = insert_paged_kv(before, block_size=block_size)
    num_blocks = 64 // block_size + 8
    pools = {s: jnp.full((num_blocks, block_size, 2, 8), jnp.nan) for s in after.state}
    layout = PagedLayout(num_blocks, block_size)
    prompts = {0: [3, 14, 15, 92, 6], 1: [5, 35], 2: [8, 9, 7, 9, 3, 2, 3, 8]}

    def contiguous_logits(seq):
        toks = np.array(seq, np.int32)
        inputs = dict(token_ids=toks, positions=np.arange(len(seq), dtype=np.int32),
                      query_start=np.array([0, len(seq)], np.int32), logit_rows=np.array([len(seq) - 1], np.int32))
        (out,), _ = ir.interpret(before, inputs, params)
        return np.asarray(out[0])

    # step 1: all three prefills in one ragged step
    step = layout.step([(s, p, 0) for s, p in prompts.items()])
    inputs = {k: getattr(step, k) for k in after.inputs}
    (logits,), pools = ir.interpret(after, inputs, params, pools)
    for row, p in zip(np.asarray(logits), prompts.values()):
        np.testing.assert_allclose(row, contiguous_logits(p), rtol=1e-5, atol=1e-5)
    # steps 2-3: decode one token each; sequence 1 also gets a 2-token chunk (mixed step)
    seqs = {s: list(p) for s, p in prompts.items()}
    for _ in range(2):
        chunks = []
        for s, seq in seqs.items():
            new = [7, 11] if s == 1 else [int(len(seq) * 13 % 97)]
            chunks.append((s, new, len(seq)))
        step = layout.step(chunks)
        (logits,), pools = ir.interpret(after, {k: getattr(step, k) for k in after.inputs}, params, pools)
        for (s, new, _), row in zip(chunks, np.asarray(logits)):
            seqs[s] += new
            np.testing.assert_allclose(row, contiguous_logits(seqs[s]), rtol=1e-5, atol=1e-5)


def test_refuses_a_graph_without_attention(traced_tiny):
    graph, _ = traced_tiny
    g = graph.copy()
    g.nodes = [n for n in g.nodes if n.op != "attention"]
    with pytest.raises(ir.IRError, match="no attention op"):
        insert_paged_kv(g)
    with pytest.raises(ir.IRError, match="block_size"):
        insert_paged_kv(graph, block_size=0)
