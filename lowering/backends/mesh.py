"""Tensor parallelism on JAX: a sharded graph (shard_tensor_parallel) run over a device mesh with shard_map.

The graph is each rank's program. The mesh has one axis, "tp", of `tp` devices; every param is held as the stack
of the ranks' pieces, [tp, *piece], sharded along that leading axis (so a device holds only its own piece), and
so is every KV pool: [tp, N, block_size, Hkv / tp, Dh]. The step is `shard_map` of the graph's interpreter with the
backend's lowering table (CPU: XLA references; TPU: the Pallas kernels); step inputs are replicated, and the
collectives (all_reduce, all_gather, embed_shard's rank) are lax.psum / lax.all_gather / lax.axis_index over "tp",
which XLA lowers to the devices' collectives (ICI on a TPU slice). Logits come back replicated.

On a CPU, JAX shows several devices with XLA_FLAGS=--xla_force_host_platform_device_count=N (set before jax is
imported), which is how the tests run TP=2 and TP=4.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lowering.backends.cpu import CpuProgram
from lowering.backends.tpu import TpuProgram
from lowering.ir import Graph, IRError, interpret
from lowering.passes.shard_tensor_parallel import AXIS_NAME, RankParams, tp_plan


def mesh_devices(tp: int, devices=None) -> list:
    """The first `tp` devices of the default backend (or of `devices`), with a clear error when there are fewer."""
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < tp:
        platform = devices[0].platform if devices else "?"
        hint = (" (on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax is imported)"
                if platform == "cpu" else "")
        raise RuntimeError(f"the graph is sharded for tensor_parallel={tp} but JAX sees {len(devices)} {platform} "
                           f"device(s){hint}")
    return devices[:tp]


class _MeshMixin:
    """Overrides of CpuProgram's param, state and step construction for a sharded graph."""

    def _setup_mesh(self, graph: Graph, devices) -> None:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        plan = tp_plan(graph)
        if plan is None:
            raise IRError("a mesh program needs a graph sharded by shard_tensor_parallel (tensor_parallel=N)")
        self.tp, self._specs = plan
        self.axis_name = graph.meta["tensor_parallel"].get("axis_name", AXIS_NAME)
        self.mesh = Mesh(np.array(mesh_devices(self.tp, devices)), (self.axis_name,))
        self._sharded = NamedSharding(self.mesh, PartitionSpec(self.axis_name))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())

    def _load_params(self, params: Mapping[str, Any]) -> dict:
        ranks = [RankParams(self.graph, params, r, self.tp, self._specs) for r in range(self.tp)]
        out = {}
        for name in self.graph.params:
            # one piece per device (RankParams checks its shape), assembled into the global [tp, ...] array
            arrays = [jax.device_put(rank[name][None], d) for rank, d in zip(ranks, self.mesh.devices.flat)]
            out[name] = jax.make_array_from_single_device_arrays((self.tp, *self.graph.types[name].shape),
                                                                 self._sharded, arrays)
        return out

    def _new_state(self, shape: tuple[int, ...], dtype: str, fill: float):
        return jax.device_put(jnp.full((self.tp, *shape), fill, dtype=dtype), self._sharded)

    def _step_function(self):
        from jax.sharding import PartitionSpec as P

        graph, axis = self.graph, self.axis_name

        def local(params, state, inputs, max_q_len):
            params = {k: v[0] for k, v in params.items()}
            state = {k: v[0] for k, v in state.items()}
            outs, new_state = interpret(graph, inputs, params, state, impls=self._impls(params, max_q_len))
            return tuple(outs), {k: v[None] for k, v in new_state.items()}

        def run(params, state, inputs, max_q_len):
            fn = jax.shard_map(lambda p, s, i: local(p, s, i, max_q_len), mesh=self.mesh,
                               in_specs=(P(axis), P(axis), P()), out_specs=(P(), P(axis)), check_vma=False)
            return fn(params, state, inputs)

        return jax.jit(run, donate_argnums=(1,), static_argnums=(3,))

    def kv_cache_bytes(self) -> int:
        """KV pool bytes of one device (its share of every block's KV heads), as for the CUDA ranks."""
        return super().kv_cache_bytes() // self.tp


class MeshCpuProgram(_MeshMixin, CpuProgram):
    """target="cpu" for a tensor-parallel graph: XLA references under shard_map over `tp` CPU devices.

    num_blocks / kv_cache_bytes are per device, as on a GPU: a rank's block holds 1/tp of the KV heads, so the same
    budget holds tp times the blocks."""

    def __init__(self, graph: Graph, params: Mapping[str, Any], *, devices=None, **kwargs):
        self._setup_mesh(graph, devices)
        super().__init__(graph, params, **kwargs)


class MeshTpuProgram(_MeshMixin, TpuProgram):
    """target="tpu" for a tensor-parallel graph: the Pallas kernels under shard_map over `tp` TPU chips."""

    def __init__(self, graph: Graph, params: Mapping[str, Any], *, devices=None, **kwargs):
        self._setup_mesh(graph, devices)
        from lowering.backends.tpu import _free_hbm_bytes, on_tpu

        interpret = kwargs.get("interpret")
        on_chip = (not interpret) if interpret is not None else on_tpu()
        if on_chip and kwargs.get("kv_cache_bytes") is None and kwargs.get("num_blocks") is None:
            # the KV budget of one chip: its memory less its own weight pieces (rank 0's, the same size on all)
            kwargs["kv_cache_bytes"] = _free_hbm_bytes(RankParams(graph, params, 0, self.tp, self._specs))
        super().__init__(graph, params, **kwargs)
