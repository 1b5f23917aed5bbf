"""Export -> runtime.load -> generate gives identical tokens; truncated, edited or foreign artifacts are refused."""
import json
import shutil

import numpy as np
import pytest

from lowering import compile_model
from lowering.models import llama
from runtime import Engine, SamplingParams, load
from runtime.artifact import ArtifactError
from tests.lowering.helpers import tiny_config

PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7]]
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cm = compile_model(llama.build_model(tiny_config(), seed=5), block_size=4, max_model_len=64)
    path = cm.export(tmp_path_factory.mktemp("art") / "tiny")
    return cm, path


def test_round_trip_generates_identical_tokens(exported):
    cm, path = exported
    files = sorted(p.name for p in path.iterdir())
    assert files == ["graph.json", "manifest.json", "params"]
    loaded = load(path)
    assert loaded.graph.dumps() == cm.graph.dumps()
    assert set(loaded.params) == set(cm.params)
    for name, value in cm.params.items():
        np.testing.assert_array_equal(loaded.params[name], value)
    want = [o.token_ids for o in Engine(cm, max_model_len=64).generate(PROMPTS, PARAMS)]
    got = [o.token_ids for o in Engine(loaded, max_model_len=64).generate(PROMPTS, PARAMS)]
    assert got == want
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["options"]["block_size"] == 4 and manifest["target"] == "cpu"
    assert all(len(entry["sha256"]) == 64 for entry in manifest["files"].values())


def copy_of(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_truncated_params_are_refused(exported, tmp_path):
    _, path = exported
    art = copy_of(path, tmp_path)
    biggest = max((p for p in (art / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="integrity check.*modified or truncated"):
        load(art)


def test_edited_graph_is_refused(exported, tmp_path):
    _, path = exported
    art = copy_of(path, tmp_path)
    text = (art / "graph.json").read_text().replace('"eps":1e-05', '"eps":0.5')
    (art / "graph.json").write_text(text)
    with pytest.raises(ArtifactError, match="graph.json"):
        load(art)


def test_missing_and_extra_files_are_refused(exported, tmp_path):
    _, path = exported
    art = copy_of(path, tmp_path)
    (art / "graph.json").unlink()
    with pytest.raises(ArtifactError, match="missing: graph.json"):
        load(art)
    art2 = copy_of(path, tmp_path / "b")
    (art2 / "evil.py").write_text("import os")
    with pytest.raises(ArtifactError, match="unexpected: evil.py"):
        load(art2)


def test_edited_manifest_is_refused(exported, tmp_path):
    _, path = exported
    art = copy_of(path, tmp_path)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt"):
        load(art)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = 999
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="version 999"):
        load(art)


def test_not_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load(tmp_path)


def test_export_refuses_to_overwrite_a_foreign_directory(exported, tmp_path):
    cm, _ = exported
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        cm.export(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "precious"
