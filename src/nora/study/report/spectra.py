"""One dataset's spectra: effective rank and AUC-90 per view against rank beside the
untrained controls, and the mechanism test (does each view's effective rank predict the test
metric?)."""

from __future__ import annotations

import statistics
from pathlib import Path

from nora.study.compare import (
    primary,
)
from nora.study.report.common import rank_study, same_adapter, variant_name
from nora.study.results import StudyResults
from nora.study.stats import rank_correlation

# weight (s·B·A) and output (Δh, the function view) first: the views the paper draws
SPECTRAL_VIEWS = ("weight", "output", "latent")


def _spectral_runs(res: StudyResults, d: str) -> tuple[list[dict], list[dict]]:
    """The summaries the spectral figures draw: the tuned runs of the rank study's variants and
    NoRA-identity, and those variants' untrained controls."""
    drawn = {*rank_study(res.config), "nora-identity"}
    runs = [t for t in res.tested if t.dataset == d and t.spectra and t.variant in drawn]
    controls = [c for c in res.controls if c.dataset == d and c.variant in drawn]
    return [_with_group(t) for t in runs], [_with_group(c) for c in controls]


def spectral(res: StudyResults, d: str, figures: Path) -> list[str]:
    from nora.study.plots import plot_effective_rank_vs_rank, plot_spectra_comparison

    runs, controls = _spectral_runs(res, d)
    if not runs:
        return []
    dashed = "; dashed: the untrained controls (the adapters at initialisation)" if controls else ""
    lines = [
        "### Spectra",
        "",
        "Effective rank and AUC-90 (the fewest singular values holding 90 % of the energy) of "
        "each tuned run against its rank, per variant (the rank study's and NoRA-identity), "
        "mean over the adapted layers, ± std over seeds, in the three views of "
        "`nora.analysis`: the weight s·B·A, the output Δh (the function view) and the latent "
        f"σ(A·x){dashed}.",
        "",
    ]
    for view in SPECTRAL_VIEWS:
        path = figures / f"effective_rank_{view}_{d}.png"
        p = plot_effective_rank_vs_rank(runs, path, view=view, controls=controls, auc90=True)
        lines += [
            f"![{view} view: effective rank and AUC-90 vs rank]({p.relative_to(figures.parent)})",
            "",
        ]
    top = max(run["r"] for run in runs)
    p = plot_spectra_comparison(runs, figures / f"spectrum_{d}.png", rank=top)
    lines += [f"![latent spectrum at r={top}]({p.relative_to(figures.parent)})", ""]
    return lines + _controls(res, d) + _mechanism(res, d)


def _controls(res: StudyResults, d: str) -> list[str]:
    """Effective rank and AUC-90 of the trained runs (mean over seeds) beside the untrained
    control of the same variant and rank, per view."""
    controls = {  # a twin's control is its twin's adapter at the same init: shown once
        (c.variant, c.r): c
        for c in res.controls
        if c.dataset == d and not same_adapter(res, c.variant, c.r)
    }
    if not controls:
        return []
    rows = []
    for (v, r), c in sorted(controls.items()):
        trained = [t for t in res.tested if (t.dataset, t.variant, t.r) == (d, v, r) and t.spectra]
        for view in sorted(c.spectra.effective_rank):
            er = [t.spectra.effective_rank[view] for t in trained]
            auc = [t.spectra.auc90[view] for t in trained]
            mean = f"{statistics.mean(er):.1f} ({len(er)} seeds)" if er else "–"
            auc_mean = f"{statistics.mean(auc):.1f}" if auc else "–"
            rows.append(
                f"| {variant_name(v)} | {r} | {view} | {mean} | {c.spectra.effective_rank[view]:.1f} | "
                f"{auc_mean} | {c.spectra.auc90[view]:.1f} |"
            )
    return [
        "Effective rank and AUC-90 after training against the untrained control (the same "
        "adapter at its initialisation with a random B, seed 0; mean over layers): how much of "
        "a trained run's spread spectrum training made, and how much a random A and B already "
        "have.",
        "",
        "| variant | r | view | ER trained | ER untrained | AUC-90 trained | AUC-90 untrained |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _mechanism(res: StudyResults, d: str) -> list[str]:
    """Spearman's ρ between each run's effective rank (per view) and its primary test metric,
    per variant: pooled over ranks and seeds, and within each rank (whether ER says more than
    the rank itself). Twins' reused runs count once."""
    m = primary(res)
    rows = []
    for v in sorted({t.variant for t in res.tested if t.dataset == d}):
        runs = [
            t
            for t in res.tested
            if (t.dataset, t.variant) == (d, v) and t.spectra is not None and t.same_as is None
        ]
        if len(runs) < 3 or len({t.r for t in runs}) < 2:
            continue
        y = [m.of(t.per_example) for t in runs]
        ranks = [t.r for t in runs]
        by_rank = all(ranks.count(r) >= 2 for r in ranks)
        for view in sorted(runs[0].spectra.effective_rank):
            x = [t.spectra.effective_rank[view] for t in runs]
            pooled = rank_correlation(x, y)
            within = rank_correlation(x, y, groups=ranks).fmt(2) if by_rank else "–"
            rows.append(
                f"| {variant_name(v)} | {view} | {len(runs)} | {pooled.fmt(2)} | {within} |"
            )
    if not rows:
        return []
    return [
        f"Does the effective rank predict {m.label}? Spearman's ρ over runs (ranks × seeds), "
        "95 % bootstrap interval over runs; *within rank*: ranks taken within each adapter "
        "rank, so it asks whether ER predicts the metric beyond what the rank does. A negative "
        f"ρ: a higher effective rank goes with a lower {m.label}.",
        "",
        "| variant | view | runs | ρ pooled [95 % CI] | ρ within rank [95 % CI] |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _with_group(run) -> dict:
    """A run's (or an untrained control's) analysis summary, grouped by its variant's name."""
    return {**run.spectra.summary, "group": variant_name(run.variant)}
