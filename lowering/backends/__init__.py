"""Backends: Graph -> Program (a step function over a KV pool) for each target."""
from __future__ import annotations

import importlib

# (target, tensor-parallel graph?) -> (module, Program class); modules are imported lazily: each pulls in its runtime
_PROGRAMS = {
    ("cpu", False): ("lowering.backends.cpu", "CpuProgram"),
    ("cuda", False): ("lowering.backends.cuda", "CudaProgram"),
    ("tpu", False): ("lowering.backends.tpu", "TpuProgram"),
    ("cpu", True): ("lowering.backends.mesh", "MeshCpuProgram"),  # a JAX device mesh, shard_map
    ("tpu", True): ("lowering.backends.mesh", "MeshTpuProgram"),
    ("cuda", True): ("lowering.backends.cuda_tp", "TensorParallelCudaProgram"),  # one process per GPU, NCCL
}


def build_program(target: str, graph, params, **kwargs):
    """The Program for `target`; a graph sharded by shard_tensor_parallel runs over its `tp` devices."""
    key = (target, bool(graph.meta.get("tensor_parallel")))
    if key not in _PROGRAMS:
        raise ValueError(f"no backend for target {target!r} in this build (available: cpu, cuda, tpu)")
    module, name = _PROGRAMS[key]
    return getattr(importlib.import_module(module), name)(graph, params, **kwargs)
