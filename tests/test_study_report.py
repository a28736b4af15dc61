"""The study report: paired bootstrap intervals, verdicts that follow from them, the PEFT
method_comparison layout, and the report built from a tiny study's files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import make_tokenizer, tiny_llama

from nora.study.results import StudyResults
from nora.study.runner import StudyConfig, run_study
from nora.study.stats import Interval, PerExample, paired_difference, verdict
from nora.study.study_report import build_study_report


def per_example(nll, correct, tokens=None):
    nll = np.asarray(nll, float)
    return PerExample(
        nll,
        np.ones_like(nll) if tokens is None else np.asarray(tokens, float),
        np.asarray(correct, float),
    )


def test_paired_difference_point_estimate_and_interval():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 2, 300)
    a = [per_example(base - 0.2, rng.integers(0, 2, 200)) for _ in range(3)]
    b = [per_example(base, np.zeros(200)) for _ in range(3)]
    iv = paired_difference(a, b, "ppl")
    want = np.mean([x.ppl() - y.ppl() for x, y in zip(a, b, strict=True)])
    assert iv.estimate == pytest.approx(want)
    # every example is lower by the same amount: the paired interval is tight and below 0
    assert iv.low <= iv.estimate <= iv.high < 0 and iv.excludes_zero
    acc = paired_difference(a, b, "accuracy")
    assert acc.estimate == pytest.approx(np.mean([x.correct.mean() for x in a]))
    assert acc.low > 0
    assert len(iv.per_seed) == 3


def test_identical_runs_give_no_difference():
    rng = np.random.default_rng(1)
    x = per_example(rng.uniform(1, 2, 100), rng.integers(0, 2, 50))
    iv = paired_difference([x], [x], "ppl")
    assert iv.estimate == 0 and not iv.excludes_zero
    assert verdict(iv, "NoRA", "LoRA", lower_is_better=True).startswith("no difference")


def test_verdict_reads_the_direction_from_the_interval():
    lower = Interval(-0.1, -0.2, -0.05, (-0.1,))
    assert verdict(lower, "NoRA", "LoRA", lower_is_better=True).startswith("NoRA is better")
    assert verdict(lower, "NoRA", "LoRA", lower_is_better=False).startswith("LoRA is better")
    assert Interval(0.5, -0.1, 1.0, (0.5,)).excludes_zero is False


def test_unpaired_or_empty_inputs():
    x = per_example([1.0, 2.0], [])
    assert paired_difference([x], [x], "accuracy") is None  # no generated problems
    assert paired_difference([], [], "ppl") is None
    with pytest.raises(ValueError, match="different test examples"):
        paired_difference([x], [per_example([1.0], [])], "ppl")
    with pytest.raises(ValueError, match="unknown metric"):
        paired_difference([x], [x], "bleu")


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64, layers=4).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    spec = {
        "study": True,
        "model": str(root / "model"),
        "datasets": ["logistic-map"],
        "top_layers": 2,
        "train": {
            "max_steps": 4,
            "batch_size": 4,
            "n_train": 16,
            "max_len": 300,
            "eval_every": 2,
        },
        "n_val": 4,
        "n_test": 6,
        "n_gen": 3,
        "max_new_tokens": {"logistic-map": 4},
        "variants": {"lora": {"method": "lora", "alpha": 32}, "nora": {"method": "nora"}},
        "ranks": [2, 4],
        "seeds": [0, 1],
        "lr_search": {"start": [-4, -3], "default_rank": 2, "max_values": 3},
        "first": ["lora", "nora"],
        "analysis_tokens": 64,
        "controls": True,
    }
    (root / "study.yaml").write_text(yaml.safe_dump(spec))
    run_study(
        StudyConfig.from_dict(spec), root / "out", log=lambda *_: None, command="nora sweep tiny"
    )
    return root / "out"


def test_untrained_controls_are_analysed_once_per_variant_and_rank(study_dir):
    res = StudyResults.load(study_dir)
    assert sorted((c.variant, c.r) for c in res.controls) == [
        ("lora", 2), ("lora", 4), ("nora", 2), ("nora", 4)
    ]  # fmt: skip
    for c in res.controls:  # a random B: every view has a spectrum, none is degenerate
        assert all(er > 1 for er in c.spectra.effective_rank.values()), c
    assert not list(study_dir.glob("runs/*/*/r*/untrained/adapter"))  # nothing trained or kept


def test_results_load_as_typed_records(study_dir):
    res = StudyResults.load(study_dir)
    runs = res.cell("logistic-map", "nora", 2)
    assert [t.seed for t in runs] == [0, 1]
    assert runs[0].per_example.nll.size == 6 and runs[0].spectra.effective_rank["latent"] > 0
    a, b = res.paired("logistic-map", "nora", "lora", 4)
    assert [t.seed for t in a] == [t.seed for t in b] == [0, 1]
    steps, loss = res.trained[0].curve()
    assert steps == [2, 4] and len(loss) == 2
    assert res.base["logistic-map"].r is None


def test_the_recorded_command_is_made_generic_per_dataset():
    from nora.study.study_report import _command

    assert _command("nora sweep study --out s") == "`nora sweep study --out s`"
    assert _command("nora sweep study --dataset math --threads 1") == (
        "`nora sweep study --dataset D --threads 1` (one worker per dataset D)"
    )


def test_report_from_the_study_files(study_dir):
    report = build_study_report(study_dir)
    text = report.read_text()
    # the headline section comes first: NoRA vs LoRA at the default rank, with its interval
    head = text.split("## Headline: NoRA vs LoRA at r = 2")[1].split("## Compute plan")[0]
    assert "NoRA − LoRA α=32, ΔPPL =" in head and "spread of mean test PPL over the 2" in head
    for needle in (
        "## Compute plan",
        "CPU hours",
        "## Learning rates",
        "## logistic-map",
        "NoRA − LoRA α=32",
        "ΔPPL",
        "Δpass@1",
        "(2 seeds;",
        "vs the base model",
        "nora sweep tiny",
        "PEFT method_comparison",
        "would exclude 0 by chance",  # the multiple-comparisons caveat
        "it does not resample training seeds",  # what the interval leaves out
        "Does the effective rank predict test PPL?",  # the mechanism test
        "| NoRA | latent | 4 |",
        "| variant | r | view | ER trained | ER untrained |",  # the untrained controls
        "| NoRA | 4 | latent | ",
    ):
        assert needle in text, needle
    # every comparison line carries an interval and a verdict
    lines = [x for x in text.splitlines() if "ΔPPL =" in x or "Δpass@1 =" in x]
    assert lines and all("[" in x and ("is better" in x or "no difference" in x) for x in lines)
    for png in (
        "learning_curves_logistic-map.png",
        "metrics_vs_rank_logistic-map.png",
        "effective_rank_logistic-map.png",
        "spectrum_logistic-map.png",
    ):
        assert (study_dir / "figures" / png).stat().st_size > 1000
    peft = sorted((study_dir / "peft").glob("*.json"))
    assert len(peft) == 2 * 2 * 2
    rec = json.loads(peft[0].read_text())
    assert set(rec) == {"run_info", "train_info", "meta_info"}
    assert rec["run_info"]["peft_config"]["r"] in (2, 4)
    m = rec["train_info"]["metrics"]
    assert "valid loss" in m[0] and "test perplexity" in m[-1] and "test accuracy" in m[-1]
    # A and B of q_proj (64 -> 64) and v_proj (64 -> 32, grouped-query) in the top 2 layers
    for path in peft:
        rec = json.loads(path.read_text())
        r = rec["run_info"]["peft_config"]["r"]
        assert rec["train_info"]["num_trainable_params"] == 2 * r * ((64 + 64) + (64 + 32))


def test_the_report_says_where_each_rate_was_searched():
    from nora.study.runner import STUDY_PRESETS
    from nora.study.study_report import _searched_ranks

    cfg = StudyConfig.from_dict(STUDY_PRESETS["study"]).to_dict()
    assert _searched_ranks(cfg).startswith(
        "LoRA α=32: searched at r = 4, 16, 128 (r = 64 takes r = 128's); "
        "LoRA α=r, rsLoRA, NoRA: searched at r = 16 (its rate used at every rank)."
    )


def test_at_a_glance_table_agrees_with_every_interval(study_dir):
    text = build_study_report(study_dir).read_text()
    glance = text.split("## At a glance")[1].split("## Compute plan")[0]
    rows = [x.split(" | ") for x in glance.splitlines() if x.startswith("| logistic-map")]
    assert [(r[1], r[2]) for r in rows] == [("LoRA α=32", "test PPL"), ("LoRA α=32", "pass@1")]
    for row in rows:
        label = "ΔPPL" if row[2] == "test PPL" else "Δpass@1"
        for r, cell in zip((2, 4), row[3:], strict=True):
            line = next(
                x
                for x in text.splitlines()
                if x.startswith(f"- r={r}, NoRA − LoRA α=32, {label} =")
            )
            estimate = line.split(" = ")[1].split(" ")[0]
            assert f"({estimate}" in cell and "seeds" not in cell  # all seeds: none noted
            if cell.startswith("**"):
                assert f"{cell[2:].split('**')[0]} is better" in line
            else:
                assert cell.startswith("no difference") and "no difference" in line


def test_means_over_fewer_seeds_are_marked(study_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(study_dir, partial)
    (test_json,) = partial.glob("runs/logistic-map/nora/r2/*/s1/test.json")
    test_json.unlink()
    text = build_study_report(partial).read_text()
    glance = text.split("## At a glance")[1].split("## Compute plan")[0]
    assert glance.count("1 of 2 seeds") == 2  # r=2's PPL and pass@1 cells, not r=4's
    spread = next(x for x in text.splitlines() if "spread of mean test PPL" in x)
    assert "NoRA" in spread and spread.count("(1 of 2 seeds)") == 1


def test_cli_sweep_resumes_a_study_and_report_dispatches(study_dir):
    from typer.testing import CliRunner

    from nora.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["sweep", str(study_dir.parent / "study.yaml"), "--out", str(study_dir)]
    )
    assert res.exit_code == 0, res.output
    assert "study finished" in res.output and "done" not in res.output  # nothing left to run
    res = runner.invoke(app, ["report", str(study_dir)])
    assert res.exit_code == 0, res.output
    assert "## Compute plan" in (study_dir / "report.md").read_text()
