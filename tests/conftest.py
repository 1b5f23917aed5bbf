"""Fixtures shared by every test folder: the real SmolLM2-135M GGUF, fetched into the llmc cache once."""
import os

import pytest


def pytest_configure(config):
    # NOTE: Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before anything imports
    # kernels_gpu: without a GPU, the kernel tests and the CUDA backend's tests run in Triton's interpreter.
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


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
