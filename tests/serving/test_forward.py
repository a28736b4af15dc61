"""The batched heterogeneous forward: a mixed batch equals each request run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from torch import nn

import nora
from nora.serving import BatchPlan, MultiAdapterLinear, MultiAdapterModel
from serving.common import ALL_SPECS as SPECS
from serving.common import check_rows, make_dir, random_ids, solo


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_dir(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def multi(adapters):
    mm = MultiAdapterModel(tiny_llama())
    for name in SPECS:
        mm.add(name, adapters / name)
    return mm


def test_mixed_batch_of_every_method_and_rank_equals_each_alone(multi, adapters):
    names = [*SPECS, None]  # one row per adapter, plus a base row
    check_rows(multi, adapters, names, random_ids(len(names), 7))


def test_shared_adapters_with_uneven_segments_pad_correctly(multi, adapters):
    # 3 rows on one adapter, 1 on another, per kind: segments of 3T and T tokens are padded
    names = ["nora-silu", "lora-r2", "nora-silu", None, "nora-relu", "nora-silu", "lora-r8"]
    names += ["aurora", "aurora-r6", "aurora", "aurora-r5", "loran", "loran", "loran-r2"]
    names += ["nora-relu"]
    plan = multi.plan([multi.uid(n) for n in names], 5)
    assert any(s.valid is not None for s in plan.groups.values())  # padding path exercised
    check_rows(multi, adapters, names, random_ids(len(names), 5, seed=1))


def test_badly_skewed_segments_run_segment_by_segment(multi, adapters):
    # one kind (NoRA-SiLU): 12 rows on one adapter, 1 row on two others: padding would waste 60%
    names = ["nora-silu"] * 12 + ["nora-silu-r3", "nora-silu-r8", None, "lora-r2", "nolora-silu"]
    plan = multi.plan([multi.uid(n) for n in names], 9)
    assert plan.groups[("nora", "silu")].loop
    check_rows(multi, adapters, names, random_ids(len(names), 9, seed=2))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_adapter_for_the_whole_batch(multi, adapters, name):
    ids = random_ids(3, 6, seed=4)
    plan = multi.plan([multi.uid(name)] * 3, 6)
    assert next(iter(plan.groups.values())).all_rows  # the two-matmul fast path
    with torch.no_grad():
        out = multi(ids, adapters=[name] * 3).logits
    assert torch.allclose(out, solo(adapters, name, ids), atol=1e-5, rtol=1e-4)


def test_adapters_on_different_modules_and_layers(tmp_path):
    specs = {
        "qv": dict(method="nora", r=4),
        "ko": dict(method="nora", r=2, target_modules=["k_proj", "o_proj"]),
        "mlp-top": dict(
            method="nora", r=3, target_modules=["gate_proj", "down_proj"], layers_to_transform=[1]
        ),
        "all": dict(method="lora", r=4, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"]),
    }
    make_dir(tmp_path, specs)
    mm = MultiAdapterModel(tiny_llama())
    for name in specs:
        mm.add(name, tmp_path / name)
    names = ["qv", "ko", "mlp-top", None, "all", "qv", "ko"]
    check_rows(mm, tmp_path, names, random_ids(len(names), 6, seed=5))


def test_plan_segments_come_from_a_stable_sort():
    uids = torch.tensor([3, 0, 5, 3, 3, 5, 0, 7])
    plan = BatchPlan.build(uids, {3: "k", 5: "k", 7: "other"})
    seg = plan.groups["k"]
    assert seg.uids == (3, 5) and seg.counts == (3, 2) and seg.L == 3
    assert seg.rows.tolist() == [0, 3, 4, 2, 5]  # token indices, sorted by uid, stable
    assert seg.gather.tolist() == [0, 3, 4, 2, 5, 0] and seg.valid.tolist() == [0, 1, 2, 3, 4]
    assert plan.groups["other"].rows.tolist() == [7] and not plan.groups["other"].all_rows
    assert BatchPlan.build(torch.tensor([2, 2]), {2: "k"}).groups["k"].all_rows


def test_scale_is_folded_into_B_never_into_A(adapters):
    model = nora.load_adapter(tiny_llama(), adapters / "nora-silu")  # scale 2.5
    a = model.model.layers[0].self_attn.q_proj.adapter
    w = a.pack()
    assert w.kind == ("nora", "silu")
    assert torch.equal(w.A, a.lora_A.weight.t())
    assert torch.allclose(w.B, (2.5 * a.lora_B.weight).t())
    x = torch.randn(5, a.in_features)
    assert torch.allclose(torch.nn.functional.silu(x @ w.A) @ w.B, a(x), atol=1e-6)


def test_base_weights_are_shared_never_copied(adapters):
    model = tiny_llama()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    originals = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    mm = MultiAdapterModel(model)
    for name in SPECS:
        mm.add(name, adapters / name)
    layers = mm.layers()
    assert set(layers) == {n for n in originals if n.endswith(("q_proj", "v_proj"))}
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == before
    assert list(model.state_dict()) == keys
    for n, layer in layers.items():
        assert layer.weight is originals[n].weight and len(layer.adapters) == len(SPECS)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in tiny_llama().parameters()
    )
    mm.remove("nora-silu")
    assert all(len(layer.adapters) == len(SPECS) - 1 for layer in layers.values())
    base = mm.close()
    for n, m in base.named_modules():
        if n in originals:
            assert m is originals[n] and not isinstance(m, MultiAdapterLinear)
