"""Backends: Graph -> Program (a step function over a KV pool) for each target."""
from __future__ import annotations


def build_program(target: str, graph, params, **kwargs):
    """The Program for `target` (backends are imported lazily: each pulls in its own runtime)."""
    if target == "cpu":
        from lowering.backends.cpu import CpuProgram

        return CpuProgram(graph, params, **kwargs)
    if target == "cuda":
        from lowering.backends.cuda import CudaProgram

        return CudaProgram(graph, params, **kwargs)
    if target == "tpu":
        from lowering.backends.tpu import TpuProgram

        return TpuProgram(graph, params, **kwargs)
    raise ValueError(f"no backend for target {target!r} in this build (available: cpu, cuda, tpu)")
