"""Distillation (nora.distill): the teacher swap is exact and leaves the model as it was, the
KL is the hand-computed one and zero against itself, fitting a teacher changes only its
weights, and `train(teacher=...)` lowers the KL to the teacher (eval_loss is that KL)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tokenizer, tiny_llama

import nora
from nora.data import build_splits, collate
from nora.distill import (
    DistillError,
    Teacher,
    batch_kl,
    fit_teacher,
    kl_eval,
    positions,
    random_delta,
)
from nora.train import TrainConfig, TrainingError, train

MODULES = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = tiny_llama(vocab=len(tok), hidden=64)
    train_set, held, _ = build_splits(tok, "logistic-map", 32, 8, 300, seed=0)
    return model, tok, train_set, held


def perturbed(model, seed=0, scale=0.5) -> Teacher:
    g = torch.Generator().manual_seed(seed)
    w = {n: model.get_submodule(n).weight for n in MODULES}
    return Teacher({n: x + scale * torch.randn(x.shape, generator=g) for n, x in w.items()})


def test_active_teacher_is_a_model_with_those_weights_and_is_undone(setup):
    model, tok, _, held = setup
    teacher = perturbed(model)
    b = collate(held[:2], tok.pad_token_id)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = tiny_llama(vocab=len(tok), hidden=64)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for n, w in teacher.weights.items():
            copy.get_submodule(n).weight.copy_(w)
        want = copy(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with teacher.active(model):
            got = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(got, want)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_kl_is_the_hand_computed_one_and_zero_against_itself(setup):
    model, tok, _, held = setup
    b = collate(held[:3], tok.pad_token_id)
    teacher = perturbed(model)
    kl, n = batch_kl(model, b, teacher, fast=False)
    mask = positions(b)
    assert n == int(mask.sum()) == int((b["attention_mask"][:, 1:] == 1).sum())
    with torch.no_grad():
        s = F.log_softmax(model(input_ids=b["input_ids"]).logits[:, :-1][mask], -1)
        with teacher.active(model):
            t = F.log_softmax(model(input_ids=b["input_ids"]).logits[:, :-1][mask], -1)
    assert float(kl.detach()) == pytest.approx(float((t.exp() * (t - s)).sum()), rel=1e-4)
    same = Teacher({n: model.get_submodule(n).weight.clone() for n in MODULES})
    assert float(batch_kl(model, b, same, fast=False)[0].detach()) == pytest.approx(0.0, abs=1e-4)


def test_fit_teacher_changes_only_its_weights(setup):
    model, tok, train_set, _ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]

    def batches(step):
        return collate(train_set[(4 * step) % 32 :][:4], tok.pad_token_id)

    teacher = fit_teacher(model, batches, MODULES, steps=6, lr=1e-2, fast=False)
    assert teacher.meta["train_loss"][-1] < teacher.meta["train_loss"][0]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [p.requires_grad for p in model.parameters()] == grads
    for n in MODULES:
        assert not torch.equal(teacher.weights[n], before[n + ".weight"])
    spectra = teacher.delta_spectra(model)
    assert set(spectra) == set(MODULES)
    assert all(1 <= s["rank90"] <= 64 and s["effective_rank"] >= 1 for s in spectra.values())


def test_delta_spectra_sees_the_rank_of_the_update():
    model = tiny_llama(hidden=64)
    w = model.get_submodule(MODULES[0]).weight
    u, v = torch.randn(w.shape[0], 2), torch.randn(2, w.shape[1])
    spec = Teacher({MODULES[0]: w + u @ v}).delta_spectra(model)[MODULES[0]]
    assert spec["rank90"] <= 2 and spec["effective_rank"] < 2.01


def test_random_delta_keeps_each_norm_and_spreads_the_rank():
    model = tiny_llama(hidden=64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ws = {n: model.get_submodule(n).weight for n in MODULES}
    low = Teacher(
        {n: w + torch.randn(w.shape[0], 2) @ torch.randn(2, w.shape[1]) for n, w in ws.items()}
    )
    spread = random_delta(low, model, seed=3)
    again = random_delta(low, model, seed=3)
    lo, hi = low.delta_spectra(model), spread.delta_spectra(model)
    for n, w in ws.items():
        assert hi[n]["fro"] == pytest.approx(lo[n]["fro"], rel=1e-5)  # the same size of change
        assert lo[n]["effective_rank"] < 2.01 and hi[n]["effective_rank"] > min(w.shape) / 2
        assert torch.equal(spread.weights[n], again.weights[n])  # seeded: reproducible
    other = random_delta(low, model, seed=4)
    big = random_delta(low, model, seed=3, scale=3.0).delta_spectra(model)
    assert all(big[n]["fro"] == pytest.approx(3 * lo[n]["fro"], rel=1e-5) for n in ws)
    assert not any(torch.equal(spread.weights[n], other.weights[n]) for n in ws)  # seed matters
    assert spread.meta["delta_kind"] == "random"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


def test_teacher_that_does_not_fit_is_refused(setup):
    model, *_ = setup
    with pytest.raises(DistillError, match="does not have"):
        Teacher({"model.nope": torch.zeros(2, 2)}).check(model)
    with pytest.raises(DistillError, match="shape"):
        Teacher({MODULES[0]: torch.zeros(2, 2)}).check(model)


def test_train_against_a_teacher_lowers_the_kl(setup, tmp_path):
    model, tok, train_set, held = setup
    teacher = perturbed(model, scale=0.3)
    path = tmp_path / "teacher.safetensors"
    teacher.meta = {"note": "random"}
    teacher.save(path)
    assert Teacher.load(path).meta == {"note": "random"}
    before = kl_eval(model, [collate(held, tok.pad_token_id)], teacher, fast=False).nll
    cfg = TrainConfig(
        adapter=nora.AdapterConfig(
            method="lora", r=8, alpha=8, target_modules=["q_proj", "v_proj"]
        ),
        teacher=str(path),
        max_steps=12,
        batch_size=4,
        lr=1e-2,
        n_eval=8,
        output_dir=str(tmp_path / "run"),
    )
    summary = train(cfg, model=model, tokenizer=tok, progress=False, splits=(train_set, held))
    assert summary.eval_loss < 0.8 * before  # eval_loss is the KL to the teacher
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["teacher"] == str(path)
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()  # the model card says so
    assert f"`{path}`" in card and f"**{summary.eval_loss:.4g}** nats" in card
    assert "perplexity" not in card.lower()  # the eval number is a KL, not a perplexity
    nora.unload(model)
    bad = Teacher({MODULES[0]: torch.zeros(3, 3)})
    bad.save(tmp_path / "bad.safetensors")
    cfg.teacher, cfg.output_dir = str(tmp_path / "bad.safetensors"), str(tmp_path / "run2")
    with pytest.raises(TrainingError, match="shape"):
        train(cfg, model=model, tokenizer=tok, progress=False, splits=(train_set, held))
    assert not nora.adapter_modules(model)  # refused before the model was touched
