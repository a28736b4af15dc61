"""Injection into Hugging Face models: freezing, unload, merge, disable, placement, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, randomize, tiny_gpt2, tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import nora
from nora.adapters import AdapterLinear, ParallelAdapter

METHODS = sorted(nora.METHODS)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m)) for n, m in model.named_modules()],
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def assert_unchanged(model, snap):
    sd, mods, rg = snap
    now = snapshot(model)
    assert now[1] == mods and now[2] == rg
    assert sd.keys() == now[0].keys() and all(torch.equal(sd[k], now[0][k]) for k in sd)
    assert getattr(model, "_nora_state", None) is None


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("placement", ["weight", "module"])
@pytest.mark.parametrize("method", METHODS)
def test_zero_init_leaves_logits_identical(family, placement, method, ids):
    model = FAMILIES[family]()
    ref = logits(model, ids)
    nora.inject(model, nora.AdapterConfig(method=method, r=4, placement=placement))
    assert torch.equal(logits(model, ids), ref)
    wrapper = AdapterLinear if placement == "weight" else ParallelAdapter
    assert len(nora.adapter_modules(model)) == 4  # 2 layers x (q,v) or (attn, mlp)
    assert all(isinstance(w, wrapper) for w in nora.adapter_modules(model).values())


@pytest.mark.parametrize("placement", ["weight", "module"])
@pytest.mark.parametrize("method", METHODS)
def test_one_step_changes_only_adapter_parameters(method, placement, ids):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4, placement=placement))
    before = {n: p.clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)  # B leaves zero after one step


@pytest.mark.parametrize("placement", ["weight", "module"])
@pytest.mark.parametrize("method", METHODS)
def test_unload_restores_the_original_model_exactly(method, placement, ids):
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)  # a user's own freezing survives the round trip
    q0 = model.model.layers[0].self_attn.q_proj
    snap = snapshot(model)
    ref = logits(model, ids)
    assert not nora.has_adapters(model)
    nora.inject(model, nora.AdapterConfig(method=method, r=4, placement=placement))
    assert nora.has_adapters(model)
    assert all(
        isinstance(w, nora.adapters.AdapterWrapper) for w in nora.adapter_modules(model).values()
    )
    randomize(model)
    assert not torch.equal(logits(model, ids), ref)
    nora.unload(model)
    assert not nora.has_adapters(model)
    assert_unchanged(model, snap)
    assert model.model.layers[0].self_attn.q_proj is q0  # the very same module object
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("method", ["lora", "loran"])
def test_merge_equals_unmerged(method, ids):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4, sinter_a=0.05, sinter_omega=5.0))
    randomize(model)
    unmerged = logits(model, ids)
    nora.merge(model)
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-4, atol=1e-5)
    nora.unload(model)  # merge + unload: a plain model carrying the update
    assert not nora.adapter_modules(model)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(model, ids), unmerged, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["nora", "nolora", "aurora"])
def test_merging_a_nonlinear_method_is_refused_and_changes_nothing(method, ids):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4))
    randomize(model)
    ref = logits(model, ids)
    with pytest.raises(nora.NotMergeableError, match="non-linear"):
        nora.merge(model)
    assert not any(w.merged for w in nora.adapter_modules(model).values())
    assert torch.equal(logits(model, ids), ref)


def test_module_level_adapters_cannot_be_merged():
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="lora", r=4, placement="module"))
    with pytest.raises(nora.NotMergeableError, match="module-level"):
        nora.merge(model)


def test_aurora_approximate_merge_only_when_asked(ids):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="aurora", r=2))
    randomize(model)
    unmerged = logits(model, ids)
    with pytest.raises(nora.NotMergeableError, match="approximate_merge=True"):
        nora.merge(model)
    q = model.model.layers[0].self_attn.q_proj
    W0 = q.base_layer.weight.clone()
    ad = q.adapter
    expected = W0 + ad.scale * ad.lora_B.weight @ ad.phi(ad.lora_A.weight.t()).t()
    nora.merge(model, approximate_merge=True)
    torch.testing.assert_close(q.base_layer.weight, expected.detach())
    assert not torch.allclose(logits(model, ids), unmerged)  # not the trained function


@pytest.mark.parametrize("placement", ["weight", "module"])
def test_disable_adapters_context(placement, ids):
    model = tiny_llama()
    ref = logits(model, ids)
    nora.inject(model, nora.AdapterConfig(method="nora", r=4, placement=placement))
    randomize(model)
    adapted = logits(model, ids)
    with nora.disable_adapters(model):
        assert torch.equal(logits(model, ids), ref)
    assert torch.equal(logits(model, ids), adapted)


def test_module_placement_adds_delta_to_block_output():
    model = tiny_llama()
    mlp = model.model.layers[1].mlp
    nora.inject(
        model, nora.AdapterConfig(method="nora", r=4, placement="module", target_modules=["mlp"])
    )
    randomize(model)
    wrapped = model.model.layers[1].mlp
    assert wrapped.base_layer is mlp
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(wrapped(x), mlp(x) + wrapped.adapter(x))
    assert wrapped.gate_proj is mlp.gate_proj  # attributes still reachable


def test_layers_to_transform_and_exclude():
    model = tiny_llama(layers=4)
    cfg = nora.AdapterConfig(
        method="nora",
        r=4,
        target_modules=["q_proj", "v_proj", "o_proj"],
        exclude_modules=["o_proj"],
        layers_to_transform=[2, 3],
    )
    nora.inject(model, cfg)
    assert sorted(nora.adapter_modules(model)) == [
        f"model.layers.{i}.self_attn.{p}" for i in (2, 3) for p in ("q_proj", "v_proj")
    ]


def test_regex_targets():
    model = tiny_llama()
    nora.inject(
        model, nora.AdapterConfig(method="lora", r=4, target_modules=r".*\.1\.mlp\.(up|down)_proj")
    )
    assert sorted(nora.adapter_modules(model)) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
    ]


def test_parameter_report():
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="nora", r=4))
    n = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # q: 32->32, v: 32->16 (grouped-query), 2 layers
    count = nora.count_parameters(model)
    assert count.trainable == n
    assert count.total == sum(p.numel() for p in model.parameters())
    assert f"{count.percent:.4f}" in str(count)
    table = nora.parameter_table(model)
    assert "q_proj" in table and "v_proj" in table and f"{n:,}" in table


# --- bad input: a clear error, and the model exactly as it was --------------------------

BAD = [
    (dict(r=0), nora.ConfigError, "positive int"),
    (dict(r=2.5), nora.ConfigError, "positive int"),
    (dict(r=True), nora.ConfigError, "positive int"),
    (dict(method="dora"), nora.ConfigError, "unknown method 'dora'"),
    (dict(method="nora", activation="swish"), nora.ConfigError, "activation 'swish'"),
    (dict(method="lora", activation="silu"), nora.ConfigError, "method='nora'"),
    (dict(dropout=1.0), nora.ConfigError, "dropout"),
    (dict(alpha=-1.0), nora.ConfigError, "alpha"),
    (dict(placement="block"), nora.ConfigError, "placement"),
    (dict(target_modules=[]), nora.ConfigError, "target_modules"),
    (dict(target_modules="(unclosed"), nora.ConfigError, "does not compile"),
    (dict(layers_to_transform=[-1]), nora.ConfigError, "layers_to_transform"),
]


@pytest.mark.parametrize("kwargs,err,msg", BAD)
def test_bad_config_values(kwargs, err, msg):
    with pytest.raises(err, match=msg):
        nora.AdapterConfig(**kwargs)


INJECT_BAD = [
    (dict(target_modules=["query"]), "matched no module.*q_proj, up_proj, v_proj"),
    (dict(target_modules=["mlp"]), "not an nn.Linear.*placement='module'"),
    (dict(target_modules=["q_proj"], placement="module"), "single Linear"),
    (dict(target_modules=["self_attn", "q_proj"], placement="module"), "single Linear"),
    (dict(layers_to_transform=[7]), r"layers \[7\].*0\.\.1"),
    (dict(method="lora", r=20), "r=20 exceeds min"),
]


@pytest.mark.parametrize("kwargs,msg", INJECT_BAD)
def test_failed_injection_leaves_model_unchanged(kwargs, msg):
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(nora.InjectionError, match=msg):
        nora.inject(model, nora.AdapterConfig(**{"method": "nora", "r": 4, **kwargs}))
    assert_unchanged(model, snap)


def test_injecting_twice_is_refused():
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="nora", r=4))
    snap = snapshot(model)
    with pytest.raises(nora.InjectionError, match="already has nora adapters"):
        nora.inject(model, nora.AdapterConfig(method="lora", r=4))
    assert snapshot(model)[1] == snap[1]


def test_nonlinear_rank_above_layer_width_warns():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="r=20 exceeds min"):
        nora.inject(model, nora.AdapterConfig(method="nora", r=20))


def test_gpt2_conv1d_is_refused_clearly_but_module_level_works(ids):
    model = tiny_gpt2()
    snap = snapshot(model)
    with pytest.raises(nora.InjectionError, match="Conv1D"):
        nora.inject(model, nora.AdapterConfig(method="nora", r=4, target_modules=["c_attn"]))
    assert_unchanged(model, snap)
    ref = logits(model, ids)
    nora.inject(
        model,
        nora.AdapterConfig(method="nora", r=4, placement="module", target_modules=["attn", "mlp"]),
    )
    assert torch.equal(logits(model, ids), ref)
    randomize(model)
    assert not torch.equal(logits(model, ids), ref)


def test_unload_or_merge_without_adapter():
    for fn in (nora.unload, nora.merge):
        model = tiny_llama()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(nora.InjectionError, match="no nora adapter"):
            fn(model)
        after = model.state_dict()
        assert after.keys() == before.keys()
        assert all(torch.equal(after[k], before[k]) for k in before)  # nothing changed


def test_config_must_be_an_adapter_config():
    with pytest.raises(TypeError, match="AdapterConfig"):
        nora.inject(tiny_llama(), {"method": "nora"})


# --- the meta device: parameter budgets of big models without their weights -------------


def llama3_8b_on_meta():
    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize(
    "method,r,targets,expected_m",
    [
        ("nora", 64, ["q_proj", "v_proj"], 27.3),  # paper Table 3
        ("nora", 128, ["q_proj", "v_proj"], 54.5),
        ("lora", 512, ["q_proj", "v_proj"], 218.1),
        ("aurora", 2, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], 3.5),  # AuroRA paper
        ("lora", 32, ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"], 56.6),
    ],
)
def test_paper_parameter_budgets_on_meta_device(method, r, targets, expected_m):
    model = llama3_8b_on_meta()
    nora.inject(model, nora.AdapterConfig(method=method, r=r, target_modules=targets))
    assert model.model.layers[0].self_attn.q_proj.adapter.lora_A.weight.is_meta
    assert round(nora.count_parameters(model).trainable / 1e6, 1) == expected_m
    with pytest.raises(nora.CheckpointError, match="meta device"):
        nora.save_adapter(model, "/nonexistent/never-written")


def test_deepcopy_and_state_dict_of_injected_model(ids):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method="nolora", r=4))
    randomize(model)
    clone = copy.deepcopy(model)
    assert torch.equal(logits(clone, ids), logits(model, ids))
    sd, sd_clone = model.state_dict(), clone.state_dict()
    assert sd.keys() == sd_clone.keys()
    n_base, n_adapter = len(tiny_llama().state_dict()), len(nora.adapter_state_dict(model))
    assert len(sd) == n_base + n_adapter  # the adapters' tensors are in state_dict
    assert all(torch.equal(sd[k], sd_clone[k]) for k in sd)
    ptrs = {t.data_ptr() for t in sd.values()}
    assert not ptrs & {t.data_ptr() for t in sd_clone.values()}  # nothing shared
    # the copy is independent: changing its adapters leaves the original's output alone
    before = logits(model, ids)
    randomize(clone, seed=1)
    assert torch.equal(logits(model, ids), before)
    assert not torch.allclose(logits(clone, ids), before)
    # and its state_dict restores the original into a fresh injected model
    fresh = tiny_llama(seed=5)
    nora.inject(fresh, nora.AdapterConfig(method="nolora", r=4))
    fresh.load_state_dict(sd)
    assert torch.equal(logits(fresh, ids), before)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_adapters_follow_the_models_mode(mode):
    model = tiny_llama()
    getattr(model, mode)()
    nora.inject(model, nora.AdapterConfig(method="nora", r=4))
    assert all(m.training == (mode == "train") for m in model.modules())
