"""load_checkpoint dispatch: registry name, .gguf file, orbax dir, HF dir, and clear errors for anything else."""
import json

import numpy as np
import pytest

import lowering.checkpoints as checkpoints
from lowering.checkpoints import CheckpointError, load_checkpoint, save_orbax_checkpoint


def test_gguf_file(tiny_gguf):
    path, _, weights, _ = tiny_gguf
    ckpt = load_checkpoint(path, progress=False)
    assert ckpt.source == str(path.resolve())
    np.testing.assert_array_equal(ckpt.weights["model.layers.1.self_attn.k_proj.weight"],
                                  weights["model.layers.1.self_attn.k_proj.weight"])


def test_gguf_without_extension_is_sniffed(tmp_path, tiny_gguf):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(tiny_gguf[0].read_bytes())
    assert load_checkpoint(str(renamed), progress=False).config.num_layers == 2


def test_registry_name(tiny_gguf, monkeypatch):
    monkeypatch.setattr(checkpoints, "resolve_model", lambda name: tiny_gguf[0])
    assert load_checkpoint("smollm2-135m", progress=False).config.hidden_size == 64


def test_orbax_dir(tmp_path, tiny_gguf):
    out = save_orbax_checkpoint(load_checkpoint(tiny_gguf[0], progress=False), tmp_path / "ck")
    assert load_checkpoint(out).config.num_kv_heads == 2


def test_hf_dir_is_dispatched(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.setattr(checkpoints, "load_hf_dir", lambda path, progress: ("hf", path))
    assert load_checkpoint(tmp_path) == ("hf", tmp_path)


def test_bad_sources(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory, and not a registered model name"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint("not-a-model")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 a zip, not gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_checkpoint(fake)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="expected a registered model name, a .gguf file"):
        load_checkpoint(other)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="llmc_config.json .* config.json"):
        load_checkpoint(tmp_path / "empty")
