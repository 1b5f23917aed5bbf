"""Tests of runtime/cli.py: argument handling, clean error messages, generate through a fake loader."""
import subprocess
import sys
import types

import pytest

import lowering
from runtime import cli
from tests.runtime.toy_program import ToyModel

SCRIPT = "Hello wörld! The end."


class CheckpointError(Exception):
    pass


CheckpointError.__module__ = "lowering.checkpoints.gguf"  # as if raised by a project loader


@pytest.fixture
def artifact_dir(tmp_path, monkeypatch):
    """A directory with manifest.json whose runtime.load returns a toy model (or raises `load.error`)."""
    (tmp_path / "manifest.json").write_text("{}")
    fake = types.ModuleType("runtime.artifact")

    def load(path):
        if fake.error is not None:
            raise fake.error
        assert path == str(tmp_path)
        return ToyModel(script_text=SCRIPT)

    fake.load, fake.error = load, None
    monkeypatch.setitem(sys.modules, "runtime.artifact", fake)
    return tmp_path, fake


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("llmc ")


def test_generate_from_an_artifact_prints_completions(artifact_dir, capsys):
    path, _ = artifact_dir
    assert cli.main(["generate", str(path), "--prompt", "Hello", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == " wö\n"
    argv = ["generate", str(path), "--prompt", "Hello", "--prompt", "Hello w", "--stop", "!", "--max-tokens", "50"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "--- [0] 'Hello' (stop)\n wörld\n" in out and "--- [1] 'Hello w' (stop)\nörld\n" in out


def test_generate_compiles_a_source_without_manifest(monkeypatch, capsys, tmp_path):
    calls = []

    def compile_model(source, **kwargs):
        calls.append((source, kwargs))
        return ToyModel(script_text=SCRIPT)

    monkeypatch.setattr(lowering, "compile_model", compile_model, raising=False)
    assert cli.main(["generate", "toy", "--prompt", "Hello", "--max-tokens", "2", "--block-size", "8"]) == 0
    assert capsys.readouterr().out == " w\n"
    assert calls == [("toy", {"target": "cpu", "block_size": 8, "dtype": None, "verbose": False, **NO_QUANT})]


NO_QUANT = {"weights": None, "kv_cache": None, "kv_rotation": False, "kv_rounding": "nearest", "quant_method": "auto",
            "max_ppl_increase": 0.01, "calibration": None, "tensor_parallel": 1}


def test_compile_calls_compile_model_and_exports(monkeypatch, capsys, tmp_path):
    exported = []

    class FakeCompiled:
        def export(self, out):
            exported.append(out)

    calls = []

    def compile_model(source, **kwargs):
        calls.append((source, kwargs))
        return FakeCompiled()

    monkeypatch.setattr(lowering, "compile_model", compile_model, raising=False)
    out = str(tmp_path / "art")
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--dtype", "bfloat16", "--quiet"]) == 0
    expected = {"target": "cpu", "block_size": None, "dtype": "bfloat16", "verbose": False, "progress": False,
                **NO_QUANT}
    assert calls == [("smollm2-135m", expected)]
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text")
    calls.clear()
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--quiet", "--weights", "int4", "--kv-cache", "fp8",
                     "--kv-rotation", "--kv-rounding", "score", "--quant-method", "gptq", "--max-ppl-increase", "off",
                     "--calibration", str(calib)]) == 0
    assert calls[0][1] | {} == {**expected, "dtype": None, "weights": "int4", "kv_cache": "fp8", "kv_rotation": True,
                                "kv_rounding": "score",
                                "quant_method": "gptq", "max_ppl_increase": None,
                                "calibration": "some calibration text"}
    with pytest.raises(SystemExit) as exc:
        cli.main(["compile", "smollm2-135m", "-o", out, "--max-ppl-increase", "-1"])
    assert exc.value.code == 2
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--calibration", str(tmp_path / "missing.txt")]) == 2
    capsys.readouterr()
    assert exported == [out, out] and capsys.readouterr().out == ""

    def failing_compile_model(source, **kwargs):
        raise ValueError("unknown model 'nope'")

    monkeypatch.setattr(lowering, "compile_model", failing_compile_model, raising=False)
    assert cli.main(["compile", "nope", "-o", out]) == 2
    assert capsys.readouterr().err == "llmc: error: unknown model 'nope'\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-tokens", "0"], "max_tokens must be an integer >= 1, got 0"),
        (["--top-p", "1.5"], "top_p must be a number in (0, 1], got 1.5"),
        (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0"),
        (["--max-model-len", "100000"], "max_model_len=100000 exceeds the model's max_position_embeddings=256"),
    ],
)
def test_bad_values_print_one_clean_line(artifact_dir, capsys, argv, message):
    path, _ = artifact_dir
    assert cli.main(["generate", str(path), "--prompt", "Hello"] + argv) == 2
    captured = capsys.readouterr()
    assert captured.err == f"llmc: error: {message}\n" and captured.out == ""


@pytest.mark.parametrize(
    "error, message",
    [
        (FileNotFoundError(2, "No such file or directory", "/x/params"), "No such file or directory: /x/params"),
        (CheckpointError("bad GGUF magic"), "bad GGUF magic"),
        (ValueError("manifest version 9 is newer than this llmc"), "manifest version 9 is newer than this llmc"),
    ],
)
def test_loader_errors_print_one_clean_line(artifact_dir, capsys, error, message):
    path, fake = artifact_dir
    fake.error = error
    assert cli.main(["generate", str(path), "--prompt", "Hello"]) == 2
    assert capsys.readouterr().err == f"llmc: error: {message}\n"


def test_bugs_are_not_hidden(artifact_dir):
    path, fake = artifact_dir
    fake.error = RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["generate", str(path), "--prompt", "Hello"])


@pytest.mark.parametrize(
    "argv",
    [[], ["generate"], ["generate", "x"], ["compile", "x"], ["generate", "x", "--prompt", "a", "--max-tokens", "z"]],
)
def test_argument_errors_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_console_run_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "generate", "x", "--prompt", "a", "--top-k", "-5"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == "llmc: error: top_k must be an integer >= -1 (0 or -1 = off), got -5\n"


@pytest.fixture
def compile_calls(monkeypatch):
    """compile_model replaced by a recorder of its keyword arguments (its model exports nothing)."""
    calls = []

    class FakeCompiled:
        def export(self, out):
            pass

    monkeypatch.setattr(lowering, "compile_model", lambda source, **kw: calls.append(kw) or FakeCompiled(),
                        raising=False)
    return calls


def test_kv_policy_flag_reaches_compile_model(compile_calls, tmp_path):
    from lowering import H2O, StreamingLLM

    calls = compile_calls
    out = str(tmp_path / "art")
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--quiet", "--kv-policy", "h2o:0.2"]) == 0
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--quiet", "--kv-policy", "streaming:4:256:original"]) == 0
    assert calls[0]["kv_policy"] == H2O(budget=0.2)
    assert calls[1]["kv_policy"] == StreamingLLM(sinks=4, window=256, positions="original")


def test_tp_flag_reaches_compile_model(compile_calls, tmp_path, capsys):
    calls = compile_calls
    out = str(tmp_path / "art")
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--quiet", "--tp", "2"]) == 0
    assert cli.main(["compile", "smollm2-135m", "-o", out, "--quiet"]) == 0
    assert calls[0]["tensor_parallel"] == 2 and calls[1]["tensor_parallel"] == 1
    assert cli.main(["serve", "--router", str(tmp_path / "r.json"), "--tp", "2"]) == 2
    assert "--tp applies to one model" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["compile", "x", "-o", "y", "--kv-policy", "lru:3"], "bad KV setting"),
    (["eval", "x", "--long", "--settings", "full,lru:3"], "bad KV setting"),
    (["eval", "x", "--long", "--needle-depths", "0.5,2"], "needle-depths"),
    (["eval", "x", "--long", "--long-window", "8"], "--long-window"),
])
def test_bad_kv_settings_fail_before_compiling(capsys, argv, message):
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
