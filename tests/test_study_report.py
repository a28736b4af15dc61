"""The study report: paired bootstrap intervals, verdicts that follow from them, the PEFT
method_comparison layout, and the report built from a tiny study's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_tokenizer, tiny_llama

from nora.study.report import build_study_report
from nora.study.results import StudyResults
from nora.study.runner import StudyConfig, run_study
from nora.study.stats import Interval, PerExample, paired_difference, verdict


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
    # the side of 0 the interval lies on decides, also where a skewed bootstrap leaves the
    # point estimate outside the interval
    skewed = Interval(0.01, -0.2, -0.05, (0.01,))
    assert verdict(skewed, "NoRA", "LoRA", lower_is_better=True).startswith("NoRA is better")


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
    from nora.study.report.overview import _command

    assert _command("nora sweep study --out s") == "`nora sweep study --out s`"
    assert _command("nora sweep study --dataset math --threads 1") == (
        "`nora sweep study --dataset D --threads 1` (one worker per dataset D)"
    )


def test_report_from_the_study_files(study_dir):
    report = build_study_report(study_dir)
    text = report.read_text()
    # the headline section comes first: NoRA vs LoRA at the default rank, with its interval
    head = text.split("## Headline: NoRA vs LoRA at r = 2")[1].split("## Compute plan")[0]
    assert "| NoRA − LoRA α=32, logistic-map | ΔPPL | 2 |" in head
    assert "- logistic-map: spread of mean test PPL over the 2" in head
    assert text.startswith("# NoRA vs LoRA: the rank-scaling study (issue 13)\n")  # the default
    # the logistic-map probe (paper Table 1): said in the header, a row per variant, its mean
    assert "also the logistic-map probe of the paper's Table 1" in text
    steps = [
        np.mean(json.loads(f.read_text())["per_example"]["correct_steps"])
        for f in sorted(study_dir.glob("runs/logistic-map/lora/r2/*/s*/test.json"))
    ]
    row = next(x for x in text.splitlines() if x.startswith("| LoRA α=32 (probe steps) |"))
    mean = f"{np.mean(steps):.2f}"  # ± the std over seeds where they differ
    assert row.split(" | ")[1].startswith(mean if len(set(steps)) == 1 else f"{mean} ± ")
    for needle in (
        "## Compute plan",
        "CPU hours",
        "of the 10 budgeted",  # StudyConfig's default budget_cpu_hours
        "## Learning rates",
        "## logistic-map",
        "### Rank study: test PPL per variant and rank",
        "| NoRA − LoRA α=32, r=4 | ΔPPL | 2 |",
        "Δpass@1",
        "(2 seeds; lr ",  # the rate each cell ran at
        "| majority answer per family (pass@1) |",  # the prior beside pass@1
        "| NoRA − majority answer, r=2 | Δpass@1 |",
        "above the prior",
        "vs the base model",
        "nora sweep tiny",
        "PEFT method_comparison",
        "hierarchical bootstrap",  # what the interval resamples: seeds, then examples
        "| Holm p |",
        "**The crossover question**: the best LoRA cell is LoRA α=32 r=",
        "Does the effective rank predict test PPL?",  # the mechanism test
        "| NoRA | latent | 4 |",
        "| variant | r | view | ER trained | ER untrained | AUC-90 trained | AUC-90 untrained |",
        "| NoRA | 4 | latent | ",
    ):
        assert needle in text, needle
    for absent in ("### Table 2", "### Siblings", "## Step 1: pilots", "ΔKL"):
        assert absent not in text, absent  # v1's variants, no pilots given, no distillation
    pass1 = next(x for x in text.splitlines() if x.startswith("| NoRA (pass@1) |"))
    assert "seeds)" in pass1 and "lr " not in pass1  # the rate: beside the primary metric only
    # every comparison row carries an interval, a Holm-adjusted p and a verdict
    rows = [x for x in text.splitlines() if "| ΔPPL |" in x or "| Δpass@1 |" in x]
    assert rows and all(
        "[" in x and ("is better" in x or "no difference" in x or "above the prior" in x)
        for x in rows
    )
    for png in (
        "learning_curves_logistic-map.png",
        "metrics_vs_rank_logistic-map.png",
        "effective_rank_weight_logistic-map.png",
        "effective_rank_output_logistic-map.png",
        "effective_rank_latent_logistic-map.png",
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
    from nora.study.report.plan import searched_ranks
    from nora.study.runner import STUDY_PRESETS

    cfg = StudyConfig.from_dict(STUDY_PRESETS["study"]).to_dict()
    assert searched_ranks(cfg).startswith(
        "LoRA α=32: searched at r = 4, 16, 128 (r = 64 takes r = 128's); "
        "LoRA α=r, rsLoRA, NoRA: searched at r = 16 (its rate used at every rank)."
    )
    # where a variant runs at some ranks only: the ranks it runs at, the rates they take
    v2 = StudyConfig.from_dict(STUDY_PRESETS["study-v2"]).to_dict()
    assert "; NoLoRA, AuroRA, LoRAN: searched at r = 16." in searched_ranks(v2)
    assert (
        "NoRA-ReLU, NoRA without dropout, LoRA α=32 + input dropout 0.1, LoRA with "
        "NoRA's init and scale, module-level NoRA (matched parameters): searched at r = 16, 128;"
    ) in searched_ranks(v2)
    cfg["variant_ranks"] = {"lora": [16, 64], "nora": [16, 128]}
    assert searched_ranks(cfg).startswith(
        "LoRA α=32: searched at r = 16, 128 (r = 64 takes r = 128's); LoRA α=r, rsLoRA: "
        "searched at r = 16 (its rate used at every rank); NoRA: searched at r = 16 (its rate "
        "used at r = 128 too)."
    )


def test_at_a_glance_table_agrees_with_every_interval(study_dir):
    text = build_study_report(study_dir).read_text()
    glance = text.split("## At a glance")[1].split("## Compute plan")[0]
    rows = [x.split(" | ") for x in glance.splitlines() if x.startswith("| logistic-map")]
    # on the logistic map the study also probes (paper Table 1): a third metric
    metrics = ["test PPL", "pass@1", "probe steps"]
    assert [(r[1], r[2]) for r in rows] == [("LoRA α=32", m) for m in metrics]
    section = text.split("**NoRA vs each LoRA variant**")[1].split("**The crossover")[0]
    for row in rows:
        label = {"test PPL": "ΔPPL", "pass@1": "Δpass@1", "probe steps": "Δprobe steps"}[row[2]]
        for r, cell in zip((2, 4), row[3:], strict=True):
            line = next(
                x
                for x in section.splitlines()
                if x.startswith(f"| NoRA − LoRA α=32, r={r} | {label} |")
            )
            estimate = line.split(" | ")[5].split(" ")[0]
            assert f"({estimate}" in cell and "seeds" not in cell  # all seeds: none noted
            if cell.startswith("**"):
                assert f"| {cell[2:].split('**')[0]} is better |" in line
            else:
                assert cell.startswith("no difference") and "no difference" in line


def test_means_over_fewer_seeds_are_marked(study_dir, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(study_dir, partial)
    for r in (2, 4):  # the test stages only: both trainings are there
        (test_json,) = partial.glob(f"runs/logistic-map/nora/r{r}/*/s1/test.json")
        test_json.unlink()
    text = build_study_report(partial).read_text()
    glance = text.split("## At a glance")[1].split("## Compute plan")[0]
    assert glance.count("1 of 2 seeds") == 6  # each rank's PPL, pass@1 and probe cells
    spread = next(x for x in text.splitlines() if "spread of mean test PPL" in x)
    assert "NoRA" in spread and spread.count("(1 of 2 seeds)") == 1  # at r=2 only
    # r=4 runs at r=2's searched rate: its training is found there, not counted as left
    assert "- Left: 2 test stages and about 0 trainings" in text


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


# --- study v2's report, from synthetic study folders (tests/testing_study.py) ---------------

V2_VARIANTS = {
    "lora": {"method": "lora", "alpha": 32},
    "lora-alpha-r": {"method": "lora", "scale": 1.0},
    # 8/√16 = 32/16 and 8/√64 = 1: the same adapter as LoRA α=32 at r=16, as LoRA α=r at r=64
    "lora-rslora": {"method": "lora", "alpha": 8, "rslora": True},
    "nora": {"method": "nora"},
    "nora-identity": {"method": "nora", "activation": "identity"},
    "nora-relu": {"method": "nora", "activation": "relu"},
    "nora-no-dropout": {"method": "nora", "dropout": 0.0},
    "nora-module": {"method": "nora", "placement": "module"},
    "lora-dropout": {"method": "lora", "alpha": 32, "dropout": 0.1},
    "lora-nora-init": {"method": "lora", "scale": 1.0},  # here: LoRA α=r's adapter
    "nolora": {"method": "nolora"},
    "loran": {"method": "loran"},
}
# test KL per cell: LoRA α=32 at r=64 is the best LoRA cell; NoRA is clearly worse at r=4
# and at the same level at r=16 (a tie: only the runs' noise differs)
V2_LEVELS = {
    ("lora", 4): 0.0120, ("lora", 16): 0.0105, ("lora", 64): 0.0100,
    ("lora-alpha-r", 4): 0.0125, ("lora-alpha-r", 16): 0.0110, ("lora-alpha-r", 64): 0.0108,
    ("lora-rslora", 4): 0.0118, ("lora-rslora", 16): 0, ("lora-rslora", 64): 0,  # twins' copies
    ("nora", 4): 0.0200, ("nora", 16): 0.0100, ("nora", 64): 0.0095,
    # Table 2 and the siblings at r=16 only; NoRA-ReLU's level is set by `_borderline`
    ("nora-identity", 16): 0.0130, ("nora-no-dropout", 16): 0.0100,
    ("nora-module", 16): 0.0100,
    ("lora-dropout", 16): 0.0090,  # a LoRA, not the rank study's: not the best LoRA cell
    ("lora-nora-init", 16): 0, ("nolora", 16): 0.0102, ("loran", 16): 0.0160,
}  # fmt: skip
V2_SEEDS = [0, 1, 2]
RANK_STUDY = ("lora", "lora-alpha-r", "lora-rslora", "nora")
DATASET = "reasoning-mix"


def _borderline() -> float:
    """A NoRA-ReLU level whose raw p against NoRA at r=16 is in [0.03, 0.05): a win on its
    own, not after Holm over Table 2's five comparisons (two of them p ≈ 0: ×3 at least)."""
    from testing_study import per_example as synthetic

    nora = [synthetic(0.0100, (DATASET, "nora", 16, s), True) for s in V2_SEEDS]
    for step in range(1, 200):
        level = 0.0100 * (1 + step / 2000)
        relu = [synthetic(level, (DATASET, "nora-relu", 16, s), True) for s in V2_SEEDS]
        if 0.03 <= paired_difference(relu, nora, "kl").p_value < 0.05:
            return level
    raise AssertionError("no level gives a borderline p")


@pytest.fixture(scope="module")
def v2_report(tmp_path_factory):
    """A distillation study with the rank study, Table 2, the siblings, twins, spectra and
    controls: its folder and report text."""
    from testing_study import spec, write_study

    levels = {**V2_LEVELS, ("nora-relu", 16): _borderline()}
    config = spec(
        title="Study v2 (synthetic)",
        budget_cpu_hours=15,
        distill={"steps": 2, "lr": 1e-4},
        variants=V2_VARIANTS,
        ranks=[4, 16, 64],
        # Table 2 and the siblings at r=16 only (StudyConfig.variant_ranks)
        variant_ranks={v: [16] for v in V2_VARIANTS if v not in RANK_STUDY},
        seeds=V2_SEEDS,
    )
    root = write_study(
        tmp_path_factory.mktemp("v2"),
        config,
        lambda v, r, s: levels.get((v, r)),
        base_level=0.44,
        spectra=("lora", "lora-alpha-r", "lora-rslora", "nora", "nora-identity", "nolora"),
        controls=("lora", "lora-rslora", "nora"),
    )
    return root, build_study_report(root).read_text()


def _rows(text: str, start: str, end: str = "\n#") -> dict[str, list[str]]:
    """The comparison rows between `start` and the next heading, by their first cell."""
    part = text.split(start)[1].split(end)[0]
    rows = [x.split(" | ") for x in part.splitlines() if x.startswith("| ") and " − " in x]
    rows = [r for r in rows if r[0] != "| A − B"]  # the header
    return {r[0][2:]: r[1:] for r in rows}


def test_distillation_report_is_read_in_kl(v2_report):
    from nora.study.compare import primary

    root, text = v2_report
    assert text.startswith("# Study v2 (synthetic)\n") and "of the 15 budgeted" in text
    assert "Primary metric: **test KL**" in text and "| ΔKL |" in text
    # the header says how the teacher was made and how far it is from the base
    assert (
        f"  - {DATASET}'s teacher: 2 steps at lr 0.0001 on every weight of 2 modules, then each "
        "ΔW replaced by a seeded Gaussian matrix of 19× its Frobenius norm; validation NLL "
        "3.5000 (base) → 4.0000 (teacher); KL(teacher ‖ base) 0.4400 nats/position; ΔW "
        "effective rank 21–40, 90 % of its energy in 12–30 singular values.\n"
    ) in text
    assert "PPL" not in text  # no perplexity table, comparison or verdict
    res = StudyResults.load(root)
    kl = primary(res)
    assert kl.key == "kl" and kl.digits == 6  # 4 significant digits of the smallest, 0.0095
    best = np.mean([kl.of(t.per_example) for t in res.cell(DATASET, "lora", 64)])
    assert (
        "the best LoRA cell is LoRA α=32 r=64 (the lowest mean test KL of the LoRA variants at "
        f"any rank: {best:.6f})"
    ) in text
    assert "Does the effective rank predict test KL?" in text
    assert "pass@1" not in text  # the study generates nothing (n_gen = 0)
    # a run's KL as its test.json has it; the base's (read with its per-example KL too) stands
    # alone against every seed: no ± over identical values
    (test_json,) = root.glob(f"runs/{DATASET}/nora/r16/*/s0/test.json")
    t = json.loads(test_json.read_text())
    assert kl.of(res.cell(DATASET, "nora", 16)[0].per_example) == pytest.approx(t["test_kl"])
    base = kl.fmt(json.loads((root / f"runs/{DATASET}/base/test.json").read_text())["test_kl"])
    assert _rows(text, "**Each adapter vs the base model**")["NoRA − base, r=16"][3] == base


def test_crossover_names_the_rank_that_ties_the_best_lora_cell(v2_report):
    _, text = v2_report
    rows = _rows(text, "**The crossover question**", "\nThe smallest")
    assert list(rows) == ["NoRA r=4 − LoRA α=32 r=64", "NoRA r=16 − LoRA α=32 r=64",
                          "NoRA r=64 − LoRA α=32 r=64"]  # fmt: skip
    assert rows["NoRA r=4 − LoRA α=32 r=64"][-1] == "LoRA α=32 r=64 is better |"
    assert rows["NoRA r=16 − LoRA α=32 r=64"][-1].startswith("no difference (the interval")
    assert (
        "The smallest NoRA rank that ties the best LoRA cell (no winner after Holm) or beats it "
        "(NoRA better) is **r = 16** (ties it)."
    ) in text
    assert "*No difference* (a *tie*) means no winner after Holm" in text  # how it is read
    # the headline's spread of the rank study at r=16: rsLoRA is LoRA α=32 there, counted once
    spread = next(x for x in text.splitlines() if "spread of mean test KL" in x)
    assert "over the 3 finished variants" in spread and "rsLoRA" not in spread


def test_crossover_with_fewer_seeds_and_a_later_loss(tmp_path):
    """NoRA ties LoRA at r=16 on its one finished seed, and is worse again at r=64."""
    from testing_study import spec, write_study

    from nora.study.report.rank import _crossover

    def level(v, r, s):
        if v == "nora" and r == 16:
            return 3.0 if s == 0 else None
        return 3.0 if v == "lora" else 6.0

    root = write_study(tmp_path, spec(ranks=[4, 16, 64]), level, base_level=28.0)
    text = "\n".join(_crossover(StudyResults.load(root), DATASET))
    assert "(ties it, over 1 of 2 seeds); LoRA α=32 r=" in text
    assert text.rstrip().endswith("is better again at r = 64.")


def test_twins_the_runner_and_the_report_agree_on(v2_report):
    from nora.study.report.common import same_adapter

    res = StudyResults.load(v2_report[0])
    assert same_adapter(res, "lora-rslora", 16) == "lora" and same_adapter(res, "lora-rslora", 64)
    # a twin that does not run at a rank: the variant runs its own cell there
    res.config["variant_ranks"]["lora-alpha-r"] = [4, 16]
    assert (
        same_adapter(res, "lora-rslora", 64) is None
        and same_adapter(res, "lora-rslora", 16) == "lora"
    )


def test_table2_verdicts_are_holm_adjusted_within_the_table(v2_report):
    from nora.study.compare import fmt_p
    from nora.study.stats import holm

    root, text = v2_report
    rows = _rows(text, "### Table 2")
    res = StudyResults.load(root)
    ablations = ["nora-identity", "nora-relu", "nora-no-dropout", "nora-module", "lora-dropout"]
    raw = []
    for v in ablations:
        a, b = res.paired(DATASET, v, "nora", 16)
        raw.append(paired_difference([t.per_example for t in a], [t.per_example for t in b], "kl"))
    adjusted = holm([iv.p_value for iv in raw])
    names = ["NoRA-identity (σ = identity)", "NoRA-ReLU", "NoRA without dropout",
             "module-level NoRA (matched parameters)", "LoRA α=32 + input dropout 0.1"]  # fmt: skip
    assert sorted(rows) == sorted(f"{n} − NoRA, r=16" for n in names)  # the twin: not here
    for name, q in zip(names, adjusted, strict=True):
        assert rows[f"{name} − NoRA, r=16"][-2] == fmt_p(q)  # the Holm p column
    relu = rows["NoRA-ReLU − NoRA, r=16"]
    assert raw[1].p_value < 0.05 and raw[1].excludes_zero  # a win on its own ...
    assert relu[-1] == "no difference after Holm (adjusted p ≥ 0.05) |"  # ... not in the table
    assert rows["NoRA-identity (σ = identity) − NoRA, r=16"][-1] == "NoRA is better |"
    assert rows["NoRA-identity (σ = identity) − NoRA, r=16"][-2] == "< 0.001"
    # the A and B columns: mean ± std over the paired seeds
    kl = [t.per_example for t in res.cell(DATASET, "nora-relu", 16)]
    from nora.study.compare import primary

    assert relu[2] == primary(res).spread(kl) and " ± " in relu[2]


def test_twins_are_shown_once_and_compared_once(v2_report):
    _, text = v2_report
    table = next(x for x in text.splitlines() if x.startswith("| rsLoRA (test KL) |"))
    cells = table.split(" | ")[1:]
    assert cells[1] == "= LoRA α=32" and cells[2] == "= LoRA α=r |" and "lr 0.01" in cells[0]
    assert "- r=16: rsLoRA = LoRA α=32 (the same adapter: shown and compared once" in text
    assert "- r=16: LoRA with NoRA's init and scale = LoRA α=r" in text  # in Table 2 ...
    assert "- r=4: LoRA with NoRA's init" not in text  # ... where it ran
    assert "| NoRA − rsLoRA, r=4 |" in text
    for twin_row in ("NoRA − rsLoRA, r=16", "NoRA − rsLoRA, r=64", "rsLoRA − base, r=16",
                     "LoRA with NoRA's init and scale −"):  # fmt: skip
        assert f"| {twin_row}" not in text, twin_row
    glance = text.split("## At a glance")[1].split("## Compute plan")[0]
    row = next(x for x in glance.splitlines() if "| rsLoRA |" in x)
    assert row.split(" | ")[4:6] == ["= LoRA α=32", "= LoRA α=r |"]


def test_table2_siblings_and_spectra_sections(v2_report):
    root, text = v2_report
    siblings = _rows(text, "### Siblings: NoLoRA, LoRAN against NoRA and LoRA α=32")
    assert sorted(siblings) == sorted(
        f"{s} − {ref}, r=16" for s in ("NoLoRA", "LoRAN") for ref in ("NoRA", "LoRA α=32")
    )
    assert siblings["LoRAN − NoRA, r=16"][-1] == "NoRA is better |"
    for view in ("weight", "output", "latent"):
        assert (root / "figures" / f"effective_rank_{view}_{DATASET}.png").stat().st_size > 1000
        assert f"![{view} view: effective rank and AUC-90 vs rank]" in text
    assert "dashed: the untrained controls" in text and "| NoRA | 16 | weight |" in text
    from nora.study.report.spectra import _spectral_runs

    runs, controls = _spectral_runs(StudyResults.load(root), DATASET)  # what the figures draw
    assert {s["group"] for s in runs} == {
        "LoRA α=32",
        "LoRA α=r",
        "rsLoRA",
        "NoRA",
        "NoRA-identity (σ = identity)",
    }  # fmt: skip  (not NoLoRA, whose runs have spectra too)
    assert {(s["group"], s["r"]) for s in controls} == {
        (g, r) for g in ("LoRA α=32", "rsLoRA", "NoRA") for r in (4, 16, 64)
    }  # the figure's rsLoRA line runs through its twins' points
    # the controls table: rsLoRA's own adapter at r=4 only (at 16 and 64 it is a twin's)
    assert "| rsLoRA | 4 | weight |" in text
    assert "| rsLoRA | 16 |" not in text and "| rsLoRA | 64 |" not in text


def test_a_distillation_studys_searches_and_pilots_read_in_kl(v2_report, tmp_path):
    from nora.study.pilots import Pilot, RankCell
    from nora.study.report.overview import pilot_section
    from nora.study.report.plan import learning_rates
    from nora.study.results import Search

    res = StudyResults.load(v2_report[0])
    # a distilling run's validation loss is its KL to the teacher: ~4 significant digits
    res.searches.append(Search(DATASET, "lora", 16, [1e-3, 3.16e-3], [0.0081234, 0.0032111],
                               3.16e-3, True))  # fmt: skip
    lines = "\n".join(learning_rates(res, tmp_path))
    assert "| grid (val KL) |" in lines and "| 0.001 (0.008123), 0.00316 (0.003211) |" in lines
    cells = [RankCell(4, 3.16e-3, {0: 0.0036, 1: 0.0038}, {}),
             RankCell(128, 1e-3, {0: 0.0031, 1: 0.0032}, {})]  # fmt: skip
    change = Interval(-0.00055, -0.0007, -0.0004, (-0.0005, -0.0006))
    said = pilot_section([Pilot("pilot-distill", DATASET, "kl", cells, change, 1.0, None)])
    assert said[-2] == (
        f"- pilot-distill ({DATASET}): **shows a rank effect** (high − low ΔKL -0.000550 "
        "[-0.000700, -0.000400], seed spread 0.000200 (test KL))"
    )
    # a label pilot's change is in NLL, like its seed spread (pilots.load_pilot)
    nll = [RankCell(4, 3.16e-3, {0: 0.685, 1: 0.685}, {}), RankCell(128, 1e-2, {0: 0.683}, {})]
    iv = Interval(-0.0021, -0.0043, 0.0003, (-0.0021,))
    said = pilot_section([Pilot("pilot-logistic", "logistic-map", "nll", nll, iv, 1.0, None)])
    assert "high − low ΔNLL -0.0021 [-0.0043, +0.0003]" in said[-2] and "PPL" not in said[-2]


def test_cells_outside_a_variants_ranks_are_not_run_not_missing(v2_report):
    _, text = v2_report
    plan = text.split("## Compute plan")[1].split("\n## ")[0]
    # 4 rank-study variants at 3 ranks, 8 others at r=16 only, 3 seeds: all finished
    assert "Cells finished: **60 of 60** (datasets × 20 (variant, rank) cells" in plan
    assert "- Left: 0 test stages and about 0 trainings" in plan
    assert "| reasoning-mix | NoRA-ReLU | · | 3 | · |" in plan  # not "0": not run by design
    assert "| reasoning-mix | NoRA | 3 | 3 | 3 |" in plan
    assert "(·: not run by design, a rank outside the variant's `variant_ranks`.)" in plan
    assert "- r=16: LoRA with NoRA's init and scale = LoRA α=r" in text  # its one rank
    rows = _rows(text, "### Table 2")
    assert len(rows) == 5 and all(k.endswith(", r=16") for k in rows)  # no r=4 or r=64 row


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    """A plain (no distillation) study that generates: LoRA α=32 and NoRA at r=4 and 16, NoRA
    twice LoRA's perplexity at both; LoRA's pass@1 far above the majority-answer prior, NoRA's
    at it."""
    from testing_study import spec, write_study

    return write_study(
        tmp_path_factory.mktemp("plain"),
        spec(n_gen=20),
        lambda v, r, s: 3.0 if v == "lora" else 6.0,
        base_level=28.0,
        accuracy=lambda v, r, s: 0.9 if v == "lora" else 0.25,
        prior=0.25,
    )


def test_plain_study_none_crossover_prior_and_no_v2_sections(plain_dir):
    from nora.study.compare import PPL, primary
    from nora.study.report.ablations import siblings, table2
    from nora.study.report.overview import header
    from nora.study.report.rank import _crossover, _prior, _table

    res = StudyResults.load(plain_dir)
    assert primary(res) is PPL
    crossover = "\n".join(_crossover(res, DATASET))
    assert "No NoRA rank ties or beats the best LoRA cell: LoRA α=32 r=" in crossover
    assert "better than NoRA at every rank compared (r = 4, 16)." in crossover
    assert table2(res, DATASET) == [] and siblings(res, DATASET) == []
    assert "| majority answer per family (pass@1) | 25.0% |" in _table(res, DATASET)
    prior = {k: v[-1] for k, v in _rows("\n".join(_prior(res, DATASET)), "prior**").items()}
    assert prior == {
        "LoRA α=32 − majority answer, r=4": "above the prior |",
        "LoRA α=32 − majority answer, r=16": "above the prior |",
        "NoRA − majority answer, r=4": "not above the prior |",
        "NoRA − majority answer, r=16": "not above the prior |",
    }
    del res.config["title"]  # a study saved before the field existed: the default title
    assert header(res)[0] == "# NoRA vs LoRA: the rank-scaling study (issue 13)"


def test_a_rank_study_variant_at_some_ranks_only(plain_dir):
    from nora.study.report.overview import glance
    from nora.study.report.rank import _crossover, _table, nora_vs_lora

    res = StudyResults.load(plain_dir)
    res.config["variant_ranks"] = {"nora": [16]}  # its r=4 runs: outside its ranks now
    nora = next(x for x in _table(res, DATASET) if x.startswith("| NoRA (test PPL) |"))
    assert nora.split(" | ")[1] == "·"
    vs = nora_vs_lora(res, DATASET)
    assert {c.pair.where for c in vs} == {"r=16"}
    glance = glance(res, {DATASET: vs})
    row = next(x for x in glance if x.startswith(f"| {DATASET} | LoRA α=32 | test PPL |"))
    assert row.split(" | ")[3] == "·" and row.split(" | ")[4].startswith("**LoRA α=32** (+")
    assert "(·: not run by design" in "\n".join(glance)
    assert "NoRA r=4" not in "\n".join(_crossover(res, DATASET))


def test_report_pilots_option(plain_dir, tmp_path):
    from typer.testing import CliRunner

    from nora.cli import app
    from nora.study.pilots import load_pilot, pilot_table

    study = tmp_path / "study"
    shutil.copytree(plain_dir, study)
    pilots = []
    for name in ("pilot-distill", "pilot-logistic"):  # the exported pilots, copied: read-only
        shutil.copytree(f"results/study-v2/{name}", tmp_path / name)
        pilots.append(tmp_path / name)
    runner = CliRunner()
    bad = runner.invoke(app, ["report", str(study), "--pilots", str(pilots[0]), str(tmp_path)])
    assert bad.exit_code == 2 and f"{tmp_path} is not a pilot folder" in bad.output
    assert "Traceback" not in bad.output and not (study / "report.md").exists()  # none written
    for args in (["--pilots"], [str(pilots[0])]):  # no folders after --pilots; folders, no flag
        assert runner.invoke(app, ["report", str(study), *args]).exit_code == 2
    ok = runner.invoke(app, ["report", str(study), "--pilots", *map(str, pilots)])
    assert ok.exit_code == 0, ok.output
    text = (study / "report.md").read_text()
    section = text.split("## Step 1: pilots")[1].split("\n## ")[0]
    loaded = [load_pilot(p) for p in pilots]
    assert pilot_table(loaded) in section
    for p in loaded:
        said = next(x for x in section.splitlines() if x.startswith(f"- {p.name} ({p.dataset}): "))
        if p.change is None:
            assert said.endswith("not decided yet (fewer than two ranks finished)")
        else:
            assert ("**shows a rank effect**" in said) == p.shows_rank_effect
    assert "## Step 1: pilots" not in build_study_report(study).read_text()  # without pilots


def test_effective_rank_figure_draws_controls_beside_their_variant(monkeypatch, tmp_path):
    from testing_study import analysis

    from nora.study import plots

    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or Path(path))
    runs = [{**analysis(m, r, r / 4), "group": g} for g, m in (("LoRA", "lora"), ("NoRA", "nora"))
            for r in (4, 16)]  # fmt: skip
    controls = [{**analysis("nora", r, r / 2), "group": "NoRA"} for r in (4, 16)]
    plots.plot_effective_rank_vs_rank(runs, tmp_path / "x.png", "output", controls, auc90=True)
    er, auc = figs[0].axes
    assert "Effective rank" in er.get_title() and "AUC-90" in auc.get_title()
    for ax in (er, auc):
        lines = {c.get_label(): c.lines[0] for c in ax.containers}  # the errorbar lines
        trained, untrained = lines["NoRA"], lines["NoRA (untrained)"]
        assert untrained.get_color() == trained.get_color() != lines["LoRA"].get_color()
        assert untrained.get_linestyle() == "--" and trained.get_linestyle() == "-"
