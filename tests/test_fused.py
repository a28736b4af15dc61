"""The fast paths of nora.fused give the reference path's numbers, and keep less for backward."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn

import nora
from nora.fused import fused
from nora.inject import fuse_shared_inputs, unfuse_shared_inputs

LATENT = ["lora", "nora", "nolora", "aurora"]


def _layer(method: str, r: int = 8, k: int = 24, d: int = 20, seed: int = 0, **kw):
    torch.manual_seed(seed)
    holder = nn.Sequential(nn.Linear(k, d))
    nora.inject(holder, nora.AdapterConfig(method=method, r=r, target_modules=["0"], **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in holder[0].adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return holder.train()


def _run(holder, x, enabled: bool, seed: int = 7):
    """Output and every gradient (x's and each trainable parameter's) of one backward."""
    holder.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout draw for both paths
    with fused(enabled):
        out = holder(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in holder.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads, out.grad_fn


def _close(a: torch.Tensor, b: torch.Tensor, what: str = "", rel: float = 1e-6) -> None:
    """Equal up to float32 rounding at the tensor's own scale (the fused node applies the
    dropout factor and the scale on the small side of a matmul, so single elements may round
    differently)."""
    err = (a - b).abs().max().item()
    assert err <= rel * b.abs().max().item() + 1e-12, (what, err, b.abs().max().item())


CASES = [
    ("lora", {}),
    ("lora", {"dropout": 0.3}),
    ("nora", {}),
    ("nora", {"dropout": 0.3}),
    ("nora", {"dropout": 0.0}),
    *[("nora", {"activation": a}) for a in ("identity", "relu", "gelu", "tanh", "learnable")],
    ("nolora", {"dropout": 0.25}),
    ("aurora", {}),
    ("aurora", {"dropout": 0.0}),
]


@pytest.mark.parametrize(("method", "kw"), CASES)
def test_fused_node_matches_the_reference_path(method, kw):
    holder = _layer(method, **kw)
    x = torch.randn(3, 5, 24) * 2  # (batch, seq, k); spreads AuroRA's latents over its grid
    out_f, gx_f, g_f, fn = _run(holder, x, True)
    out_r, gx_r, g_r, _ = _run(holder, x, False)
    assert "_Expand" in fn.next_functions[1][0].name()  # the fused node was really used
    assert torch.equal(out_f, out_r)  # same ops in the same order, same dropout draw
    _close(gx_f, gx_r, "x")
    assert g_f.keys() == g_r.keys()
    for name in g_r:
        _close(g_f[name], g_r[name], name)


@pytest.mark.parametrize(("method", "kw"), [("loran", {}), ("loran", {"dropout": 0.0})])
def test_dropped_linear_matches_the_reference_path(method, kw):
    """LoRAN's ΔW·D(x) (and every input-dropout shrink) through the bool-mask node."""
    holder = _layer(method, **kw)
    x = torch.randn(3, 5, 24)
    out_f, gx_f, g_f, fn = _run(holder, x, True)
    out_r, gx_r, g_r, _ = _run(holder, x, False)
    used = "_DroppedLinear" in fn.next_functions[1][0].name()
    assert used == (holder[0].adapter.dropout.__class__ is nn.Dropout)
    assert torch.equal(out_f, out_r)
    _close(gx_f, gx_r, "x")
    for name in g_r:
        _close(g_f[name], g_r[name], name)


def _saved_bytes(holder, x) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = holder.adapter(x)
    out.sum().backward()
    params = {p.untyped_storage().data_ptr() for p in holder.parameters()}
    return sum(b for ptr, b in seen.items() if ptr not in params and ptr != x.data_ptr())


@pytest.mark.parametrize(
    ("method", "ratio"),
    [("nora", 0.5), ("nolora", 0.5), ("aurora", 0.3), ("lora", 0.4), ("loran", 0.5)],
)
def test_fused_node_saves_less_for_backward(method, ratio):
    """nora: z + a byte mask instead of z, the float mask and s·D(σ(z)); aurora: no spline
    tables; input dropout (lora, aurora, loran): a byte mask instead of D(x) and its mask."""
    holder = _layer(method, r=16, dropout=0.1)[0]
    x = torch.randn(256, 24, requires_grad=True)
    with fused(True):
        fast = _saved_bytes(holder, x)
    with fused(False):
        plain = _saved_bytes(holder, x)
    assert fast <= ratio * plain, (fast, plain)


def test_plain_path_where_fusing_would_get_in_the_way():
    holder = _layer("nora", dropout=0.0)
    x = torch.randn(4, 24, requires_grad=True)
    a = holder[0].adapter
    assert "_Expand" in a(x).grad_fn.name()
    a.eval()  # dropout off, still differentiable: the fused node is fine
    assert "_Expand" in a(x).grad_fn.name()
    with torch.no_grad():
        assert a(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_Expand" not in a(x).grad_fn.name()
    handle = a.lora_B.register_forward_pre_hook(lambda m, args: None)  # analysis relies on it
    assert "_Expand" not in a(x).grad_fn.name()
    handle.remove()
    with fused(False):
        assert "_Expand" not in a(x).grad_fn.name()
    assert "_Expand" in a(x).grad_fn.name()  # the switch is restored


def test_fused_training_step_equals_plain_on_a_model():
    """Whole model, gradient checkpointing on: the same loss and adapter gradients."""
    ids = torch.randint(0, 96, (2, 9))
    results = []
    for enabled in (True, False):
        model = tiny_llama()
        nora.inject(model, nora.AdapterConfig(method="nora", r=4, dropout=0.2, init_weights=False))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(3)
        with fused(enabled):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=1e-6)
    for n in g2:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6, msg=n)


# --- shared-input shrink ----------------------------------------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(method, **kw):
    model = tiny_llama(layers=2)
    cfg = nora.AdapterConfig(method=method, r=4, target_modules=TARGETS, init_weights=False, **kw)
    nora.inject(model, cfg)
    return model


def _model_pair(method, **kw):
    plain, grouped = _model(method, **kw), _model(method, **kw)
    grouped.load_state_dict(plain.state_dict())
    return plain, grouped


@pytest.mark.parametrize("method", LATENT)
def test_shared_shrink_matches_separate_shrinks(method):
    plain, grouped = _model_pair(method, dropout=0.0)
    assert fuse_shared_inputs(grouped) == 4  # (q,k,v) and (gate,up) in each of 2 layers
    attn = grouped.model.layers[0].self_attn
    group = attn.q_proj.adapter.shared
    assert group is attn.k_proj.adapter.shared is attn.v_proj.adapter.shared
    assert attn.o_proj.adapter.shared is None  # o_proj reads the attention output
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(grouped(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)
    for m in (plain, grouped):  # training: the gradients reach each A through the slices
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
    gp = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for n, p in grouped.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, gp[n], rtol=1e-5, atol=1e-6, msg=n)
    assert group._z is None  # all three members served: nothing held between calls


def test_shared_shrink_under_gradient_checkpointing():
    """Checkpointed layers recompute their forward in backward: the group must follow."""
    plain, grouped = _model_pair("nora", dropout=0.0)
    fuse_shared_inputs(grouped)
    ids = torch.randint(0, 96, (2, 7))
    grads = []
    for m in (plain, grouped):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.train()
        m(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_shared_shrink_is_always_the_members_own_input():
    """Members called with different tensors, twice, or out of order: each gets A·x."""
    model = _model("nora", dropout=0.0)
    fuse_shared_inputs(model)
    attn = model.model.layers[0].self_attn
    q, k, v = attn.q_proj.adapter, attn.k_proj.adapter, attn.v_proj.adapter
    x1, x2 = torch.randn(3, 32), torch.randn(3, 32)
    with torch.no_grad():
        for adapter, x in [(q, x1), (k, x2), (v, x1), (v, x1), (q, x2), (k, x2)]:
            torch.testing.assert_close(
                adapter.shared.shrink(adapter, x), F.linear(x, adapter.lora_A.weight)
            )
        x1.add_(1.0)  # changed in place since the group cached it
        torch.testing.assert_close(q.shared.shrink(q, x1), F.linear(x1, q.lora_A.weight))
        torch.testing.assert_close(k.shared.shrink(k, x1), F.linear(x1, k.lora_A.weight))


def test_shared_shrink_membership_and_unfuse():
    model = _model("loran")  # dense ΔW: no shrink to share
    assert fuse_shared_inputs(model) == 0
    model = _model("nora")
    assert fuse_shared_inputs(model, groups=[("q_proj", "v_proj")]) == 2
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.adapter.shared is None
    unfuse_shared_inputs(model)
    assert all(w.adapter.shared is None for w in nora.adapter_modules(model).values())


def test_input_dropout_keeps_its_own_shrink():
    """LoRA's dropout is on x: each layer's x differs in training, so no shared GEMM then."""
    plain, grouped = _model_pair("lora", dropout=0.3)
    fuse_shared_inputs(grouped)
    ids = torch.randint(0, 96, (2, 7))
    outs = []
    for m in (plain, grouped):
        m.train()
        torch.manual_seed(5)
        outs.append(m(ids).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad", [True, False])
def test_no_graph_breaks_with_fast_paths_on(grad):
    model = _model("nora", dropout=0.1)
    fuse_shared_inputs(model)
    model.train(grad)
    ids = torch.randint(0, 96, (2, 7))
    dynamo.reset()
    with torch.set_grad_enabled(grad):
        explanation = dynamo.explain(model)(ids)
    assert explanation.graph_break_count == 0, explanation.break_reasons
