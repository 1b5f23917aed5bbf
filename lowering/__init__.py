"""llmc compiler: tracing, graph IR, passes and backends. Public entry point: compile_model."""
from __future__ import annotations

import os

# JAX only traces and holds weights here; the GPU belongs to the CUDA backend's torch tensors, so JAX must
# not preallocate most of its memory (its default) when it sees a GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def compile_model(*args, **kwargs):
    """See lowering.compile.compile_model (imported lazily to keep `import lowering` cheap)."""
    from lowering.compile import compile_model as _compile_model

    return _compile_model(*args, **kwargs)


from lowering.kv_policy import H2O, StreamingLLM  # noqa: E402  (plain dataclasses, cheap)
from lowering.speculation import Speculative  # noqa: E402  (plain dataclass, cheap)

__all__ = ["compile_model", "Speculative", "H2O", "StreamingLLM"]
