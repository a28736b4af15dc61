"""`nora report STUDY_DIR`: a study's report (issue 13's v1, issue 21's v2), regenerated from
its JSON files.

Sections: what ran (under the config's `title`), how the verdicts are read, study v2's pilot
table (with `pilots=`: `nora report STUDY_DIR --pilots P1 P2`), the headline comparison,
every NoRA-vs-LoRA verdict in one table, the compute plan (against the config's
`budget_cpu_hours`), the learning-rate searches with their learning curves, then per dataset:
the rank study (the primary metric per variant and rank with each cell's rate, its figure,
NoRA vs each LoRA variant, the crossover question, pass@1 against the majority-answer prior,
each adapter against the base model), Table 2 (ablations) and the siblings where the config
has those variants, and the spectra (weight, output and latent views, beside the untrained
controls) with the mechanism test: does each view's effective rank predict the test metric?

The metrics and each table's comparisons are `nora.study.compare`'s: the primary metric is
the test KL(teacher ‖ adapter) in a distillation study (config `distill`), else the test
perplexity; pass@1 is a second metric where the study generates. Every verdict comes from a
paired hierarchical-bootstrap interval (seeds, then examples; `stats.paired_difference`) and
Holm's adjustment within its table (`compare.family`): a winner is named only when the
interval excludes 0 and the adjusted p < 0.05; "no difference" (a tie) is no winner after
Holm. A variant runs only at its ranks (`StudyConfig.variant_ranks`): a cell outside them is
"·" (not run by design), not "–" (missing). A variant that is the same adapter as an earlier
one at a rank (`runner.twin_of`, where that one runs at the rank) is shown once there, as
"X = Y", and not compared again. Each finished run is also written in the layout of PEFT's
method_comparison results (`peft/`, see `nora.study.peft_layout`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
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
from nora.study.results import StudyResults
from nora.study.stats import PerExample, rank_correlation

NAMES = {
    "lora": "LoRA α=32",
    "lora-alpha-r": "LoRA α=r",
    "lora-rslora": "rsLoRA",
    "nora": "NoRA",
    # Table 2 (the paper's ablations)
    "nora-identity": "NoRA-identity (σ = identity)",
    "nora-relu": "NoRA-ReLU",
    "nora-no-dropout": "NoRA without dropout",
    "nora-module": "module-level NoRA (matched parameters)",
    # dropout 0.1 where LoRA has it (its input, PEFT's place); the latent-dropout contrast at
    # NoRA's init and scale is NoRA-identity against LoRA with NoRA's init and scale
    "lora-dropout": "LoRA α=32 + input dropout 0.1",
    "lora-nora-init": "LoRA with NoRA's init and scale",
    # the siblings
    "nolora": "NoLoRA",
    "aurora": "AuroRA",
    "loran": "LoRAN",
}
TABLE2 = (
    "nora-identity",
    "nora-relu",
    "nora-no-dropout",
    "nora-module",
    "lora-dropout",
    "lora-nora-init",
)
SIBLINGS = ("nolora", "aurora", "loran")


def _name(variant: str) -> str:
    return NAMES.get(variant, variant)


def _rank_study(config: dict) -> list[str]:
    """The variants of the rank study: every one that is not an ablation or a sibling."""
    return [v for v in config["variants"] if v not in TABLE2 + SIBLINGS]


def _lora_variants(config: dict) -> list[str]:
    """The rank study's LoRA variants (method "lora", AdapterConfig's default)."""
    return [v for v in _rank_study(config) if config["variants"][v].get("method", "lora") == "lora"]


def _ranks_of(config: dict, variant: str) -> list[int]:
    """The ranks a variant's cells run at, in the study's order (`StudyConfig.ranks_of`; a
    study.json from before `variant_ranks` runs every variant at every rank)."""
    mine = config.get("variant_ranks", {}).get(variant, config["ranks"])
    return [r for r in config["ranks"] if r in mine]


NOT_RUN = "·"  # a cell outside its variant's ranks: not run by design (not "–", missing)


def _not_run_note(config: dict, variants: Sequence[str]) -> list[str]:
    """The legend of `NOT_RUN`, where one of `variants` leaves a rank out."""
    if all(_ranks_of(config, v) == config["ranks"] for v in variants):
        return []
    return [f"({NOT_RUN}: not run by design, a rank outside the variant's `variant_ranks`.)", ""]


def _twin(res: StudyResults, variant: str, r: int) -> str | None:
    """The earlier variant `variant` is the same adapter as at rank r (its runs are that
    one's: `runner.twin_of`), or None; also None where that one does not run at r (its
    `variant_ranks`), so `variant` runs its own cell there."""
    from nora.study.runner import twin_of

    c = res.config
    twin = twin_of(c["variants"], variant, r) if variant in c["variants"] else None
    return twin if twin is not None and r in _ranks_of(c, twin) else None


def _defaults():
    """A config's defaults (a study saved before a field existed reads as its default)."""
    from nora.study.runner import StudyConfig

    return StudyConfig()


def _twin_notes(res: StudyResults, d: str, variants: list[str]) -> list[str]:
    """One line per variant and rank where it ran as another variant's adapter (its runs are
    that one's, copied)."""
    notes = [
        f"- r={r}: {_name(v)} = {_name(t)} (the same adapter: shown and compared once, as "
        f"{_name(t)})"
        for v in variants
        for r in _ranks_of(res.config, v)
        if (t := _twin(res, v, r)) and res.cell(d, v, r)
    ]
    return [*notes, ""] if notes else []


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
    test = f"- **Test**: {c['n_test']} held-out examples ({primary(res).what})"
    if c["n_gen"]:
        new = ", ".join(f"{d} {n}" for d, n in c["max_new_tokens"].items()) or "256"
        test += f" and greedy pass@1 on the first {c['n_gen']} of them (max new tokens: {new})"
    lines = [
        f"# {c.get('title') or _defaults().title}",
        "",
        f"- **Machine**: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, torch "
        f"{m.get('torch', '?')}; 1 torch thread per run, workers side by side (one per "
        "dataset with `--dataset`, or several on one folder), sharing the CPU with the "
        "session's other work",
        f"- **Model**: {c['model']}; adapted layers: top {c['top_layers']}, q_proj and v_proj",
        f"- **Training**: {t.get('max_steps')} steps × {t.get('batch_size')} examples "
        f"({t.get('n_train')} training examples, one pass), cosine schedule, warmup "
        f"{t.get('warmup_ratio')}; validation loss every {t.get('eval_every')} steps on "
        f"{c['n_val']} examples",
    ]
    if c.get("distill"):
        from nora.study.pilots import teacher_summary

        fit = ", ".join(f"{k} {v}" for k, v in c["distill"].items())
        lines.append(
            f"- **Distillation**: each dataset's teacher fine-tunes every weight of the adapted "
            f"modules ({fit}); the adapters are trained to match its next-token distributions "
            "at every position (`nora.distill`); its fit is in `teachers/<dataset>/teacher.json`"
        )
        for d in c["datasets"]:  # a teacher not fitted yet has no line
            fitted = res.folder / "teachers" / d / "teacher.json"
            if fitted.is_file():
                teacher = teacher_summary(json.loads(fitted.read_text()))
                lines.append(f"  - {d}'s teacher: {teacher}")
    return [
        *lines,
        test,
        f"- **Command**: {_command(res.command)}, then `nora report {res.folder}`",
        "",
    ]


def _reading(res: StudyResults) -> list[str]:
    """How every verdict of the report is made (the rule `compare.family` and `Comparison`
    apply)."""
    return [
        "## How the verdicts are read",
        "",
        f"Primary metric: **{primary(res).label}** ({primary(res).what})"
        + ("; pass@1 beside it." if res.config.get("n_gen") else "."),
        "Every comparison is a paired difference A − B: seed s of A with seed s of B, over the "
        "seeds both finished, on the same test examples. Its 95 % interval is a hierarchical "
        "bootstrap (`nora.study.stats.paired_difference`: each draw resamples the seeds, then "
        "the test examples within each drawn seed), so it includes seed-to-seed variance as "
        "well as the choice of test examples (with one seed, the examples only). Within each "
        "table the bootstrap p-values are adjusted together by Holm's method (*Holm p*): a "
        f"verdict names the better one only when the interval excludes 0 **and** the adjusted "
        f"p < {ALPHA}; otherwise it says no difference. *No difference* (a *tie*) means no "
        "winner after Holm: the study cannot tell the two apart, not that they are equal. Each "
        "table is its own family, so a pair that appears in two tables (the headline's NoRA − "
        "LoRA α=32 is also in its dataset's rank-study table) can read differently in each. A "
        "variant that is the same adapter as an earlier one at a rank is shown there once, as "
        '"X = Y", and not compared again.',
        "",
    ]


def _pilots(folders: Sequence[str | Path]) -> list:
    """The pilots (`nora.study.pilots.Pilot`); a folder that is not one is a ValueError that
    names it (the CLI prints it, no traceback)."""
    from nora.study.pilots import load_pilot

    pilots = []
    for f in folders:
        try:
            pilots.append(load_pilot(f))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise ValueError(
                f"{f} is not a pilot folder (a study of one variant on one dataset, "
                f"`nora sweep pilot-…`): {type(e).__name__}: {e}"
            ) from None
    return pilots


def _pilot_section(pilots: list) -> list[str]:
    """Study v2's step 1: the pilot table and each pilot's verdict on a rank effect."""
    from nora.study.pilots import pilot_table

    lines = [
        "## Step 1: pilots",
        "",
        "In which setting does LoRA's quality depend on its rank? Each pilot runs one variant "
        "at a low and a high rank, each rank's rate searched, two or more seeds "
        "(`nora.study.pilots`). A setting shows a rank effect when the high − low interval "
        "(hierarchical bootstrap: seeds, then examples) excludes 0 and the change is more than "
        "twice the seed spread (the largest difference between two seeds of one rank).",
        "",
        pilot_table(pilots),
        "",
    ]
    for p in pilots:
        if p.change is None:
            said = "not decided yet (fewer than two ranks finished)"
        else:
            # ~4 significant digits of a KL pilot's small values (0.001-0.06), else 4 decimals;
            # the change and the spread are both in the cells' metric (KL, or NLL)
            values = [v for c in p.cells for v in c.per_seed.values() if v > 0]
            digits = max(4, 3 - math.floor(math.log10(min(values, default=0.1))))
            delta, unit = ("ΔKL", "test KL") if p.metric == "kl" else ("ΔNLL", "test NLL")
            spread = f"{p.spread:.{digits}f} ({unit})" if p.spread == p.spread else "not measured"
            yes = "**shows a rank effect**" if p.shows_rank_effect else "shows no rank effect"
            said = f"{yes} (high − low {delta} {p.change.fmt(digits)}, seed spread {spread})"
        lines.append(f"- {p.name} ({p.dataset}): {said}")
    return [*lines, ""]


def _compute(res: StudyResults) -> list[str]:
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
        for r in _ranks_of(c, v)
        for s in c["seeds"]
    ]
    done = {(t.dataset, t.variant, t.r, t.seed) for t in res.tested}
    trained_keys = {(t.dataset, t.variant, t.r, t.seed, t.lr) for t in res.trained}
    # a cell whose variant is the same adapter as an earlier one's reuses its runs (no cost)
    todo = [k for k in cells if k not in done and not _twin(res, k[1], k[2])]
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
    budget = c.get("budget_cpu_hours", _defaults().budget_cpu_hours)
    if _not_run_note(c, list(c["variants"])):
        n_cells = sum(len(_ranks_of(c, v)) for v in c["variants"])
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
    return lines + _not_run_note(c, list(c["variants"]))


def _cell_table(res: StudyResults, by_cell: dict[tuple, list[int]]) -> str:
    c = res.config
    head = "| dataset | variant | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |"
    rows = [head, "|---|---|" + "---|" * len(c["ranks"])]
    for d in c["datasets"]:
        for v in c["variants"]:
            cells = [
                str(len(by_cell.get((d, v, r), []))) if r in _ranks_of(c, v) else NOT_RUN
                for r in c["ranks"]
            ]
            rows.append(f"| {d} | {_name(v)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _searched_ranks(config: dict) -> str:
    """Which ranks each variant's rate is searched at, and where its other ranks' come from:
    as the runner does it, a cell at rank r runs at the rate searched at
    `LRSearch.source_rank(v, r)`, for each rank the variant runs at."""
    from nora.study.runner import LRSearch

    lr = LRSearch(**config["lr_search"])
    said: dict[str, list[str]] = {}  # what is said -> the variants it is said of
    for v in config["variants"]:
        runs = _ranks_of(config, v)
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
    parts = [f"{', '.join(map(_name, vs))}: {what}" for what, vs in said.items()]
    return "; ".join(parts) + ". (An unsearched rank takes the nearest searched rank's rate.)"


def _learning_rates(res: StudyResults, figures: Path) -> list[str]:
    from nora.study.plots import plot_learning_curves
    from nora.study.runner import LRSearch

    # a distilling run's validation loss is its mean KL to the teacher per position (train.py)
    loss, digits = ("KL", primary(res).digits) if res.config.get("distill") else ("NLL", 4)
    lines = [
        "## Learning rates",
        "",
        "Each variant's rate is searched on the validation split (seed 0) on a half-decade grid "
        "that is extended past an edge while the best value sits on it, so the chosen rate is "
        "interior. " + _searched_ranks(res.config),
        "",
    ]
    c, search = res.config, LRSearch(**res.config["lr_search"])
    carried = [  # LoRA α=r or rsLoRA at a rank whose rate was searched at another rank
        v
        for v in ("lora-alpha-r", "lora-rslora")
        if v in c["variants"] and any(search.source_rank(v, r) != r for r in _ranks_of(c, v))
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


# --- one dataset: the rank study ----------------------------------------------------------


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
        for v in _rank_study(c):
            cells = [_cell(res, d, v, r, m) for r in c["ranks"]]
            lines.append(f"| {_name(v)} ({m.label}) | " + " | ".join(cells) + " |")
    return lines


def _cell(res: StudyResults, d: str, v: str, r: int, m: Metric) -> str:
    """Mean ± std over the seeds, how many, and (beside the primary metric) the rate the cell
    ran at; a twin's cell names the variant it is; one outside the variant's ranks is
    `NOT_RUN`."""
    if r not in _ranks_of(res.config, v):
        return NOT_RUN
    if twin := _twin(res, v, r):
        return f"= {_name(twin)}"
    runs = [t for t in res.cell(d, v, r) if m.of(t.per_example) is not None]
    if not runs:
        return "–"
    rates = {t.lr for t in runs}
    rate = f"; lr {rates.pop():.3g}" if m is not PASS1 and len(rates) == 1 else ""
    seeds = f"{len(runs)} seed{'s' if len(runs) > 1 else ''}"
    return f"{m.spread([t.per_example for t in runs])} ({seeds}{rate})"


def _vs_lora(res: StudyResults, d: str, against: str = "nora") -> list[Comparison]:
    """NoRA against each other rank-study variant at each rank (twins left out): one family."""
    pairs = [
        pair(res, d, (against, r), (other, r), (_name(against), _name(other)), f"r={r}")
        for other in _rank_study(res.config)
        if other != against
        for r in _ranks_of(res.config, other)
        if r in _ranks_of(res.config, against)
        and not _twin(res, other, r)
        and not _twin(res, against, r)
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
        for v in _lora_variants(c)
        for r in _ranks_of(c, v)
        if res.cell(d, v, r) and not _twin(res, v, r)
    }
    nora = [r for r in sorted(_ranks_of(c, "nora")) if res.cell(d, "nora", r)]
    if not means or not nora:
        return []
    best = min(means, key=means.get)
    best_label = f"{_name(best[0])} r={best[1]}"
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
            Side(_name(v), [t.per_example for t in runs]), Side(label, [ref] * len(runs)), f"r={r}"
        )
        for v in res.config["variants"]
        for r in _ranks_of(res.config, v)
        if (runs := res.cell(d, v, r)) and not _twin(res, v, r)
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


def _rank_section(res: StudyResults, d: str, figures: Path, vs_lora: list[Comparison]) -> list[str]:
    m = primary(res)
    lines = [
        f"### Rank study: {m.label} per variant and rank",
        "",
        "Mean ± std over seeds (how many, and the rate each cell ran at, in brackets):",
        "",
        *_table(res, d),
        "",
        *_not_run_note(res.config, _rank_study(res.config)),
        *_twin_notes(res, d, _rank_study(res.config)),
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
            _name(v): {
                r: [
                    x * m.scale for t in res.cell(d, v, r) if (x := m.of(t.per_example)) is not None
                ]
                for r in _ranks_of(c, v)
            }
            for v in _rank_study(c)
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


# --- one dataset: Table 2 and the siblings ------------------------------------------------


def _against(res: StudyResults, d: str, variants: Sequence[str], refs: Sequence[str]) -> list[str]:
    """Each of `variants` (those the config has) against each reference variant at every rank
    where both have cells: one family."""
    c = res.config
    pairs = [
        pair(res, d, (v, r), (ref, r), (_name(v), _name(ref)), f"r={r}")
        for v in variants
        for ref in refs
        if ref in c["variants"]
        for r in _ranks_of(c, v)
        if r in _ranks_of(c, ref)
        and res.cell(d, v, r)
        and not _twin(res, v, r)
        and not _twin(res, ref, r)
    ]
    return [
        *_twin_notes(res, d, list(variants)),
        *comparison_table(family(pairs, metrics(res))),
        "",
    ]


def _table2(res: StudyResults, d: str) -> list[str]:
    """The paper's Table 2: each ablation against NoRA at the same rank."""
    variants = [v for v in TABLE2 if v in res.config["variants"]]
    if not variants:
        return []
    return [
        f"### Table 2: ablations against NoRA ({primary(res).label}; Holm over this table)",
        "",
        *_against(res, d, variants, ["nora"]),
    ]


def _siblings(res: StudyResults, d: str) -> list[str]:
    """NoLoRA, AuroRA and LoRAN against NoRA and LoRA α=32 at each rank."""
    variants = [v for v in SIBLINGS if v in res.config["variants"]]
    if not variants:
        return []
    return [
        f"### Siblings: {', '.join(map(_name, variants))} against NoRA and LoRA α=32 "
        "(Holm over this table)",
        "",
        *_against(res, d, variants, ["nora", "lora"]),
    ]


# --- one dataset: spectra ------------------------------------------------------------------

# weight (s·B·A) and output (Δh, the function view) first: the views the paper draws
SPECTRAL_VIEWS = ("weight", "output", "latent")


def _spectral_runs(res: StudyResults, d: str) -> tuple[list[dict], list[dict]]:
    """The summaries the spectral figures draw: the tuned runs of the rank study's variants and
    NoRA-identity, and those variants' untrained controls."""
    drawn = {*_rank_study(res.config), "nora-identity"}
    runs = [t for t in res.tested if t.dataset == d and t.spectra and t.variant in drawn]
    controls = [c for c in res.controls if c.dataset == d and c.variant in drawn]
    return [_with_group(t) for t in runs], [_with_group(c) for c in controls]


def _spectral(res: StudyResults, d: str, figures: Path) -> list[str]:
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
        if c.dataset == d and not _twin(res, c.variant, c.r)
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
                f"| {_name(v)} | {r} | {view} | {mean} | {c.spectra.effective_rank[view]:.1f} | "
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
            rows.append(f"| {_name(v)} | {view} | {len(runs)} | {pooled.fmt(2)} | {within} |")
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
    return {**run.spectra.summary, "group": _name(run.variant)}


def _dataset(res: StudyResults, d: str, figures: Path, vs_lora: list[Comparison]) -> list[str]:
    return [
        f"## {d}",
        "",
        *_rank_section(res, d, figures, vs_lora),
        *_table2(res, d),
        *_siblings(res, d),
        *_spectral(res, d, figures),
    ]


# --- the overview --------------------------------------------------------------------------


def _headline(res: StudyResults) -> list[str]:
    """The paper's question first: NoRA vs LoRA α=32 at the default rank, per dataset, and
    how far apart all variants are there once each has its own tuned learning rate."""
    r = res.config["lr_search"].get("default_rank", 16)
    m, want = primary(res), len(res.config["seeds"])
    labels = (_name("nora"), _name("lora"))
    pairs = [pair(res, d, ("nora", r), ("lora", r), labels, d) for d in res.config["datasets"]]
    lines = [
        f"## Headline: NoRA vs LoRA at r = {r}, each at its tuned learning rate",
        "",
        *comparison_table(family(pairs, metrics(res))),
        "",
    ]
    for d in res.config["datasets"]:
        runs = {  # a twin's runs are its twin's: counted once
            _name(v): res.cell(d, v, r) for v in _rank_study(res.config) if not _twin(res, v, r)
        }
        means = {
            k: statistics.mean(m.of(t.per_example) for t in ts) for k, ts in runs.items() if ts
        }
        if len(means) > 1:
            lo, hi = min(means.values()), max(means.values())
            # a mean over fewer seeds than the others is marked: the spread mixes them
            seeds = {
                k: "" if len(runs[k]) == want else f" ({len(runs[k])} of {want} seeds)"
                for k in means
            }
            lines.append(
                f"- {d}: spread of mean {m.label} over the {len(means)} finished variants at "
                f"r={r}: {m.fmt(lo)} – {m.fmt(hi)} ({(hi - lo) / lo:.1%} of the best; "
                + ", ".join(f"{k} {m.fmt(v)}{seeds[k]}" for k, v in means.items())
                + ")"
            )
    return [*lines, ""]


def _glance(res: StudyResults, vs_lora: dict[str, list[Comparison]]) -> list[str]:
    """Every NoRA-vs-LoRA verdict of the report in one table, read from each dataset's family
    (the same verdicts as there): the better one per rank (its Δ in brackets), "no difference"
    otherwise, "= Y" where the variant is Y's adapter, – where a cell is missing, `NOT_RUN`
    where NoRA or the other variant does not run at that rank."""
    c = res.config
    lines = [
        "## At a glance: NoRA vs each LoRA variant, per rank",
        "",
        "Each cell names the better of the two where its dataset's table below does (the "
        "interval of NoRA − the other excludes 0 and the Holm-adjusted p < 0.05) and says "
        '"no difference" otherwise. Learning rates: ' + _searched_ranks(c),
        "",
        "| dataset | NoRA vs | metric | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |",
        "|---|---|---|" + "---|" * len(c["ranks"]),
    ]
    want = len(c["seeds"])
    for d in c["datasets"]:
        found = {(x.pair.b.label, x.pair.where, x.metric.key): x for x in vs_lora[d]}
        for other in [v for v in _rank_study(c) if v != "nora"]:
            for m in metrics(res):
                cells = []
                for r in c["ranks"]:
                    x = found.get((_name(other), f"r={r}", m.key))
                    if r not in set(_ranks_of(c, other)) & set(_ranks_of(c, "nora")):
                        cells.append(NOT_RUN)
                    elif twin := _twin(res, other, r):
                        cells.append(f"= {_name(twin)}")
                    elif x is None:
                        cells.append("–")
                    else:
                        n = len(x.pair.a.runs)
                        seeds = "" if n == want else f", {n} of {want} seeds"
                        est = f"{x.iv.estimate * m.scale:+.{m.digits}f}{m.delta_unit}"
                        w = f"**{x.winner}**" if x.winner else "no difference"
                        cells.append(f"{w} ({est}{seeds})")
                if any(x not in ("–", NOT_RUN) and not x.startswith("=") for x in cells):
                    lines.append(
                        f"| {d} | {_name(other)} | {m.label} | " + " | ".join(cells) + " |"
                    )
    if not lines[-1].startswith("| "):  # no row: the table's header alone
        lines.append("| – | – | – | " + " | ".join("–" for _ in c["ranks"]) + " |")
    return [*lines, "", *_not_run_note(c, _rank_study(c))]


# --- the report ----------------------------------------------------------------------------


def build_study_report(folder: str | Path, pilots: Sequence[str | Path] = ()) -> Path:
    """Write `report.md`, `figures/` and `peft/` into the study folder; returns the report.
    `pilots`: study v2's pilot folders, for a "Step 1: pilots" section (read before anything
    is written: a folder that is not a pilot is a ValueError naming it)."""
    from nora.study.peft_layout import write_peft_results

    folder = Path(folder)
    loaded = _pilots(pilots)
    res = StudyResults.load(folder)
    figures = folder / "figures"
    figures.mkdir(exist_ok=True)
    # each dataset's NoRA-vs-LoRA family, computed once: the glance table and its section
    vs_lora = {d: _vs_lora(res, d) for d in res.config["datasets"]}
    lines = _header(res) + _reading(res)
    if loaded:
        lines += _pilot_section(loaded)
    lines += _headline(res) + _glance(res, vs_lora) + _compute(res)
    lines += _learning_rates(res, figures)
    for d in res.config["datasets"]:
        lines += _dataset(res, d, figures, vs_lora[d])
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
