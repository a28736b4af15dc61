"""Checkpoints in PEFT's layout: exact round trips, PEFT interop both ways, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from test_inject import assert_unchanged, logits, snapshot

import nora
from nora import checkpoint

METHODS = sorted(nora.METHODS)


def trained(method="nora", placement="weight", seed=0, **kw):
    model = tiny_llama()
    nora.inject(model, nora.AdapterConfig(method=method, r=4, placement=placement, **kw))
    randomize(model, seed)
    return model


@pytest.mark.parametrize("placement", ["weight", "module"])
@pytest.mark.parametrize("method", METHODS)
def test_save_load_gives_bit_identical_logits(method, placement, tmp_path, ids):
    model = trained(method, placement)
    ref = logits(model, ids)
    nora.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md",  # the model card (tests/test_modelcard.py)
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = nora.load_adapter(tiny_llama(), tmp_path / "a")
    assert torch.equal(logits(fresh, ids), ref)
    assert nora.get_config(fresh) == nora.AdapterConfig.from_dict(
        {**nora.get_config(model).to_dict(), "base_model_name_or_path": None}
    )
    assert nora.count_parameters(fresh).trainable == 0  # PEFT's default: inference mode
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)


def test_peft_types(tmp_path):
    for method, placement, ptype in [
        ("lora", "weight", "LORA"),
        ("lora", "module", "LORA_MODULE"),
        ("nora", "weight", "NORA"),
        ("nolora", "weight", "NOLORA"),
        ("aurora", "weight", "AURORA"),
        ("loran", "weight", "LORAN"),
    ]:
        nora.save_adapter(trained(method, placement), tmp_path / method / placement)
        d = json.loads((tmp_path / method / placement / "adapter_config.json").read_text())
        assert d["peft_type"] == ptype
        assert ("nora_format_version" in d) == (ptype != "LORA")


def test_is_trainable_keeps_the_adapter_trainable(tmp_path):
    nora.save_adapter(trained("nora"), tmp_path)
    model = nora.load_adapter(tiny_llama(), tmp_path, is_trainable=True)
    assert nora.count_parameters(model).trainable == 2 * 4 * (64 + 48)


def test_float32_checkpoint_loads_into_bfloat16_model(tmp_path, ids):
    nora.save_adapter(trained("nora"), tmp_path)
    model = nora.load_adapter(tiny_llama().to(torch.bfloat16), tmp_path)
    w = model.model.layers[0].self_attn.q_proj.adapter.lora_B.weight
    assert w.dtype == torch.bfloat16 and torch.count_nonzero(w) > 0


# --- PEFT interop ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(alpha=32, rslora=True),
        dict(scale=0.5),
        dict(layers_to_transform=[1], dropout=0.1),
    ],
)
def test_nora_lora_loads_in_peft(kw, tmp_path, ids):
    model = trained("lora", **kw)
    ref = logits(model, ids)
    nora.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(lora_alpha=32, use_rslora=True),
        dict(layers_to_transform=[0], target_modules=["k_proj", "o_proj"]),
    ],
)
def test_peft_lora_loads_in_nora(kw, tmp_path, ids):
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4,
        **{"target_modules": ["q_proj", "v_proj"], **kw},
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(tiny_llama(), cfg).eval()
    ref = logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    model = nora.load_adapter(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-6)
    # and back out again, still readable by PEFT
    nora.save_adapter(model, tmp_path / "again")
    again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "again").eval()
    torch.testing.assert_close(logits(again, ids), ref, rtol=1e-5, atol=1e-6)


def test_peft_refuses_nonlinear_checkpoints(tmp_path, monkeypatch):
    from peft import mapping

    # stock PEFT: undo `import nora.peft` (the PEFT bridge) if another test module did it
    for table in (
        mapping.PEFT_TYPE_TO_CONFIG_MAPPING,
        mapping.PEFT_TYPE_TO_TUNER_MAPPING,
        mapping.PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        monkeypatch.delitem(table, "NORA", raising=False)
    nora.save_adapter(trained("nora"), tmp_path)
    with pytest.raises(Exception, match="NORA"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_unsupported_peft_features_are_refused(tmp_path):
    cfg = LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)
    get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path)
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(nora.CheckpointError, match="use_dora=True"):
        nora.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


# --- refusals: each names the problem and leaves the model as it was ----------------------


def _edit_config(path, **changes):
    f = path / "adapter_config.json"
    d = json.loads(f.read_text())
    d.update(changes)
    f.write_text(json.dumps(d))


def _corrupt(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(b"\x00\x01garbage" * 10)


def _truncate(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


CASES = [
    (
        "unknown field",
        lambda p: _edit_config(p, rank_dropout=0.5),
        "unknown config fields.*rank_dropout",
    ),
    ("newer version", lambda p: _edit_config(p, nora_format_version=99), "newer than this nora"),
    ("wrong peft_type", lambda p: _edit_config(p, peft_type="IA3"), "does not match method"),
    ("bad value", lambda p: _edit_config(p, r=-3), "invalid adapter config.*positive int"),
    ("corrupted", _corrupt, "truncated or corrupted"),
    ("truncated", _truncate, "truncated or corrupted"),
    ("not json", lambda p: (p / "adapter_config.json").write_text("{nope"), "not valid JSON"),
    ("no config", lambda p: (p / "adapter_config.json").unlink(), "not an adapter folder"),
    ("no weights", lambda p: (p / "adapter_model.safetensors").unlink(), "not found"),
    (
        "pickle",
        lambda p: (
            (p / "adapter_model.safetensors").unlink(),
            (p / "adapter_model.bin").write_bytes(b"x"),
        ),
        "pickle",
    ),
]


@pytest.mark.parametrize("name,damage,msg", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoints_are_refused_and_change_nothing(name, damage, msg, tmp_path):
    nora.save_adapter(trained("nora"), tmp_path)
    damage(tmp_path)
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(nora.CheckpointError, match=msg):
        nora.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_checkpoint_for_another_base_model_names_the_mismatch(tmp_path):
    nora.save_adapter(trained("nora"), tmp_path)
    other = tiny_llama(hidden=48)
    snap = snapshot(other)
    with pytest.raises(
        nora.CheckpointError,
        match=r"q_proj.lora_A.weight: model expects shape \(4, 48\), file has \(4, 32\)",
    ):
        nora.load_adapter(other, tmp_path)
    assert_unchanged(other, snap)
    gpt2 = tiny_gpt2()
    with pytest.raises(nora.CheckpointError, match="does not fit this model.*matched no module"):
        nora.load_adapter(gpt2, tmp_path)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    nora.save_adapter(trained("nora"), tmp_path)
    _edit_config(tmp_path, layers_to_transform=[0])
    with pytest.raises(nora.CheckpointError, match="unexpected tensor model.layers.1"):
        nora.load_adapter(tiny_llama(), tmp_path)
    _edit_config(tmp_path, layers_to_transform=None, target_modules=["q_proj", "v_proj", "k_proj"])
    with pytest.raises(
        nora.CheckpointError, match="missing tensor model.layers.0.self_attn.k_proj"
    ):
        nora.load_adapter(tiny_llama(), tmp_path)


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, ids):
    good = trained("nora", seed=0)
    nora.save_adapter(good, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        nora.save_adapter(trained("nora", seed=1), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files left
    monkeypatch.undo()
    assert torch.equal(logits(nora.load_adapter(tiny_llama(), tmp_path), ids), logits(good, ids))


def test_save_into_a_file_path_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(nora.CheckpointError, match="not a directory"):
        nora.save_adapter(trained("nora"), tmp_path / "f")
