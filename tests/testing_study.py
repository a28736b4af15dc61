"""Synthetic study folders for the study report's tests: the JSON files a finished study
leaves, laid out and keyed like an exported real one (results/study-v2/pilot-distill):
`study.json`, `lr_choices.json`, runs/<dataset>/<variant>/r<r>/lr<lr>/s<seed>/test.json (a
twin's a copy of its twin's with `same_as`, as `runner.Study` writes it),
runs/<dataset>/base/test.json and runs/<dataset>/<variant>/r<r>/untrained/test.json (the
controls). No val.json: the report's compute plan then says "not measured yet", and the
learning-curve and PEFT parts, covered by the real tiny study of test_study_report.py, are
skipped.

Each run's test metric is the `level` the test asks for (KL per position in a distillation
study, else perplexity) within 0.1 %: example i's value is the level × its fixed weight ×
(1 + 5 % noise, centred over the run's examples) × the run's (1 + 0.1 % noise), both drawn
from the run's (dataset, variant, rank, seed). So an interval over examples has a width, and
two cells at one level tie.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from nora.study.runner import StudyConfig, lr_of, twin_of
from nora.study.stats import PerExample

N_TEST = 40
K = -4  # every cell's rate on the study grid: lr_of(-4) = 0.01


def spec(**overrides) -> dict:
    """A study config (as a study.yaml holds it) with small defaults."""
    return {
        "model": "synthetic",
        "datasets": ["reasoning-mix"],
        "train": {"max_steps": 4, "batch_size": 2, "n_train": 8, "eval_every": 2},
        "n_val": 4,
        "n_test": N_TEST,
        "n_gen": 0,
        "variants": {"lora": {"method": "lora", "alpha": 32}, "nora": {"method": "nora"}},
        "ranks": [4, 16],
        "seeds": [0, 1],
        "lr_search": {"start": [-5, -4, -3], "default_rank": 16},
        **overrides,
    }


def _weights() -> tuple[np.ndarray, np.ndarray]:
    """Each example's positions (tokens) and fixed weight, normalised so that the
    position-weighted mean weight is 1: a run's metric is then its level."""
    rng = np.random.default_rng(12345)
    positions = rng.integers(20, 60, N_TEST).astype(float)
    weight = rng.lognormal(0.0, 0.5, N_TEST)
    return positions, weight * positions.sum() / (weight * positions).sum()


def _seed(*key) -> int:
    return zlib.crc32("/".join(map(str, key)).encode())


def scores(level: float, key: tuple, distill: bool, n_gen: int = 0, accuracy: float = 0.3):
    """A test.json's score keys for a run at `level` (`key` seeds its noise)."""
    positions, weight = _weights()
    rng = np.random.default_rng(_seed(*key))
    noise = 0.05 * rng.standard_normal(N_TEST)  # (n,)
    noise -= (positions * weight * noise).sum() / (positions * weight).sum()  # the mean: 0
    run = 1 + 0.001 * rng.standard_normal()  # the run's own offset from its level
    per = positions * weight * (1 + noise) * run  # (n,); Σ per / Σ positions = run
    nll = per * (1.2 if distill else math.log(level))
    correct = (rng.random(n_gen) < accuracy).astype(float).tolist()
    out = {
        "test_ppl": math.exp(nll.sum() / positions.sum()),
        "test_nll": nll.sum() / positions.sum(),
        "accuracy": sum(correct) / n_gen if n_gen else None,
        "per_example": {"nll": nll.tolist(), "tokens": positions.tolist(), "correct": correct},
        "samples": [],
        "n_test": N_TEST,
        "n_gen": n_gen,
        "max_new_tokens": 256,
    }
    if distill:
        kl = per * level
        out["test_kl"] = kl.sum() / positions.sum()
        out["per_example_kl"] = {"kl": kl.tolist(), "positions": positions.tolist()}
    return out


def per_example(level: float, key: tuple, distill: bool) -> PerExample:
    """The PerExample a run written by `write_study` at `level` has (for calibrating a test)."""
    s = scores(level, key, distill)
    return PerExample.from_dict(s["per_example"], s.get("per_example_kl"))


def analysis(method: str, r: int, spread: float, layers: int = 2) -> dict:
    """An `analyze` summary whose singular values decay as exp(−i / spread) in every view."""
    import torch

    from nora.analysis import SpectralSummary, _view_summary

    sv = torch.exp(-torch.arange(r, dtype=torch.float64) / spread)
    per_layer = {
        f"model.layers.{i}.self_attn.q_proj": {
            "method": method,
            "r": r,
            "in_features": 64,
            "out_features": 64,
            "tokens": 128,
            **{view: _view_summary(sv, r, None) for view in ("latent", "output", "weight")},
        }
        for i in range(layers)
    }
    return {
        "format_version": 1,
        "method": method,
        "r": r,
        "scale": 1.0,
        "weight_space": method == "loran",
        "n_layers": layers,
        "layers": per_layer,
        "aggregate": SpectralSummary.over_layers(per_layer).to_dict(),
    }


TEACHER = {
    "modules": ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"],
    "steps": 2,
    "lr": 1e-4,
    "delta_kind": "random",
    "delta_scale": 19.0,
    "val_nll_base": 3.5,
    "val_nll_teacher": 4.0,
    "val_kl_base": 0.44,
    "delta": {
        "model.layers.0.self_attn.q_proj": {"effective_rank": 40.2, "rank90": 30},
        "model.layers.0.self_attn.v_proj": {"effective_rank": 20.7, "rank90": 12},
    },
}


def _write(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))


def write_study(
    root: Path,
    config: dict,
    level: Callable[[str, int, int], float | None],
    base_level: float,
    accuracy: Callable[[str, int, int], float] | None = None,
    prior: float | None = None,
    spectra: tuple[str, ...] = (),
    controls: tuple[str, ...] = (),
) -> Path:
    """A finished study's folder: every (variant, rank, seed) whose `level` is not None, at
    the variant's ranks (a twin's copied from its twin's, its level unused), the base model at
    `base_level` (with the majority-answer prior's `prior` accuracy where the study
    generates), analysis summaries for the runs of the variants in `spectra` and untrained
    controls of those in `controls` at each of their ranks."""
    study = StudyConfig.from_dict(config)
    cfg = study.to_dict()
    distill, n_gen = bool(cfg["distill"]), cfg["n_gen"]
    _write(
        root / "study.json",
        {
            "config": cfg,
            "command": "nora sweep synthetic --out out",
            "machine": {"cpu": "synthetic", "cores": 2, "torch": "2"},
        },
    )
    runs = root / "runs"
    for d in cfg["datasets"]:
        base = scores(base_level, (d, "base"), distill, n_gen, 0.05)
        if n_gen and prior is not None:
            correct = (np.arange(n_gen) < round(prior * n_gen)).astype(float).tolist()
            base["prior"] = {"correct": correct, "accuracy": sum(correct) / n_gen}
        _write(runs / d / "base" / "test.json", {"variant": "base", "dataset": d, **base})
        if distill:  # the teacher's fit, as `runner` records it (the keys a report reads)
            _write(root / "teachers" / d / "teacher.json", TEACHER)
        for v in cfg["variants"]:
            for r in study.ranks_of(v):
                twin = twin_of(cfg["variants"], v, r)
                for s in cfg["seeds"]:
                    folder = runs / d / v / f"r{r}" / f"lr{lr_of(K):.3g}" / f"s{s}"
                    if (lv := level(v, r, s)) is None:
                        continue
                    if twin is not None:  # the runner's copy of the twin's finished run
                        src = runs / d / twin / folder.relative_to(runs / d / v) / "test.json"
                        t = json.loads(src.read_text())
                        t.update(variant=v, same_as=twin, wall_s=0.0, cpu_s=0.0)
                        _write(folder / "test.json", t)
                        continue
                    acc = accuracy(v, r, s) if accuracy else 0.3
                    t = {"dataset": d, "variant": v, "r": r, "k": K, "seed": s, "lr": lr_of(K)}
                    t |= scores(lv, (d, v, r, s), distill, n_gen, acc)
                    if v in spectra:
                        method = cfg["variants"][v].get("method", "lora")
                        t["analysis"] = analysis(method, r, r / 4 * (1 + 0.1 * s))
                    _write(folder / "test.json", {**t, "wall_s": 60.0, "cpu_s": 55.0})
                if v in controls:
                    method = cfg["variants"][v].get("method", "lora")
                    control = {"dataset": d, "variant": v, "r": r, "cpu_s": 5.0}
                    control["analysis"] = analysis(method, r, r / 2)
                    _write(runs / d / v / f"r{r}" / "untrained" / "test.json", control)
    _write(root / "lr_choices.json", {"k": {}, "searches": []})  # no search recorded
    return root
