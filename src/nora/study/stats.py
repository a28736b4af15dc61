"""Paired differences with bootstrap confidence intervals, and the verdicts read from them.

Two variants are compared on the same held-out examples and the same seeds: seed s of A is
paired with seed s of B (same data order, same initialisation seed). The statistic is the
mean over the shared seeds of (metric of A − metric of B). Its 95 % interval comes from a
**hierarchical bootstrap** (Saravanan et al. 2020): each draw resamples the seeds with
replacement, then, for each drawn seed, the examples (one resample shared by A and B, which
keeps the pairing). So the interval covers both what another seed and what other test
examples would give; with one seed it covers the examples only, and the report says so.
`over="examples"` gives the examples-only interval (v1's) for comparison.

Each interval carries a two-sided bootstrap p-value (twice the smaller tail beyond 0);
`holm` adjusts a table's p-values for the number of comparisons in it (Holm 1979).

`rank_correlation` asks whether one per-run quantity predicts another (the paper's mechanism:
does the effective rank of the update predict test PPL across ranks and seeds?): Spearman's ρ
over runs with a bootstrap interval over runs, optionally within groups (e.g. within each
rank, so that ρ says whether ER predicts PPL beyond what the rank itself does).

Perplexity of a resample = exp(Σ NLL / Σ tokens) over its examples (token-weighted, like the
point estimate); NLL the same without the exp; KL = Σ KL / Σ positions (nora.distill);
accuracy = the mean of the 0/1 scores; the probe's steps = the mean of its per-problem counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PerExample:
    """One run's per-example test scores (aligned across runs of one dataset)."""

    nll: np.ndarray  # (n,) summed NLL of each example's response tokens
    tokens: np.ndarray  # (n,) response tokens per example
    correct: np.ndarray  # (m,) 0/1 greedy pass@1 per problem
    kl: np.ndarray | None = None  # (n,) summed KL to the teacher (distillation studies)
    positions: np.ndarray | None = None  # (n,) positions the KL is summed over
    # (m,) the logistic-map probe's correct iterations per generated problem (paper Table 1)
    steps: np.ndarray | None = None

    @classmethod
    def from_dict(cls, d: dict, kl: dict | None = None) -> PerExample:
        """From a test.json's `per_example` (and `per_example_kl` when distilling)."""
        return cls(
            np.asarray(d["nll"], dtype=float),
            np.asarray(d["tokens"], dtype=float),
            np.asarray(d["correct"], dtype=float),
            np.asarray(kl["kl"], dtype=float) if kl else None,
            np.asarray(kl["positions"], dtype=float) if kl else None,
            np.asarray(d["correct_steps"], dtype=float) if d.get("correct_steps") else None,
        )

    def per_problem(self, metric: str) -> np.ndarray:
        """(m,) one score per generated problem, averaged by a mean metric: pass@1's 0/1
        ("accuracy") or the probe's correct iterations ("steps"; empty without a probe)."""
        if metric == "accuracy":
            return self.correct
        return self.steps if self.steps is not None else np.empty(0)

    def ratio(self, metric: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """(numerators, denominators, exp?) of a token-weighted metric: ppl, nll or kl."""
        if metric in ("ppl", "nll"):
            return self.nll, self.tokens, metric == "ppl"
        if self.kl is None:
            raise ValueError("no per-example KL: this run was not distilled")
        return self.kl, self.positions, False

    def ppl(self) -> float:
        return math.exp(self.nll.sum() / self.tokens.sum())


@dataclass(frozen=True)
class Interval:
    """A paired difference A − B: point estimate, 95 % bootstrap interval, per-seed values."""

    estimate: float
    low: float
    high: float
    per_seed: tuple[float, ...]
    p_value: float = 1.0  # two-sided bootstrap p-value of "no difference"
    over: str = "seeds+examples"  # what the bootstrap resampled

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        f = f"{{:+.{digits}f}}"
        e, lo, hi = (f.format(v * scale) for v in (self.estimate, self.low, self.high))
        return f"{e}{unit} [{lo}, {hi}]"


def _boot_ratio(num: np.ndarray, den: np.ndarray, exp: bool, idx: np.ndarray) -> np.ndarray:
    r = num[idx].sum(axis=-1) / den[idx].sum(axis=-1)  # (n_boot,)
    return np.exp(r) if exp else r


def paired_difference(
    a: list[PerExample],
    b: list[PerExample],
    metric: str,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    over: str = "seeds+examples",
) -> Interval | None:
    """A − B for `metric` ("ppl", "nll", "kl", "accuracy" or the probe's "steps"), seed-paired
    (a[i] with b[i]), by the hierarchical bootstrap (`over="seeds+examples"`) or over examples
    only (`"examples"`). None when there is nothing to compare (no seeds, or no generated
    problems, or no probe)."""
    if not a or len(a) != len(b):
        return None
    if over not in ("seeds+examples", "examples"):
        raise ValueError(f"over must be 'seeds+examples' or 'examples', got {over!r}")
    if metric not in ("ppl", "nll", "kl", "accuracy", "steps"):
        raise ValueError(
            f"unknown metric {metric!r}; use 'ppl', 'nll', 'kl', 'accuracy' or 'steps'"
        )
    rng = np.random.default_rng(seed)
    if metric in ("accuracy", "steps"):  # a mean over the generated problems
        m = a[0].per_problem(metric).size
        if m == 0 or any(x.per_problem(metric).size != m for x in (*a, *b)):
            return None

        def value(x: PerExample, idx: np.ndarray) -> np.ndarray:
            return x.per_problem(metric)[idx].mean(-1)

        n = m
    else:
        n = a[0].nll.size
        if any(x.nll.size != n for x in (*a, *b)):
            raise ValueError("runs scored different test examples; they cannot be paired")

        def value(x: PerExample, idx: np.ndarray) -> np.ndarray:
            return _boot_ratio(*x.ratio(metric), idx)

    everything = np.arange(n)[None]  # (1, n): the point estimate's "resample"
    pairs = list(zip(a, b, strict=True))
    point = [float(value(x, everything)[0] - value(y, everything)[0]) for x, y in pairs]
    s = len(a)
    if over == "examples":  # one example resample shared by every seed (v1's interval)
        idx = rng.integers(0, n, size=(n_boot, n))
        boots = np.mean([value(x, idx) - value(y, idx) for x, y in pairs], 0)
    else:  # seeds with replacement, then examples within each drawn seed
        seeds = rng.integers(0, s, size=(n_boot, s))  # (n_boot, s)
        diffs = np.empty((n_boot, s))
        for j in range(s):
            idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n): this slot's examples
            per = np.stack([value(x, idx) - value(y, idx) for x, y in pairs])  # (s, n_boot)
            diffs[:, j] = per[seeds[:, j], np.arange(n_boot)]  # (n_boot,)
        boots = diffs.mean(1)
    low, high, p = _percentile_interval(boots, level)
    return Interval(float(np.mean(point)), low, high, tuple(point), p_value=p, over=over)


def _percentile_interval(boots: np.ndarray, level: float) -> tuple[float, float, float]:
    """(low, high) percentile interval of bootstrap values and the two-sided p-value of 0
    (twice the smaller tail beyond 0)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    p = min(1.0, 2 * min(float((boots <= 0).mean()), float((boots >= 0).mean())))
    return float(low), float(high), p


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along the last axis, ties given their average rank (`scipy.stats.rankdata`'s
    "average" method, less 1): every row of a (draws, n) array ranked at once."""
    n = v.shape[-1]
    order = np.argsort(v, axis=-1, kind="stable")
    s = np.take_along_axis(v, order, -1)
    pos = np.broadcast_to(np.arange(n), v.shape)
    first = np.ones(v.shape, dtype=bool)  # the first of its run of equal values (sorted)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = np.ones(v.shape, dtype=bool)
    last[..., :-1] = first[..., 1:]
    lo = np.maximum.accumulate(np.where(first, pos, 0), axis=-1)  # the run's first position
    hi = np.flip(np.minimum.accumulate(np.flip(np.where(last, pos, n - 1), -1), axis=-1), -1)
    ranks = np.empty(v.shape)
    np.put_along_axis(ranks, order, (lo + hi) / 2, -1)  # a run's mean position, in place
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """ρ of x and y along the last axis (each row at once); with groups (one label per column),
    of their ranks within each group, centred per group. NaN where x or y has no spread."""
    if groups is None:
        rx, ry = _ranks(x), _ranks(y)
    else:
        rx, ry = np.empty(x.shape), np.empty(y.shape)
        for g in np.unique(groups):
            m = groups == g
            centre = (m.sum() - 1) / 2
            rx[..., m], ry[..., m] = _ranks(x[..., m]) - centre, _ranks(y[..., m]) - centre
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))
    num = (rx * ry).sum(-1)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


def rank_correlation(
    x: list[float],
    y: list[float],
    groups: list | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Spearman's ρ between x[i] and y[i] (one pair per run), with a percentile bootstrap
    interval over runs (resampled within each group when `groups` is given) and a two-sided
    p-value of ρ = 0. With `groups`, ρ is computed on ranks within each group: whether x
    predicts y among runs of the same group (e.g. the same adapter rank).

    The draws: `n_boot` resamples of the runs (within groups: each group's runs, its size,
    groups in sorted order), drawn at once and ranked at once."""
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1 or len(xa) < 3:
        raise ValueError("rank_correlation needs two equal-length lists of at least 3 values")
    ga = None if groups is None else np.asarray(groups)
    if ga is not None and len(ga) != len(xa):
        raise ValueError("groups must give one group per pair")
    rng = np.random.default_rng(seed)
    point = float(_spearman(xa, ya, ga))
    n = len(xa)
    if ga is None:
        idx = rng.integers(0, n, size=(n_boot, n))  # (n_boot, n)
        labels = None
    else:  # each draw: every group's runs resampled with replacement, the group's size
        members = [np.flatnonzero(ga == g) for g in np.unique(ga)]
        sizes = np.array([len(m) for m in members])
        runs = np.concatenate(members)  # a draw's slot j resamples group_of(j)'s runs
        start = np.repeat(np.cumsum(sizes) - sizes, sizes)  # (n,) the slot's group in `runs`
        local = rng.integers(0, np.broadcast_to(np.repeat(sizes, sizes), (n_boot, n)))
        idx = runs[start + local]  # (n_boot, n)
        labels = ga[runs]  # the slots' groups, the same in every draw
    boots = _spearman(xa[idx], ya[idx], labels)  # (n_boot,)
    b = boots[~np.isnan(boots)]  # a resample of ties only has no ρ
    if not b.size:  # x or y is constant: no draw has a ρ, nor an interval
        return Interval(point, math.nan, math.nan, (), p_value=1.0, over="runs")
    low, high, p = _percentile_interval(b, level)
    return Interval(point, low, high, (), p_value=p, over="runs")


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): the i-th smallest is
    multiplied by (k − i), made non-decreasing, capped at 1. A comparison is significant at
    level α in a table of k when its adjusted value is below α."""
    k = len(p_values)
    order = sorted(range(k), key=lambda i: p_values[i])
    adjusted, running = [0.0] * k, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (k - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def winner(iv: Interval, a: str, b: str, lower_is_better: bool) -> str | None:
    """The better of A and B by the interval, or None when it contains 0: the side of 0 the
    interval lies on (a skewed bootstrap can leave the point estimate outside it)."""
    if not iv.excludes_zero:
        return None
    return a if (iv.high < 0) == lower_is_better else b


def verdict(iv: Interval, a: str, b: str, lower_is_better: bool) -> str:
    """One sentence that follows from the interval: which is better, or no difference."""
    if (w := winner(iv, a, b, lower_is_better)) is None:
        return f"no difference detected between {a} and {b} (the interval contains 0)"
    return f"{w} is better (the interval excludes 0)"
