"""`nora report SWEEP_DIR`: one markdown report with the NoRA paper's figures and tables,
regenerated from whatever runs of a sweep have finished.

Every number is mean ± std over seeds (n = number of seeds that finished). The report says
which part of the grid ran, on which machine, with which command; and it states plainly
whether NoRA beat LoRA, matched it or lost to it.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from nora.study.plots import VIEWS, plot_metrics_vs_rank
from nora.study.results import SweepRun


def _load(path: Path) -> Any:
    return json.loads(path.read_text())


def _ms(values: list[float], fmt: str = "{:.3f}") -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0]) + " (n=1)"
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


@dataclass
class SweepData:
    """All finished results of a sweep folder, grouped for the report."""

    sweep: dict  # sweep.json: spec, config, command, machine
    runs: dict[str, dict[str, dict[int, list[SweepRun]]]]  # dataset -> variant -> r -> seeds
    base: dict[str, float]  # dataset -> base model test PPL
    ablations: dict[str, list[SweepRun]]
    probes: dict[str, list[dict]]
    lrs: dict[str, dict]  # dataset -> chosen-<dataset>.json
    lr_runs: list[SweepRun]
    errors: list[str]
    efficiency: dict | None
    seconds: float | None  # summed wall time of every finished run

    @property
    def config(self) -> dict:
        return self.sweep.get("config", {})


def collect(sweep_dir: Path) -> SweepData:
    """All finished results of a sweep folder, grouped for the report."""
    runs: dict[str, dict[str, dict[int, list[SweepRun]]]] = defaultdict(lambda: defaultdict(dict))
    base: dict[str, float] = {}
    for f in sorted(sweep_dir.glob("runs/*/*/r*/s*/result.json")):
        r = SweepRun.from_dict(_load(f))
        runs[r.dataset][r.variant].setdefault(r.r, []).append(r)
    for f in sorted(sweep_dir.glob("runs/*/base/result.json")):
        base[f.parts[-3]] = _load(f)["ppl"]
    ablations: dict[str, list[SweepRun]] = defaultdict(list)
    for f in sorted(sweep_dir.glob("ablations/*/*/s*/result.json")):
        ablations[f.parts[-3]].append(SweepRun.from_dict(_load(f)))
    probes: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(sweep_dir.glob("probe/*/s*/result.json")):
        probes[f.parts[-3]].append(_load(f))
    lrs = {
        f.stem.removeprefix("chosen-"): _load(f) for f in sorted(sweep_dir.glob("lr/chosen-*.json"))
    }
    lr_runs = [
        SweepRun.from_dict(_load(f)) for f in sorted(sweep_dir.glob("lr/*/*/lr*/result.json"))
    ]
    errors = [str(f.parent.relative_to(sweep_dir)) for f in sorted(sweep_dir.rglob("error.json"))]
    eff = sweep_dir / "efficiency" / "result.json"
    return SweepData(
        sweep=_load(sweep_dir / "sweep.json") if (sweep_dir / "sweep.json").is_file() else {},
        runs=runs,
        base=base,
        ablations=ablations,
        probes=probes,
        lrs=lrs,
        lr_runs=lr_runs,
        errors=errors,
        efficiency=_load(eff) if eff.is_file() else None,
        # compute = the wall time of every finished run (robust to sweeps stopped mid-way)
        seconds=sum(_load(f).get("wall_s", 0) for f in sweep_dir.rglob("result.json")) or None,
    )


def _headline(runs: dict[str, dict[int, list[SweepRun]]], dataset: str) -> list[str]:
    """Plain statements, NoRA vs LoRA at each rank both ran, difference vs seed spread."""
    out = []
    loras = [v for v, by_r in runs.items() if next(iter(by_r.values()))[0].method == "lora"]
    for lora_name in loras:
        if "nora" not in runs:
            break
        for r in sorted(set(runs["nora"]) & set(runs[lora_name])):
            a = [x.ppl for x in runs["nora"][r]]
            b = [x.ppl for x in runs[lora_name][r]]
            diff = statistics.mean(a) - statistics.mean(b)
            spread = max(
                statistics.stdev(a) if len(a) > 1 else 0, statistics.stdev(b) if len(b) > 1 else 0
            )
            if min(len(a), len(b)) < 2:
                verdict = (
                    "NoRA lower" if diff < 0 else "LoRA lower"
                ) + " (one seed: no spread yet)"
            elif abs(diff) <= spread:
                verdict = "**no clear difference** (within the seed spread)"
            elif diff < 0:
                verdict = "**NoRA is better**"
            else:
                verdict = "**LoRA is better**"
            out.append(
                f"- {dataset}, r={r}: NoRA {statistics.mean(a):.3f} vs {lora_name} "
                f"{statistics.mean(b):.3f} → {verdict} (Δ = {diff:+.3f}, seed std ≤ {spread:.3f})"
            )
    return out


def _header(data: SweepData, sweep_dir: Path) -> list[str]:
    sw, cfg = data.sweep, data.config
    machine = sw.get("machine", {})
    planned = sum(
        len(cfg.get("variant_ranks", {}).get(v, cfg.get("ranks", []))) * len(cfg.get("seeds", []))
        for v in cfg.get("variants", {})
    ) * len(cfg.get("datasets", []))
    done = sum(len(x) for d in data.runs.values() for v in d.values() for x in v.values())
    return [
        "# NoRA vs LoRA: the rank-scaling study",
        "",
        f"- **Machine**: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
        f"torch {machine.get('torch', '?')}, GPU: {machine.get('cuda') or 'none'}",
        f"- **Model**: {cfg.get('model', '?')}; adapted layers: top "
        f"{cfg.get('top_layers') or 'all'}, targets q_proj, v_proj",
        f"- **Data**: {', '.join(cfg.get('datasets', []))}; training: "
        f"{json.dumps(cfg.get('train', {}))}",
        f"- **Command**: `{sw.get('command') or 'nora sweep ' + str(sw.get('spec', '?'))}` then "
        f"`nora report {sweep_dir}`",
        f"- **Compute**: {data.seconds / 60:.0f} min, the summed wall time of finished runs"
        if data.seconds
        else "- **Compute**: not recorded",
        f"- **Coverage**: {done} of {planned} grid runs finished"
        + (f"; failed: {', '.join(data.errors)}" if data.errors else ""),
        "",
    ]


def _ppl_section(data: SweepData, dataset: str, sweep_dir: Path) -> list[str]:
    """Headline statements, the PPL-vs-rank figure and table of one dataset."""
    runs = data.runs[dataset]
    L = [f"## {dataset}", ""]
    heads = _headline(runs, dataset)
    if heads:
        L += ["**NoRA vs LoRA** (test perplexity, lower is better):", "", *heads, ""]
    fig = sweep_dir / "figures" / f"ppl_vs_rank_{dataset}.png"
    ppl = {
        v: {r: [x.ppl for x in xs] for r, xs in by_r.items()} for v, by_r in sorted(runs.items())
    }
    plot_metrics_vs_rank(
        [("held-out perplexity (test split)", ppl, data.base.get(dataset))],
        fig,
        f"Perplexity vs rank — {dataset} (paper Fig. 2/3)",
    )
    L += [f"![ppl vs rank]({fig.relative_to(sweep_dir)})", ""]
    ranks = sorted({r for v in runs.values() for r in v})
    L += [
        "Test perplexity, mean ± std over seeds (paper Fig. 2/3):",
        "",
        "| variant | " + " | ".join(f"r={r}" for r in ranks) + " |",
        "|---|" + "---|" * len(ranks),
    ]
    if dataset in data.base:
        L.append(f"| base model | {data.base[dataset]:.3f} |" + " |" * (len(ranks) - 1))
    for v, by_r in sorted(runs.items()):
        L.append(
            f"| {v} | " + " | ".join(_ms([x.ppl for x in by_r.get(r, [])]) for r in ranks) + " |"
        )
    return [*L, ""]


def _spectral_section(data: SweepData, dataset: str, sweep_dir: Path) -> list[str]:
    """Spectral metrics at the largest rank and the paper's Fig. 4-9 for one dataset."""
    from nora.study.plots import (
        plot_cumulative_energy,
        plot_effective_rank_vs_rank,
        plot_spectra_comparison,
    )
    from nora.study.results import Spectra

    runs = data.runs[dataset]
    summaries = [
        dict(x.analysis, group=v)
        for v, by_r in runs.items()
        for xs in by_r.values()
        for x in xs
        if x.analysis is not None
    ]
    if not summaries:
        return []
    top = max(r for v in runs.values() for r in v)
    L = [
        f"Spectral metrics at r={top} (mean over layers, then mean ± std over seeds; "
        "ER = effective rank, AUC-90 = components for 90% of the energy):",
        "",
        "| variant | ER latent | ER output Δh | ER weight BA | AUC-90 latent | AUC-90 weight |",
        "|---|---|---|---|---|---|",
    ]
    for v, by_r in sorted(runs.items()):
        sp = [Spectra.from_summary(x.analysis) for x in by_r.get(top, []) if x.analysis is not None]
        if sp:
            er = {view: _ms([s.effective_rank[view] for s in sp], "{:.1f}") for view in VIEWS}
            auc = {view: _ms([s.auc90[view] for s in sp], "{:.1f}") for view in VIEWS}
            L.append(
                f"| {v} | {er['latent']} | {er['output']} | {er['weight']} | {auc['latent']} | "
                f"{auc['weight']} |"
            )
    L.append("")
    for name, fn, caption in [
        (
            "spectrum",
            partial(plot_spectra_comparison, summaries, view="latent", rank=top),
            f"Singular-value spectrum of the latent activations at r={top} (paper Fig. 4/7)",
        ),
        (
            "effective_rank",
            partial(plot_effective_rank_vs_rank, summaries, view="latent"),
            "Effective rank vs rank (paper Fig. 5/8)",
        ),
        (
            "cumulative_energy",
            partial(plot_cumulative_energy, summaries, view="latent"),
            "Cumulative spectral energy and AUC-90 (paper Fig. 6/9)",
        ),
        (
            "effective_rank_output",
            partial(plot_effective_rank_vs_rank, summaries, view="output"),
            "Effective rank of the adapter output Δh vs rank (function space)",
        ),
    ]:
        path = sweep_dir / "figures" / f"{name}_{dataset}.png"
        try:
            fn(path)
            L += [f"{caption}:", "", f"![{name}]({path.relative_to(sweep_dir)})", ""]
        except (ValueError, KeyError) as e:
            L += [f"({caption}: not plotted: {e})", ""]
    return L


def _lr_section(data: SweepData) -> list[str]:
    if not data.lrs:
        return []
    L = [
        "## Learning rates",
        "",
        "Each variant at its own best learning rate, chosen on a validation split disjoint "
        "from the test split (seed 0, one rank):",
        "",
        "| variant | " + " | ".join(f"chosen for {d}" for d in data.lrs) + " |",
        "|---|" + "---|" * len(data.lrs),
    ]
    names = sorted({v for c in data.lrs.values() for v in c["lr"]})
    for v in names:
        L.append(
            f"| {v} | " + " | ".join(f"{c['lr'].get(v, '–')}" for c in data.lrs.values()) + " |"
        )
    if data.lr_runs:
        L += ["", "Validation perplexity per learning rate:", "", "| variant | lr | val PPL |"]
        L.append("|---|---|---|")
        for x in sorted(data.lr_runs, key=lambda x: (x.variant, x.lr)):
            L.append(f"| {x.variant} | {x.lr:g} | {x.ppl:.3f} |")
    return [*L, ""]


def _ablation_section(data: SweepData) -> list[str]:
    if not data.ablations:
        return []
    ab = data.config.get("ablations", {})
    L = [
        f"## Ablations (paper Table 2; {ab.get('dataset', '')}, r={ab.get('rank', '?')})",
        "",
        "| row | test PPL |",
        "|---|---|",
    ]
    for dataset, runs in data.runs.items():
        full = runs.get(ab.get("base", "nora"), {}).get(ab.get("rank"))
        if full and dataset == ab.get("dataset"):
            L.append(f"| full NoRA (weight-level, SiLU, dropout) | {_ms([x.ppl for x in full])} |")
    for xs in data.ablations.values():
        for v in sorted({x.variant for x in xs}):
            L.append(f"| {v} | {_ms([x.ppl for x in xs if x.variant == v])} |")
    return [*L, ""]


def _probe_section(data: SweepData) -> list[str]:
    if not data.probes:
        return []
    L = [
        "## Case study: the logistic map (paper Table 1)",
        "",
        "Greedy generation on held-out prompts; correct steps before the first wrong value, "
        "fully correct sequences, and state collapses (a value repeated where the true "
        "sequence changes):",
        "",
        "| variant | correct steps (of mean steps) | all correct | collapses per prompt |",
        "|---|---|---|---|",
    ]
    for v, xs in sorted(data.probes.items()):
        L.append(
            f"| {v} | {_ms([x['correct_steps'] for x in xs], '{:.2f}')} of "
            f"{statistics.mean(x['steps'] for x in xs):.1f} | "
            f"{_ms([x['all_correct'] for x in xs], '{:.0%}')} | "
            f"{_ms([x['collapse'] for x in xs], '{:.2f}')} |"
        )
    return [*L, ""]


def _efficiency_section(data: SweepData) -> list[str]:
    e = data.efficiency
    if not e:
        return []
    ppl_at = {}
    for dataset, runs in data.runs.items():
        for v, by_r in runs.items():
            if e["rank"] in by_r:
                ppl_at.setdefault(v, _ms([x.ppl for x in by_r[e["rank"]]]) + f" ({dataset})")
    L = [
        f"## Efficiency (paper Table 3; r={e['rank']}, prefill {e['batch']}×{e['seq']})",
        "",
        "| variant | params | test PPL | prefill ms | relative to merged LoRA | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in e["rows"]:
        L.append(
            f"| {row['variant']} | {row['params']:,} | {ppl_at.get(row['variant'], '–')} | "
            f"{row['prefill_ms']:.1f} | {row['relative_to_merged_lora']:.3f}× | "
            f"{row['tok_per_s']:.0f} |"
        )
    return [*L, "", f"({e['note']})", ""]


def build_report(sweep_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `report.md` (and `figures/`) into the sweep folder; returns the report path."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a sweep folder")
    data = collect(sweep_dir)
    (sweep_dir / "figures").mkdir(exist_ok=True)
    L = _header(data, sweep_dir)
    for dataset in sorted(data.runs):
        L += _ppl_section(data, dataset, sweep_dir) + _spectral_section(data, dataset, sweep_dir)
    L += _lr_section(data) + _ablation_section(data) + _probe_section(data)
    L += _efficiency_section(data)
    path = Path(out) if out else sweep_dir / "report.md"
    path.write_text("\n".join(L) + "\n")
    return path
