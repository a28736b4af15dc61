"""One dataset's rank study: the primary metric per variant and rank, its figure, NoRA vs
each LoRA variant, the crossover question, pass@1 against the majority-answer prior, each
adapter against the base model."""

from __future__ import annotations

import statistics
from pathlib import Path

from nora.study.compare import (
    ALPHA,
    PASS1,
    Comparison,
    Metric,
    Pair,
    Side,
    comparison_table,
    family,
    metrics,
    pair,
    primary,
    prior_verdict,
)
from nora.study.report.common import (
    NOT_RUN,
    lora_variants,
    not_run_note,
    rank_study,
    ranks_of,
    same_adapter,
    twin_notes,
    variant_name,
)
from nora.study.results import StudyResults
from nora.study.stats import PerExample


def _table(res: StudyResults, d: str) -> list[str]:
    """The rank study's cells: each metric's mean ± std over seeds, the seeds and the rate;
    a twin's cell names the variant it is; the base model, and the prior beside pass@1."""
    c, base = res.config, res.base.get(d)
    lines = [
        "| variant | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |",
        "|---|" + "---|" * len(c["ranks"]),
    ]
    for m in metrics(res):
        if base is not None:
            v = m.of(base.per_example)
            lines.append(f"| base model ({m.label}) | {m.fmt(v) if v is not None else '–'} |")
        if m is PASS1 and base is not None and base.prior is not None:
            lines.append(f"| majority answer per family (pass@1) | {m.fmt(base.prior.mean())} |")
        for v in rank_study(c):
            cells = [_cell(res, d, v, r, m) for r in c["ranks"]]
            lines.append(f"| {variant_name(v)} ({m.label}) | " + " | ".join(cells) + " |")
    return lines


def _cell(res: StudyResults, d: str, v: str, r: int, m: Metric) -> str:
    """Mean ± std over the seeds, how many, and (beside the primary metric) the rate the cell
    ran at; a twin's cell names the variant it is; one outside the variant's ranks is
    `NOT_RUN`."""
    if r not in ranks_of(res.config, v):
        return NOT_RUN
    if twin := same_adapter(res, v, r):
        return f"= {variant_name(twin)}"
    runs = [t for t in res.cell(d, v, r) if m.of(t.per_example) is not None]
    if not runs:
        return "–"
    rates = {t.lr for t in runs}
    rate = f"; lr {rates.pop():.3g}" if not m.generated and len(rates) == 1 else ""
    seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    return f"{m.spread([t.per_example for t in runs])} ({seeds}{rate})"


def nora_vs_lora(res: StudyResults, d: str, against: str = "nora") -> list[Comparison]:
    """NoRA against each other rank-study variant at each rank (twins left out): one family."""
    pairs = [
        pair(
            res, d, (against, r), (other, r), (variant_name(against), variant_name(other)), f"r={r}"
        )
        for other in rank_study(res.config)
        if other != against
        for r in ranks_of(res.config, other)
        if r in ranks_of(res.config, against)
        and not same_adapter(res, other, r)
        and not same_adapter(res, against, r)
    ]
    return family(pairs, metrics(res))


def _crossover(res: StudyResults, d: str) -> list[str]:
    """The crossover question: the best LoRA cell (the lowest mean primary metric over its
    finished seeds of any rank-study LoRA variant at any of its ranks; a twin's cell is its
    twin's), and NoRA at each rank, ascending, against it, seed s with seed s over the seeds
    both finished; the smallest NoRA rank that ties it (no winner after Holm) or beats it, and
    any larger rank where the LoRA cell wins again."""
    c, m, want = res.config, primary(res), len(res.config["seeds"])
    means = {
        (v, r): statistics.mean(m.of(t.per_example) for t in res.cell(d, v, r))
        for v in lora_variants(c)
        for r in ranks_of(c, v)
        if res.cell(d, v, r) and not same_adapter(res, v, r)
    }
    nora = [r for r in sorted(ranks_of(c, "nora")) if res.cell(d, "nora", r)]
    if not means or not nora:
        return []
    best = min(means, key=means.get)
    best_label = f"{variant_name(best[0])} r={best[1]}"
    pairs = [pair(res, d, ("nora", r), best, (f"NoRA r={r}", best_label)) for r in nora]
    comps = family(pairs, (m,))
    rank_of = {p.a.label: r for p, r in zip(pairs, nora, strict=True)}
    won = {rank_of[x.pair.a.label]: x.winner for x in comps}  # NoRA's rank -> the winner
    seeds = {rank_of[x.pair.a.label]: len(x.pair.a.runs) for x in comps}  # paired seeds
    first = next((r for r in sorted(won) if won[r] != best_label), None)
    if not won:
        answer = "Not answerable yet: no NoRA rank shares a finished seed with the best LoRA cell."
    elif first is None:
        answer = (
            f"No NoRA rank ties or beats the best LoRA cell: {best_label} is better than NoRA at "
            f"every rank compared (r = {', '.join(map(str, sorted(won)))})."
        )
    else:
        how = "beats it" if won[first] else "ties it"
        over = "" if seeds[first] == want else f", over {seeds[first]} of {want} seeds"
        again = [r for r in sorted(won) if r > first and won[r] == best_label]
        answer = (
            "The smallest NoRA rank that ties the best LoRA cell (no winner after Holm) or beats "
            f"it (NoRA better) is **r = {first}** ({how}{over})"
            + (
                f"; {best_label} is better again at r = {', '.join(map(str, again))}."
                if again
                else "."
            )
        )
    n_best = len(res.cell(d, *best))
    best_seeds = "" if n_best == want else f", {n_best} of {want} seeds"
    return [
        f"**The crossover question**: the best LoRA cell is {best_label} (the lowest mean "
        f"{m.label} of the LoRA variants at any rank: {m.fmt(means[best])}{best_seeds}). NoRA "
        "at each rank against it, paired seed by seed; Holm over this table. The cell is picked "
        "as the best on these same test examples, so its mean is, if anything, optimistic: the "
        "comparison leans towards LoRA.",
        "",
        *comparison_table(comps),
        "",
        answer,
        "",
    ]


def _each_cell_vs(res: StudyResults, d: str, label: str, ref: PerExample) -> list[Pair]:
    """Every variant's cell at every rank (twins left out) against one fixed run, which
    stands against each of the cell's seeds."""
    return [
        Pair(
            Side(variant_name(v), [t.per_example for t in runs]),
            Side(label, [ref] * len(runs)),
            f"r={r}",
        )
        for v in res.config["variants"]
        for r in ranks_of(res.config, v)
        if (runs := res.cell(d, v, r)) and not same_adapter(res, v, r)
    ]


def _prior(res: StudyResults, d: str) -> list[str]:
    """pass@1 of every cell against the per-family majority answer (the base's `prior`)."""
    base = res.base.get(d)
    if not res.config.get("n_gen") or base is None or base.prior is None:
        return []
    prior = PerExample(base.per_example.nll, base.per_example.tokens, base.prior)
    comps = family(_each_cell_vs(res, d, "majority answer", prior), (PASS1,))
    return [
        "**pass@1 against the majority-answer prior** (each family's most common training "
        "answer, whatever the question): a cell is *above the prior* only when its interval "
        f"excludes 0 and its Holm-adjusted p < {ALPHA}:",
        "",
        *comparison_table(comps, prior_verdict),
        "",
    ]


def _vs_base(res: StudyResults, d: str) -> list[str]:
    base = res.base.get(d)
    if base is None:
        return []
    return [
        "**Each adapter vs the base model** (same intervals; Holm over this table):",
        "",
        *comparison_table(family(_each_cell_vs(res, d, "base", base.per_example), metrics(res))),
        "",
    ]


def rank_section(res: StudyResults, d: str, figures: Path, vs_lora: list[Comparison]) -> list[str]:
    m = primary(res)
    lines = [
        f"### Rank study: {m.label} per variant and rank",
        "",
        "Mean ± std over seeds (how many, and the rate each cell ran at, in brackets):",
        "",
        *_table(res, d),
        "",
        *not_run_note(res.config, rank_study(res.config)),
        *twin_notes(res, d, rank_study(res.config)),
        *_rank_figure(res, d, figures),
        "**NoRA vs each LoRA variant** (Holm over this table):",
        "",
        *comparison_table(vs_lora),
        "",
    ]
    return lines + _crossover(res, d) + _prior(res, d) + _vs_base(res, d)


def _rank_figure(res: StudyResults, d: str, figures: Path) -> list[str]:
    """Each metric vs rank per rank-study variant (the paper's Fig. 2/3), once a cell finished."""
    from nora.study.plots import plot_metrics_vs_rank

    c, base = res.config, res.base.get(d)
    panels = []
    for m in metrics(res):
        groups = {
            variant_name(v): {
                r: [
                    x * m.scale for t in res.cell(d, v, r) if (x := m.of(t.per_example)) is not None
                ]
                for r in ranks_of(c, v)
            }
            for v in rank_study(c)
        }
        b = m.of(base.per_example) if base is not None else None
        panels.append((m.label, groups, b * m.scale if b is not None else None))
    if not any(vs for _, groups, _ in panels for by_r in groups.values() for vs in by_r.values()):
        return []
    p = plot_metrics_vs_rank(
        panels, figures / f"metrics_vs_rank_{d}.png", f"{d}: test metrics vs rank"
    )
    return [
        "Mean ± std over the finished seeds (the table above says how many):",
        "",
        f"![test metrics vs rank]({p.relative_to(figures.parent)})",
        "",
    ]
