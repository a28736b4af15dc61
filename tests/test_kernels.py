"""The segmented multi-adapter kernel against its PyTorch reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

from nora import kernels
from nora.kernels import segmented_delta, segmented_delta_reference, stack_adapters

needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")


def make(n_adapters=3, ranks=(4, 16, 9), k=40, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ads = [
        (torch.randn(r, k, generator=g), torch.randn(d, r, generator=g), 0.5 + i)
        for i, r in zip(range(n_adapters), ranks, strict=True)
    ]
    return ads, stack_adapters(ads)


def test_reference_equals_each_adapter_alone():
    ads, (A, B) = make()
    x = torch.randn(10, 40)
    idx = torch.tensor([0, 2, -1, 1, 0, 2, 2, -1, 1, 0])
    y = segmented_delta_reference(x, torch.zeros(10, 24), idx, A, B, "silu")
    for t in range(10):
        a = int(idx[t])
        if a < 0:
            assert torch.all(y[t] == 0)
        else:
            Aa, Ba, s = ads[a]
            expect = s * (torch.nn.functional.silu(Aa @ x[t]) @ Ba.T)  # scale outside the act
            torch.testing.assert_close(y[t], expect, rtol=1e-4, atol=1e-4)


@needs_triton
@pytest.mark.parametrize("activation", sorted(kernels.ACTIVATIONS))
def test_kernel_matches_reference(activation):
    ads, (A, B) = make()
    g = torch.Generator().manual_seed(1)
    T = 37  # several tiles per adapter, ragged ends, base-only tokens, one unused adapter
    x = torch.randn(T, 40, generator=g)
    idx = torch.randint(-1, 2, (T,), generator=g)  # adapter 2 gets no tokens
    base = torch.randn(T, 24, generator=g)
    ref = segmented_delta_reference(x, base.clone(), idx, A, B, activation)
    got = segmented_delta(x, base.clone(), idx, A, B, activation)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@needs_triton
def test_kernel_with_no_adapter_tokens_leaves_output():
    _, (A, B) = make()
    y = torch.randn(5, 24)
    assert torch.equal(
        segmented_delta(torch.randn(5, 40), y.clone(), torch.full((5,), -1), A, B, "silu"), y
    )


def test_unknown_activation_is_refused():
    _, (A, B) = make()
    with pytest.raises((ValueError, RuntimeError)):
        segmented_delta(
            torch.randn(2, 40), torch.zeros(2, 24), torch.zeros(2, dtype=torch.long), A, B, "swish"
        )


@needs_triton
@pytest.mark.parametrize("precision", kernels.PRECISIONS)
def test_every_pinned_precision_compiles_and_matches(precision):
    # On CPU the interpreter computes in float32 whatever the precision: this checks that each
    # is accepted by tl.dot; benchmarks/kernel_gpu.py checks on a GPU that they differ.
    ads, (A, B) = make()
    g = torch.Generator().manual_seed(2)
    x, idx = torch.randn(9, 40, generator=g), torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, 0])
    ref = segmented_delta_reference(x, torch.zeros(9, 24), idx, A, B, "gelu")
    got = segmented_delta(x, torch.zeros(9, 24), idx, A, B, "gelu", precision=precision)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@needs_triton
def test_unknown_precision_is_refused():
    _, (A, B) = make()
    x, idx = torch.randn(2, 40), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="precision 'fp8'"):
        segmented_delta(x, torch.zeros(2, 24), idx, A, B, "silu", precision="fp8")
