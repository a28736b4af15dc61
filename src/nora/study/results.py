"""A study folder read back as typed records (what `nora report` and the demo consume).

res = StudyResults.load("results/study")
res.cell("math", "nora", 16)          # [TestRun per finished seed], seed order
res.base["math"].per_example.ppl()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nora.study.stats import PerExample


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class Spectra:
    """Mean over adapted layers of the spectral metrics of one run (from `nora.analysis`)."""

    effective_rank: dict[str, float]  # view -> ER ("latent", "output", "weight")
    auc90: dict[str, float]
    summary: dict  # the full `analyze` summary, for the figures

    @classmethod
    def from_summary(cls, s: dict) -> Spectra:
        from nora.study.plots import layer_mean

        views = list(s["aggregate"])
        return cls(
            {v: layer_mean(s, v, "effective_rank") for v in views},
            {v: layer_mean(s, v, "auc90") for v in views},
            s,
        )


def _cost(d: dict) -> float:
    """A stage's CPU seconds: what it cost whatever else ran beside it or paused it (stages
    written before `cpu_s` was recorded fall back to their wall time)."""
    return d.get("cpu_s", d.get("wall_s", 0.0))


@dataclass(frozen=True)
class TrainedRun:
    """Stage 1 of a run: training + validation (also what a learning-rate search reads)."""

    dataset: str
    variant: str
    r: int
    lr: float
    seed: int
    val_nll: float
    val_ppl: float
    train_time_s: float
    wall_s: float
    cost_s: float  # CPU seconds of the stage (older results: its wall time)
    trainable_params: int
    steps: int
    folder: Path
    same_as: str | None = None  # another variant's identical run, reused (runner.Study.twin)

    @classmethod
    def from_file(cls, f: Path) -> TrainedRun:
        d = _load(f)
        return cls(
            d["dataset"],
            d["variant"],
            d["r"],
            d["lr"],
            d["seed"],
            d["val_nll"],
            d["val_ppl"],
            d["train_time_s"],
            d.get("wall_s", 0.0),
            _cost(d),
            d["trainable_params"],
            d["steps"],
            f.parent,
            d.get("same_as"),
        )

    def curve(self) -> tuple[list[int], list[float]]:
        """Validation loss by step (the last record of a step wins: a resumed run repeats
        the steps after its last checkpoint)."""
        f = self.folder / "metrics.jsonl"
        if not f.is_file():
            return [], []
        by_step = {}
        for line in f.read_text().splitlines():
            rec = json.loads(line)
            if "eval_loss" in rec:
                by_step[rec["step"]] = rec["eval_loss"]
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]


@dataclass(frozen=True)
class TestRun:
    """Stage 2 of a run (or the base model): per-example test scores and spectra."""

    dataset: str
    variant: str
    r: int | None
    lr: float | None
    seed: int | None
    test_ppl: float
    accuracy: float | None
    per_example: PerExample
    wall_s: float
    cost_s: float  # CPU seconds of the stage (older results: its wall time)
    spectra: Spectra | None
    samples: list[str] = field(default_factory=list)
    same_as: str | None = None  # another variant's identical run, reused (runner.Study.twin)

    @classmethod
    def from_file(cls, f: Path) -> TestRun:
        d = _load(f)
        return cls(
            d["dataset"],
            d["variant"],
            d.get("r"),
            d.get("lr"),
            d.get("seed"),
            d["test_ppl"],
            d["accuracy"],
            PerExample.from_dict(d["per_example"]),
            d.get("wall_s", 0.0),
            _cost(d),
            Spectra.from_summary(d["analysis"]) if "analysis" in d else None,
            d.get("samples", []),
            d.get("same_as"),
        )


@dataclass(frozen=True)
class Search:
    """One learning-rate search: the grid it ended with and the validation NLL of each value."""

    dataset: str
    variant: str
    r: int
    grid: list[float]
    val_nll: list[float]
    best_lr: float
    interior: bool


@dataclass
class StudyResults:
    folder: Path
    config: dict
    machine: dict
    command: str | None
    trained: list[TrainedRun]
    tested: list[TestRun]
    base: dict[str, TestRun]
    searches: list[Search]
    errors: list[str]

    @classmethod
    def load(cls, folder: str | Path) -> StudyResults:
        folder = Path(folder)
        meta = _load(folder / "study.json")
        choices = folder / "lr_choices.json"
        searches = [Search(**s) for s in _load(choices)["searches"]] if choices.is_file() else []
        runs = folder / "runs"
        return cls(
            folder,
            meta["config"],
            meta.get("machine", {}),
            meta.get("command"),
            [TrainedRun.from_file(f) for f in sorted(runs.glob("*/*/r*/lr*/s*/val.json"))],
            [TestRun.from_file(f) for f in sorted(runs.glob("*/*/r*/lr*/s*/test.json"))],
            {f.parts[-3]: TestRun.from_file(f) for f in sorted(runs.glob("*/base/test.json"))},
            searches,
            [str(f.parent.relative_to(folder)) for f in sorted(folder.rglob("error.json"))],
        )

    def chosen_lr(self, dataset: str, variant: str, r: int) -> float | None:
        for s in self.searches:
            if (s.dataset, s.variant, s.r) == (dataset, variant, r):
                return s.best_lr
        return None

    def cell(self, dataset: str, variant: str, r: int) -> list[TestRun]:
        """The finished seeds of a headline cell, in seed order."""
        runs = [t for t in self.tested if (t.dataset, t.variant, t.r) == (dataset, variant, r)]
        return sorted(runs, key=lambda t: t.seed)

    def paired(self, dataset: str, a: str, b: str, r: int) -> tuple[list[TestRun], list[TestRun]]:
        """Seeds finished for both variants, aligned."""
        ra = {t.seed: t for t in self.cell(dataset, a, r)}
        rb = {t.seed: t for t in self.cell(dataset, b, r)}
        seeds = sorted(set(ra) & set(rb))
        return [ra[s] for s in seeds], [rb[s] for s in seeds]
