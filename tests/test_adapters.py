"""Each method's math, init, parameter count and dropout placement, checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import BSpline
from torch import nn

import nora
from nora.adapters.aurora import bspline_basis, local_basis_polynomials, uniform_spline

METHODS = sorted(nora.METHODS)


class Toy(nn.Module):
    """One non-square Linear (k=12 -> d=7, with bias) to adapt."""

    def __init__(self, k: int = 12, d: int = 7):
        super().__init__()
        self.proj = nn.Linear(k, d)

    def forward(self, x):
        return self.proj(x)


def adapted(method: str, r: int = 4, seed: int = 0, k: int = 12, d: int = 7, **kw):
    torch.manual_seed(seed)
    m = Toy(k, d)
    nora.inject(m, nora.AdapterConfig(method=method, r=r, target_modules=["proj"], **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # random non-zero adapter weights
        for p in m.proj.adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval()


def by_hand(m: Toy, x: torch.Tensor) -> torch.Tensor:
    """The method's equation from METHODS.md, written out from the raw weights (float64)."""
    ad, base = m.proj.adapter, m.proj.base_layer
    x = x.double()
    W0, b = base.weight.double(), base.bias.double()
    A, B = ad.lora_A.weight.double(), ad.lora_B.weight.double()
    s = ad.scale
    z = x @ A.T
    name = ad.name
    if name == "lora":
        delta = s * z @ B.T
    elif name == "nora":
        delta = s * (z * torch.sigmoid(z)) @ B.T
    elif name == "nolora":
        v, beta = ad.lora_v.double(), ad.act.beta.double()
        delta = s * (v * z * torch.sigmoid(beta * z)) @ B.T
    elif name == "aurora":
        H = ad.self_proj.weight.double()
        c, w = ad.spline_weight.double(), ad.spline_scale.double()
        knots = ad.knots.double().numpy()
        spline = torch.zeros_like(z)
        for j in range(c.shape[1]):  # scipy's B-spline basis element j, 0 outside its support
            bj = BSpline.basis_element(knots[j : j + ad.order + 2], extrapolate=False)
            vals = torch.from_numpy(np.nan_to_num(bj(z.detach().numpy()), nan=0.0))
            spline += c[:, j] * vals
        delta = s * (torch.tanh(torch.tanh(z) @ H.T) + w * spline) @ B.T
    elif name == "loran":
        BA = B @ A
        delta = x @ (s * (BA + ad.a * BA * torch.sin(ad.omega * BA))).T
    else:
        raise AssertionError(name)
    return x @ W0.T + b + delta


@pytest.mark.parametrize("method", METHODS)
def test_forward_equals_equation(method):
    m = adapted(method, sinter_a=0.1, sinter_omega=3.0)  # Sinter visible at these weights
    x = torch.randn(3, 5, 12)
    torch.testing.assert_close(m(x).double(), by_hand(m, x), rtol=1e-5, atol=1e-5)


def test_every_method_is_covered_by_hand():
    assert set(METHODS) == {"lora", "nora", "nolora", "aurora", "loran"}


@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 40),
    d=st.integers(1, 40),
    r=st.integers(1, 8),
    method=st.sampled_from(["lora", "nora"]),
)
def test_equation_holds_for_any_shape(k, d, r, method):
    m = adapted(method, r=min(r, k, d), k=k, d=d)
    x = torch.randn(2, k)
    torch.testing.assert_close(m(x).double(), by_hand(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_parameter_count_formula(method):
    k, d, r = 12, 7, 4
    m = adapted(method, r=r)
    n = sum(p.numel() for p in m.proj.adapter.parameters())
    expected = {
        "lora": r * (d + k),
        "nora": r * (d + k),
        "loran": r * (d + k),
        "nolora": r * (d + k) + 2 * r,  # v and β
        "aurora": r * (d + k) + r * r + r * (5 + 3) + r,  # H, spline c (G+K=8), w_s
    }[method]
    assert n == expected
    assert nora.count_parameters(m).trainable == expected


def test_scales():
    cfg = nora.AdapterConfig
    assert cfg(method="lora", r=4).effective_scale == 8 / 4  # PEFT default alpha=8
    assert cfg(method="lora", r=16, alpha=32, rslora=True).effective_scale == 32 / 4
    assert cfg(method="lora", r=16, scale=0.5).effective_scale == 0.5
    assert cfg(method="nora", r=64).effective_scale == 1.0  # paper code: s = 1, no α/r
    assert cfg(method="nora", r=64, alpha=128).effective_scale == 2.0
    assert cfg(method="loran", r=64).effective_scale == 16 / 64
    assert cfg(method="aurora", r=2).effective_scale == 4 / 2
    assert cfg(method="nolora", r=8).effective_scale == 16 / 8


def test_method_defaults_match_docs():
    c = nora.AdapterConfig(method="nora")
    assert (c.dropout, c.activation, c.target_modules) == (0.1, "silu", ["q_proj", "v_proj"])
    assert nora.AdapterConfig(method="lora").dropout == 0.0
    assert nora.AdapterConfig(method="aurora").dropout == 0.05
    c = nora.AdapterConfig(method="loran")
    assert (c.dropout, c.sinter_a, c.sinter_omega) == (0.2, 5e-4, 1e3)


@pytest.mark.parametrize("method", METHODS)
def test_B_starts_at_zero(method):
    torch.manual_seed(0)
    m = Toy()
    nora.inject(m, nora.AdapterConfig(method=method, r=4, target_modules=["proj"]))
    assert torch.count_nonzero(m.proj.adapter.lora_B.weight) == 0
    assert torch.count_nonzero(m.proj.adapter.lora_A.weight) > 0


def test_nora_A_is_kaiming_normal_relu():
    torch.manual_seed(0)
    m = Toy(k=512, d=64)
    nora.inject(m, nora.AdapterConfig(method="nora", r=64, target_modules=["proj"]))
    A = m.proj.adapter.lora_A.weight
    assert abs(A.std().item() / math.sqrt(2 / 512) - 1) < 0.05  # N(0, 2/k)
    assert abs(A.mean().item()) < 0.01
    assert A.abs().max() > 3 * math.sqrt(1 / 512)  # Gaussian tails, not a uniform bound


def test_lora_A_is_kaiming_uniform_sqrt5():
    torch.manual_seed(0)
    m = Toy(k=512, d=64)
    nora.inject(m, nora.AdapterConfig(method="lora", r=64, target_modules=["proj"]))
    A = m.proj.adapter.lora_A.weight
    bound = 1 / math.sqrt(512)  # kaiming_uniform(a=√5) on fan_in k
    assert A.abs().max() <= bound and A.abs().max() > 0.98 * bound


def test_nolora_and_aurora_init():
    torch.manual_seed(0)
    m = Toy(k=64, d=16)
    nora.inject(m, nora.AdapterConfig(method="nolora", r=8, target_modules=["proj"]))
    assert torch.equal(m.proj.adapter.lora_v, torch.ones(8))
    assert torch.equal(m.proj.adapter.act.beta, torch.ones(8))  # f = SiLU at init
    m = Toy(k=64, d=32)
    nora.inject(m, nora.AdapterConfig(method="aurora", r=32, target_modules=["proj"]))
    ad = m.proj.adapter
    assert ad.spline_weight.shape == (32, 8) and ad.spline_weight.abs().max() <= 0.1
    assert abs(ad.self_proj.weight.std().item() / math.sqrt(2 / 64) - 1) < 0.1  # Xavier-normal


def test_bspline_basis_matches_scipy_and_sums_to_one():
    knots = -1 + 0.4 * torch.arange(-3, 9, dtype=torch.float64)  # G=5, K=3 on [-1, 1]
    z = torch.linspace(-0.999, 0.999, 101, dtype=torch.float64)
    basis = bspline_basis(z, knots, 3)
    assert basis.shape == (101, 8)
    torch.testing.assert_close(basis.sum(-1), torch.ones(101, dtype=torch.float64))
    ref = BSpline.design_matrix(z.numpy(), knots.numpy(), 3).toarray()
    torch.testing.assert_close(basis, torch.from_numpy(ref))
    assert torch.all(bspline_basis(torch.tensor([-5.0, 5.0]), knots.float(), 3) == 0)


@pytest.mark.parametrize(("order", "grid"), [(1, 3), (2, 4), (3, 5), (4, 7)])
def test_uniform_spline_equals_the_full_basis_expansion(order, grid):
    """AuroRA's fast spline (K+1 local polynomials) = Cox–de Boor over every basis function."""
    h = 2.0 / grid
    knots = -1 + h * torch.arange(-order, grid + order + 1, dtype=torch.float64)
    coef = torch.randn(6, grid + order, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(order)
    z = (torch.randn(64, 6, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    on_knots = knots[:, None].expand(-1, 6)  # both sides of each knot, and outside the range
    M = local_basis_polynomials(order)
    fast = uniform_spline(z, coef, float(knots[0]), h, M)
    ref = (bspline_basis(z, knots, order) * coef).sum(-1)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    grads_fast = torch.autograd.grad(fast, [z, coef], w)
    grads_ref = torch.autograd.grad(ref, [z, coef], w)
    for a, b in zip(grads_fast, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        uniform_spline(on_knots, coef, float(knots[0]), h, M),
        (bspline_basis(on_knots, knots, order) * coef).sum(-1),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("method", METHODS)
def test_dropout_only_in_training(method):
    m = adapted(method, dropout=0.5)
    x = torch.randn(4, 12)
    m.train()
    torch.manual_seed(0)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    assert not torch.allclose(a, b)  # dropout is active
    m.eval()
    torch.testing.assert_close(m(x).double(), by_hand(m, x), rtol=1e-5, atol=1e-5)


def test_nora_dropout_sits_on_the_latent_after_the_activation():
    m = adapted("nora", dropout=0.5)
    ad = m.proj.adapter
    x = torch.randn(4, 12)
    m.train()
    torch.manual_seed(3)
    got = ad(x)
    torch.manual_seed(3)  # same mask, drawn on the (4, r) latent
    h = F.dropout(F.silu(ad.lora_A(x)), 0.5, training=True)
    torch.testing.assert_close(got, ad.lora_B(h) * ad.scale)


def test_lora_dropout_sits_on_the_input():
    m = adapted("lora", dropout=0.5)
    ad = m.proj.adapter
    x = torch.randn(4, 12)
    m.train()
    torch.manual_seed(3)
    got = ad(x)
    torch.manual_seed(3)
    xd = F.dropout(x, 0.5, training=True)  # (4, k) mask: the input, as in PEFT
    torch.testing.assert_close(got, ad.scale * ad.lora_B(ad.lora_A(xd)))


@pytest.mark.parametrize("act", ["identity", "relu", "silu", "gelu", "tanh", "sinter", "learnable"])
def test_nora_activation_switch(act):
    m = adapted("nora", activation=act, sinter_a=0.1, sinter_omega=3.0)
    ad = m.proj.adapter
    x = torch.randn(3, 12)
    z = ad.lora_A(x)
    f = {
        "identity": lambda z: z,
        "relu": F.relu,
        "silu": F.silu,
        "gelu": F.gelu,
        "tanh": torch.tanh,
        "sinter": lambda z: z + 0.1 * z * torch.sin(3.0 * z),
        "learnable": lambda z: z * torch.sigmoid(ad.act.beta * z),
    }[act]
    torch.testing.assert_close(ad(x), ad.lora_B(f(z)) * ad.scale)


def test_loran_computes_sinter_in_float32():
    m = adapted("loran")
    m.to(torch.bfloat16)
    ad = m.proj.adapter
    dw = ad.delta_weight()
    assert dw.dtype == torch.float32
    BA = ad.lora_B.weight.float() @ ad.lora_A.weight.float()
    pert = dw - ad.scale * BA
    assert pert.abs().max() > 0  # a·z·sin(ωz) survives
    torch.testing.assert_close(pert, ad.scale * ad.a * BA * torch.sin(ad.omega * BA))
    # The same perturbation added in bf16 would mostly round away:
    lost = (BA.bfloat16() + (ad.a * BA * torch.sin(ad.omega * BA)).bfloat16()) - BA.bfloat16()
    assert (lost == 0).float().mean() > 0.5


@pytest.mark.parametrize("method", ["lora", "loran"])
def test_delta_weight_reproduces_the_forward(method):
    m = adapted(method)
    x = torch.randn(5, 12)
    ad = m.proj.adapter
    torch.testing.assert_close(ad(x), x @ ad.delta_weight().T, rtol=1e-5, atol=1e-6)


def test_loran_reuses_its_update_at_inference_until_weights_change():
    m = adapted("loran")
    ad = m.proj.adapter
    x = torch.randn(3, 12)
    with torch.no_grad():
        first = ad(x)
        assert ad._cache is not None
        cached = ad._cache[1]
        assert torch.equal(ad(x), first) and ad._cache[1] is cached  # reused
        ad.lora_B.weight.mul_(2.0)  # an in-place update (optimizer step, load) invalidates it
        torch.testing.assert_close(ad(x), x @ ad.delta_weight().T, rtol=1e-5, atol=1e-6)
        assert ad._cache[1] is not cached
    torch.testing.assert_close(ad(x), x @ ad.delta_weight().T, rtol=1e-5, atol=1e-6)  # grad path


@pytest.mark.parametrize("method", METHODS)
def test_an_adapter_built_on_a_device_keeps_every_tensor_there(method):
    # inject builds adapters on the base weight's device: a buffer left on the CPU breaks
    # every CUDA model (AuroRA's spline basis once did)
    cfg = nora.AdapterConfig(method=method, r=4)
    a = nora.METHODS[method](16, 8, cfg, device="meta")
    tensors = dict(a.named_parameters()) | dict(a.named_buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors.values()), {
        n: t.device for n, t in tensors.items()
    }


@pytest.mark.parametrize("method", METHODS)
def test_training_forward_and_backward_run_on_the_meta_device(method):
    # parameter budgets and dry runs of large models build them on meta: no data, shapes only
    a = nora.METHODS[method](16, 8, nora.AdapterConfig(method=method, r=4), device="meta")
    a.train()
    y = a(torch.empty(3, 16, device="meta"))
    y.sum().backward()
    assert y.shape == (3, 8) and a.lora_A.weight.grad.device.type == "meta"


def test_pack_keeps_sigma_tensors_on_the_adapters_device():
    # Sinter's a and ω are made on the CPU: stacked with CUDA latents they must be on the device
    cfg = nora.AdapterConfig(method="nora", r=4, activation="sinter")
    packed = nora.METHODS["nora"](16, 8, cfg, device="meta").pack()
    assert packed.p and all(t.device.type == "meta" for t in packed.p.values())
