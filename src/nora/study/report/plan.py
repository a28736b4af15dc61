"""The compute plan (spent against budgeted, what is left) and the learning-rate searches
with their learning curves."""

from __future__ import annotations

import statistics
from pathlib import Path

from nora.study.compare import (
    primary,
)
from nora.study.report.common import (
    NOT_RUN,
    config_defaults,
    not_run_note,
    ranks_of,
    same_adapter,
    variant_name,
)
from nora.study.results import StudyResults


def compute_plan(res: StudyResults) -> list[str]:
    """Minutes per run, CPU hours spent, what ran and what did not, what the rest costs."""
    from nora.study.runner import LRSearch

    c = res.config
    train_min = [r.cost_s / 60 for r in res.trained if r.same_as is None]
    test_min = [t.cost_s / 60 for t in res.tested if t.same_as is None]
    spent = (sum(train_min) + sum(test_min) + sum(b.cost_s / 60 for b in res.base.values())) / 60
    cells = [
        (d, v, r, s)
        for d in c["datasets"]
        for v in c["variants"]
        for r in ranks_of(c, v)
        for s in c["seeds"]
    ]
    done = {(t.dataset, t.variant, t.r, t.seed) for t in res.tested}
    trained_keys = {(t.dataset, t.variant, t.r, t.seed, t.lr) for t in res.trained}
    # a cell whose variant is the same adapter as an earlier one's reuses its runs (no cost)
    todo = [k for k in cells if k not in done and not same_adapter(res, k[1], k[2])]
    # a missing cell needs a test stage, and a training unless it is trained already (at the
    # rate searched at its source rank: its own search's seed-0 run, or a test stage left)
    search = LRSearch(**c["lr_search"])
    need_train = [
        d
        for d, v, r, s in todo
        if (d, v, r, s, res.chosen_lr(d, v, search.source_rank(v, r))) not in trained_keys
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
    budget = c.get("budget_cpu_hours", config_defaults().budget_cpu_hours)
    if not_run_note(c, list(c["variants"])):
        n_cells = sum(len(ranks_of(c, v)) for v in c["variants"])
        grid = f"{n_cells} (variant, rank) cells, each variant at its `variant_ranks`"
    else:
        grid = f"{len(c['variants'])} variants × {len(c['ranks'])} ranks"
    lines += [
        f"- Spent so far: **{spent:.1f} CPU hours** of the {budget:g} budgeted (the config's "
        "`budget_cpu_hours`; summed over finished stages; a worker's first stage includes "
        "building its dataset's prefix cache).",
        f"- Cells finished: **{sum(k in done for k in cells)} of {len(cells)}** "
        f"(datasets × {grid} × {len(c['seeds'])} seeds); learning-rate searches finished: "
        f"{len(res.searches)}.",
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
    return lines + not_run_note(c, list(c["variants"]))


def _cell_table(res: StudyResults, by_cell: dict[tuple, list[int]]) -> str:
    c = res.config
    head = "| dataset | variant | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |"
    rows = [head, "|---|---|" + "---|" * len(c["ranks"])]
    for d in c["datasets"]:
        for v in c["variants"]:
            cells = [
                str(len(by_cell.get((d, v, r), []))) if r in ranks_of(c, v) else NOT_RUN
                for r in c["ranks"]
            ]
            rows.append(f"| {d} | {variant_name(v)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def searched_ranks(config: dict) -> str:
    """Which ranks each variant's rate is searched at, and where its other ranks' come from:
    as the runner does it, a cell at rank r runs at the rate searched at
    `LRSearch.source_rank(v, r)`, for each rank the variant runs at."""
    from nora.study.runner import LRSearch

    lr = LRSearch(**config["lr_search"])
    said: dict[str, list[str]] = {}  # what is said -> the variants it is said of
    for v in config["variants"]:
        runs = ranks_of(config, v)
        source = {r: lr.source_rank(v, r) for r in runs}
        searched = sorted(set(source.values()))
        unsearched = [r for r in runs if r not in searched]
        if not unsearched:
            took = ""
        elif len(searched) == 1:  # one rate for every rank
            took = (
                " (its rate used at every rank)"
                if runs == config["ranks"]
                else f" (its rate used at r = {', '.join(map(str, unsearched))} too)"
            )
        else:
            src = (f"r = {r} takes r = {source[r]}'s" for r in unsearched)
            took = f" ({'; '.join(src)})"
        said.setdefault(f"searched at r = {', '.join(map(str, searched))}{took}", []).append(v)
    parts = [f"{', '.join(map(variant_name, vs))}: {what}" for what, vs in said.items()]
    return "; ".join(parts) + ". (An unsearched rank takes the nearest searched rank's rate.)"


def learning_rates(res: StudyResults, figures: Path) -> list[str]:
    from nora.study.plots import plot_learning_curves
    from nora.study.runner import LRSearch

    # a distilling run's validation loss is its mean KL to the teacher per position (train.py)
    loss, digits = ("KL", primary(res).digits) if res.config.get("distill") else ("NLL", 4)
    lines = [
        "## Learning rates",
        "",
        "Each variant's rate is searched on the validation split (seed 0) on a half-decade grid "
        "that is extended past an edge while the best value sits on it, so the chosen rate is "
        "interior. " + searched_ranks(res.config),
        "",
    ]
    c, search = res.config, LRSearch(**res.config["lr_search"])
    carried = [  # LoRA α=r or rsLoRA at a rank whose rate was searched at another rank
        v
        for v in ("lora-alpha-r", "lora-rslora")
        if v in c["variants"] and any(search.source_rank(v, r) != r for r in ranks_of(c, v))
    ]
    if carried:
        lines += [
            "With Adam, every entry of A and B moves by about the rate per step, so the update "
            "s·B·A grows with the adapter's scale s times its rank r (`runner.Study._start`): "
            "LoRA α=32's s·r = 32 is the same at every rank, while LoRA α=r's r and rsLoRA's "
            "8·√r grow with it, so a rate carried to a larger rank takes larger steps there "
            "(rsLoRA's argument) — the learning curves below show whether such a run is still "
            "well tuned.",
            "",
        ]
    lines += [
        f"| dataset | variant | r | grid (val {loss}) | chosen | interior |",
        "|---|---|---|---|---|---|",
    ]
    for s in res.searches:
        grid = ", ".join(
            f"{lr:.3g} ({v:.{digits}f})" for lr, v in zip(s.grid, s.val_nll, strict=True)
        )
        lines.append(
            f"| {s.dataset} | {variant_name(s.variant)} | {s.r} | {grid} | **{s.best_lr:.3g}** | "
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
            f"- {d}, r={r}: {variant_name(v)} is {variant_name(o)} (its runs are {variant_name(o)}'s, reused)"
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
