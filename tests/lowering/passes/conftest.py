"""Fixtures for pass tests: a traced tiny Llama graph and its params."""
import pytest

from lowering import frontend
from lowering.models import llama, nnx_params
from tests.lowering.helpers import tiny_config


@pytest.fixture(scope="module")
def traced_tiny():
    model = llama.build_model(tiny_config(attention_bias=True), seed=1)
    fn, params = nnx_params.forward_fn(model)
    graph, values = frontend.trace(fn, params)
    return graph, {k: v for k, v in values.items()}
