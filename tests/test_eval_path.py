"""The eval-mode adapter forward without grad (issue 23 item 5: `generate()` at batch 1):
shrink, σ, expand and nothing else — no dropout call, no fused node — equal to the module path
it replaces, hooks still honoured."""

from __future__ import annotations

import pytest
import torch

import nora
from nora.adapters import METHODS
from nora.adapters import base as adapters_base

LATENT = sorted(m for m, c in METHODS.items() if c.shrinks)  # every method with a shrink
CASES = [(m, None) for m in LATENT] + [("nora", a) for a in ("identity", "learnable", "gelu")]


def adapter(method: str, activation: str | None, seed: int = 0):
    """A random adapter (B ≠ 0, σ's tensors random) with dropout configured: eval ignores it."""
    g = torch.Generator().manual_seed(seed)
    kw = {} if activation is None else {"activation": activation}
    cfg = nora.AdapterConfig(method=method, r=4, init_weights=False, dropout=0.3, **kw)
    a = METHODS[method](12, 10, cfg)
    with torch.no_grad():
        for p in a.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return a.eval()


def module_path(a, x):
    """The path eval took before: forced by a hook on lora_B (as analysis registers one)."""
    h = a.lora_B.register_forward_hook(lambda *_: None)
    try:
        return a(x)
    finally:
        h.remove()


@pytest.mark.parametrize("method, activation", CASES)
def test_eval_forward_equals_the_module_path(method, activation):
    a = adapter(method, activation)
    x = torch.randn(3, 5, 12)
    with torch.no_grad():
        assert torch.equal(a(x), module_path(a, x))


@pytest.mark.parametrize("method, activation", CASES)
def test_eval_runs_no_dropout_and_no_fused_node(method, activation, monkeypatch):
    a = adapter(method, activation)

    def fail(*_, **__):
        pytest.fail("the eval path called the training machinery")

    monkeypatch.setattr(adapters_base, "expand", fail)
    monkeypatch.setattr(adapters_base, "dropped_linear", fail)
    a.dropout.register_forward_pre_hook(fail)
    with torch.inference_mode():
        assert a(torch.randn(2, 12)).shape == (2, 10)


def test_hooks_grad_and_training_take_the_module_path():
    a = adapter("nora", None)
    seen = []
    a.lora_B.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        a(torch.randn(2, 12))
    assert seen == [torch.Size([2, 10])]  # analysis' hook on lora_B still fires in eval
    b = adapter("nora", None)
    with torch.no_grad():
        assert b.plain_eval() and not b.train().plain_eval()
    assert not b.eval().plain_eval()  # grad on: the fused node (tests/test_fused.py)
