"""Typed run records of the sweep and the study: what their stages write (`to_dict`) and what
`nora report` and the demo read back (`from_dict` / `from_file`).

res = StudyResults.load("results/study")
res.cell("math", "nora", 16)          # [TestRun per finished seed], seed order
res.base["math"].per_example.ppl()
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

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


def _record_dict(rec, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A record's JSON form: its fields less `skip`, and less optional fields left at None
    (the values as they are: no deep copy of a run's analysis summary)."""
    out = {}
    for f in fields(rec):
        v = getattr(rec, f.name)
        if f.name not in skip and not (v is None and f.default is None):
            out[f.name] = v
    return out


@dataclass(frozen=True)
class SweepRun:
    """One run of the sweep (`nora sweep`): its `result.json`."""

    variant: str
    dataset: str
    split: str  # "test", or "validation" for a learning-rate search run
    method: str
    r: int
    seed: int
    lr: float
    ppl: float  # on `split`
    nll: float
    trainable_params: int
    train_time_s: float
    tok_per_s: float
    steps: int
    analysis: dict | None = None  # `nora.analysis.analyze`'s summary (test runs of the top rank)
    wall_s: float = 0.0  # the stage's wall time (`context.Runner.guarded` sets it)
    cpu_s: float | None = None  # its CPU seconds (runs written before it was recorded: None)

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepRun:
        return cls(**d)


@dataclass(frozen=True)
class TrainedRun:
    """Stage 1 of a study run: training + validation, its `val.json` (also what a learning-rate
    search reads)."""

    dataset: str
    variant: str
    r: int
    k: int  # the rate's index on the study's grid (`runner.lr_of`)
    seed: int
    lr: float
    val_ppl: float
    val_nll: float
    val_tokens: int
    final_train_loss: float
    trainable_params: int
    train_time_s: float
    tok_per_s: float
    steps: int
    wall_s: float = 0.0  # the stage's wall time (`context.Runner.guarded` sets it)
    cpu_s: float | None = None  # its CPU seconds (stages written before it was recorded: None)
    same_as: str | None = None  # another variant's identical run, reused (runner.Study.twin)
    folder: Path | None = None  # where it was read from (not written)

    @property
    def cost_s(self) -> float:
        """The stage's CPU seconds: what it cost whatever else ran beside it or paused it (older
        results: its wall time)."""
        return self.cpu_s if self.cpu_s is not None else self.wall_s

    def to_dict(self) -> dict[str, Any]:
        return _record_dict(self, skip=("folder",))

    @classmethod
    def from_dict(cls, d: dict[str, Any], folder: Path | None = None) -> TrainedRun:
        return cls(**d, folder=folder)

    @classmethod
    def from_file(cls, f: Path) -> TrainedRun:
        return cls.from_dict(_load(f), f.parent)

    def curve(self) -> tuple[list[int], list[float]]:
        """Validation loss by step (the last record of a step wins: a resumed run repeats
        the steps after its last checkpoint)."""
        f = self.folder / "metrics.jsonl" if self.folder else None
        if f is None or not f.is_file():
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
    # the base model's only: the per-family majority answer's 0/1 score per generated problem
    prior: np.ndarray | None = None

    @classmethod
    def from_file(cls, f: Path) -> TestRun:
        """A test.json: its per-example KL too where the study distils, the prior's scores
        where it is the base model's of a generating study."""
        d = _load(f)
        prior = d.get("prior")
        return cls(
            d["dataset"],
            d["variant"],
            d.get("r"),
            d.get("lr"),
            d.get("seed"),
            d["test_ppl"],
            d["accuracy"],
            PerExample.from_dict(d["per_example"], d.get("per_example_kl")),
            d.get("wall_s", 0.0),
            _cost(d),
            Spectra.from_summary(d["analysis"]) if "analysis" in d else None,
            d.get("samples", []),
            d.get("same_as"),
            np.asarray(prior["correct"], dtype=float) if prior else None,
        )


@dataclass(frozen=True)
class ControlRun:
    """An untrained adapter's spectra (`Study.control`): the baseline a trained run's
    effective rank is read against (a random A and B already have a spread spectrum)."""

    dataset: str
    variant: str
    r: int
    spectra: Spectra
    cost_s: float

    @classmethod
    def from_file(cls, f: Path) -> ControlRun:
        d = _load(f)
        return cls(
            d["dataset"], d["variant"], d["r"], Spectra.from_summary(d["analysis"]), _cost(d)
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
    controls: list[ControlRun] = field(default_factory=list)

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
            [ControlRun.from_file(f) for f in sorted(runs.glob("*/*/r*/untrained/test.json"))],
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
