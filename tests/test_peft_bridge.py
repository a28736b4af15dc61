"""The PEFT bridge: stock PEFT creates, trains, saves and loads nora's methods after `import nora.peft`."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

import nora
import nora.peft
from nora.peft import NoraConfig

# one config per nora peft_type; r=4 on a 32-wide tiny Llama
SPECS = {
    "NORA": dict(method="nora", r=4, activation="silu"),
    "NOLORA": dict(method="nolora", r=4),
    "AURORA": dict(method="aurora", r=4),
    "LORAN": dict(method="loran", r=4, sinter_a=0.05, sinter_omega=3.0),
    "LORA_MODULE": dict(method="lora", r=4, placement="module"),
}


def _peft(ptype: str, **kw):
    return get_peft_model(tiny_llama(), NoraConfig(**SPECS[ptype], **kw))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_every_nora_peft_type_is_registered():
    assert set(SPECS) <= set(nora.peft.peft_types())
    for ptype, spec in SPECS.items():
        assert NoraConfig(**spec).peft_type == ptype


@pytest.mark.parametrize("ptype", sorted(SPECS))
def test_peft_written_folder_loads_in_nora_and_peft_with_identical_logits(ptype, tmp_path, ids):
    model = _peft(ptype)
    randomize(model.get_base_model())
    want = _logits(model, ids)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == ptype and "nora_format_version" in saved

    by_nora = nora.load_adapter(tiny_llama(), tmp_path)
    assert torch.equal(_logits(by_nora, ids), want)
    by_peft = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(_logits(by_peft, ids), want)


@pytest.mark.parametrize("ptype", sorted(SPECS))
def test_nora_written_folder_loads_in_peft_with_identical_logits(ptype, tmp_path, ids):
    model = nora.inject(tiny_llama(), NoraConfig(**SPECS[ptype]).to_nora())
    randomize(model)
    want = _logits(model, ids)
    nora.save_adapter(model, tmp_path / "nora")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "nora")
    assert type(peft_model.base_model).__name__ == "NoraTuner"
    assert torch.equal(_logits(peft_model, ids), want)
    # and PEFT writes back the very same files
    peft_model.save_pretrained(tmp_path / "peft")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "nora" / name).read_bytes()


def test_lora_folders_load_both_ways(tmp_path, ids):
    # weight-level LoRA is PEFT's own LoraConfig; the bridge is not involved
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    want = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "peft")
    assert torch.equal(_logits(nora.load_adapter(tiny_llama(), tmp_path / "peft"), ids), want)
    nora.save_adapter(nora.load_adapter(tiny_llama(), tmp_path / "peft"), tmp_path / "nora")
    back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "nora")
    assert torch.equal(_logits(back, ids), want)


def test_weight_level_lora_config_points_to_peft_lora():
    with pytest.raises(nora.ConfigError, match="peft.LoraConfig"):
        NoraConfig(method="lora", r=4)
    with pytest.raises(nora.ConfigError, match="unknown method"):
        NoraConfig(method="dora")
    with pytest.raises(nora.ConfigError, match="activation"):
        NoraConfig(method="nora", activation="softmax")
    # the checks nora.load_adapter applies to a folder's config
    with pytest.raises(nora.CheckpointError, match="newer than this nora"):
        NoraConfig(method="nora", nora_format_version=99)
    with pytest.raises(nora.CheckpointError, match="does not match method"):
        NoraConfig(method="nora", peft_type="AURORA")


def test_config_resolves_method_defaults_like_nora():
    cfg = NoraConfig(method="nora", r=8)
    assert cfg.to_nora() == nora.AdapterConfig(method="nora", r=8)
    assert (cfg.scale, cfg.dropout, cfg.activation) == (1.0, 0.1, "silu")


def test_disable_adapter_runs_the_base_model(ids):
    model = _peft("NORA")
    randomize(model.get_base_model())
    adapted = _logits(model, ids)
    base = _logits(tiny_llama(), ids)
    with model.disable_adapter():
        assert torch.equal(_logits(model, ids), base)
        assert model.get_model_status().enabled is False
    assert torch.equal(_logits(model, ids), adapted)
    assert not torch.allclose(adapted, base)


def test_merge_and_unload_a_mergeable_method(ids):
    model = _peft("LORAN")
    randomize(model.get_base_model())
    want = _logits(model, ids)
    merged = model.merge_and_unload()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not nora.adapter_modules(merged)
    torch.testing.assert_close(_logits(merged, ids), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ptype", ["NORA", "NOLORA", "AURORA", "LORA_MODULE"])
def test_merge_and_unload_refuses_non_linear_methods_and_changes_nothing(ptype, ids):
    model = _peft(ptype)
    randomize(model.get_base_model())
    before = _logits(model, ids)
    wrapped = nora.adapter_modules(model.get_base_model())
    assert wrapped
    with pytest.raises(nora.NotMergeableError, match="cannot be merged"):
        model.merge_and_unload()
    assert torch.equal(_logits(model, ids), before)
    assert nora.adapter_modules(model.get_base_model()) == wrapped  # the same wrappers, all kept


def test_train_through_peft_changes_only_the_adapter(ids):
    model = _peft("NOLORA")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter." in n for n in trainable)
    assert model.get_nb_trainable_parameters()[0] == nora.count_parameters(model).trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable


def test_from_pretrained_freezes_unless_trainable(tmp_path):
    _peft("NORA").save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    live = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert live.get_nb_trainable_parameters()[0] == nora.count_parameters(live).total - sum(
        p.numel() for p in tiny_llama().parameters()
    )


def test_loading_a_checkpoint_that_does_not_fit_names_the_mismatch(tmp_path):
    _peft("NORA").save_pretrained(tmp_path)
    wider = tiny_llama(hidden=64)
    with pytest.raises(nora.CheckpointError, match="model expects shape"):
        PeftModel.from_pretrained(wider, tmp_path)


def test_one_adapter_per_model():
    model = _peft("NORA")
    with pytest.raises(ValueError, match="one adapter per model"):
        model.add_adapter("second", NoraConfig(**SPECS["NORA"]))
    assert list(model.peft_config) == ["default"]


def test_without_the_bridge_peft_refuses_a_nora_folder_instead_of_misreading_it(
    tmp_path, monkeypatch
):
    from peft import mapping

    _peft("NORA").save_pretrained(tmp_path)
    for table in (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
    ):  # PEFT as it is before `import nora.peft` (restored after the test)
        monkeypatch.delitem(table, "NORA")
    with pytest.raises(KeyError, match="NORA"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_a_method_defined_outside_nora_gets_the_bridge(tmp_path, ids):
    from test_custom_method import TanhLoRA  # a sixth method, defined in a test

    from nora.adapters import METHODS, register

    register(TanhLoRA)
    try:
        assert TanhLoRA.peft_type in nora.peft.register_methods()
        model = get_peft_model(tiny_llama(), NoraConfig(method=TanhLoRA.name, r=4))
        randomize(model.get_base_model())
        want = _logits(model, ids)
        model.save_pretrained(tmp_path)
        assert torch.equal(_logits(PeftModel.from_pretrained(tiny_llama(), tmp_path), ids), want)
        assert torch.equal(_logits(nora.load_adapter(tiny_llama(), tmp_path), ids), want)
    finally:
        METHODS.pop(TanhLoRA.name)
