"""The rank-scaling study: tuned learning rates, long runs, per-example scores, resumable.

    nora sweep study --out /work/sweep-out/study   # a preset, or a YAML/JSON file with `study: true`
    nora report /work/sweep-out/study

Every run is keyed by (dataset, variant, rank, learning rate, seed) and lives in
`runs/<dataset>/<variant>/r<rank>/lr<lr>/s<seed>/`. It has two stages, each finished when its
JSON exists (so a rerun skips it, and a killed run restarts from its last checkpoint):

1. `val.json`: train (the validation loss every `eval_every` steps is the learning curve in
   `metrics.jsonl`), keep the final adapter in `adapter/`, score the validation split.
2. `test.json`: per-example test NLL, greedy pass@1 per problem, the spectral analysis.
   A learning-rate search only needs stage 1; a headline cell at the chosen rate reuses it.

Learning rates lie on a half-decade grid (lr = 10^(k/2)). A search starts with three values
around a guess and adds the next value beyond an edge while the validation optimum is at that
edge, so the chosen rate is interior (or the search says it hit `max_values`). Runs whose loss
diverges count as +inf. Order of work (see `plan`): the most informative runs first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import nora
from nora.checkpoint import write_json
from nora.config import AdapterConfig, ConfigError, from_mapping
from nora.study.context import DataContext, Runner, StageBusy
from nora.study.results import TrainedRun
from nora.train import TrainConfig, train


class StudyError(ValueError):
    """The study file or folder is not usable; the message says why."""


@dataclass
class LRSearch:
    """Where and how each variant's learning rate is searched."""

    # k: lr = 10^(k/2); one list for every variant, or variant -> list (missing: [-6, -5, -4])
    start: list[int] | dict[str, list[int]] = field(default_factory=lambda: [-6, -5, -4])
    ranks: dict[str, list[int]] = field(default_factory=dict)  # variant -> searched ranks
    # variant -> another variant whose finished search starts this one's until it has its own
    # (an ablation of NoRA starts at NoRA's rate, carried by the scale rule of Study._start)
    like: dict[str, str] = field(default_factory=dict)
    default_rank: int = 16
    max_values: int = 7  # a search that would need more says so instead of going on

    def start_of(self, variant: str) -> list[int]:
        if isinstance(self.start, dict):
            return list(self.start.get(variant, [-6, -5, -4]))
        return list(self.start)

    def ranks_of(self, variant: str) -> list[int]:
        return self.ranks.get(variant, [self.default_rank])

    def source_rank(self, variant: str, r: int) -> int:
        """The searched rank whose learning rate rank `r` uses: the nearest in log2."""
        return min(self.ranks_of(variant), key=lambda s: (abs(math.log2(s / r)), s))


@dataclass
class StudyConfig:
    model: str = "smollm2-135m"
    datasets: list[str] = field(default_factory=lambda: ["math"])
    top_layers: int | None = 4
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields
    n_val: int = 64
    n_test: int = 300
    n_gen: int = 200  # test problems answered by greedy generation
    max_new_tokens: dict[str, int] = field(default_factory=dict)  # per dataset (default 256)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=lambda: [16])
    # variant -> the ranks its cells run at (default: every rank), e.g. ablations at 16 only
    variant_ranks: dict[str, list[int]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    lr_search: LRSearch = field(default_factory=LRSearch)
    first: list[str] = field(default_factory=list)  # variants searched/run before the rest
    analysis_tokens: int = 2048
    data_path: dict[str, str] = field(default_factory=dict)
    # distillation (nora.distill): every dataset's adapters match a teacher fitted on it —
    # {"steps", "lr", "target_modules"}; empty: adapters learn the labels
    distill: dict[str, Any] = field(default_factory=dict)
    # the spectral control of item 3: analyse an untrained adapter of every variant at every
    # rank (B drawn like A, `init_weights=False`, seed 0) on the test tokens, no training
    controls: bool = False
    # the report's title and the CPU hours its compute plan counts against (issue 13's 10)
    title: str = "NoRA vs LoRA: the rank-scaling study (issue 13)"
    budget_cpu_hours: float = 10.0
    study: bool = True  # marks a file as a study (not a `nora.experiments` sweep)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StudyConfig:
        try:  # unknown fields (with the nearest name) and wrong types, as for any config file
            cfg = from_mapping(cls, d, where="study")
        except ConfigError as e:
            raise StudyError(str(e)) from None
        cfg.check()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check(self) -> None:
        if not self.variants:
            raise StudyError("the study names no variants")
        for name, kw in self.variants.items():
            try:
                AdapterConfig(**{**adapter_kwargs(kw), "r": 4})
            except (TypeError, ValueError) as e:
                raise StudyError(f"variant {name!r}: {e}") from None
            other = kw.get("match_params")
            if other is not None and (other == name or other not in self.variants):
                raise StudyError(
                    f"variant {name!r}: `match_params` names another variant of the study, "
                    f"not {other!r}"
                )
        from nora.study.sweep.run import PER_RUN_FIELDS, check_train_keys

        # n_eval is the study's n_val (the split scored during training)
        check_train_keys(self.train, StudyError, PER_RUN_FIELDS | {"n_eval"})
        if unknown := sorted(set(self.first) - set(self.variants)):
            raise StudyError(f"`first` names unknown variants {unknown}")
        like = self.lr_search.like
        if unknown := sorted((set(like) | set(like.values())) - set(self.variants)):
            raise StudyError(f"`lr_search.like` names unknown variants {unknown}")
        if unknown := sorted(set(self.variant_ranks) - set(self.variants)):
            raise StudyError(f"`variant_ranks` names unknown variants {unknown}")
        for v, rs in self.variant_ranks.items():
            if not rs or set(rs) - set(self.ranks):
                raise StudyError(
                    f"`variant_ranks` of {v!r} must be some of the study's ranks {self.ranks}, "
                    f"not {rs}"
                )
        if unknown := sorted(set(self.distill) - set(TEACHER_DEFAULTS)):
            raise StudyError(
                f"`distill` has unknown keys {unknown}; known: {list(TEACHER_DEFAULTS)}"
            )
        if self.distill.get("delta", "fitted") not in ("fitted", "random"):
            raise StudyError(
                f"`distill.delta` is 'fitted' or 'random', not {self.distill['delta']!r}"
            )
        b = self.budget_cpu_hours
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise StudyError(f"`budget_cpu_hours` must be a number > 0, not {b!r}")
        scale = self.distill.get("delta_scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise StudyError(f"`distill.delta_scale` must be a number > 0, not {scale!r}")

    def ranks_of(self, variant: str) -> list[int]:
        return [r for r in self.ranks if r in self.variant_ranks.get(variant, self.ranks)]

    def teacher_settings(self) -> dict[str, Any]:
        return {**TEACHER_DEFAULTS, **self.distill}

    def max_new(self, dataset: str) -> int:
        return self.max_new_tokens.get(dataset, 256)


# how a distillation study's teacher is fitted: every weight of these modules in the adapted
# layers, by next-token NLL on the dataset's training split (nora.distill.fit_teacher)
TEACHER_DEFAULTS: dict[str, Any] = {
    "steps": 480,
    "lr": 1e-4,
    "batch_size": 8,
    "target_modules": ["q_proj", "v_proj"],
    # "fitted": the fine-tuned weights; "random": each fitted ΔW replaced by a Gaussian one of
    # delta_scale times its norm (nora.distill.random_delta), high-rank by construction
    "delta": "fitted",
    "delta_scale": 1.0,  # "random": the Gaussian ΔW's norm, in units of the fitted ΔW's
}


# A variant's settings that are the study's, not the adapter's: "match_params": another
# variant whose trainable parameter count this one matches at each cell's rank (module-level
# NoRA at NoRA's budget: its cell "r=16" trains the rank with the nearest count)
STUDY_KEYS = ("match_params",)


def adapter_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    """A variant's AdapterConfig fields: its settings without the study's own (STUDY_KEYS)."""
    return {k: v for k, v in kw.items() if k not in STUDY_KEYS}


def lr_of(k: int) -> float:
    """The half-decade grid: k=-6 -> 1e-3, k=-5 -> 3.16e-3, k=-4 -> 1e-2."""
    return float(f"{10 ** (k / 2):.3g}")


def _lr_name(k: int) -> str:
    return f"lr{lr_of(k):.3g}"


# --- one run -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunKey:
    dataset: str
    variant: str
    r: int
    k: int  # learning rate lr_of(k)
    seed: int

    def folder(self, out: Path) -> Path:
        return (
            out
            / "runs"
            / self.dataset
            / self.variant
            / f"r{self.r}"
            / _lr_name(self.k)
            / (f"s{self.seed}")
        )


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on `path` (created if missing) for a read-modify-write."""
    import fcntl

    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def twin_of(variants: dict[str, dict], variant: str, r: int) -> str | None:
    """An earlier variant that is the same adapter as `variant` at rank `r`: the same
    method and settings and the same effective scale (rsLoRA's 8/√16 and LoRA α=32's 32/16
    are both 2), so the same key trains the same weights: a run of the twin's with the
    same rate and seed stands for this variant's (see `Study._twin_done`)."""

    def norm(v: str) -> tuple[dict, float]:
        if "match_params" in variants[v]:  # its adapter's rank is not r: never a twin
            return {"variant": v}, 0.0
        c = AdapterConfig(**{**adapter_kwargs(variants[v]), "r": r})
        d = {k: x for k, x in c.to_dict().items() if k not in ("alpha", "rslora", "scale")}
        return d, c.effective_scale

    mine = norm(variant)
    for other in variants:
        if other == variant:
            return None
        if norm(other) == mine:
            return other
    return None


class RateChoices:
    """`lr_choices.json`: the grid index k each finished rate search chose, per dataset,
    variant and rank, each search's grid and validation NLLs (what the report shows), and
    each search's first points (`started`, see `start`).
    Workers on other datasets write it too: every update is a locked read-modify-write."""

    def __init__(self, out: Path):
        self.file, self.lock = out / "lr_choices.json", out / "lr_choices.lock"

    def chosen(self) -> dict[str, dict[str, dict[str, int]]]:
        return self._read()["k"]

    def start(self, dataset, variant, r, guess: Callable[[], list[int]]) -> list[int]:
        """A search's first grid points: `guess()` the first time any worker asks, then the
        same points for every worker (kept under `started`). A guess carried from another
        search changes when that search finishes; a second worker guessing again then would
        train the union of two starts (one run more, seen in pilot-distill-random)."""
        with _locked(self.lock):
            data = self._read()
            by_r = data["started"].setdefault(dataset, {}).setdefault(variant, {})
            if str(r) not in by_r:
                by_r[str(r)] = guess()
                write_json(self.file, data)
            return list(by_r[str(r)])

    def _read(self) -> dict[str, Any]:
        data = json.loads(self.file.read_text()) if self.file.is_file() else {}
        return {"k": {}, "searches": [], "started": {}, **data}

    def record(self, dataset, variant, r, ks: list[int], scores: dict, best: int) -> None:
        with _locked(self.lock):
            f, data = self.file, self._read()
            data["k"].setdefault(dataset, {}).setdefault(variant, {})[str(r)] = best
            data["searches"] = [
                s
                for s in data["searches"]
                if (s["dataset"], s["variant"], s["r"]) != (dataset, variant, r)
            ]
            data["searches"].append(
                {
                    "dataset": dataset,
                    "variant": variant,
                    "r": r,
                    "grid": [lr_of(k) for k in ks],
                    "val_nll": [scores[k] for k in ks],
                    "best_lr": lr_of(best),
                    "interior": ks[0] < best < ks[-1],
                }
            )
            write_json(f, data)


class Study(Runner):
    """One call of `run_study`: runs stages on demand, skipping those already done."""

    def __init__(self, cfg: StudyConfig, out: Path, log=print):
        super().__init__(out, log)
        self.cfg = cfg
        self.rates = RateChoices(out)
        self.shared = True  # workers started on one folder split its stages (run_study)

    def build_context(self, dataset: str) -> DataContext:
        t = self.cfg.train
        return DataContext(
            self.cfg.model,
            dataset,
            n_train=t.get("n_train", 512),
            n_val=self.cfg.n_val,
            n_test=self.cfg.n_test,
            max_len=t.get("max_len", 256),
            top_layers=self.cfg.top_layers,
            data_path=self.cfg.data_path.get(dataset),
            cache_dir=self.out / "prefix-cache",
        )

    def base(self, dataset: str) -> None:
        """The base model's test scores, once per dataset (the reference row)."""
        out = self.out / "runs" / dataset / "base"

        def job() -> dict:
            teacher = self.teacher(dataset)
            c = self.context(dataset)
            scores = c.score_test(
                c.model, self.cfg.n_gen, self.cfg.max_new(dataset), teacher=teacher
            )
            prior = {}
            if self.cfg.n_gen:  # pass@1 has a baseline: the per-family majority answer
                correct = c.prior_correct(self.cfg.n_gen)
                prior = {"prior": {"correct": correct, "accuracy": sum(correct) / len(correct)}}
            return {"variant": "base", "dataset": dataset, **scores, **prior}

        self.guarded(out, out / "test.json", job, f"base {dataset}")

    def teacher(self, dataset: str):
        """The dataset's teacher (`nora.distill.Teacher`), fitted on first use and kept in
        teachers/<dataset>/; None unless the study distils."""
        if not self.cfg.distill:
            return None
        from nora.distill import Teacher

        path = self.teacher_path(dataset)
        c = self.context(dataset)
        if path.is_file():
            return Teacher.load(path).check(c.model)
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_suffix(".lock")):  # a second worker waits for the first's fit
            if path.is_file():
                return Teacher.load(path).check(c.model)
            self.log(f"[{dataset}] fitting the teacher")
            t0, c0 = time.perf_counter(), time.process_time()
            teacher = fit_study_teacher(c, self.cfg.teacher_settings(), log=self.log)
            teacher.meta.update(wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
            teacher.save(path)  # + teacher.json, its meta
        return teacher

    def teacher_path(self, dataset: str) -> Path:
        return self.out / "teachers" / dataset / "teacher.safetensors"

    def _train_config(self, key: RunKey, out: Path) -> TrainConfig:
        if self.cfg.distill:
            self.teacher(key.dataset)  # fitted before the first student
        c = self.ctx
        kw = adapter_kwargs(self.cfg.variants[key.variant])
        r = self.adapter_rank(key.dataset, key.variant, key.r)
        adapter = AdapterConfig(**{**kw, "r": r, "layers_to_transform": c.layers})
        return TrainConfig(
            adapter=adapter,
            model=self.cfg.model,
            data=key.dataset,
            seed=key.seed,
            lr=lr_of(key.k),
            # the study's splits, so that `nora train --config <run>/train_config.json` trains
            # on the same examples: validation, then the test split left out, then training
            n_eval=self.cfg.n_val,
            n_skip=self.cfg.n_test,
            data_seed=0,
            data_path=self.cfg.data_path.get(key.dataset),
            output_dir=str(out),
            teacher=str(self.teacher_path(key.dataset)) if self.cfg.distill else None,
            **self.cfg.train,
        )

    def adapter_rank(self, dataset: str, variant: str, r: int) -> int:
        """The rank of `variant`'s adapter in the cell labelled `r`: r, or with `match_params`
        the rank whose trainable parameter count is nearest the other variant's at r (the
        counts are linear in r: r·(d+k) per adapted module)."""
        other = self.cfg.variants[variant].get("match_params")
        if other is None:
            return r
        from nora.inject import plan as wrappers_for

        c = self.context(dataset)

        def per_rank(v: str) -> int:  # planned on the model, not injected: nothing changes
            kw = {**adapter_kwargs(self.cfg.variants[v]), "r": 1, "layers_to_transform": c.layers}
            wrappers = wrappers_for(c.model, AdapterConfig(**kw))
            return sum(p.numel() for _, w in wrappers for p in w.adapter.parameters())

        return max(1, round(r * per_rank(other) / per_rank(variant)))

    def twin(self, variant: str, r: int) -> str | None:
        return twin_of(self.cfg.variants, variant, r)

    def _twin_done(self, key: RunKey, stage: str) -> dict | None:
        """`stage` of `key` when its twin has already run that key (same rate, same seed):
        copied into this key's folder with `same_as` naming the twin; else None."""
        other = self.twin(key.variant, key.r)
        if other is None:
            return None
        src = dataclasses.replace(key, variant=other).folder(self.out)
        if not (src / stage).is_file():
            return None
        out = key.folder(self.out)
        out.mkdir(parents=True, exist_ok=True)
        if stage == "test.json" and not (out / "val.json").is_file():
            self._twin_done(key, "val.json")  # stage 1 comes with it (curves, compute plan)
        for f in ("metrics.jsonl", "train_config.json", "summary.json"):
            if (src / f).is_file() and not (out / f).is_file():
                shutil.copyfile(src / f, out / f)
        res = json.loads((src / stage).read_text())
        # the twin's run cost the CPU once: the copy costs nothing in the compute plan
        res = {**res, "variant": key.variant, "same_as": other, "wall_s": 0.0, "cpu_s": 0.0}
        write_json(out / stage, res)
        return res

    def _adapter_dir(self, key: RunKey) -> Path:
        """Where stage 1 left the adapter: this key's folder, or its twin's if reused."""
        out = key.folder(self.out)
        twin = json.loads((out / "val.json").read_text()).get("same_as")
        return (
            dataclasses.replace(key, variant=twin).folder(self.out) / "adapter"
            if twin
            else out / "adapter"
        )

    def trained(self, key: RunKey) -> TrainedRun | None:
        """Stage 1 (train + validation); its result, or None if the run failed."""
        out = key.folder(self.out)
        if not (out / "val.json").is_file() and (res := self._twin_done(key, "val.json")):
            return TrainedRun.from_dict(res, out)

        def job() -> TrainedRun:
            c = self.context(key.dataset)
            tcfg = self._train_config(key, out)
            summary = train(
                tcfg,
                model=c.model,
                tokenizer=c.tok,
                progress=False,
                splits=(c.train_set, c.val_set),
                prefix=c.prefix,
            )
            nora.unload(c.model)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the adapter/ stays
            return TrainedRun(
                **dataclasses.asdict(key),
                lr=lr_of(key.k),
                val_ppl=summary.eval_ppl,
                val_nll=summary.eval_loss,
                val_tokens=summary.eval_tokens,
                final_train_loss=summary.final_train_loss,
                trainable_params=summary.trainable_params,
                train_time_s=summary.train_time_s,
                tok_per_s=summary.tok_per_s,
                steps=summary.steps,
                folder=out,
            )

        # a failed training (e.g. diverged) is not retried: it would fail again
        return self.guarded(
            out,
            out / "val.json",
            job,
            f"train {key}",
            retry_failed=False,
            parse=functools.partial(TrainedRun.from_dict, folder=out),
        )

    def tested(self, key: RunKey) -> dict | None:
        """Stage 2 (test NLL per example, pass@1 per problem, spectra) after stage 1."""
        out = key.folder(self.out)
        done = out / "test.json"
        if not done.is_file() and (res := self._twin_done(key, "test.json")):
            return res
        if not done.is_file() and self.trained(key) is None:
            return None

        def job() -> dict:
            from nora.analysis import analyze

            teacher = self.teacher(key.dataset)
            c = self.context(key.dataset)
            nora.load_adapter(c.model, self._adapter_dir(key))
            try:
                scores = c.score_test(
                    c.model, self.cfg.n_gen, self.cfg.max_new(key.dataset), teacher=teacher
                )
                spectra = analyze(
                    c.model,
                    c.token_batches(c.test_set),
                    max_tokens=self.cfg.analysis_tokens,
                    keep_singular_values=256,
                )
            finally:
                nora.unload(c.model)
            return {**dataclasses.asdict(key), "lr": lr_of(key.k), **scores, "analysis": spectra}

        return self.guarded(out, done, job, f"test {key}")

    def control(self, dataset: str, variant: str, r: int) -> dict | None:
        """The untrained control of `variant` at rank `r`: its adapter as initialised with a
        random B (seed 0), analysed on the test tokens like a trained run (`untrained/`)."""
        out = self.out / "runs" / dataset / variant / f"r{r}" / "untrained"

        def job() -> dict:
            kw = {**adapter_kwargs(self.cfg.variants[variant])}
            kw["r"] = self.adapter_rank(dataset, variant, r)
            spectra = untrained_spectra(self.context(dataset), kw, self.cfg.analysis_tokens)
            return {"dataset": dataset, "variant": variant, "r": r, "analysis": spectra}

        return self.guarded(out, out / "test.json", job, f"control {dataset} {variant} r{r}")

    # --- learning rates ----------------------------------------------------------------------

    def search_lr(self, dataset: str, variant: str, r: int) -> int | None:
        """The grid index k of the best validation NLL, extending the grid past its edges."""
        done = self.rates.chosen().get(dataset, {}).get(variant, {}).get(str(r))
        if done is not None:
            return done
        ks = self.search_start(dataset, variant, r)
        limit = self.cfg.lr_search.max_values
        while True:
            scores, busy = {}, False
            for k in ks:  # a point another worker is training is skipped, the others run
                try:
                    res = self.trained(RunKey(dataset, variant, r, k, 0))
                except StageBusy:
                    busy = True
                    continue
                scores[k] = res.val_nll if res else math.inf
            if busy:
                raise StageBusy(f"search {dataset} {variant} r{r}")
            best = min(ks, key=lambda k: scores[k])
            if not math.isfinite(scores[best]):
                return None
            if best == ks[0] and len(ks) < limit:
                ks = [ks[0] - 1, *ks]
            elif best == ks[-1] and len(ks) < limit:
                ks = [*ks, ks[-1] + 1]
            else:
                self.rates.record(dataset, variant, r, ks, scores, best)
                return best

    def search_start(self, dataset: str, variant: str, r: int) -> list[int]:
        """The search's first points: `_start`'s guess, fixed by the first worker to ask."""
        return self.rates.start(dataset, variant, r, lambda: self._start(dataset, variant, r))

    def _start(self, dataset: str, variant: str, r: int) -> list[int]:
        """Three grid points around a guess: the configured start, or carried from a finished
        search of this variant at another rank (below) or on another dataset (the same k), or
        while it has none, from the variant it is `like` (lr_search.like).

        Across ranks the rate is carried as lr ∝ s^(-1/2)·r^(-1/6), s the adapter's scale.
        Adam moves every entry of A and B by about lr per step, so after t steps the update
        s·B·A has grown about as s·(lr·t)²·g(r): hence s^(-1/2). The rank's own exponent is
        measured: in both pilots (LoRA α=32, s·r = 32) r=128's best rate is one half-decade
        above r=4's (3.16e-3 -> 1e-2; 32x the rank: lr ∝ r^(1/3) at fixed s·r, so g(r) ∝
        r^(1/3)). Carrying lr ∝ 1/s (Adam's step on B alone) started r=128 three
        half-decades up, where it diverged; a wrong guess costs one run past the edge."""
        chosen = self.rates.chosen()  # one read of lr_choices.json

        def finished(v: str) -> dict | None:  # this dataset's searches of v, else another's
            return chosen.get(dataset, {}).get(v) or next(
                (by_v[v] for by_v in chosen.values() if v in by_v), None
            )

        source = variant
        found = finished(variant)
        if not found and (like := self.cfg.lr_search.like.get(variant)):
            source, found = like, finished(like)
        if not found:
            return self.cfg.lr_search.start_of(variant)
        # the finished search nearest in log2 rank
        r0, k0 = min(
            ((int(q), k) for q, k in found.items()), key=lambda x: abs(math.log2(x[0] / r))
        )
        s0 = AdapterConfig(**{**adapter_kwargs(self.cfg.variants[source]), "r": r0}).effective_scale
        s1 = AdapterConfig(**{**adapter_kwargs(self.cfg.variants[variant]), "r": r}).effective_scale
        # k = 2·log10(lr), so lr ∝ s^(-1/2)·r^(-1/6) moves k by -log10(s) - log10(r)/3
        k = k0 - round(math.log10(s1 / s0) + math.log10(r / r0) / 3)
        return [k - 1, k, k + 1]

    def lr_for(self, dataset: str, variant: str, r: int) -> int | None:
        return self.search_lr(dataset, variant, self.cfg.lr_search.source_rank(variant, r))

    def cell(self, dataset: str, variant: str, r: int, seed: int) -> None:
        k = self.lr_for(dataset, variant, r)
        if k is not None:
            self.tested(RunKey(dataset, variant, r, k, seed))


def untrained_spectra(c: DataContext, kw: dict[str, Any], max_tokens: int) -> dict:
    """`nora.analysis.analyze` of the adapter `kw` on `c`'s adapted layers as initialised
    with a random B (`init_weights=False`, seed 0), on the test tokens; the model is left
    without adapters."""
    from nora.analysis import analyze

    torch.manual_seed(0)
    cfg = AdapterConfig(**{**kw, "layers_to_transform": c.layers, "init_weights": False})
    nora.inject(c.model, cfg)
    try:
        return analyze(
            c.model, c.token_batches(c.test_set), max_tokens=max_tokens, keep_singular_values=256
        )
    finally:
        nora.unload(c.model)


def fit_study_teacher(c: DataContext, settings: dict[str, Any], log=print):
    """Fit a teacher on `c`'s training split: every weight of `settings["target_modules"]`
    in the adapted layers; its meta records the update's spectra and how far it moved the
    model (validation KL to the base, the task NLL of both)."""
    from nora.distill import fit_teacher, kl_eval, random_delta
    from nora.evaluate import perplexity
    from nora.inject import find_targets
    from nora.train import micro_batch_indices

    probe = AdapterConfig(
        method="lora", r=1, target_modules=settings["target_modules"], layers_to_transform=c.layers
    )
    modules = [name for name, _ in find_targets(c.model, probe)]
    b, n = settings["batch_size"], len(c.train_set)

    def batches(step: int) -> dict:
        idx = micro_batch_indices(n, b, 0, step)
        return c.collate([c.train_set[i] for i in idx])

    teacher = fit_teacher(
        c.model, batches, modules, settings["steps"], settings["lr"], c.forward_context, log=log
    ).check(c.model)
    if settings["delta"] == "random":
        fitted = teacher.delta_spectra(c.model)
        teacher = random_delta(teacher, c.model, scale=settings["delta_scale"])
        teacher.meta["fitted_delta"] = fitted  # what the fine-tune's own update looked like
    val = c.batches(c.val_set)
    with c.forward_context():
        base_nll = perplexity(c.model, val).nll
        with teacher.active(c.model):
            teacher_nll = perplexity(c.model, val).nll
    kl = kl_eval(c.model, val, teacher, context=c.forward_context).nll
    teacher.meta.update(
        settings=settings,
        val_nll_base=base_nll,
        val_nll_teacher=teacher_nll,
        val_kl_base=kl,
        delta=teacher.delta_spectra(c.model),
    )
    return teacher


# --- the order of work ---------------------------------------------------------------------


def plan(cfg: StudyConfig, datasets: list[str] | None = None) -> list[tuple]:
    """The order of work, in tiers, the most informative first (a done step is cheap to skip).

    Tier 1, for every dataset in turn: the `first` variants (LoRA, NoRA) at the default rank:
    their learning-rate searches, seed 0, the base model, the other seeds — the headline
    paired comparison. Then per dataset, tier 2: the `first` variants at the other ranks
    (searches where a variant searches that rank, seed 0 largest rank first, then the other
    seeds); tier 3: the other variants, default rank first, the same way; then, with
    `controls`, every variant's untrained control at each of its ranks. A variant runs (and
    searches) only at its `variant_ranks`.
    `datasets` keeps only those datasets' steps (one worker per dataset can share a folder).
    """
    lr = cfg.lr_search
    first = [v for v in cfg.variants if v in cfg.first] or list(cfg.variants)
    rest = [v for v in cfg.variants if v not in first]
    r0 = lr.default_rank if lr.default_rank in cfg.ranks else cfg.ranks[0]
    others = sorted((r for r in cfg.ranks if r != r0), reverse=True)
    seed0, later = cfg.seeds[0], cfg.seeds[1:]

    def searches(d, group, ranks):  # a variant searches where it searches and runs
        runs = cfg.ranks_of
        return [
            ("lr", d, v, r) for r in ranks for v in group if r in lr.ranks_of(v) and r in runs(v)
        ]

    def cells(d, group, ranks, seeds):
        return [
            ("cell", d, v, r, s)
            for s in seeds
            for r in ranks
            for v in group
            if r in cfg.ranks_of(v)
        ]

    def at_r0(d, group, base=False):
        steps = searches(d, group, [r0]) + cells(d, group, [r0], [seed0])
        return steps + [("base", d)] * base + cells(d, group, [r0], later)

    def at_others(d, group):
        return (
            searches(d, group, others)
            + cells(d, group, others, [seed0])
            + cells(d, group, others, later)
        )

    keep = [d for d in cfg.datasets if datasets is None or d in datasets]
    steps = [s for d in keep for s in at_r0(d, first, base=True)]
    for d in keep:
        steps += at_others(d, first)
        if rest:
            steps += at_r0(d, rest) + at_others(d, rest)
        if cfg.controls:  # cheap (no training): after the dataset's runs
            steps += [("control", d, v, r) for v in cfg.variants for r in cfg.ranks_of(v)]
    return steps


def run_plan(study: Study, steps: list[tuple], wait_s: float = 60.0) -> None:
    """Run the plan's steps in order. Workers started on one folder share it: a step whose
    stage another worker is running (StageBusy: a search point, a seed, a test) is passed
    over for the next ones, and the passed-over steps are tried again, after `wait_s`,
    until every step is done or failed."""
    do = {"lr": study.search_lr, "base": study.base, "control": study.control}
    while steps:
        busy = []
        for step in steps:
            try:
                do.get(step[0], study.cell)(*step[1:])
            except StageBusy:
                busy.append(step)
        if busy:
            study.log(f"{len(busy)} step(s) wait for another worker; again in {wait_s:.0f} s")
            time.sleep(wait_s)
        steps = busy


def _saved_config(path: Path) -> dict | None:
    try:
        return StudyConfig.from_dict(json.loads(path.read_text())["config"]).to_dict()
    except StudyError:
        return None


def run_study(
    cfg: StudyConfig,
    out_dir: str | Path,
    log=print,
    command: str | None = None,
    datasets: list[str] | None = None,
) -> dict:
    """Run (or continue) a study into `out_dir`; `datasets`: only those datasets' runs."""
    from nora.study.context import machine_info

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "study.json"
    with _locked(out / "study.lock"):  # workers for other datasets may start at the same time
        # read back through today's StudyConfig: a field added since (at its default) does
        # not make it another study
        if saved.is_file() and _saved_config(saved) != cfg.to_dict():
            raise StudyError(f"{out} holds a study with another config; use another --out")
        if not saved.is_file():
            info = {"config": cfg.to_dict(), "command": command, "machine": machine_info()}
            write_json(saved, info)
    if datasets and (unknown := sorted(set(datasets) - set(cfg.datasets))):
        raise StudyError(f"the study has no dataset(s) {unknown}; it has {cfg.datasets}")
    study = Study(cfg, out, log)
    t0 = time.perf_counter()
    run_plan(study, plan(cfg, datasets or None))
    study.ctx = None
    total = time.perf_counter() - t0
    log(f"study finished in {total / 60:.1f} min, {study.failed} failed stage(s)")
    with (out / "timing.jsonl").open("a") as f:
        f.write(json.dumps({"seconds": total, "failed": study.failed, "torch": torch.__version__}))
        f.write("\n")
    return {"failed": study.failed, "seconds": total}


# --- presets -------------------------------------------------------------------------------

# v1's training (issue 13): 240 steps x 8 examples, one pass over 1920, validation every 24
V1_TRAIN: dict[str, Any] = {
    "max_steps": 240,
    "batch_size": 8,
    "n_train": 1920,
    "max_len": 256,
    "warmup_ratio": 0.05,
    "eval_every": 24,
    "save_every": 48,
    "keep_checkpoints": 1,
}

# What every study v2 pilot shares: one variant (LoRA α=32) at r=4 and r=128 on v1's layers
# and steps, each rank's rate searched, seeds 0 and 1 (the second says how large a seed-to-
# seed difference is), no generation (the question is the test NLL or KL).
PILOT: dict[str, Any] = {
    "model": "smollm2-135m",
    "top_layers": 4,
    "train": dict(V1_TRAIN),  # v1's layers and steps
    "n_val": 64,
    "n_test": 300,
    "n_gen": 0,
    "variants": {"lora": {"method": "lora", "alpha": 32}},
    "ranks": [4, 128],
    "seeds": [0, 1],
    "lr_search": {"start": [-6, -5, -4], "ranks": {"lora": [4, 128]}, "default_rank": 4},
    "first": ["lora"],
    "analysis_tokens": 2048,
}

PILOT_DISTILL_RANDOM = {"steps": 480, "lr": 1e-4, "delta": "random", "delta_scale": 19.0}

STUDY_PRESETS: dict[str, dict[str, Any]] = {
    # The rank-scaling study on the embedded default (issue 13), for a 2-core CPU over
    # several sessions: 240 steps x 8 examples (10x the first paper-mini runs' tokens),
    # one pass over 1920 training examples, the validation loss every 24 steps.
    # `reasoning-mix` first: its runs cost ~6 CPU minutes (math ~25: longer examples and
    # 200 greedy answers of up to 192 tokens), so its whole grid fits the budget first.
    "study": {
        "model": "smollm2-135m",
        "datasets": ["reasoning-mix", "math"],
        "top_layers": 4,
        "train": dict(V1_TRAIN),
        "n_val": 64,
        "n_test": 300,
        "n_gen": 200,
        "max_new_tokens": {"math": 192, "reasoning-mix": 48},  # math answers: ~100 tokens
        "variants": {
            "lora": {"method": "lora", "alpha": 32},  # the paper's baseline: alpha = 32 always
            "lora-alpha-r": {"method": "lora", "scale": 1.0},  # alpha = r (paper's appendix)
            "lora-rslora": {"method": "lora", "alpha": 8, "rslora": True},  # 8/sqrt(r)
            "nora": {"method": "nora"},
        },
        "ranks": [4, 16, 64, 128],
        "seeds": [0, 1, 2],
        # LoRA's scale 32/r moves its best learning rate with the rank: searched at 4, 16, 128
        # (r=64 takes 128's). The other variants' scales move less (rsLoRA) or not at all.
        # Searches start around earlier runs' best (the demo: LoRA 3.16e-3, NoRA 1e-2) and
        # extend past an edge, so a wrong guess costs runs, not the answer.
        "lr_search": {
            "start": {"nora": [-5, -4, -3]},
            "ranks": {"lora": [4, 16, 128]},
            "default_rank": 16,
        },
        "first": ["lora", "nora"],
        "analysis_tokens": 2048,
    },
    # Study v2 pilots (issue 21): which setting makes LoRA's quality depend on its rank?
    "pilot-logistic": {
        # (c) the logistic-map task (the paper's Table 1 case study) as a rank sweep: ~56
        # supervised tokens per example of 4-decimal arithmetic, against reasoning-mix's 4
        **PILOT,
        "datasets": ["logistic-map"],
    },
    "pilot-distill": {
        # (a) distillation of a fully fine-tuned teacher: q/v of the top 4 layers fine-tuned
        # on reasoning-mix (every weight: a full-rank update), adapters on the same modules
        # trained to match its next-token distributions at every position (nora.distill)
        **PILOT,
        "datasets": ["reasoning-mix"],
        "distill": {"steps": 480, "lr": 1e-4},
    },
    "pilot-distill-random": {
        # (d) pilot-distill's teacher with each ΔW replaced by a Gaussian one (nora.distill.
        # random_delta): the fitted update is low-rank (rank90 9-19), so r=4 already closes
        # 99 % of its gap; this one's energy is spread over every direction. At the fitted
        # norm it moves the model by KL 0.001 only (KL grows ~ scale²: 0.016 at 4x, 0.064 at
        # 8x, 0.33 at 16x, 0.55 at 19x on 32 validation examples: results/study-v2/
        # random_teacher_scale.py), so its norm is 19x the fitted one's, a little further from
        # the base than the fine-tune (0.45)
        **PILOT,
        "datasets": ["reasoning-mix"],
        "distill": PILOT_DISTILL_RANDOM,
    },
}


# Study v2's main grid (issue 21), in the regime the pilots chose. The rank study (LoRA α=32,
# α=r, rsLoRA, NoRA at r = 4…128, each rate searched at every rank, 3 seeds) comes first:
# LoRA α=32 and NoRA at every rank (the crossover question), then everything at r=16, then
# the other variants' other ranks. Table 2 runs at 16 and 128, the siblings at 16 only.
V2_VARIANTS: dict[str, dict[str, Any]] = {
    "lora": {"method": "lora", "alpha": 32},
    "nora": {"method": "nora"},
    # Table 2: NoRA with one thing changed, or LoRA with one of NoRA's things
    "nora-identity": {"method": "nora", "activation": "identity"},  # isolates SiLU
    "lora-alpha-r": {"method": "lora", "scale": 1.0},
    "lora-rslora": {"method": "lora", "alpha": 8, "rslora": True},
    "nora-relu": {"method": "nora", "activation": "relu"},
    "nora-no-dropout": {"method": "nora", "dropout": 0.0},
    # LoRA's dropout sits on its input (PEFT's place); NoRA-identity vs LoRA-NoRA-init
    # is the latent-dropout contrast at NoRA's init and scale
    "lora-dropout": {"method": "lora", "alpha": 32, "dropout": 0.1},
    "lora-nora-init": {"method": "nora", "activation": "identity", "dropout": 0.0},
    # one NoRA adapter parallel to each attention and MLP block, at NoRA's parameter count
    "nora-module": {"method": "nora", "placement": "module", "match_params": "nora"},
    "nolora": {"method": "nolora"},
    "aurora": {"method": "aurora"},
    "loran": {"method": "loran"},
}
V2_RANKS = [4, 16, 64, 128]
V2_VARIANT_RANKS = {
    **{v: [16, 128] for v in ("nora-identity", "nora-relu", "nora-no-dropout")},
    **{v: [16, 128] for v in ("lora-dropout", "lora-nora-init", "nora-module")},
    **{v: [16] for v in ("nolora", "aurora", "loran")},
}
V2: dict[str, Any] = {
    **PILOT,
    "title": "Study v2 (issue 21): NoRA vs LoRA where LoRA's quality depends on its rank",
    "budget_cpu_hours": 15.0,
    "variants": V2_VARIANTS,
    "ranks": V2_RANKS,
    "variant_ranks": V2_VARIANT_RANKS,
    "seeds": [0, 1, 2],
    "lr_search": {
        # searched at every rank each variant runs at; the first search of a variant
        # starts from the pilots' (LoRA) or NoRA's rate, carried by Study._start's rule
        "start": [-6, -5, -4],
        "ranks": {v: V2_VARIANT_RANKS.get(v, V2_RANKS) for v in V2_VARIANTS},
        "like": {"nora": "lora", **{v: "nora" for v in V2_VARIANTS if v not in ("lora", "nora")}},
        "default_rank": 16,
    },
    "first": ["lora", "nora"],
    "controls": True,
}
STUDY_PRESETS["study-v2"] = {**V2, "datasets": ["reasoning-mix"], "distill": PILOT_DISTILL_RANDOM}
# The paper's Table 1 case study beside it: the distilled adapters above never saw the
# logistic map, so its probe (`nora.data.probe_logistic`: correct iterations before the first
# wrong one, state collapse) needs adapters trained on it. LoRA α=32 at r=16 and 128 (its best
# rank is the better of the two) against NoRA at both, tuned, 3 seeds, 100 greedy answers
# (5-8 lines "x3 = 0.6762" of ~10 tokens: the longest of the 300 test answers is 87 tokens
# for SmolLM2's tokenizer, so 96 new tokens hold any). pilot-logistic chose LoRA's rates.
STUDY_PRESETS["study-v2-probe"] = {
    **PILOT,
    "title": "Study v2 (issue 21), Table 1: the logistic-map probe, LoRA vs NoRA",
    "datasets": ["logistic-map"],
    "variants": {"lora": V2_VARIANTS["lora"], "nora": V2_VARIANTS["nora"]},
    "ranks": [16, 128],
    "seeds": [0, 1, 2],
    "n_gen": 100,
    "max_new_tokens": {"logistic-map": 96},
    "lr_search": {
        "start": [-5, -4, -3],  # around pilot-logistic's LoRA choices (3.16e-3, 1e-2)
        "ranks": {"lora": [16, 128], "nora": [16, 128]},
        "like": {"nora": "lora"},
        "default_rank": 16,
    },
    "first": ["lora", "nora"],
}


def load_study(spec: str) -> StudyConfig | None:
    """A study preset or a YAML/JSON file with `study: true`; None for anything else."""
    if spec in STUDY_PRESETS:
        return StudyConfig.from_dict(STUDY_PRESETS[spec])
    p = Path(spec)
    if p.suffix.lower() not in (".yaml", ".yml", ".json") or not p.is_file():
        return None
    import yaml

    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return None  # the sweep loader reports the syntax error
    if isinstance(d, dict) and d.get("study") is True:
        return StudyConfig.from_dict(d)
    return None


STAGES = ("val.json", "test.json")  # a run folder's finished stages
# Files a report needs; adapter weights and checkpoints stay behind.
EXPORTED = ("*.json", "*.jsonl", "adapter/adapter_config.json")


def export_results(src: str | Path, dst: str | Path) -> int:
    """Copy a study folder's finished JSON/JSONL files (not adapter weights, not unfinished
    stages' temporaries) into `dst`, e.g. a folder under git; returns the number copied."""
    src, dst = Path(src), Path(dst)
    n = 0
    files = {p for pattern in EXPORTED for p in src.glob("**/" + pattern)}
    for f in sorted(files):
        rel = f.relative_to(src)
        if "checkpoints" in rel.parts or rel.parts[0] in ("figures", "peft"):
            continue
        if f.name.endswith(".cost.json"):  # a running stage's cost so far (context.CostMeter)
            continue
        run = f.parent.parent if f.parent.name == "adapter" else f.parent
        if rel.parts[0] == "runs" and not any((run / d).is_file() for d in STAGES):
            continue  # a run still training: its files come with its first finished stage
        if rel.parent.name == "adapter":  # adapter/ folders are git-ignored: keep the config
            rel = rel.parent.parent / rel.name
        out = dst / rel
        if out.is_file() and out.read_bytes() == f.read_bytes():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
        n += 1
    return n
