"""Kernel test setup: Triton runs under its CPU interpreter when no GPU is present; tolerances by dtype/format."""
import importlib
import os

import pytest
import torch

# (q dtype, kv_format) -> (atol, rtol) of the kernel against its float64 reference. Quantized formats are
# compared with a reference that reads the same quantized cache, so only compute rounding counts.
TOLERANCES = {
    (torch.float32, "bf16"): (2e-4, 2e-4),
    (torch.float32, "fp8"): (2e-4, 2e-4),
    (torch.float32, "nvfp4"): (2e-4, 2e-4),
    (torch.bfloat16, "bf16"): (3e-2, 3e-2),
    (torch.bfloat16, "fp8"): (3e-2, 3e-2),
    (torch.bfloat16, "nvfp4"): (4e-2, 4e-2),
    (torch.float16, "bf16"): (5e-3, 5e-3),
    (torch.float16, "fp8"): (5e-3, 5e-3),
    (torch.float16, "nvfp4"): (8e-3, 8e-3),
}


def pytest_configure(config):
    # NOTE: triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before any
    # kernels_gpu kernel module is imported; kernel_module() below also repairs a module imported too early.
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session")
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def kernel_module():
    """kernel_module("paged_attention") -> the kernels_gpu module, jitted for the interpreter when on CPU."""

    def load(name):
        module = importlib.import_module(f"kernels_gpu.{name}")
        if not torch.cuda.is_available():
            from triton.runtime.interpreter import InterpretedFunction

            kernels = [v for k, v in vars(module).items() if k.endswith("_kernel")]
            if any(not isinstance(k, InterpretedFunction) for k in kernels):
                module = importlib.reload(module)  # imported before TRITON_INTERPRET was set
        return module

    return load


@pytest.fixture(scope="session")
def tolerances():
    return TOLERANCES
