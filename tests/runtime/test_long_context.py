"""runtime/long_context.py (`llmc eval --long`): streamed NLL equals one-shot scoring with a full cache and a
sliding-window model's under eviction; settings parse or fail clearly; the sweep's plots are written."""
import dataclasses
import math

import numpy as np
import pytest

from lowering import StreamingLLM, compile_model
from lowering.models import llama
from runtime.evaluate import token_nll
from runtime.long_context import format_row, parse_setting, plot, stream_nll
from runtime.step import window_step
from tests.lowering.helpers import tiny_config


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(num_layers=2, max_position_embeddings=256)
    return cfg, llama.build_model(cfg, seed=11)


TOKENS = np.random.default_rng(3).integers(1, 90, 70).tolist()


def test_streamed_nll_with_a_full_cache_equals_one_prefill(tiny):
    cfg, model = tiny
    cm = compile_model(model, config=cfg, block_size=4, max_model_len=128, progress=False)
    res = stream_nll(cm, TOKENS, chunk=16)
    prog = cm.make_program(num_blocks=18, max_num_seqs=2, max_model_len=72)
    logits = np.asarray(prog.step(window_step(np.asarray([TOKENS], np.int32), block_size=4)))
    want = token_nll(logits[:-1], np.asarray(TOKENS[1:]))
    np.testing.assert_allclose(res.nll, want, rtol=1e-4, atol=1e-5)
    assert res.peak_blocks == 18 and res.num_compactions == 0


def test_streamed_nll_under_eviction_equals_a_sliding_window_model(tiny):
    """StreamingLLM without sinks, compacted every token: each token sees the 12 newest and itself, as a model with
    a 13-token sliding window does; the sequence never holds more than ceil(13 / 4) blocks."""
    cfg, model = tiny
    cm = compile_model(model, config=cfg, block_size=4, max_model_len=128, progress=False,
                       kv_policy=StreamingLLM(sinks=0, window=12, positions="original", evict_every=1))
    cfg_w = dataclasses.replace(cfg, sliding_window=13)
    ref = compile_model(llama.build_model(cfg_w, seed=11), config=cfg_w, block_size=4, max_model_len=128,
                        progress=False)
    res, want = stream_nll(cm, TOKENS, chunk=16), stream_nll(ref, TOKENS, chunk=16)
    np.testing.assert_allclose(res.nll, want.nll, rtol=1e-4, atol=1e-5)
    assert res.num_compactions == len(TOKENS) - 13 and res.peak_blocks == 4


def test_settings_parse_or_fail_clearly():
    assert parse_setting("full") == {}
    assert parse_setting("h2o:0.2")["kv_policy"].budget == 0.2
    assert parse_setting("h2o:300:100")["kv_policy"].recent == 100
    s = parse_setting("streaming:4:1024:original")["kv_policy"]
    assert (s.sinks, s.window, s.positions) == (4, 1024, "original")
    assert parse_setting("share:2") == {"share_kv_layers": 2}
    for bad in ("h2o", "streaming:4", "lru:3", "share:x", "streaming:4:8:text", "h2o:abc"):
        with pytest.raises(ValueError, match="bad KV setting"):
            parse_setting(bad)


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"setting": "full", "ppl": 10.0, "kv_bytes": 8 << 20, "needle_accuracy": 1.0, "seconds": 1.0},
            {"setting": "h2o:0.2", "ppl": 10.3, "kv_bytes": 2 << 20, "needle_accuracy": 0.4, "seconds": 1.0}]
    paths = plot({"rows": rows, "window": 8192, "needle_context": 4096}, tmp_path)
    assert len(paths) == 2 and all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)
    assert "+3.00%" in format_row(rows[1], rows[0]) and math.isclose(rows[1]["kv_bytes"] / rows[0]["kv_bytes"], 0.25)
