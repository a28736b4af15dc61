"""torch.compile-friendliness: an adapted model traces with no graph breaks (dynamo.explain)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from conftest import tiny_llama

import nora


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("method", sorted(nora.METHODS))
def test_no_graph_breaks(method, grad):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4, init_weights=False))
    ids = torch.randint(0, 96, (2, 7))
    dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
