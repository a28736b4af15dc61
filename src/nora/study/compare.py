"""One table's paired comparisons, Holm-adjusted together, and how they are printed.

A report table (the headline, NoRA against each LoRA variant, the crossover question, Table 2,
...) is one *family*: a list of `Pair`s, A − B, each side one cell's runs in seed order, seed
s of A with seed s of B over the seeds both finished. `family` gives each pair its paired
hierarchical-bootstrap interval per metric (`stats.paired_difference`) and adjusts the
table's p-values together by Holm's method (`stats.holm`); a `Comparison` names a winner only
when its interval excludes 0 **and** its Holm-adjusted p < `ALPHA`, so "no difference" (a tie)
means no winner after Holm. `comparison_table` prints a family as a markdown table.

The metrics: the study's primary one (`primary`: the test KL(teacher ‖ adapter) where the
study distils, else the test perplexity) and pass@1 beside it where the study generates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nora.study.results import StudyResults
from nora.study.stats import Interval, PerExample, holm, paired_difference
from nora.study.stats import winner as interval_winner

ALPHA = 0.05  # a verdict's level, after Holm's adjustment within its table

# --- metrics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """A test metric as the report prints it."""

    key: str  # stats.paired_difference's name: "ppl", "kl", "accuracy" or "steps"
    label: str  # "test KL"
    what: str  # the header's sentence
    digits: int  # decimals of values and differences, after `scale`
    scale: float = 1.0
    unit: str = ""  # of a value
    delta_unit: str = ""  # of a difference
    lower_is_better: bool = True

    @property
    def delta(self) -> str:
        return "Δ" + self.label.removeprefix("test ")

    @property
    def generated(self) -> bool:
        """Scored on greedy completions (pass@1, the probe), not on the test tokens."""
        return self.key in ("accuracy", "steps")

    def of(self, pe: PerExample) -> float | None:
        """A run's value: token-weighted like the bootstrap's point estimate (KL: Σ KL / Σ
        positions; PPL: exp(Σ NLL / Σ tokens)); pass@1 and the probe's steps: the mean per
        problem, None without any."""
        if self.generated:
            scores = pe.per_problem(self.key)
            return float(scores.mean()) if scores.size else None
        num, den, exp = pe.ratio(self.key)
        m = float(num.sum() / den.sum())
        return math.exp(m) if exp else m

    def fmt(self, v: float) -> str:
        return f"{v * self.scale:.{self.digits}f}{self.unit}"

    def spread(self, runs: Sequence[PerExample]) -> str:
        """Mean ± std over runs (seeds); the value alone where they agree (one run, or the base
        model standing against every seed), – for none."""
        values = [v for v in map(self.of, runs) if v is not None]
        if not values:
            return "–"
        m = self.fmt(statistics.mean(values))
        return m if len(set(values)) == 1 else f"{m} ± {self.fmt(statistics.stdev(values))}"


PPL = Metric("ppl", "test PPL", "token-weighted test perplexity, lower is better", 3)
PASS1 = Metric("accuracy", "pass@1", "greedy pass@1", 1, 100.0, "%", " pp", lower_is_better=False)
STEPS = Metric(
    "steps",
    "probe steps",
    "the logistic-map probe (the paper's Table 1): correct iterations before the first wrong "
    "one, greedy, higher is better",
    2,
    lower_is_better=False,
)


def primary(res: StudyResults) -> Metric:
    """The study's primary metric: the test KL(teacher ‖ adapter) per position where it distils
    (to about 4 significant digits of its smallest run), else the test perplexity."""
    if not res.config.get("distill"):
        return PPL
    per_run = [
        pe.kl.sum() / pe.positions.sum() for t in res.tested if (pe := t.per_example).kl is not None
    ]
    low = float(min((v for v in per_run if v > 0), default=0.1))
    what = "test KL(teacher ‖ adapter), nats per position, lower is better"
    return Metric("kl", "test KL", what, max(3, 3 - math.floor(math.log10(low))))


def metrics(res: StudyResults) -> tuple[Metric, ...]:
    """The primary metric, then pass@1 where the study generates (n_gen > 0), then the
    logistic-map probe's steps where a run has them (its problems are the logistic map's)."""
    found = (PASS1,) * bool(res.config.get("n_gen"))
    found += (STEPS,) * any(t.per_example.steps is not None for t in res.tested)
    return (primary(res), *found)


# --- comparisons: one table's intervals, Holm-adjusted together ------------------------------


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its label and its runs' per-example scores, in seed order."""

    label: str
    runs: list[PerExample]


@dataclass(frozen=True)
class Pair:
    """A − B, seed s of A with seed s of B; `where` is a row's context (e.g. "r=16")."""

    a: Side
    b: Side
    where: str = ""

    @property
    def name(self) -> str:
        return f"{self.a.label} − {self.b.label}" + (f", {self.where}" if self.where else "")


@dataclass(frozen=True)
class Comparison:
    pair: Pair
    metric: Metric
    iv: Interval
    p_holm: float  # the bootstrap p-value adjusted by Holm over the comparison's table

    @property
    def winner(self) -> str | None:
        """A's or B's label where the interval excludes 0 and the adjusted p < ALPHA."""
        if self.p_holm >= ALPHA:
            return None
        return interval_winner(
            self.iv, self.pair.a.label, self.pair.b.label, self.metric.lower_is_better
        )


def pair(
    res: StudyResults,
    d: str,
    a: tuple[str, int],
    b: tuple[str, int],
    labels: tuple[str, str],
    where: str = "",
) -> Pair:
    """Cell a (variant, rank) − cell b on dataset d, labelled `labels`, over the seeds both
    finished, seed with seed."""
    ra = {t.seed: t for t in res.cell(d, *a)}
    rb = {t.seed: t for t in res.cell(d, *b)}
    seeds = sorted(set(ra) & set(rb))
    la, lb = labels
    return Pair(
        Side(la, [ra[s].per_example for s in seeds]),
        Side(lb, [rb[s].per_example for s in seeds]),
        where,
    )


def family(pairs: list[Pair], metrics: Sequence[Metric]) -> list[Comparison]:
    """One table's comparisons: each pair's interval per metric (metric by metric; a pair with
    no shared seed, or pass@1 without generated problems, has none), and their p-values
    adjusted together by Holm: the only place a verdict's p is made."""
    found = [
        (p, m, iv)
        for m in metrics
        for p in pairs
        if (iv := paired_difference(p.a.runs, p.b.runs, m.key)) is not None
    ]
    adjusted = holm([iv.p_value for _, _, iv in found])
    return [Comparison(p, m, iv, q) for (p, m, iv), q in zip(found, adjusted, strict=True)]


# --- how a family is printed -----------------------------------------------------------------


def fmt_p(p: float) -> str:
    # 2000 bootstrap draws: a p of 0 means none crossed 0, so p < 0.001
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def verdict(c: Comparison) -> str:
    if w := c.winner:
        return f"{w} is better"
    if c.iv.excludes_zero:
        return f"no difference after Holm (adjusted p ≥ {ALPHA})"
    return "no difference (the interval contains 0)"


def prior_verdict(c: Comparison) -> str:
    return "above the prior" if c.winner == c.pair.a.label else "not above the prior"


def comparison_table(
    comps: list[Comparison], verdict: Callable[[Comparison], str] = verdict
) -> list[str]:
    """A family as a table: both sides' mean ± std over the paired seeds, the difference with
    its 95 % interval, per seed, the Holm-adjusted p and the verdict."""
    if not comps:
        return ["- nothing finished for both sides yet"]
    rows = [
        "| A − B | metric | seeds | A | B | A − B [95 % CI] | per seed | Holm p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comps:
        m, (a, b) = c.metric, (c.pair.a, c.pair.b)
        per_seed = ", ".join(f"{v * m.scale:+.{m.digits}f}" for v in c.iv.per_seed)
        rows.append(
            f"| {c.pair.name} | {m.delta} | {len(a.runs)} | {m.spread(a.runs)} | "
            f"{m.spread(b.runs)} | {c.iv.fmt(m.digits, m.scale, m.delta_unit)} | {per_seed} | "
            f"{fmt_p(c.p_holm)} | {verdict(c)} |"
        )
    return rows
