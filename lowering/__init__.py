"""llmc compiler: tracing, graph IR, passes and backends. Public entry point: compile_model."""
from __future__ import annotations


def compile_model(*args, **kwargs):
    """See lowering.compile.compile_model (imported lazily to keep `import lowering` cheap)."""
    from lowering.compile import compile_model as _compile_model

    return _compile_model(*args, **kwargs)


__all__ = ["compile_model"]
