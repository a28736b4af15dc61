"""The demo's own rules: per-method learning rates and a verdict read from each interval."""

from __future__ import annotations

from nora.study.demo import TUNED_LR, DemoConfig, _verdict, format_table


def test_each_method_gets_its_own_rate_unless_one_is_given():
    cfg = DemoConfig()
    assert cfg.lr is None and cfg.data == "reasoning-mix"
    assert {m: cfg.lr_of(m) for m in cfg.methods} == {m: TUNED_LR[m] for m in cfg.methods}
    assert DemoConfig(lr=1e-3).lr_of("nora") == DemoConfig(lr=1e-3).lr_of("lora") == 1e-3


def rows(low, high):
    base = {"name": "base", "trainable_params": 0, "ppl": 3.0, "accuracy": 0.01}
    d = {"estimate": (low + high) / 2, "low": low, "high": high, "per_seed": [(low + high) / 2]}
    ad = {"name": "nora r16", "trainable_params": 10, "ppl": 2.0, "accuracy": 0.3}
    prior = {"name": "majority answer", "trainable_params": 0, "ppl": None, "accuracy": 0.2}
    far = {"estimate": 0.29, "low": 0.2, "high": 0.35, "per_seed": [0.29]}
    return [base, prior, {**ad, "acc_vs_base": far, "acc_vs_prior": d, "train_time_s": 5.0}]


def test_verdict_is_about_the_answer_prior_not_the_base():
    assert "better than the per-family majority answer" in _verdict(rows(0.1, 0.3))
    assert "WORSE" in _verdict(rows(-0.3, -0.1))
    said = _verdict(rows(-0.05, 0.2))  # far above the base, not above the prior
    assert "not above the per-family majority answer" in said and "answer format" in said


def test_table_shows_the_interval():
    table = format_table(rows(0.1, 0.3))
    assert "+20.0% [+10.0%, +30.0%]" in table and "30.0%" in table  # vs the prior
    assert "+29.0% [+20.0%, +35.0%]" in table  # vs the base


def test_the_demo_rates_are_the_studys_choices():
    """TUNED_LR's comment says the rates come from the committed study's searches."""
    import json
    from pathlib import Path

    from nora.study.runner import lr_of

    f = Path(__file__).parent.parent / "results/study/lr_choices.json"
    chosen = json.loads(f.read_text())["k"]["reasoning-mix"]
    cfg = DemoConfig()
    assert cfg.data == "reasoning-mix" and cfg.r == 16
    assert {m: lr_of(chosen[m][str(cfg.r)]) for m in cfg.methods} == TUNED_LR
