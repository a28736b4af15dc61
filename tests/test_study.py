"""The study runner on a tiny local model: learning-rate search extends its grid until the
optimum is interior, runs resume by skipping finished stages, per-example scores are kept."""

from __future__ import annotations

import json
import math
import time
import types

import pytest
import torch
import yaml
from conftest import save_model_dir

import nora
from nora.study.runner import (
    STUDY_PRESETS,
    LRSearch,
    StudyConfig,
    StudyError,
    load_study,
    lr_of,
    plan,
    run_study,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("tiny-model"), layers=4)


def study_dict(model_dir, **over):
    cfg = {
        "study": True,
        "model": str(model_dir),
        "datasets": ["logistic-map"],
        "top_layers": 2,
        "train": {"max_steps": 3, "batch_size": 4, "n_train": 12, "max_len": 300},
        "n_val": 4,
        "n_test": 4,
        "n_gen": 2,
        "max_new_tokens": {"logistic-map": 4},
        "variants": {"lora": {"method": "lora", "alpha": 32}, "nora": {"method": "nora"}},
        "ranks": [2, 4],
        "seeds": [0, 1],
        "lr_search": {"start": [-4, -3], "default_rank": 2, "max_values": 4},
        "analysis_tokens": 64,
    }
    cfg.update(over)
    return cfg


def test_lr_grid_is_half_decades():
    assert [lr_of(k) for k in (-6, -5, -4)] == [1e-3, 0.00316, 1e-2]


def test_source_rank_is_nearest_searched_rank():
    s = LRSearch(ranks={"lora": [4, 16, 128]})
    assert [s.source_rank("lora", r) for r in (4, 16, 64, 128)] == [4, 16, 128, 128]
    assert s.source_rank("nora", 128) == 16


def test_plan_puts_the_headline_comparison_first():
    cfg = StudyConfig.from_dict(STUDY_PRESETS["study"])
    steps = plan(cfg)
    assert steps[:4] == [
        ("lr", "reasoning-mix", "lora", 16),
        ("lr", "reasoning-mix", "nora", 16),
        ("cell", "reasoning-mix", "lora", 16, 0),
        ("cell", "reasoning-mix", "nora", 16, 0),
    ]
    assert len(steps) == len(set(steps))
    # every headline cell, every seed, both datasets; every variant's search at r=16
    cells = {s[1:] for s in steps if s[0] == "cell"}
    assert len(cells) == 2 * 4 * 4 * 3
    assert {s[1:] for s in steps if s[0] == "lr" and s[3] == 16} == {
        (d, v, 16) for d in cfg.datasets for v in cfg.variants
    }
    # tier 1: LoRA vs NoRA at r=16 with all seeds (and the base model) on both datasets
    # before any other rank or variant
    tier1 = {
        ("cell", d, v, 16, s) for d in cfg.datasets for v in ("lora", "nora") for s in (0, 1, 2)
    } | {("base", d) for d in cfg.datasets}
    end = max(steps.index(s) for s in tier1)
    assert all(s in tier1 or s[0] == "lr" and s[3] == 16 for s in steps[: end + 1])
    # a search comes before the cells that use it; seed 0 before the other seeds
    for d in cfg.datasets:
        assert steps.index(("lr", d, "lora", 4)) < steps.index(("cell", d, "lora", 4, 0))
        assert steps.index(("cell", d, "nora", 4, 0)) < steps.index(("cell", d, "nora", 4, 1))
    # one worker per dataset: the same steps, split
    split = [plan(cfg, [d]) for d in cfg.datasets]
    assert sorted(split[0] + split[1]) == sorted(steps)
    assert all(s[1] == "math" for s in split[1])


def test_the_v2_study_searches_every_rank_and_runs_the_crossover_first():
    cfg = StudyConfig.from_dict(STUDY_PRESETS["study-v2"])
    steps = plan(cfg)
    # each variant's rate is searched at every rank it runs at
    for v in cfg.variants:
        searched = {s[3] for s in steps if s[0] == "lr" and s[2] == v}
        ran = {s[3] for s in steps if s[0] == "cell" and s[2] == v}
        assert searched == ran == set(cfg.ranks_of(v)), v
    # LoRA α=32 and NoRA at every rank, every seed, before any other variant's run
    crossover = [s for s in steps if s[0] in ("lr", "cell") and s[2] in ("lora", "nora")]
    assert len(crossover) == 2 * 4 + 2 * 4 * 3
    assert max(map(steps.index, crossover)) < min(
        steps.index(s) for s in steps if s[0] in ("lr", "cell") and s[2] not in ("lora", "nora")
    )
    assert cfg.ranks_of("nolora") == [16] and cfg.ranks_of("nora-identity") == [16, 128]
    assert cfg.distill["delta"] == "random" and cfg.controls


def test_the_v2_probe_study_trains_lora_and_nora_on_the_logistic_map_and_probes_them():
    from nora.data import load_examples

    cfg = StudyConfig.from_dict(STUDY_PRESETS["study-v2-probe"])
    steps = plan(cfg)
    assert {s[1:] for s in steps if s[0] == "lr"} == {
        ("logistic-map", v, r) for v in ("lora", "nora") for r in (16, 128)
    }
    assert sum(s[0] == "cell" for s in steps) == 2 * 2 * 3 and not cfg.distill
    # the probed problems: held-out logistic-map iterations, every one with its answer
    held = load_examples("logistic-map", cfg.n_val + cfg.n_test, 0)[cfg.n_val :]
    assert sum(e.answer is not None for e in held) >= cfg.n_gen == 100


def test_a_variant_runs_only_at_its_ranks():
    spec = {
        **STUDY_PRESETS["study"],
        "datasets": ["reasoning-mix"],
        "variants": {"lora": {"method": "lora"}, "nora-relu": {"method": "nora"}},
        "variant_ranks": {"nora-relu": [16, 128]},
        "first": ["lora"],
        "lr_search": {"ranks": {"lora": [4, 128], "nora-relu": [16, 128]}},
        "controls": True,
    }
    steps = plan(StudyConfig.from_dict(spec))
    ran = {(s[0], s[2], s[3]) for s in steps if s[0] != "base"}
    assert {r for kind, v, r in ran if v == "nora-relu"} == {16, 128}
    assert {r for kind, v, r in ran if v == "lora"} == {4, 16, 64, 128}
    assert ("lr", "nora-relu", 16) in ran and ("control", "nora-relu", 64) not in ran
    for bad, match in (
        ({"nora": [16]}, r"names unknown variants \['nora'\]"),
        ({"nora-relu": [32]}, "must be some of the study's ranks"),
        ({"nora-relu": []}, "must be some of the study's ranks"),
    ):
        with pytest.raises(StudyError, match=match):
            StudyConfig.from_dict({**spec, "variant_ranks": bad})


@pytest.mark.parametrize(
    "variant, found, r, start",
    [
        # LoRA α=32 (s·r = 32 at every rank): r^(1/3), the pilots' measurement, 32x the rank is
        # one half-decade up (3.16e-3 at r=4, 1e-2 at r=128 in both pilots)
        ("lora", {4: -5}, 128, [-5, -4, -3]),
        ("nora", {128: -5}, 4, [-5, -4, -3]),  # s fixed: r^(-1/6), 32x down: a half-decade up
        # scale 1 (NoRA's default, LoRA α=r): 8x the rank, 8^(-1/6): 0.3 of a half-decade
        ("lora-alpha-r", {16: -4}, 128, [-5, -4, -3]),
        # rsLoRA 8/√r: (1/√8)^(-1/2)·8^(-1/6) = 8^(1/12): no shift either
        ("lora-rslora", {16: -5}, 128, [-6, -5, -4]),
        # the nearest finished rank in log2 is the one carried: r=64 takes r=128's
        ("nora", {4: -2, 128: -5}, 64, [-6, -5, -4]),
    ],
)
def test_a_rate_carries_across_ranks_by_scale_and_rank(tmp_path, variant, found, r, start):
    from nora.study.runner import Study

    study = Study(StudyConfig.from_dict(STUDY_PRESETS["study"]), tmp_path)
    for r0, k in found.items():
        study.rates.record("math", variant, r0, [k], {k: 1.0}, k)
    assert study._start("math", variant, r) == start
    # a search on another dataset carries its k to this one
    assert study._start("reasoning-mix", variant, r) == start


def test_a_search_keeps_the_start_its_first_worker_chose(tmp_path):
    """The carried start changes once the search it carries from finishes; a second worker
    (another Study on the folder) still gets the first worker's points."""
    from nora.study.runner import Study

    cfg = StudyConfig.from_dict(STUDY_PRESETS["study"])
    first, second = Study(cfg, tmp_path), Study(cfg, tmp_path)
    assert first.search_start("math", "lora", 128) == [-6, -5, -4]  # the configured start
    first.rates.record("math", "lora", 4, [-4], {-4: 1.0}, -4)  # r=4 finishes meanwhile
    assert second._start("math", "lora", 128) == [-4, -3, -2]  # a fresh guess would differ
    assert second.search_start("math", "lora", 128) == [-6, -5, -4]
    saved = json.loads((tmp_path / "lr_choices.json").read_text())
    assert saved["k"] == {"math": {"lora": {"4": -4}}}  # record() keeps `started`, and back
    assert saved["started"] == {"math": {"lora": {"128": [-6, -5, -4]}}}


def test_an_ablation_starts_at_the_rate_of_the_variant_it_is_like(tmp_path):
    from nora.study.runner import Study

    spec = {
        **STUDY_PRESETS["study"],
        "variants": {
            "nora": {"method": "nora"},
            "nora-relu": {"method": "nora", "activation": "relu"},
            "lora-dropout": {"method": "lora", "alpha": 32, "dropout": 0.1},
        },
        "first": ["nora"],
        "lr_search": {"like": {"nora-relu": "nora", "lora-dropout": "nora"}},
    }
    study = Study(StudyConfig.from_dict(spec), tmp_path)
    assert study._start("math", "nora-relu", 16) == [-6, -5, -4]  # nothing finished yet
    study.rates.record("math", "nora", 16, [-4], {-4: 1.0}, -4)
    assert study._start("math", "nora-relu", 16) == [-5, -4, -3]
    assert study._start("math", "nora-relu", 128) == [-5, -4, -3]  # 8^(-1/6): no shift
    # LoRA α=32 at r=16 has s = 2 against NoRA's 1: lr x 2^(-1/2), 0.3 of a half-decade
    assert study._start("math", "lora-dropout", 16) == [-5, -4, -3]
    study.rates.record("math", "nora-relu", 16, [-3], {-3: 1.0}, -3)  # its own, once it has it
    assert study._start("math", "nora-relu", 16) == [-4, -3, -2]
    with pytest.raises(StudyError, match=r"lr_search.like` names unknown variants \['lora'\]"):
        StudyConfig.from_dict({**spec, "lr_search": {"like": {"nora-relu": "lora"}}})


def test_variant_specific_search_start():
    s = LRSearch(start={"nora": [-5, -4, -3]})
    assert s.start_of("nora") == [-5, -4, -3] and s.start_of("lora") == [-6, -5, -4]
    assert LRSearch(start=[-4, -3]).start_of("nora") == [-4, -3]


def test_bad_study_files(tmp_path, model_dir):
    with pytest.raises(
        StudyError, match=r"unknown config fields \['n_tset'\] in study.*did you mean 'n_test'"
    ):
        StudyConfig.from_dict(study_dict(model_dir, n_tset=300))
    with pytest.raises(StudyError, match="study.n_test must be an int, got 'many'"):
        StudyConfig.from_dict(study_dict(model_dir, n_test="many"))
    with pytest.raises(StudyError, match=r"lr_search.start must be .*, got \{'nora': 'high'\}"):
        StudyConfig.from_dict(study_dict(model_dir, lr_search={"start": {"nora": "high"}}))
    with pytest.raises(StudyError, match="unknown config fields .'begin'. in study.lr_search"):
        StudyConfig.from_dict(study_dict(model_dir, lr_search={"begin": [-5]}))
    per_variant = StudyConfig.from_dict(
        study_dict(model_dir, lr_search={"start": {"nora": [-5, -4]}})
    )
    assert per_variant.lr_search.start_of("nora") == [-5, -4]
    with pytest.raises(StudyError, match="unknown train setting 'steps' .did you mean 'max_steps'"):
        StudyConfig.from_dict(study_dict(model_dir, train={"steps": 3}))
    with pytest.raises(StudyError, match="variant 'x'"):
        StudyConfig.from_dict(study_dict(model_dir, variants={"x": {"method": "nope"}}))
    for bad in (0, -2.0):
        with pytest.raises(StudyError, match="budget_cpu_hours` must be a number > 0"):
            StudyConfig.from_dict(study_dict(model_dir, budget_cpu_hours=bad))
    with pytest.raises(StudyError, match="budget_cpu_hours must be a number, got True"):
        StudyConfig.from_dict(study_dict(model_dir, budget_cpu_hours=True))
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump(study_dict(model_dir)))
    assert isinstance(load_study(str(f)), StudyConfig)
    f.write_text(yaml.safe_dump({"variants": {}}))  # not a study: the sweep loader's business
    assert load_study(str(f)) is None
    with pytest.raises(StudyError, match=r"no dataset\(s\) \['math'\]"):
        run_study(StudyConfig.from_dict(study_dict(model_dir)), tmp_path / "o", datasets=["math"])


def test_study_searches_resumes_and_keeps_per_example_scores(tmp_path, model_dir):
    cfg = StudyConfig.from_dict(study_dict(model_dir))
    out = tmp_path / "out"
    logs: list[str] = []
    res = run_study(cfg, out, log=logs.append)
    assert res["failed"] == 0
    choices = json.loads((out / "lr_choices.json").read_text())
    for s in choices["searches"]:
        nll = dict(zip(s["grid"], s["val_nll"], strict=True))
        assert s["best_lr"] == min(nll, key=nll.get)
        # the optimum is interior unless the grid hit max_values
        assert s["interior"] or len(s["grid"]) == 4
        assert s["grid"] == sorted(s["grid"])
    tests = sorted(out.glob("runs/logistic-map/*/r*/lr*/s*/test.json"))
    assert len(tests) == 2 * 2 * 2  # variants x ranks x seeds
    t = json.loads(tests[0].read_text())
    per = t["per_example"]
    assert len(per["nll"]) == len(per["tokens"]) == t["n_test"] > 0
    assert math.isclose(t["test_nll"], sum(per["nll"]) / sum(per["tokens"]))
    assert len(per["correct"]) == t["n_gen"] == 2
    # the logistic-map probe (paper Table 1) of each generated problem, here all of them
    from nora.data import load_examples, probe_logistic

    problems = load_examples("logistic-map", 8, 0)[4:6]  # after the 4 validation examples
    want = [
        probe_logistic(o, e.meta["r"], e.meta["x0"], e.meta["steps"])
        for e, o in zip(problems, t["samples"], strict=True)
    ]
    assert per["correct_steps"] == [w["correct_steps"] for w in want]
    assert per["collapse"] == [w["collapse"] for w in want]
    assert "analysis" in t and (tests[0].parent / "adapter").is_dir()
    assert not (tests[0].parent / "checkpoints").exists()
    curve = [json.loads(x) for x in (tests[0].parent / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in x for x in curve)
    base = json.loads((out / "runs/logistic-map/base/test.json").read_text())
    assert len(base["per_example"]["nll"]) == t["n_test"]
    # a second call trains nothing
    logs.clear()
    run_study(cfg, out, log=logs.append)
    assert not any(line.startswith("done") for line in logs)
    # the files a report needs, without adapter weights
    from nora.study.runner import export_results

    n = export_results(out, tmp_path / "exported")
    assert n == sum(1 for f in (tmp_path / "exported").rglob("*") if f.is_file())  # one per file
    assert not list((tmp_path / "exported").rglob("*.safetensors"))
    assert len(list((tmp_path / "exported").rglob("test.json"))) == len(tests) + 1  # + base
    assert (tmp_path / "exported" / "study.json").is_file()
    cfgs = list((tmp_path / "exported").rglob("adapter_config.json"))
    assert cfgs and all(c.parent.name.startswith("s") for c in cfgs)  # beside val.json
    assert export_results(out, tmp_path / "exported") == 0  # nothing new
    # a run still training (no finished stage yet) is not exported
    busy = out / "runs/logistic-map/nora/r2/lr9.99/s0"
    busy.mkdir(parents=True)
    (busy / "train_config.json").write_text("{}")
    (busy / "metrics.jsonl").write_text("")
    assert export_results(out, tmp_path / "exported") == 0
    with pytest.raises(StudyError, match="another config"):
        run_study(StudyConfig.from_dict(study_dict(model_dir, seeds=[0])), out, log=logs.append)


def test_paper_preset_dry_run_on_the_meta_device():
    """The `paper` preset (Llama-3-8B) builds every run on the meta device: no download."""
    from transformers import LlamaConfig

    from nora.study.sweep.run import SweepConfig, dry_run

    # Meta-Llama-3-8B's published architecture (config.json on the Hub)
    llama3_8b = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    cfg = SweepConfig.load("paper")
    rows = dry_run(cfg, llama3_8b)
    assert len(rows) == sum(len(cfg.ranks_of(v)) for v in cfg.variants)
    by = {(x["variant"], x["r"]): x for x in rows}
    # LoRA on q_proj (4096 -> 4096) and v_proj (4096 -> 1024) of 32 layers: r * 13312 * 32,
    # the count PEFT reports for this model and target set
    for r in cfg.ranks:
        assert by[("lora", r)]["trainable_params"] == r * (4096 + 4096 + 4096 + 1024) * 32
        assert by[("nora", r)]["trainable_params"] == by[("lora", r)]["trainable_params"]
    assert all(x["modules"] == 64 for x in rows)


def test_the_probe_counts_each_generated_problems_correct_iterations(tmp_path, model_dir):
    from nora.data import logistic_steps
    from nora.study.context import DataContext

    c = DataContext(str(model_dir), "logistic-map", 8, 2, 3, 300, 2, cache_dir=tmp_path)

    def lines(m, wrong_from=None):  # a completion of problem m, off by 0.01 from `wrong_from`
        xs = logistic_steps(m["r"], m["x0"], m["steps"])
        xs = [x + 0.01 * (wrong_from is not None and i >= wrong_from) for i, x in enumerate(xs)]
        return "\n".join(f"x{i} = {x:.4f}" for i, x in enumerate(xs, 1))

    problems = c.gen_examples(2)
    first, second = (e.meta for e in problems)
    got = c.probe(problems, [lines(first), lines(second, wrong_from=2)])
    assert got["correct_steps"] == [first["steps"], 2] and got["collapse"] == [0, 0]


def test_prefix_cache_is_kept_on_disk_and_reused(tmp_path, model_dir, monkeypatch):
    from nora.prefix_cache import PrefixCache
    from nora.study.context import DataContext

    def make():
        return DataContext(str(model_dir), "logistic-map", 8, 2, 3, 300, 2, cache_dir=tmp_path)

    first = make()
    assert first.prefix is not None and len(list(tmp_path.glob("prefix-*.safetensors"))) == 1

    encoded = []
    real = PrefixCache.encode

    def counting(self, features, *a, **k):
        encoded.append(len(features))
        return real(self, features, *a, **k)

    monkeypatch.setattr(PrefixCache, "encode", counting)
    second = make()
    assert encoded == [1]  # only `verify`'s own check example ran through the lower layers
    pairs = zip(first.train_set + first.test_set, second.train_set + second.test_set, strict=True)
    for a, b in pairs:
        assert torch.equal(first.prefix.hidden[id(a)], second.prefix.hidden[id(b)])
    # batches carry the stored states
    b = second.batches(second.test_set[:2], 2)[0]
    assert b["inputs_embeds"].shape[:2] == b["input_ids"].shape


def test_runner_stages_skip_when_done_and_record_failures(tmp_path):
    from nora.study.context import Runner

    logs, calls = [], []
    runner = Runner(tmp_path, log=logs.append)

    def boom():
        calls.append("boom")
        raise RuntimeError("diverged")

    out = tmp_path / "a"
    assert runner.guarded(out, out / "val.json", boom, "train a", retry_failed=False) is None
    err = json.loads((out / "error.json").read_text())
    assert err["error"] == "RuntimeError: diverged" and "Traceback" in err["traceback"]
    assert runner.failed == 1 and logs[-1] == "FAILED train a: RuntimeError: diverged"
    # not retried when told so; retried (and the error file removed) otherwise
    assert runner.guarded(out, out / "val.json", boom, "train a", retry_failed=False) is None
    assert calls == ["boom"]
    res = runner.guarded(out, out / "val.json", lambda: {"ppl": 2.0}, "train a")
    assert res["ppl"] == 2.0 and res["wall_s"] >= 0 and not (out / "error.json").exists()
    assert res["cpu_s"] >= 0  # CPU seconds: what the compute plan sums
    assert json.loads((out / "val.json").read_text()) == res
    assert logs[-1].startswith("done train a ppl=2.0000 in")
    # done: the stored result, the job not called
    assert runner.guarded(out, out / "val.json", boom, "train a") == res and calls == ["boom"]
    # Ctrl-C inside a training stops the whole run (the command resumes), not a failed stage
    from nora.train import TrainingInterrupted

    def interrupted():
        raise TrainingInterrupted("interrupted at step 3")

    b = tmp_path / "b"
    with pytest.raises(TrainingInterrupted):
        runner.guarded(b, b / "val.json", interrupted, "train b", retry_failed=False)
    assert not (b / "error.json").exists() and runner.failed == 1


def test_a_stage_costs_every_attempt(tmp_path):
    from nora.study.context import CostMeter, Runner
    from nora.train import TrainingInterrupted

    out, seen = tmp_path / "a", []
    cost = out / "val.cost.json"

    def killed():  # an attempt that stops mid-run: its cost so far is kept on disk
        time.sleep(0.2)
        seen.append(json.loads(cost.read_text()))  # the meter's tick wrote it meanwhile
        raise TrainingInterrupted("interrupted at step 3")

    runner = Runner(tmp_path, log=lambda m: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CostMeter, "every", 0.01)
        with pytest.raises(TrainingInterrupted):
            runner.guarded(out, out / "val.json", killed, "a")
    assert seen[0]["wall_s"] > 0 and cost.is_file()
    first = json.loads(cost.read_text())
    assert first["wall_s"] >= 0.2
    cost.write_text(json.dumps({"wall_s": 100.0, "cpu_s": 50.0}))  # a session's earlier attempt
    res = runner.guarded(out, out / "val.json", lambda: {"ppl": 2.0}, "a")
    assert 100.0 <= res["wall_s"] < 110.0 and 50.0 <= res["cpu_s"] < 60.0
    assert not cost.exists()  # finished: the stage's file holds the total
    from nora.study.runner import export_results

    (tmp_path / "runs/x/s0").mkdir(parents=True)
    (tmp_path / "runs/x/s0/val.json").write_text("{}")
    (tmp_path / "runs/x/s0/test.cost.json").write_text("{}")  # a test stage still running
    export_results(tmp_path, tmp_path / "exported")
    assert [p.name for p in (tmp_path / "exported").glob("runs/x/s0/*")] == ["val.json"]


def test_workers_on_one_folder_never_run_a_stage_twice(tmp_path):
    from nora.study.context import Runner, StageBusy, stage_lock

    out, calls = tmp_path / "a", []
    shared = Runner(tmp_path, log=lambda m: None)
    shared.shared = True
    with stage_lock(out / "val.lock"):  # another worker is training this run
        with pytest.raises(StageBusy):
            shared.guarded(out, out / "val.json", lambda: calls.append(1) or {}, "a")
        assert calls == [] and not (out / "val.json").exists()
        # a runner that does not share its folder (the sweep) does not look at the lock
        solo = Runner(tmp_path, log=lambda m: None)
        assert solo.guarded(out, out / "val.json", lambda: {"ppl": 1.0}, "a")["ppl"] == 1.0
    # finished by the other worker: read back, not run again
    assert shared.guarded(out, out / "val.json", lambda: calls.append(1) or {}, "a")["ppl"] == 1.0
    assert calls == []


def test_a_search_runs_the_points_no_other_worker_holds_then_waits(tmp_path, monkeypatch):
    from nora.study.context import StageBusy
    from nora.study.runner import Study, run_plan

    study = Study(StudyConfig.from_dict(STUDY_PRESETS["study"]), tmp_path, log=lambda m: None)
    trained, held = [], {-5}

    def fake_trained(key):
        if key.k in held:
            raise StageBusy(str(key))
        trained.append(key.k)
        return types.SimpleNamespace(val_nll={-6: 2.0, -5: 1.0, -4: 3.0}[key.k])

    monkeypatch.setattr(study, "trained", fake_trained)
    with pytest.raises(StageBusy):
        study.search_lr("math", "lora", 16)
    assert trained == [-6, -4]  # the free points ran; the held one was left to its worker
    # the plan passes over a busy step, runs the rest, and comes back to it
    order = []

    def cell(*key):
        order.append(key[3])
        if key[3] == 1 and order.count(1) == 1:
            raise StageBusy("s1")

    monkeypatch.setattr(study, "cell", cell)
    run_plan(study, [("cell", "math", "lora", 16, s) for s in (0, 1, 2)], wait_s=0)
    assert order == [0, 1, 2, 1]
    held.clear()
    assert study.search_lr("math", "lora", 16) == -5


def test_module_level_nora_trains_at_the_rank_that_matches_noras_parameters(tmp_path, model_dir):
    from nora.study.runner import RunKey, Study

    variants = {
        "nora": {"method": "nora"},
        "nora-module": {"method": "nora", "placement": "module", "match_params": "nora"},
    }
    spec = study_dict(model_dir, variants=variants, ranks=[4], seeds=[0], n_gen=0)
    cfg = StudyConfig.from_dict(spec)
    study = Study(cfg, tmp_path, log=lambda m: None)
    # the tiny model: q (d->d) and v (d->kv) per layer against self_attn and mlp (d->d each)
    c = study.context("logistic-map")
    cm = c.model.config
    d, kv = cm.hidden_size, cm.num_key_value_heads * (cm.hidden_size // cm.num_attention_heads)
    weight, module = 2 * d + d + kv, 2 * (2 * d)  # params per rank and layer
    r = study.adapter_rank("logistic-map", "nora-module", 4)
    assert r == round(4 * weight / module) and study.adapter_rank("logistic-map", "nora", 4) == 4
    assert not nora.has_adapters(c.model)  # counted, not injected
    key = RunKey("logistic-map", "nora-module", 4, -4, 0)
    run = study.trained(key)
    want = study.trained(RunKey("logistic-map", "nora", 4, -4, 0)).trainable_params
    assert abs(run.trainable_params - want) <= module * len(c.layers) / 2  # nearest rank
    saved = json.loads((key.folder(tmp_path) / "train_config.json").read_text())
    assert saved["adapter"]["r"] == r and saved["adapter"]["placement"] == "module"
    assert "match_params" not in saved["adapter"]
    for bad in ("nora-module", "lora"):
        variants["nora-module"]["match_params"] = bad
        with pytest.raises(StudyError, match="`match_params` names another variant"):
            StudyConfig.from_dict(study_dict(model_dir, variants=variants))


def test_a_variant_that_is_the_same_adapter_reuses_the_runs(tmp_path, model_dir, monkeypatch):
    """rsLoRA α=16 at r=4 has scale 16/√4 = 8 = LoRA α=32's 32/4: the same adapter; at r=2
    (16/√2 vs 16) it is not."""
    from nora.study.report import build_study_report
    from nora.study.results import StudyResults
    from nora.study.runner import Study

    variants = {
        "lora": {"method": "lora", "alpha": 32},
        "rs": {"method": "lora", "alpha": 16, "rslora": True},
    }
    spec = study_dict(model_dir, variants=variants, seeds=[0], n_gen=0)
    # one rate for both (a one-value grid), so the twin's runs are at the same key
    spec["lr_search"] = {"start": [-4], "default_rank": 2, "max_values": 1}
    cfg = StudyConfig.from_dict(spec)
    study = Study(cfg, tmp_path / "x")
    assert study.twin("rs", 4) == "lora" and study.twin("rs", 2) is None
    assert study.twin("lora", 4) is None
    logs: list[str] = []
    run_study(cfg, tmp_path / "out", log=logs.append)
    res = StudyResults.load(tmp_path / "out")
    (rs4,), (lora4,) = res.cell("logistic-map", "rs", 4), res.cell("logistic-map", "lora", 4)
    assert rs4.same_as == "lora" and rs4.cost_s == 0 and rs4.test_ppl == lora4.test_ppl
    assert res.cell("logistic-map", "rs", 2)[0].same_as is None
    # the claim behind the reuse: trained for real, the twin gives the very same numbers
    monkeypatch.setattr(Study, "twin", lambda self, v, r: None)
    run_study(cfg, tmp_path / "real", log=logs.append)
    real = StudyResults.load(tmp_path / "real").cell("logistic-map", "rs", 4)[0]
    assert real.same_as is None and real.test_ppl == rs4.test_ppl
    text = build_study_report(tmp_path / "out").read_text()
    assert "logistic-map, r=4: rs is LoRA α=32 (its runs are LoRA α=32's, reused)" in text


def test_a_random_delta_teacher_is_the_fitted_one_spread_at_the_same_norms(tmp_path, model_dir):
    from nora.study.runner import Study

    def teacher(delta):
        spec = study_dict(model_dir, distill={"steps": 2, "lr": 1e-2, "delta": delta})
        return Study(StudyConfig.from_dict(spec), tmp_path / delta, log=[].append).teacher(
            "logistic-map"
        )

    fitted, spread = teacher("fitted"), teacher("random")
    assert spread.meta["delta_kind"] == "random"
    assert spread.meta["fitted_delta"] == fitted.meta["delta"]  # the fitted spectra, kept
    for name, d in spread.meta["delta"].items():
        assert d["fro"] == pytest.approx(fitted.meta["delta"][name]["fro"], rel=1e-4)
        assert d["effective_rank"] > fitted.meta["delta"][name]["effective_rank"]
    assert spread.meta["val_kl_base"] > 0  # measured on the spread teacher


def test_a_distillation_study_fits_its_teacher_once_and_scores_the_kl(tmp_path, model_dir):
    spec = study_dict(
        model_dir,
        variants={"lora": {"method": "lora", "alpha": 32}},
        ranks=[2],
        seeds=[0],
        n_gen=0,
        distill={"steps": 4, "lr": 1e-2},
    )
    cfg = StudyConfig.from_dict(spec)
    out = tmp_path / "out"
    assert run_study(cfg, out, log=[].append)["failed"] == 0
    meta = json.loads((out / "teachers/logistic-map/teacher.json").read_text())
    assert sorted(meta["modules"]) == sorted(meta["delta"])  # q/v of the 2 adapted layers
    assert len(meta["modules"]) == 4 and meta["val_kl_base"] > 0
    test = json.loads(next(out.glob("runs/logistic-map/lora/r2/lr*/s0/test.json")).read_text())
    kl = test["per_example_kl"]
    assert len(kl["kl"]) == test["n_test"] and test["test_kl"] >= 0
    assert math.isclose(test["test_kl"], sum(kl["kl"]) / sum(kl["positions"]))
    run_cfg = json.loads(
        next(out.glob("runs/logistic-map/lora/r2/lr*/s0/train_config.json")).read_text()
    )
    assert run_cfg["teacher"] == str(out / "teachers/logistic-map/teacher.safetensors")
    base = json.loads((out / "runs/logistic-map/base/test.json").read_text())
    assert math.isclose(
        base["test_kl"],
        sum(base["per_example_kl"]["kl"]) / sum(base["per_example_kl"]["positions"]),
    )
    with pytest.raises(StudyError, match="unknown keys"):
        StudyConfig.from_dict({**spec, "distill": {"stepz": 3}})
    with pytest.raises(StudyError, match="'fitted' or 'random'"):
        StudyConfig.from_dict({**spec, "distill": {"delta": "noise"}})
    for bad in (0, -1.0, "big", True):
        with pytest.raises(StudyError, match="delta_scale` must be a number > 0"):
            StudyConfig.from_dict({**spec, "distill": {"delta": "random", "delta_scale": bad}})
    # the run folder reproduces its run: `nora train --config <run>/train_config.json` trains
    # on the same examples (validation, the test split left out, then training) and the same
    # teacher, so every step's loss is the study's
    from nora.train import TrainConfig, train

    run_dir = next(out.glob("runs/logistic-map/lora/r2/lr*/s0"))
    again = TrainConfig.from_dict({**run_cfg, "output_dir": str(tmp_path / "again")})
    train(again, progress=False)

    def losses(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [
            (r["step"], r["loss"], r["supervised_tokens"])
            for r in map(json.loads, lines)
            if "loss" in r
        ]

    want, got = losses(run_dir), losses(tmp_path / "again")
    assert [w[::2] for w in want] == [g[::2] for g in got] and len(want) == 3
    assert [g[1] for g in got] == pytest.approx([w[1] for w in want], rel=1e-4)


def test_a_saved_study_without_a_newer_field_is_the_same_study(tmp_path, model_dir):
    from nora.study.runner import _saved_config

    cfg = StudyConfig.from_dict(study_dict(model_dir))
    older = cfg.to_dict()
    del older["distill"]  # written before the field existed: it meant "no distillation"
    del older["title"], older["budget_cpu_hours"], older["variant_ranks"]  # added later still
    (tmp_path / "study.json").write_text(json.dumps({"config": older}))
    assert _saved_config(tmp_path / "study.json") == cfg.to_dict()
    (tmp_path / "study.json").write_text(json.dumps({"config": {**older, "n_test": 99}}))
    assert _saved_config(tmp_path / "study.json") != cfg.to_dict()
