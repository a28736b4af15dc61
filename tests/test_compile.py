"""torch.compile-friendliness: an adapted model traces with no graph breaks (dynamo.explain),
and the compiled model computes what the eager one does, forward and backward."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from conftest import randomize, tiny_llama

import nora


@pytest.mark.parametrize("method", sorted(nora.METHODS))
def test_no_graph_breaks_at_inference(method):
    # (training: fullgraph=True below raises on any graph break)
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4, init_weights=False))
    ids = torch.randint(0, 96, (2, 7))
    dynamo.reset()
    with torch.no_grad():
        explanation = dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def loss_and_grads(model, ids, run=None):
    """Logits and adapter gradients of `run` (default: model itself), read off `model`."""
    model.zero_grad()
    out = (model if run is None else run)(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def compiled_equals_eager(method, backend):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4, dropout=0.0))
    randomize(model)  # B = 0 would hide a wrong adapter path
    model.train()
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    ref_logits, ref_grads = loss_and_grads(model, ids)
    dynamo.reset()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    logits, grads = loss_and_grads(model, ids, run=compiled)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(nora.METHODS))
def test_compiled_training_step_equals_eager(method):
    # aot_eager: dynamo's graph and AOTAutograd's traced backward, run without code generation
    # (inductor's C++ compile costs minutes on 2 cores; the slow test below runs it).
    compiled_equals_eager(method, "aot_eager")


@pytest.mark.slow
def test_inductor_equals_eager():
    compiled_equals_eager("nora", "inductor")
