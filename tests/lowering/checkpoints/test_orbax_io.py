"""orbax_io: flat-dict params round trip (dotted keys, bf16/int8/uint8), whole-checkpoint directories, corruption."""
import gc
import json
import time

import ml_dtypes
import numpy as np
import pytest

from lowering.checkpoints import (
    CheckpointError,
    load_checkpoint,
    load_gguf,
    load_orbax_dir,
    load_params,
    save_orbax_checkpoint,
    save_params,
)
from lowering.checkpoints.orbax_io import escape_key, unescape_key


def test_key_escaping_is_reversible():
    for key in ["model.layers.0.self_attn.q_proj.weight", "a/b", "%2E", "ü ñ", "x-y_z", "..."]:
        safe = escape_key(key)
        assert "." not in safe and "/" not in safe
        assert unescape_key(safe) == key


def test_params_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "model.embed_tokens.weight": rng.standard_normal((5, 4)).astype(ml_dtypes.bfloat16),
        "q.scales": rng.standard_normal(3).astype(np.float16),
        "q.int8": rng.integers(-128, 127, (4, 4), dtype=np.int8),
        "q.packed": rng.integers(0, 255, (2, 8), dtype=np.uint8),
        "fp8": rng.standard_normal(6).astype(ml_dtypes.float8_e4m3fn),
        "scalar": np.array(0.5, np.float32),
        "a%2Eb": np.ones(2, np.int32),  # looks escaped already; must come back verbatim
    }
    save_params(tmp_path / "p", params)
    restored = load_params(tmp_path / "p")
    assert set(restored) == set(params)
    for name, want in params.items():
        got = restored[name]
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, name
        assert got.tobytes() == want.tobytes(), name  # bit-exact, NaN payloads included


def test_save_refuses_to_clobber_and_empty_arrays(tmp_path):
    save_params(tmp_path / "p", {"w": np.ones(2, np.float32)})
    with pytest.raises(CheckpointError, match="already exists"):
        save_params(tmp_path / "p", {"w": np.ones(2, np.float32)})
    save_params(tmp_path / "p", {"v": np.zeros(3, np.float32)}, overwrite=True)
    assert list(load_params(tmp_path / "p")) == ["v"]
    with pytest.raises(CheckpointError, match="zero elements"):
        save_params(tmp_path / "e", {"w": np.ones((0, 2), np.float32)})


def test_checkpoint_round_trip(tmp_path, tiny_gguf):
    original = load_gguf(tiny_gguf[0], progress=False)
    original.weights["model.norm.weight"] = original.weights["model.norm.weight"].astype(ml_dtypes.bfloat16)
    out = save_orbax_checkpoint(original, tmp_path / "ck")
    assert (out / "llmc_config.json").is_file() and (out / "tokenizer" / "tokenizer.json").is_file()
    restored = load_checkpoint(out)
    assert restored.config == original.config
    assert restored.source == str(out)
    for name, want in original.weights.items():
        assert restored.weights[name].dtype == want.dtype
        np.testing.assert_array_equal(restored.weights[name], want, err_msg=name)
    text = "<|im_start|>the cat<|im_end|>"
    assert restored.tokenizer.encode(text) == original.tokenizer.encode(text)
    assert restored.tokenizer.chat_template == original.tokenizer.chat_template


def test_corrupt_directories(tmp_path, tiny_gguf):
    ckpt = load_gguf(tiny_gguf[0], progress=False)
    out = save_orbax_checkpoint(ckpt, tmp_path / "ck")
    with pytest.raises(CheckpointError, match="already exists"):
        save_orbax_checkpoint(ckpt, out)

    (out / "params" / "_METADATA").write_text("garbage")
    with pytest.raises(CheckpointError, match="_METADATA: missing or not valid JSON"):
        load_orbax_dir(out)

    (out / "llmc_config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_orbax_dir(out)
    (out / "llmc_config.json").write_text(json.dumps({"format": "llmc-orbax", "version": 7}))
    with pytest.raises(CheckpointError, match="version 7"):
        load_orbax_dir(out)
    with pytest.raises(CheckpointError, match="llmc_config.json: not found"):
        load_orbax_dir(tmp_path / "nowhere")


# NOTE: when one array of a restore fails, orbax closes its event loop while tensorstore reads of the
# other arrays are still in flight; their callbacks then raise "Event loop is closed" in the background.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["deleted", "overwritten"])
def test_damaged_array_data(tmp_path, tiny_gguf, damage):
    out = save_orbax_checkpoint(load_gguf(tiny_gguf[0], progress=False), tmp_path / "ck")
    for f in (out / "params").rglob("*"):
        if not f.is_file() or f.name in ("_METADATA", "_CHECKPOINT_METADATA"):
            continue
        if damage == "deleted":
            f.unlink()
        elif f.parent.name == "d":  # the array chunks
            f.write_bytes(b"\0" * 8)
    with pytest.raises(CheckpointError, match="cannot restore the orbax checkpoint"):
        load_orbax_dir(out)
    time.sleep(0.2)  # let the orphaned reads finish inside this test
    gc.collect()
