"""Flax NNX helpers shared by every model: params keyed by dotted path, and a traceable forward."""
from __future__ import annotations

from typing import Mapping

import jax
from flax import nnx


def dotted(path) -> str:
    """("model", "layers", 0, "mlp") -> "model.layers.0.mlp"."""
    return ".".join(str(k) for k in path)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """Params keyed by dotted path (for the Llama module tree: exactly the Hugging Face names); the
    jax.ShapeDtypeStructs of a model made under nnx.eval_shape (tracing needs no weights)."""
    return {dotted(path): var.get_value() if hasattr(var, "get_value") else var.value
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def with_params(model: nnx.Module, values: Mapping[str, jax.Array]):
    """(graphdef, params state, other state) of `model` with its params replaced by `values`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    flat = [(path, var.replace(values[dotted(path)])) for path, var in nnx.to_flat_state(params)]
    return graphdef, nnx.from_flat_state(flat), rest


def forward_fn(model: nnx.Module):
    """(fn, params): fn(params_by_name, token_ids, positions, query_start, logit_rows) -> f32[L, V]."""

    def fn(by_name, token_ids, positions, query_start, logit_rows):
        m = nnx.merge(*with_params(model, by_name))
        return m(token_ids, positions, query_start, logit_rows)

    return fn, flat_params(model)
