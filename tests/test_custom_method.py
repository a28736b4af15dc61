"""A sixth method, defined here and nowhere under src/, gets every feature of nora for free.

    Δ(x) = s · B · D(tanh(A·x)),   A orthogonal rows at init, B zeros, s = α/r, α = 4

It is registered, then injected, trained, saved and loaded, analysed and served in a mixed
batch — with no line of nora that names it. The README's "Adding a method" is this file.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_llama
from safetensors.torch import load_file
from serving.common import check_rows, random_ids, save_random
from torch import nn

import nora
from nora.adapters import METHODS, Adapter, register
from nora.analysis import analyze, collect
from nora.serving import MultiAdapterModel


class TanhLoRA(Adapter):
    """Δ(x) = s·B·D(tanh(A·x)): σ = tanh, dropout on the latent, orthogonal A."""

    name = "tanhlora"
    default_alpha = 4.0
    default_dropout = 0.1
    latent_dropout = True

    def reset_parameters(self, init_weights: bool = True) -> None:
        nn.init.orthogonal_(self.lora_A.weight)
        self._init_B(init_weights)  # zeros: the adapted model starts equal to the base

    @classmethod
    def sigma(cls, kind, z, p):  # (..., r) -> (..., r)
        return torch.tanh(z)


@pytest.fixture(autouse=True, scope="module")
def registered():
    register(TanhLoRA)
    yield
    METHODS.pop(TanhLoRA.name)


CFG = dict(method="tanhlora", r=4, target_modules=["q_proj", "v_proj"])


def delta_by_hand(wrapper, x):  # s·B·tanh(A·x), eval mode
    a = wrapper.adapter
    return a.scale * torch.tanh(x @ a.lora_A.weight.T) @ a.lora_B.weight.T


def test_inject_uses_its_own_init_and_math(ids):
    model = nora.inject(tiny_llama(), nora.AdapterConfig(**CFG))
    q = model.model.layers[0].self_attn.q_proj
    A = q.adapter.lora_A.weight
    assert torch.allclose(A @ A.T, torch.eye(4), atol=1e-5)  # orthogonal rows, not Kaiming
    assert q.adapter.scale == 1.0 and torch.all(q.adapter.lora_B.weight == 0)
    randomize(model, 1)
    model.eval()
    x = torch.randn(3, q.in_features)
    assert torch.allclose(q(x), q.base_layer(x) + delta_by_hand(q, x), atol=1e-6)


def test_trains_a_step_and_fused_equals_plain(ids):
    grads = []
    for fused in (True, False):
        model = nora.inject(tiny_llama(), nora.AdapterConfig(**CFG, init_weights=False))
        model.train()
        torch.manual_seed(0)
        with nora.fused.fused(fused):
            model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 2
    for n, g in grads[0].items():
        assert g.abs().sum() > 0, n
        assert torch.allclose(g, grads[1][n], atol=1e-6, rtol=1e-5), n
    # and an optimizer step changes the adapter
    model = nora.inject(tiny_llama(), nora.AdapterConfig(**CFG))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    assert model.model.layers[0].self_attn.q_proj.adapter.lora_B.weight.abs().sum() > 0


def test_save_and_load_in_peft_layout(tmp_path, ids):
    save_random(tmp_path / "a", seed=3, **CFG)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TANHLORA" and config["method"] == "tanhlora"
    assert "nora_format_version" in config
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    model = nora.load_adapter(tiny_llama(), tmp_path / "a").eval()
    again = nora.load_adapter(tiny_llama(), tmp_path / "a").eval()
    with torch.no_grad():
        out = model(ids).logits
        assert torch.equal(out, again(ids).logits)
        assert not torch.allclose(out, tiny_llama()(ids).logits, atol=1e-3)
    with pytest.raises(nora.NotMergeableError, match="non-linear"):
        nora.merge(model)


def test_analysis_measures_its_latent(tmp_path, ids):
    save_random(tmp_path / "a", seed=4, **CFG)
    model = nora.load_adapter(tiny_llama(), tmp_path / "a")
    c = collect(model, [ids], max_tokens=1000)["model.layers.1.self_attn.v_proj"]
    x = model.model.layers[1].self_attn.v_proj
    h_in = {}
    handle = x.register_forward_hook(lambda m, args, out: h_in.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    flat = h_in["x"].reshape(-1, x.in_features)[c.index]
    assert torch.allclose(c.latent, torch.tanh(flat @ x.adapter.lora_A.weight.T), atol=1e-6)
    summary = analyze(model, [ids])
    er = summary["layers"]["model.layers.1.self_attn.v_proj"]["latent"]["effective_rank"]
    assert 1.0 < er <= 4.0


def test_served_in_a_mixed_batch_equals_each_alone(tmp_path):
    specs = {
        "tanh": CFG,
        "tanh-r6": dict(CFG, r=6, alpha=9.0),  # stacks with "tanh": ranks zero-padded
        "lora": dict(method="lora", r=2),
        "nora": dict(method="nora", r=4, scale=2.5),
    }
    for i, (name, cfg) in enumerate(specs.items()):
        save_random(tmp_path / name, seed=10 + i, **cfg)
    multi = MultiAdapterModel(tiny_llama())
    for name in specs:
        multi.add(name, tmp_path / name)
    assert multi.adapters["tanh"].kind == ("tanhlora",)
    names = ["tanh", "lora", "tanh-r6", None, "nora", "tanh", "tanh-r6"]
    check_rows(multi, tmp_path, names, random_ids(len(names), 6, seed=5))
