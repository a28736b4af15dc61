"""Sweeps on a tiny local model: the grid runs, resumes by skipping finished runs, survives a
failing run, and the report builds with its figures and tables."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from conftest import make_tokenizer, save_model_dir
from transformers import AutoModelForCausalLM

from nora.study.sweep.report import build_report
from nora.study.sweep.run import SweepConfig, SweepError, run_sweep


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("tiny-model"), layers=4)


def sweep_file(tmp_path, model_dir, **over):
    cfg = {
        "model": str(model_dir),
        "datasets": ["logistic-map"],
        "top_layers": 2,
        "n_val": 4,
        "train": {
            "max_steps": 3,
            "batch_size": 4,
            "n_train": 12,
            "n_eval": 4,
            "max_len": 300,
        },
        "variants": {"lora": {"method": "lora", "alpha": 32}, "nora": {"method": "nora"}},
        "ranks": [2, 4],
        "seeds": [0, 1],
        "lr_grid": {"values": [1e-3, 1e-2], "rank": 2},
        "ablations": {
            "rank": 4,
            "dataset": "logistic-map",
            "base": "nora",
            "variants": {"identity": {"method": "nora", "activation": "identity"}},
        },
        "probe": {
            "variants": ["lora", "nora"],
            "rank": 2,
            "n_train": 12,
            "n_test": 2,
            "steps": 2,
            "max_new_tokens": 8,
        },
        "efficiency": {"rank": 2, "batch": 2, "seq": 8, "repeats": 2},
        "analysis_tokens": 64,
    }
    cfg.update(over)
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(cfg))
    return str(f)


def test_sweep_resume_and_report(tmp_path, model_dir):
    spec = sweep_file(tmp_path, model_dir)
    out = tmp_path / "out"
    logs: list[str] = []
    res = run_sweep(spec, out, log=logs.append)
    assert res["failed"] == 0
    results = sorted(out.glob("runs/logistic-map/*/r*/s*/result.json"))
    assert len(results) == 2 * 2 * 2  # variants x ranks x seeds
    r = json.loads(results[0].read_text())
    assert {"ppl", "analysis", "lr", "trainable_params"} <= set(r)
    chosen = json.loads((out / "lr" / "chosen-logistic-map.json").read_text())["lr"]
    lr_runs = [
        json.loads(f.read_text()) for f in sorted(out.glob("lr/logistic-map/*/lr*/result.json"))
    ]
    assert len(lr_runs) == 2 * 2  # variants x learning rates
    for variant in ("lora", "nora"):  # the argmin of validation perplexity, per variant
        scores = {x["lr"]: x["ppl"] for x in lr_runs if x["variant"] == variant}
        assert scores.keys() == {1e-3, 1e-2} and chosen[variant] == min(scores, key=scores.get)
    assert all(x["split"] == "validation" for x in lr_runs)
    assert all(
        json.loads(f.read_text())["lr"] == chosen[json.loads(f.read_text())["variant"]]
        for f in results
    )
    # each run was scored on the split it names: re-score its saved adapter on both splits
    val, test = held_out_splits(model_dir)
    for run_dir, split in [
        (out / "lr/logistic-map/nora/lr0.01", "validation"),
        (results[0].parent, "test"),
    ]:
        saved = json.loads((run_dir / "result.json").read_text())
        assert saved["split"] == split
        on_val, on_test = (heldout_ppl(model_dir, run_dir / "adapter", s) for s in (val, test))
        assert saved["ppl"] == pytest.approx(on_val if split == "validation" else on_test, rel=1e-6)
        assert on_val != pytest.approx(on_test, rel=1e-4)  # the splits tell apart
    assert len(list(out.glob("probe/*/s*/result.json"))) == 4
    assert (out / "efficiency" / "result.json").is_file()
    # a second call skips everything that finished
    logs.clear()
    run_sweep(spec, out, log=logs.append)
    assert not any(line.startswith("done") for line in logs)
    report = build_report(out)
    text = report.read_text()
    assert_tables_match_results(text, out)
    for needle in (
        "## logistic-map",
        "NoRA vs LoRA",
        "r=2",
        "r=4",
        "Ablations",
        "identity",
        "logistic map",
        "Efficiency",
        "Learning rates",
        "Machine",
    ):
        assert needle in text, needle
    for png in (
        "ppl_vs_rank_logistic-map.png",
        "spectrum_logistic-map.png",
        "effective_rank_logistic-map.png",
        "cumulative_energy_logistic-map.png",
    ):
        assert (out / "figures" / png).stat().st_size > 1000


def held_out_splits(model_dir):
    """The sweep's validation and test examples, rebuilt as `sweep_file` defines them."""
    from nora.data import build_splits

    tok = make_tokenizer()
    _, held, _ = build_splits(tok, "logistic-map", 12, 4 + 4, 300, seed=0)
    return held[:4], held[4:]


def heldout_ppl(model_dir, adapter_dir, split) -> float:
    import nora
    from nora.data import batches
    from nora.evaluate import perplexity

    tok = make_tokenizer()
    model = nora.load_adapter(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
    return perplexity(model, batches(split, tok.pad_token_id, 4)).ppl


def table(text: str, caption: str) -> dict[str, list[str]]:
    """The markdown table after the line starting with `caption`: first cell -> other cells."""
    lines = text[text.index(caption) :].splitlines()[2:]  # caption, blank line, then the table
    rows = {}
    for line in lines[2:]:  # after the header and |---|
        if not line.startswith("|"):
            break
        first, *cells = [c.strip() for c in line.strip("|").split("|")]
        rows[first] = cells
    return rows


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def assert_tables_match_results(text: str, out) -> None:
    """The report's numbers are the result files' numbers (mean ± std over the seeds)."""
    runs = [json.loads(f.read_text()) for f in out.glob("runs/logistic-map/*/r*/s*/result.json")]
    ppl = table(text, "Test perplexity, mean ± std over seeds")
    base = json.loads((out / "runs/logistic-map/base/result.json").read_text())["ppl"]
    assert ppl["base model"][0] == f"{base:.3f}"
    for variant in ("lora", "nora"):
        expected = [
            mean_std([x["ppl"] for x in runs if x["variant"] == variant and x["r"] == r])
            for r in (2, 4)
        ]
        assert ppl[variant] == expected, variant
    lr_rows = [line for line in text.splitlines() if line.count("|") == 4 and "| lr" not in line]
    lr_table = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lr_rows}
    for f in out.glob("lr/logistic-map/*/lr*/result.json"):
        x = json.loads(f.read_text())
        assert lr_table[(x["variant"], f"{x['lr']:g}")].split("|")[3].strip() == f"{x['ppl']:.3f}"


def test_a_failing_run_is_reported_not_fatal(tmp_path, model_dir):
    # rank 40 > the tiny v_proj's width 32: refused for LoRA, so those runs fail; NoRA runs on
    spec = sweep_file(
        tmp_path,
        model_dir,
        ranks=[40],
        seeds=[0],
        lr_grid=None,
        ablations=None,
        probe=None,
        efficiency=None,
    )
    out = tmp_path / "out"
    with pytest.warns(UserWarning):
        res = run_sweep(spec, out, log=lambda *_: None)
    assert res["failed"] == 1
    err = json.loads((out / "runs/logistic-map/lora/r40/s0/error.json").read_text())
    assert "exceeds min" in err["error"]
    assert (out / "runs/logistic-map/nora/r40/s0/result.json").is_file()
    assert "failed: runs/logistic-map/lora/r40/s0" in build_report(out).read_text()


def test_bad_sweep_files(tmp_path, model_dir):
    with pytest.raises(SweepError, match="neither a preset"):
        SweepConfig.load(str(tmp_path / "missing.yaml"))
    with pytest.raises(SweepError, match=r"unknown config fields \['colour'\] in sweep"):
        SweepConfig.load(sweep_file(tmp_path, model_dir, colour="red"))
    with pytest.raises(SweepError, match="did you mean 'seeds'"):
        SweepConfig.load(sweep_file(tmp_path, model_dir, seed=[0, 1]))
    with pytest.raises(
        SweepError, match="sweep.ranks must look like '20-29' or '1,3,5', got 'big'"
    ):
        SweepConfig.load(sweep_file(tmp_path, model_dir, ranks="big"))
    with pytest.raises(SweepError, match="variant 'x'.*unknown method"):
        SweepConfig.load(sweep_file(tmp_path, model_dir, variants={"x": {"method": "dora"}}))
    spec = sweep_file(
        tmp_path,
        model_dir,
        ranks=[2],
        seeds=[0],
        lr_grid=None,
        ablations=None,
        probe=None,
        efficiency=None,
        variants={"nora": {"method": "nora"}},
    )
    run_sweep(spec, tmp_path / "o", log=lambda *_: None)
    spec2 = sweep_file(
        tmp_path,
        model_dir,
        ranks=[4],
        seeds=[0],
        lr_grid=None,
        ablations=None,
        probe=None,
        efficiency=None,
        variants={"nora": {"method": "nora"}},
    )
    with pytest.raises(SweepError, match="another config"):
        run_sweep(spec2, tmp_path / "o", log=lambda *_: None)


def test_presets_are_valid():
    for name in ("paper-mini", "paper"):
        cfg = SweepConfig.load(name)
        assert "nora" in cfg.variants and "lora" in cfg.variants


def test_probe_counts_correct_steps_and_collapse():
    from nora.data import logistic_steps, probe_logistic

    truth = logistic_steps(3.7, 0.25, 5)
    good = "\n".join(f"x{i} = {v:.4f}" for i, v in enumerate(truth, 1))
    assert probe_logistic(good, 3.7, 0.25, 5) == {
        "correct_steps": 5,
        "steps": 5,
        "all_correct": True,
        "collapse": 0,
        "n_values": 5,
    }
    stuck = "\n".join(f"x{i} = {truth[0]:.4f}" for i in range(1, 6))
    p = probe_logistic(stuck, 3.7, 0.25, 5)
    assert p["correct_steps"] == 1 and p["collapse"] == 4 and not p["all_correct"]
