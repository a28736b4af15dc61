"""`nora report STUDY_DIR`: the study's report (issue 13), regenerated from its JSON files.

Sections: what ran, the headline comparison, every NoRA-vs-LoRA verdict in one table, the
compute plan, the learning-rate searches with their learning curves, then per dataset the
test PPL / pass@1 table, the paired comparisons (every verdict sentence follows from its 95 %
interval, see `nora.study.stats`), the spectral figures, and the mechanism test: does the
effective rank of each view predict the test metric across ranks and seeds?
Each finished run is also written in the layout of PEFT's method_comparison results
(`peft/`, see `nora.study.peft_layout`).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from nora.study.results import StudyResults, TestRun
from nora.study.stats import paired_difference, rank_correlation, verdict, winner

NAMES = {
    "lora": "LoRA α=32",
    "lora-alpha-r": "LoRA α=r",
    "lora-rslora": "rsLoRA",
    "nora": "NoRA",
}


def _name(variant: str) -> str:
    return NAMES.get(variant, variant)


def _mean(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "–"
    m = fmt.format(statistics.mean(values))
    if len(values) == 1:
        return f"{m} (1 seed)"
    return f"{m} ± {fmt.format(statistics.stdev(values))} ({len(values)} seeds)"


# --- sections ------------------------------------------------------------------------------


def _command(command: str | None) -> str:
    """The sweep command as a worker recorded it; with `--dataset`, made generic."""
    import re

    command = command or "nora sweep study"
    if "--dataset" not in command:
        return f"`{command}`"
    generic = re.sub(r"--dataset \S+", "--dataset D", command)
    return f"`{generic}` (one worker per dataset D)"


def _header(res: StudyResults) -> list[str]:
    c, m = res.config, res.machine
    t = c["train"]
    return [
        "# NoRA vs LoRA: the rank-scaling study (issue 13)",
        "",
        f"- **Machine**: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch "
        f"{m.get('torch', '?')}; 1 torch thread per run, one worker per dataset running side "
        "by side (`--dataset`), sharing the CPU with the session's other work",
        f"- **Model**: {c['model']}; adapted layers: top {c['top_layers']}, q_proj and v_proj",
        f"- **Training**: {t.get('max_steps')} steps × {t.get('batch_size')} examples "
        f"({t.get('n_train')} training examples, one pass), cosine schedule, warmup "
        f"{t.get('warmup_ratio')}; validation loss every {t.get('eval_every')} steps on "
        f"{c['n_val']} examples",
        f"- **Test**: {c['n_test']} held-out examples (token-weighted perplexity) and greedy "
        f"pass@1 on the first {c['n_gen']} of them (max new tokens: "
        + ", ".join(f"{d} {n}" for d, n in c["max_new_tokens"].items())
        + ")",
        f"- **Command**: {_command(res.command)}, then `nora report {res.folder}`",
        "",
    ]


BUDGET_CPU_HOURS = 10  # issue 13: "Budget about 10 CPU hours in total"


def _compute(res: StudyResults) -> list[str]:
    """Minutes per run, CPU hours spent, what ran and what did not, what the rest costs."""
    c = res.config
    train_min = [r.cost_s / 60 for r in res.trained if r.same_as is None]
    test_min = [t.cost_s / 60 for t in res.tested if t.same_as is None]
    spent = (sum(train_min) + sum(test_min) + sum(b.cost_s / 60 for b in res.base.values())) / 60
    cells = [
        (d, v, r, s)
        for d in c["datasets"]
        for v in c["variants"]
        for r in c["ranks"]
        for s in c["seeds"]
    ]
    done = {(t.dataset, t.variant, t.r, t.seed) for t in res.tested}
    trained_keys = {(t.dataset, t.variant, t.r, t.seed, t.lr) for t in res.trained}
    from nora.study.runner import twin_of

    # a cell whose variant is the same adapter as an earlier one's reuses its runs (no cost)
    todo = [k for k in cells if k not in done and not twin_of(c["variants"], k[1], k[2])]
    # a missing cell needs a test stage, and a training unless its search already trained it
    need_train = [
        d for d, v, r, s in todo if (d, v, r, s, res.chosen_lr(d, v, r)) not in trained_keys
    ]
    lines = ["## Compute plan", ""]
    if train_min and test_min:
        per_train, per_test = statistics.median(train_min), statistics.median(test_min)
        # each dataset's own medians where it has finished stages (math runs cost ~4x more)
        med_train, med_test = {}, {}
        for d in c["datasets"]:
            tr = [r.cost_s / 60 for r in res.trained if r.dataset == d and r.same_as is None]
            te = [t.cost_s / 60 for t in res.tested if t.dataset == d and t.same_as is None]
            med_train[d] = statistics.median(tr) if tr else per_train
            med_test[d] = statistics.median(te) if te else per_test
            if tr or te:
                lines.append(
                    f"- {d}: median **{med_train[d]:.1f} CPU min** per training "
                    f"({len(tr)} runs), **{med_test[d]:.1f}** per test stage ({len(te)})"
                    + ("" if te else " (no test stage yet: the overall median is used)")
                )
        minutes = sum(med_train[d] for d in need_train) + sum(med_test[k[0]] for k in todo)
        rest = f"≈ **{minutes / 60:.1f} CPU hours**"
        lines.append(
            "- (CPU time, one thread; stages from before CPU time was recorded count their wall "
            "time.)"
        )
    else:
        rest = "(minutes per run: not measured yet, no stage of each kind has finished)"
    lines += [
        f"- Spent so far: **{spent:.1f} CPU hours** of the about {BUDGET_CPU_HOURS} the issue "
        "budgets (summed over finished stages; a worker's first stage includes building its "
        "dataset's prefix cache).",
        f"- Headline cells finished: **{sum(k in done for k in cells)} of {len(cells)}** "
        f"(datasets × {len(c['variants'])} variants × {len(c['ranks'])} ranks × "
        f"{len(c['seeds'])} seeds); learning-rate searches finished: {len(res.searches)}.",
        f"- Left: {len(todo)} test stages and about {len(need_train)} trainings {rest} at the "
        "medians above (plus any learning-rate searches not yet run; cells that reuse an "
        "identical variant's runs cost nothing and are not counted). "
        "Rerunning the sweep command continues where it stopped.",
    ]
    if res.errors:
        lines.append(f"- Failed stages (diverged or crashed): {', '.join(res.errors)}")
    by_cell: dict[tuple, list[int]] = {}
    for d, v, r, s in cells:
        if (d, v, r, s) in done:
            by_cell.setdefault((d, v, r), []).append(s)
    lines += ["", "Seeds finished per cell:", "", _cell_table(res, by_cell), ""]
    return lines


def _cell_table(res: StudyResults, by_cell: dict[tuple, list[int]]) -> str:
    c = res.config
    head = "| dataset | variant | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |"
    rows = [head, "|---|---|" + "---|" * len(c["ranks"])]
    for d in c["datasets"]:
        for v in c["variants"]:
            cells = [str(len(by_cell.get((d, v, r), []))) for r in c["ranks"]]
            rows.append(f"| {d} | {_name(v)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _searched_ranks(config: dict) -> str:
    """Which ranks each variant's rate is searched at, and where the other ranks' come from."""
    from nora.study.runner import LRSearch

    lr = LRSearch(**config["lr_search"])
    groups: dict[tuple, list[str]] = {}  # searched ranks -> the variants searched there
    for v in config["variants"]:
        groups.setdefault(tuple(lr.ranks_of(v)), []).append(v)
    parts = []
    for ranks, variants in groups.items():
        unsearched = [r for r in config["ranks"] if r not in ranks]
        if not unsearched:
            took = ""
        elif len(ranks) == 1:  # one rate for every rank
            took = " (its rate used at every rank)"
        else:
            src = (f"r = {r} takes r = {lr.source_rank(variants[0], r)}'s" for r in unsearched)
            took = f" ({'; '.join(src)})"
        searched = ", ".join(map(str, ranks))
        parts.append(f"{', '.join(map(_name, variants))}: searched at r = {searched}{took}")
    return "; ".join(parts) + ". (An unsearched rank takes the nearest searched rank's rate.)"


def _learning_rates(res: StudyResults, figures: Path) -> list[str]:
    from nora.study.plots import plot_learning_curves

    lines = [
        "## Learning rates",
        "",
        "Each variant's rate is searched on the validation split (seed 0) on a half-decade grid "
        "that is extended past an edge while the best value sits on it, so the chosen rate is "
        "interior. " + _searched_ranks(res.config),
        "",
    ]
    if {"lora-alpha-r", "lora-rslora"} & set(res.config["variants"]):
        lines += [
            "With Adam, one step moves B·A roughly by the rate "
            "times the adapter's scale times the rank: LoRA α=32's scale 32/r keeps that steady "
            "across ranks, while LoRA α=r's 1 and rsLoRA's 8/√r do not, so a rate carried from "
            "r = 16 to a larger rank takes larger steps there (rsLoRA's argument) — the learning "
            "curves below show whether such a run is still well tuned.",
            "",
        ]
    lines += [
        "| dataset | variant | r | grid (val NLL) | chosen | interior |",
        "|---|---|---|---|---|---|",
    ]
    for s in res.searches:
        grid = ", ".join(f"{lr:.3g} ({v:.4f})" for lr, v in zip(s.grid, s.val_nll, strict=True))
        lines.append(
            f"| {s.dataset} | {_name(s.variant)} | {s.r} | {grid} | **{s.best_lr:.3g}** | "
            f"{'yes' if s.interior else 'NO (grid limit)'} |"
        )
    if not res.searches:
        lines.append("| – | – | – | no search has finished yet | – | – |")
    twins = sorted(
        {(t.dataset, t.variant, t.r, t.same_as) for t in [*res.trained, *res.tested] if t.same_as}
    )
    if twins:
        lines += [
            "",
            "Variants that are the same adapter at a rank (same method, same effective "
            "scale) reuse the earlier variant's runs instead of training them again:",
            "",
        ]
        lines += [
            f"- {d}, r={r}: {_name(v)} is {_name(o)} (its runs are {_name(o)}'s, reused)"
            for d, v, r, o in twins
        ]
    for d in res.config["datasets"]:
        runs = [t for t in res.trained if t.dataset == d and t.seed == 0]
        if runs:
            path = plot_learning_curves(runs, figures / f"learning_curves_{d}.png", d)
            lines += [
                "",
                f"Validation loss during training ({d}; one line per learning rate, the chosen "
                "one bold): the curves show whether a run finished learning.",
                "",
                f"![learning curves]({path.relative_to(figures.parent)})",
            ]
    return [*lines, ""]


def _table(res: StudyResults, d: str) -> list[str]:
    c = res.config
    lines = [
        "| variant | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |",
        "|---|" + "---|" * len(c["ranks"]),
    ]
    base = res.base.get(d)
    for metric, fmt in (("test_ppl", "{:.3f}"), ("accuracy", "{:.1%}")):
        label = "test PPL" if metric == "test_ppl" else "pass@1"
        if base is not None:
            v = getattr(base, metric)
            lines.append(f"| base model ({label}) | {fmt.format(v) if v is not None else '–'} |")
        for v in c["variants"]:
            cells = []
            for r in c["ranks"]:
                vals = [getattr(t, metric) for t in res.cell(d, v, r)]
                cells.append(_mean([x for x in vals if x is not None], fmt))
            lines.append(f"| {_name(v)} ({label}) | " + " | ".join(cells) + " |")
    return lines


def _comparisons(res: StudyResults, d: str, against: str = "nora") -> list[str]:
    """NoRA against each LoRA variant, and each adapter against the base model, per rank."""
    lines = []
    for other in [v for v in res.config["variants"] if v != against]:
        for r in res.config["ranks"]:
            a, b = res.paired(d, against, other, r)
            lines += _compare(
                [t.per_example for t in a], [t.per_example for t in b], against, other, r
            )
    return lines


# metric, lower is better, digits, scale, unit
METRICS = (("ppl", True, 3, 1.0, ""), ("accuracy", False, 1, 100.0, " pp"))


def _compare(a, b, name_a: str, name_b: str, r: int | None) -> list[str]:
    out = []
    where = f"r={r}, " if r is not None else ""
    for metric, lower, digits, scale, unit in METRICS:
        iv = paired_difference(a, b, metric)
        if iv is None:
            continue
        seeds = f"{len(a)} seed{'s' if len(a) > 1 else ''}"
        per_seed = ", ".join(f"{v * scale:+.{digits}f}" for v in iv.per_seed)
        label = "ΔPPL" if metric == "ppl" else "Δpass@1"
        out.append(
            f"- {where}{_name(name_a)} − {_name(name_b)}, {label} = "
            f"{iv.fmt(digits, scale, unit)} ({seeds}; per seed {per_seed}): "
            f"{verdict(iv, _name(name_a), _name(name_b), lower_is_better=lower)}"
        )
    return out


def _base_comparisons(res: StudyResults, d: str) -> list[str]:
    base = res.base.get(d)
    if base is None:
        return []
    lines = []
    for v in res.config["variants"]:
        for r in res.config["ranks"]:
            runs = res.cell(d, v, r)
            if runs:
                lines += _compare(
                    [t.per_example for t in runs], [base.per_example] * len(runs), v, "base", r
                )
    return lines


def _dataset(res: StudyResults, d: str, figures: Path) -> list[str]:
    lines = [f"## {d}", "", "Test perplexity and greedy pass@1, mean ± std over seeds:", ""]
    lines += _table(res, d)
    lines += _rank_figure(res, d, figures)
    comps = _comparisons(res, d)
    lines += [
        "",
        "**NoRA vs each LoRA variant** (paired over seeds, 95 % bootstrap interval over test "
        "examples; negative ΔPPL and positive Δpass@1 favour NoRA). The interval is the "
        "uncertainty from which test examples were drawn, for these seeds; it does not "
        "resample training seeds, whose spread the per-seed values show:",
        "",
        *(comps or ["- no cell has finished for both yet"]),
        *(
            [
                "",
                f"Each interval is 95 % on its own: of these {len(comps)}, about "
                f"{len(comps) / 20:.1f} would exclude 0 by chance if there were no difference, "
                "so a single verdict that stands alone among its neighbours is weak evidence.",
            ]
            if len(comps) > 2
            else []
        ),
        "",
        "**Each adapter vs the base model** (same intervals):",
        "",
        *(_base_comparisons(res, d) or ["- nothing finished yet"]),
        "",
    ]
    return lines + _spectral(res, d, figures)


def _rank_figure(res: StudyResults, d: str, figures: Path) -> list[str]:
    """Test PPL and pass@1 vs rank per variant (the paper's Fig. 2/3), once a cell finished."""
    from nora.study.plots import plot_metrics_vs_rank

    c, base = res.config, res.base.get(d)
    panels = []
    for metric, label, scale in (
        ("test_ppl", "test perplexity", 1),
        ("accuracy", "pass@1 (%)", 100),
    ):
        groups = {
            _name(v): {
                r: [
                    getattr(t, metric) * scale
                    for t in res.cell(d, v, r)
                    if getattr(t, metric) is not None
                ]
                for r in c["ranks"]
            }
            for v in c["variants"]
        }
        b = getattr(base, metric) if base is not None else None
        panels.append((label, groups, b * scale if b is not None else None))
    if not any(vs for _, groups, _ in panels for by_r in groups.values() for vs in by_r.values()):
        return []
    p = plot_metrics_vs_rank(
        panels, figures / f"metrics_vs_rank_{d}.png", f"{d}: test metrics vs rank"
    )
    return [
        "",
        "Mean ± std over the finished seeds (the table above says how many):",
        "",
        f"![test metrics vs rank]({p.relative_to(figures.parent)})",
    ]


def _spectral(res: StudyResults, d: str, figures: Path) -> list[str]:
    from nora.study.plots import plot_effective_rank_vs_rank, plot_spectra_comparison

    runs = [_with_group(t) for t in res.tested if t.dataset == d and t.spectra is not None]
    if not runs:
        return []
    lines = ["Spectra of the tuned runs (latent activations; mean over layers):", ""]
    p = plot_effective_rank_vs_rank(runs, figures / f"effective_rank_{d}.png")
    lines.append(f"![effective rank vs rank]({p.relative_to(figures.parent)})")
    top = max(t.r for t in res.tested if t.dataset == d and t.spectra is not None)
    p = plot_spectra_comparison(runs, figures / f"spectrum_{d}.png", rank=top)
    lines += ["", f"![spectrum at r={top}]({p.relative_to(figures.parent)})", ""]
    return lines + _controls(res, d) + _mechanism(res, d)


def _controls(res: StudyResults, d: str) -> list[str]:
    """Effective rank of the trained runs (mean over seeds) beside the untrained control of
    the same variant and rank, per view."""
    controls = {(c.variant, c.r): c for c in res.controls if c.dataset == d}
    if not controls:
        return []
    rows = []
    for (v, r), c in sorted(controls.items()):
        trained = [t for t in res.tested if (t.dataset, t.variant, t.r) == (d, v, r) and t.spectra]
        for view in sorted(c.spectra.effective_rank):
            er = [t.spectra.effective_rank[view] for t in trained]
            mean = f"{statistics.mean(er):.1f} ({len(er)} seeds)" if er else "–"
            rows.append(
                f"| {_name(v)} | {r} | {view} | {mean} | {c.spectra.effective_rank[view]:.1f} |"
            )
    return [
        "Effective rank after training against the untrained control (the same adapter at its "
        "initialisation with a random B, seed 0; mean over layers): how much of a trained "
        "run's spread spectrum training made, and how much a random A and B already have.",
        "",
        "| variant | r | view | ER trained | ER untrained |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _mechanism(res: StudyResults, d: str) -> list[str]:
    """Spearman's ρ between each run's effective rank (per view) and its test metric, per
    variant: pooled over ranks and seeds, and within each rank (whether ER says more than
    the rank itself). Twins' reused runs count once."""
    kl = bool(res.config.get("distill"))
    rows = []
    for v in sorted({t.variant for t in res.tested if t.dataset == d}):
        runs = [
            t
            for t in res.tested
            if (t.dataset, t.variant) == (d, v) and t.spectra is not None and t.same_as is None
        ]
        if len(runs) < 3 or len({t.r for t in runs}) < 2:
            continue
        y = [_test_metric(t, kl) for t in runs]
        ranks = [t.r for t in runs]
        by_rank = all(ranks.count(r) >= 2 for r in ranks)
        for view in sorted(runs[0].spectra.effective_rank):
            x = [t.spectra.effective_rank[view] for t in runs]
            pooled = rank_correlation(x, y)
            within = rank_correlation(x, y, groups=ranks).fmt(2) if by_rank else "–"
            rows.append(f"| {_name(v)} | {view} | {len(runs)} | {pooled.fmt(2)} | {within} |")
    if not rows:
        return []
    metric = "test KL" if kl else "test PPL"
    return [
        f"Does the effective rank predict {metric}? Spearman's ρ over runs (ranks × seeds), "
        "95 % bootstrap interval over runs; *within rank*: ranks taken within each adapter "
        "rank, so it asks whether ER predicts the metric beyond what the rank does. A negative "
        f"ρ: a higher effective rank goes with a lower {metric}.",
        "",
        "| variant | view | runs | ρ pooled [95 % CI] | ρ within rank [95 % CI] |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _test_metric(t: TestRun, kl: bool) -> float:
    num, den, exp = t.per_example.ratio("kl" if kl else "ppl")
    m = float(num.sum() / den.sum())
    return math.exp(m) if exp else m


def _with_group(t: TestRun) -> dict:
    return {**t.spectra.summary, "group": _name(t.variant)}


def _headline(res: StudyResults) -> list[str]:
    """The paper's question first: NoRA vs LoRA α=32 at the default rank, per dataset, and
    how far apart all variants are there once each has its own tuned learning rate."""
    r = res.config["lr_search"].get("default_rank", 16)
    lines = [f"## Headline: NoRA vs LoRA at r = {r}, each at its tuned learning rate", ""]
    for d in res.config["datasets"]:
        a, b = res.paired(d, "nora", "lora", r)
        comp = _compare(
            [t.per_example for t in a], [t.per_example for t in b], "nora", "lora", None
        )
        lines += [f"**{d}**:", ""]
        lines += comp or ["- not finished yet for both"]
        runs = {_name(v): res.cell(d, v, r) for v in res.config["variants"]}
        means = {k: statistics.mean(t.test_ppl for t in ts) for k, ts in runs.items() if ts}
        if len(means) > 1:
            lo, hi = min(means.values()), max(means.values())
            want = len(res.config["seeds"])
            # a mean over fewer seeds than the others is marked: the spread mixes them
            seeds = {
                k: "" if len(runs[k]) == want else f" ({len(runs[k])} of {want} seeds)"
                for k in means
            }
            lines.append(
                f"- spread of mean test PPL over the {len(means)} finished variants at r={r}: "
                f"{lo:.3f} – {hi:.3f} ({(hi - lo) / lo:.1%} of the best; "
                + ", ".join(f"{k} {v:.3f}{seeds[k]}" for k, v in means.items())
                + ")"
            )
        lines.append("")
    return lines


def _glance(res: StudyResults, against: str = "nora") -> list[str]:
    """Every NoRA-vs-LoRA verdict of the report in one table: the better one per rank (its
    Δ in brackets), "no difference" where the interval contains 0, – where a cell is missing."""
    c = res.config
    lines = [
        "## At a glance: NoRA vs each LoRA variant, per rank",
        "",
        "Each cell names the better of the two where the 95 % interval of the paired "
        'difference (NoRA − the other) excludes 0, and says "no difference" where it '
        "contains 0; the intervals themselves are in each dataset's section. Learning rates: "
        + _searched_ranks(c),
        "",
        "| dataset | NoRA vs | metric | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |",
        "|---|---|---|" + "---|" * len(c["ranks"]),
    ]
    for d in c["datasets"]:
        for other in [v for v in c["variants"] if v != against]:
            for metric, lower, digits, scale, unit in METRICS:
                cells = []
                for r in c["ranks"]:
                    a, b = res.paired(d, against, other, r)
                    pa, pb = [t.per_example for t in a], [t.per_example for t in b]
                    iv = paired_difference(pa, pb, metric)
                    if iv is None:
                        cells.append("–")
                        continue
                    w = winner(iv, _name(against), _name(other), lower_is_better=lower)
                    est = f"{iv.estimate * scale:+.{digits}f}{unit}"
                    n, want = len(a), len(c["seeds"])
                    seeds = "" if n == want else f", {n} of {want} seeds"
                    cells.append(f"{f'**{w}**' if w else 'no difference'} ({est}{seeds})")
                label = "test PPL" if metric == "ppl" else "pass@1"
                row = f"| {d} | {_name(other)} | {label} | " + " | ".join(cells) + " |"
                if any(x != "–" for x in cells):
                    lines.append(row)
    return [*lines, ""]


# --- the report ----------------------------------------------------------------------------


def build_study_report(folder: str | Path) -> Path:
    """Write `report.md`, `figures/` and `peft/` into the study folder; returns the report."""
    from nora.study.peft_layout import write_peft_results

    folder = Path(folder)
    res = StudyResults.load(folder)
    figures = folder / "figures"
    figures.mkdir(exist_ok=True)
    lines = _header(res) + _headline(res) + _glance(res) + _compute(res)
    lines += _learning_rates(res, figures)
    for d in res.config["datasets"]:
        lines += _dataset(res, d, figures)
    n = write_peft_results(res, folder / "peft")
    lines += [
        "## PEFT method_comparison layout",
        "",
        f"Each finished run is also in `peft/` ({n} files) in the layout of PEFT's "
        "`method_comparison/*/results/*.json` (`run_info` / `train_info` / `meta_info`), so its "
        "numbers can sit next to PEFT's table. CPU runs record no accelerator memory.",
        "",
    ]
    report = folder / "report.md"
    report.write_text("\n".join(lines))
    return report
