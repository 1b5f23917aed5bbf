"""Fixtures shared by every test folder: the real SmolLM2-135M GGUF, fetched into the llmc cache once."""
import os
from pathlib import Path

import pytest

JAX_CACHE_DIR = Path(__file__).resolve().parent.parent / ".jax_cache"  # git-ignored


def pytest_configure(config):
    # NOTE: Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
    # kernels_gpu: without a GPU, the kernel tests and the CUDA backend's tests run in Triton's interpreter.
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    # XLA compilations shared by every test process (both xdist workers) and kept between runs: many tests compile
    # the same step of the same model (another Program object, the same HLO), which costs seconds each time on the
    # CPU. LLMC_TEST_JAX_CACHE="" turns it off.
    cache = os.environ.get("LLMC_TEST_JAX_CACHE", str(JAX_CACHE_DIR))
    if cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (the registry fetches it on first use); skips when unobtainable."""
    from lowering.checkpoints import CheckpointError, resolve_model

    try:
        return resolve_model("smollm2-135m")
    except CheckpointError as e:
        pytest.skip(f"SmolLM2-135M GGUF unavailable (offline?): {e}")


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf_path):
    """The SmolLM2-135M Checkpoint (dequantized float32 HF-named weights), loaded once per session."""
    from lowering.checkpoints import load_gguf

    return load_gguf(smollm2_gguf_path, progress=False)


@pytest.fixture(scope="session")
def smollm2_compiled(smollm2_gguf_path):
    """SmolLM2-135M compiled for the CPU target (float32, block size 16), once per session."""
    from lowering import compile_model

    return compile_model(str(smollm2_gguf_path), target="cpu", progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """(model, tokenizer) from Hugging Face transformers' own GGUF loader, float32, eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = smollm2_gguf_path
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              torch_dtype=torch.float32).eval()
    return model, tok


# Session fixtures that are expensive to build (a compiled SmolLM2, HF's model): under pytest-xdist
# (`make test` runs `-n 2 --dist loadgroup`) every file that uses one goes to the same worker, so each is built once.
_SHARED_SESSION_FIXTURES = {"smollm2_compiled", "hf_smollm2", "smollm2_checkpoint"}


@pytest.hookimpl(tryfirst=True)  # NOTE: before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under --dist loadgroup, one work unit per test file (module-scoped fixtures stay shared, as with
    --dist loadfile), except that the files using a shared SmolLM2 session fixture form one unit together."""
    def shares(item):  # a file's own module-scoped fixture of the same name (test_smollm2_quant.py) is not shared
        defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
        return any(defs.get(name) and defs[name][-1].scope == "session" for name in _SHARED_SESSION_FIXTURES)

    shared_files = {item.nodeid.split("::")[0] for item in items if shares(item)}
    for item in items:
        if any(item.iter_markers("xdist_group")):
            continue
        path = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group("smollm2" if path in shared_files else path))
