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

from collections.abc import Sequence
from pathlib import Path

from nora.study.compare import Comparison
from nora.study.report.ablations import siblings, table2
from nora.study.report.overview import glance, header, headline, load_pilots, pilot_section, reading
from nora.study.report.plan import compute_plan, learning_rates
from nora.study.report.rank import nora_vs_lora, rank_section
from nora.study.report.spectra import spectral
from nora.study.results import StudyResults


def _dataset(res: StudyResults, d: str, figures: Path, vs_lora: list[Comparison]) -> list[str]:
    return [
        f"## {d}",
        "",
        *rank_section(res, d, figures, vs_lora),
        *table2(res, d),
        *siblings(res, d),
        *spectral(res, d, figures),
    ]


def build_study_report(folder: str | Path, pilots: Sequence[str | Path] = ()) -> Path:
    """Write `report.md`, `figures/` and `peft/` into the study folder; returns the report.
    `pilots`: study v2's pilot folders, for a "Step 1: pilots" section (read before anything
    is written: a folder that is not a pilot is a ValueError naming it)."""
    from nora.study.peft_layout import write_peft_results

    folder = Path(folder)
    loaded = load_pilots(pilots)
    res = StudyResults.load(folder)
    figures = folder / "figures"
    figures.mkdir(exist_ok=True)
    # each dataset's NoRA-vs-LoRA family, computed once: the glance table and its section
    vs_lora = {d: nora_vs_lora(res, d) for d in res.config["datasets"]}
    lines = header(res) + reading(res)
    if loaded:
        lines += pilot_section(loaded)
    lines += headline(res) + glance(res, vs_lora) + compute_plan(res)
    lines += learning_rates(res, figures)
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
