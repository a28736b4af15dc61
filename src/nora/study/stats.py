"""Paired differences with bootstrap confidence intervals, and the verdicts read from them.

Two variants are compared on the same held-out examples and the same seeds: seed s of A is
paired with seed s of B (same data order, same initialisation seed). The statistic is the
mean over the shared seeds of (metric of A − metric of B); its 95 % interval resamples the
*examples* (the same resample for every seed and both variants, which keeps the pairing).
The interval therefore covers the sampling of test examples; the spread over seeds is shown
beside it (each seed's own difference), and with one seed the report says so.

Perplexity of a resample = exp(Σ NLL / Σ tokens) over its examples (token-weighted, like the
point estimate); accuracy = the mean of the 0/1 scores.
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

    @classmethod
    def from_dict(cls, d: dict) -> PerExample:
        return cls(
            np.asarray(d["nll"], dtype=float),
            np.asarray(d["tokens"], dtype=float),
            np.asarray(d["correct"], dtype=float),
        )

    def ppl(self) -> float:
        return math.exp(self.nll.sum() / self.tokens.sum())

    def accuracy(self) -> float | None:
        return float(self.correct.mean()) if self.correct.size else None


@dataclass(frozen=True)
class Interval:
    """A paired difference A − B: point estimate, 95 % bootstrap interval, per-seed values."""

    estimate: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 3, scale: float = 1.0, unit: str = "") -> str:
        f = f"{{:+.{digits}f}}"
        e, lo, hi = (f.format(v * scale) for v in (self.estimate, self.low, self.high))
        return f"{e}{unit} [{lo}, {hi}]"


def _ppl_of(nll: np.ndarray, tokens: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return np.exp(nll[idx].sum(axis=-1) / tokens[idx].sum(axis=-1))


def paired_difference(
    a: list[PerExample],
    b: list[PerExample],
    metric: str,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> Interval | None:
    """A − B for `metric` ("ppl" or "accuracy"), seed-paired (a[i] with b[i]), bootstrap over
    examples. None when there is nothing to compare (no seeds, or no generated problems)."""
    if not a or len(a) != len(b):
        return None
    rng = np.random.default_rng(seed)
    if metric == "ppl":
        n = a[0].nll.size
        if any(x.nll.size != n for x in (*a, *b)):
            raise ValueError("runs scored different test examples; they cannot be paired")
        point = [x.ppl() - y.ppl() for x, y in zip(a, b, strict=True)]
        idx = rng.integers(0, n, size=(n_boot, n))
        pairs = zip(a, b, strict=True)
        boots = np.mean(
            [_ppl_of(x.nll, x.tokens, idx) - _ppl_of(y.nll, y.tokens, idx) for x, y in pairs], 0
        )
    elif metric == "accuracy":
        m = a[0].correct.size
        if m == 0 or any(x.correct.size != m for x in (*a, *b)):
            return None
        point = [x.correct.mean() - y.correct.mean() for x, y in zip(a, b, strict=True)]
        idx = rng.integers(0, m, size=(n_boot, m))
        pairs = zip(a, b, strict=True)
        boots = np.mean([x.correct[idx].mean(1) - y.correct[idx].mean(1) for x, y in pairs], 0)
    else:
        raise ValueError(f"unknown metric {metric!r}; use 'ppl' or 'accuracy'")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(boots, [tail, 100 - tail])
    return Interval(float(np.mean(point)), float(low), float(high), tuple(map(float, point)))


def winner(iv: Interval, a: str, b: str, lower_is_better: bool) -> str | None:
    """The better of A and B by the interval, or None when it contains 0."""
    if not iv.excludes_zero:
        return None
    return a if (iv.estimate < 0) == lower_is_better else b


def verdict(iv: Interval, a: str, b: str, lower_is_better: bool) -> str:
    """One sentence that follows from the interval: which is better, or no difference."""
    if (w := winner(iv, a, b, lower_is_better)) is None:
        return f"no difference detected between {a} and {b} (the interval contains 0)"
    return f"{w} is better (the interval excludes 0)"
