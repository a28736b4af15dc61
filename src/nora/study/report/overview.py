"""The report's first sections: what ran, how the verdicts are read, study v2's pilots, the
headline comparison and the at-a-glance table."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from nora.study.compare import (
    ALPHA,
    STEPS,
    Comparison,
    comparison_table,
    family,
    metrics,
    pair,
    primary,
)
from nora.study.report.common import (
    NOT_RUN,
    config_defaults,
    not_run_note,
    rank_study,
    ranks_of,
    same_adapter,
    variant_name,
)
from nora.study.report.plan import searched_ranks
from nora.study.results import StudyResults


def _command(command: str | None) -> str:
    """The sweep command as a worker recorded it; with `--dataset`, made generic."""
    import re

    command = command or "nora sweep study"
    if "--dataset" not in command:
        return f"`{command}`"
    generic = re.sub(r"--dataset \S+", "--dataset D", command)
    return f"`{generic}` (one worker per dataset D)"


def header(res: StudyResults) -> list[str]:
    c, m = res.config, res.machine
    t = c["train"]
    test = f"- **Test**: {c['n_test']} held-out examples ({primary(res).what})"
    if c["n_gen"]:
        new = ", ".join(f"{d} {n}" for d, n in c["max_new_tokens"].items()) or "256"
        test += f" and greedy pass@1 on the first {c['n_gen']} of them (max new tokens: {new})"
    if STEPS in metrics(res):
        test += (
            "; on them also the logistic-map probe of the paper's Table 1 (correct iterations "
            "before the first wrong one, `nora.data.probe_logistic`)"
        )
    lines = [
        f"# {c.get('title') or config_defaults().title}",
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


def reading(res: StudyResults) -> list[str]:
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


def load_pilots(folders: Sequence[str | Path]) -> list:
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


def pilot_section(pilots: list) -> list[str]:
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


def headline(res: StudyResults) -> list[str]:
    """The paper's question first: NoRA vs LoRA α=32 at the default rank, per dataset, and
    how far apart all variants are there once each has its own tuned learning rate."""
    r = res.config["lr_search"].get("default_rank", 16)
    m, want = primary(res), len(res.config["seeds"])
    labels = (variant_name("nora"), variant_name("lora"))
    pairs = [pair(res, d, ("nora", r), ("lora", r), labels, d) for d in res.config["datasets"]]
    lines = [
        f"## Headline: NoRA vs LoRA at r = {r}, each at its tuned learning rate",
        "",
        *comparison_table(family(pairs, metrics(res))),
        "",
    ]
    for d in res.config["datasets"]:
        runs = {  # a twin's runs are its twin's: counted once
            variant_name(v): res.cell(d, v, r)
            for v in rank_study(res.config)
            if not same_adapter(res, v, r)
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


def glance(res: StudyResults, vs_lora: dict[str, list[Comparison]]) -> list[str]:
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
        '"no difference" otherwise. Learning rates: ' + searched_ranks(c),
        "",
        "| dataset | NoRA vs | metric | " + " | ".join(f"r={r}" for r in c["ranks"]) + " |",
        "|---|---|---|" + "---|" * len(c["ranks"]),
    ]
    want = len(c["seeds"])
    for d in c["datasets"]:
        found = {(x.pair.b.label, x.pair.where, x.metric.key): x for x in vs_lora[d]}
        for other in [v for v in rank_study(c) if v != "nora"]:
            for m in metrics(res):
                cells = []
                for r in c["ranks"]:
                    x = found.get((variant_name(other), f"r={r}", m.key))
                    if r not in set(ranks_of(c, other)) & set(ranks_of(c, "nora")):
                        cells.append(NOT_RUN)
                    elif twin := same_adapter(res, other, r):
                        cells.append(f"= {variant_name(twin)}")
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
                        f"| {d} | {variant_name(other)} | {m.label} | " + " | ".join(cells) + " |"
                    )
    if not lines[-1].startswith("| "):  # no row: the table's header alone
        lines.append("| – | – | – | " + " | ".join("–" for _ in c["ranks"]) + " |")
    return [*lines, "", *not_run_note(c, rank_study(c))]
