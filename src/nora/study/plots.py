"""Figures of the spectral analysis (NoRA paper Fig. 4-9) from `nora.analysis` summaries.

Drawn with matplotlib's object API (`Figure.savefig`, the Agg canvas): no pyplot, no global
backend switch, safe on headless machines.

One run (one `analyze` summary):   plot_run(summary, out_dir) writes
    spectrum.png            singular values per view, log scale: layers faint, mean bold
    cumulative_energy.png   E_k per view with the 90% line and AUC-90 marked
    effective_rank.png      ER and AUC-90 per layer, the three views
Several runs (a sweep): `runs` is a list of summaries, or a dict of them (keys unused). Runs
are grouped by `summary.get("group", summary["method"])`, so a sweep can tell "lora α=32"
from "lora α/r fixed"; runs sharing group and r are seeds, averaged (± std where shown).
    plot_spectra_comparison      Fig. 4/7: mean spectrum of each run at one rank
    plot_effective_rank_vs_rank  Fig. 5/8: ER (and AUC-90) vs r per group, mean ± std over
                                 seeds, untrained controls dashed beside
    plot_cumulative_energy       Fig. 6/9: energy curves, and AUC-90 vs r per group
Test metrics vs rank (Fig. 2/3): plot_metrics_vs_rank, one panel per metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

VIEWS = ("latent", "output", "weight")
VIEW_TITLES = {
    "latent": "latent H (N×r)",
    "output": "output Δh (N×d)",
    "weight": "weight s·B·A",
}
Runs = Mapping[str, Mapping[str, Any]] | Sequence[Mapping[str, Any]]


def _figure(ncols: int, width: float = 4.8, height: float = 3.8, nrows: int = 1):
    """A figure of nrows × ncols panels, returned as one flat list of axes (row by row)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # indices, ranks, layers
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _view_title(summary: Mapping[str, Any], view: str) -> str:
    if view == "weight" and summary.get("weight_space"):  # ΔW is the method's own (LoRAN)
        return "weight ΔW = delta_weight()"
    return VIEW_TITLES[view]


def _sv(layer: Mapping[str, Any], view: str) -> np.ndarray:
    return np.asarray(layer[view]["singular_values"], dtype=np.float64)


def _energy(layer: Mapping[str, Any], view: str) -> np.ndarray:
    """E_k over the stored values, relative to the energy of *all* values."""
    s = _sv(layer, view)
    total = layer[view]["energy"]
    return np.cumsum(s * s) / total if total > 0 else np.zeros_like(s)


def _mean_curve(curves: list[np.ndarray]) -> np.ndarray:
    n = min(len(c) for c in curves)
    return np.mean([c[:n] for c in curves], axis=0)


def _mean_spectrum(summary: Mapping[str, Any], view: str, normalize: bool) -> np.ndarray:
    curves = []
    for layer in summary["layers"].values():
        s = _sv(layer, view)
        curves.append(s / s[0] if normalize and len(s) and s[0] > 0 else s)
    return _mean_curve(curves)


def _log_limits(ax, curves: list[np.ndarray], decades: float = 10.0) -> None:
    # From the smallest positive value shown, but at most `decades` below the top: float32
    # round-off puts a rank-r matrix's tail near 1e-7·σ_1 and exact zeros could reach 1e-300.
    values = np.concatenate([c for c in curves if len(c)] or [np.zeros(1)])
    top = float(values.max())
    if top > 0:
        low = max(float(values[values > 0].min()), top * 10.0**-decades)
        ax.set_ylim(bottom=low / 2, top=top * 2)


def layer_mean(summary: Mapping[str, Any], view: str, metric: str) -> float:
    """`metric` of `view` averaged over the adapted layers (the aggregate's layout lives in
    `nora.analysis.SpectralSummary`)."""
    from nora.analysis import SpectralSummary  # torch: only once a figure needs it

    return getattr(SpectralSummary.of(summary).view(view), metric).mean


def _x(n: int) -> np.ndarray:
    return np.arange(1, n + 1)


def _short(name: str) -> str:
    parts = name.split(".")
    nums = [p for p in parts if p.isdigit()]
    return f"{nums[-1]}.{parts[-1]}" if nums else ".".join(parts[-2:])


def plot_spectrum(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Singular values per view, log scale; each layer faint, the mean over layers bold."""
    fig, axes = _figure(len(VIEWS))
    r = summary["r"]
    for ax, view in zip(axes, VIEWS, strict=True):
        curves = [_sv(layer, view) for layer in summary["layers"].values()]
        for c in curves:
            ax.semilogy(_x(len(c)), np.maximum(c, 1e-300), color="C0", alpha=0.2, lw=0.8)
        mean = _mean_curve(curves)
        ax.semilogy(_x(len(mean)), np.maximum(mean, 1e-300), color="C0", lw=2.2, label="mean")
        ax.axvline(r, color="grey", ls="--", lw=1, label=f"r = {r}")
        _log_limits(ax, curves)
        er = layer_mean(summary, view, "effective_rank")
        ax.set(title=f"{_view_title(summary, view)}, mean ER {er:.1f}", xlabel="index i")
        ax.set_ylabel("singular value σ_i")
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"{summary['method']} r={r}: singular-value spectrum ({summary['n_layers']} layers)"
    )
    return _save(fig, path)


def plot_cumulative(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Cumulative energy per view: layers faint, mean bold, 90% line, AUC-90 of the mean."""
    fig, axes = _figure(len(VIEWS))
    r = summary["r"]
    for ax, view in zip(axes, VIEWS, strict=True):
        curves = [_energy(layer, view) for layer in summary["layers"].values()]
        for c in curves:
            ax.plot(_x(len(c)), c, color="C1", alpha=0.2, lw=0.8)
        mean = _mean_curve(curves)
        ax.plot(_x(len(mean)), mean, color="C1", lw=2.2, label="mean over layers")
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        k = int(np.searchsorted(mean, 0.9 * (1 - 1e-12)) + 1)
        if k <= len(mean):
            ax.axvline(k, color="C3", ls="--", lw=1, label=f"AUC-90 of mean = {k}")
        agg = layer_mean(summary, view, "auc90")
        ax.set(title=f"{_view_title(summary, view)}, per-layer AUC-90 {agg:.1f}")
        ax.set(xlabel="components k", ylabel="energy fraction E_k", ylim=(0, 1.02))
        ax.set_xlim(0.5, min(len(mean), 2 * r) + 0.5)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{summary['method']} r={r}: cumulative spectral energy")
    return _save(fig, path)


def plot_layers(summary: Mapping[str, Any], path: str | Path) -> Path:
    """Effective rank and AUC-90 of each layer, the three views, with the budget r dashed."""
    names = list(summary["layers"])
    fig, axes = _figure(2, width=max(5.0, 0.28 * len(names) + 2.5))
    x = np.arange(len(names))
    for ax, metric, label in zip(
        axes, ("effective_rank", "auc90"), ("effective rank", "AUC-90"), strict=True
    ):
        for i, view in enumerate(VIEWS):
            y = [summary["layers"][n][view][metric] for n in names]
            ax.plot(x, y, marker="os^"[i], ls="-", lw=0.8, color=f"C{i}", label=view)
        ax.axhline(summary["r"], color="grey", ls="--", lw=1, label=f"r = {summary['r']}")
        step = max(1, len(names) // 40)
        ax.set_xticks(x[::step], [_short(n) for n in names[::step]], rotation=60, fontsize=7)
        ax.set(ylabel=label, title=f"{label} per layer", ylim=(0, None))
        ax.legend(fontsize=8)
    fig.suptitle(f"{summary['method']} r={summary['r']}")
    return _save(fig, path)


def plot_run(summary: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """The three per-run figures in `out_dir`; returns {kind: path}."""
    out = Path(out_dir)
    return {
        "spectrum": plot_spectrum(summary, out / "spectrum.png"),
        "cumulative_energy": plot_cumulative(summary, out / "cumulative_energy.png"),
        "effective_rank": plot_layers(summary, out / "effective_rank.png"),
    }


# ---------------------------------------------------------------- several runs (sweep)


def _summaries(runs: Runs) -> list[Mapping[str, Any]]:
    items = list(runs.values()) if isinstance(runs, Mapping) else list(runs)
    if not items:
        raise ValueError("no runs to plot")
    return items


def _group(summary: Mapping[str, Any]) -> str:
    return summary.get("group") or summary["method"]


def _seeds(runs: Runs) -> dict[str, dict[int, list[Mapping[str, Any]]]]:
    """{group: {r: [summaries: the seeds]}}, groups and ranks sorted."""
    out: dict[str, dict[int, list[Mapping[str, Any]]]] = {}
    for s in _summaries(runs):
        out.setdefault(_group(s), {}).setdefault(int(s["r"]), []).append(s)
    return {g: dict(sorted(by_r.items())) for g, by_r in sorted(out.items())}


def _label(group: str, r: int, seeds: list) -> str:
    return f"{group} r={r}" + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else "")


def _plain_ticks(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _plot_vs_rank(
    ax, runs: Runs, view: str, metric: str, ylabel: str, controls: Runs | None = None
) -> None:
    """Mean over layers of `metric` vs r, one line per group, mean ± std over seeds; each
    control group dashed with hollow markers in the colour of the trained group it shares
    its name with."""
    data = _seeds(runs)
    colour = {g: f"C{i % 10}" for i, g in enumerate(data)}
    untrained = _seeds(controls) if controls else {}
    for i, group in enumerate(untrained):
        colour.setdefault(group, f"C{(len(data) + i) % 10}")
    lines = [(g, by_r, {}) for g, by_r in data.items()]
    lines += [(g, by_r, {"ls": "--", "mfc": "none"}) for g, by_r in untrained.items()]
    for group, by_r, style in lines:
        values = [[layer_mean(s, view, metric) for s in seeds] for seeds in by_r.values()]
        ax.errorbar(
            list(by_r),
            [np.mean(v) for v in values],
            yerr=[np.std(v) for v in values],
            marker="o",
            capsize=3,
            color=colour[group],
            label=f"{group} (untrained)" if style else group,
            **style,
        )
    ranks = sorted({r for d in (data, untrained) for by_r in d.values() for r in by_r})
    ax.plot(ranks, ranks, color="grey", ls=":", lw=1, label="= r (budget)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank r", ylabel=ylabel)
    ax.legend(fontsize=8)


def plot_spectra_comparison(
    runs: Runs,
    path: str | Path,
    view: str = "latent",
    rank: int | None = None,
    normalize: bool = True,
) -> Path:
    """Fig. 4/7: mean singular-value spectrum per group and r (log scale), e.g. LoRA vs NoRA.

    rank: only runs with this r (None: all). Each curve averages layers, then seeds.
    normalize: divide each layer's spectrum by its σ_1 first — the methods' scales differ
    (NoRA s = 1, LoRA s = α/r), so raw magnitudes would mix scale with shape.
    """
    fig, (ax,) = _figure(1, width=6.4, height=4.4)
    curves = []
    for i, (group, by_r) in enumerate(_seeds(runs).items()):
        for j, (r, seeds) in enumerate(by_r.items()):
            if rank is not None and r != rank:
                continue
            c = _mean_curve([_mean_spectrum(s, view, normalize) for s in seeds])
            ls = ("-", "--", "-.", ":")[j % 4]
            ax.semilogy(
                _x(len(c)), c, color=f"C{i % 10}", ls=ls, lw=1.8, label=_label(group, r, seeds)
            )
            curves.append(c)
    if not curves:
        raise ValueError(f"no run has r={rank}")
    _log_limits(ax, curves)
    where = f" at r={rank}" if rank is not None else ""
    ax.set(title=f"Singular-value spectrum, {VIEW_TITLES[view]}{where}", xlabel="index i")
    ax.set_ylabel("σ_i / σ_1 (mean over layers)" if normalize else "σ_i (mean over layers)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_effective_rank_vs_rank(
    runs: Runs,
    path: str | Path,
    view: str = "latent",
    controls: Runs | None = None,
    auc90: bool = False,
) -> Path:
    """Fig. 5/8: mean-over-layers effective rank vs r, one line per group, ± std over seeds.

    controls: untrained adapters' summaries (grouped like `runs`), drawn dashed beside the
    trained group of the same name. auc90: a second panel, AUC-90 (mean over layers) vs r.
    """
    fig, axes = _figure(2 if auc90 else 1, width=6.0, height=4.4)
    panels = [("effective_rank", "effective rank (mean over layers)", "Effective rank")]
    if auc90:
        panels.append(("auc90", "AUC-90 (components, mean over layers)", "AUC-90"))
    for ax, (metric, ylabel, title) in zip(axes, panels, strict=True):
        _plot_vs_rank(ax, runs, view, metric, ylabel, controls)
        ax.set_yscale("log", base=2)
        _plain_ticks(ax.yaxis)
        ax.set_title(f"{title} vs rank, {VIEW_TITLES[view]}")
    return _save(fig, path)


def plot_cumulative_energy(runs: Runs, path: str | Path, view: str = "latent") -> Path:
    """Fig. 6/9: left, mean cumulative energy per group and r with the 90% line; right,
    AUC-90 (mean over layers) vs r per group, ± std over seeds."""
    fig, (left, right) = _figure(2, width=5.6, height=4.4)
    for i, (group, by_r) in enumerate(_seeds(runs).items()):
        for j, (r, seeds) in enumerate(by_r.items()):
            c = _mean_curve(
                [
                    _mean_curve([_energy(layer, view) for layer in s["layers"].values()])
                    for s in seeds
                ]
            )
            ls = ("-", "--", "-.", ":")[j % 4]
            left.plot(
                _x(len(c)), c, color=f"C{i % 10}", ls=ls, lw=1.5, label=_label(group, r, seeds)
            )
    left.axhline(0.9, color="grey", ls=":", lw=1)
    left.set_xscale("log", base=2)
    _plain_ticks(left.xaxis)
    left.set(xlabel="components k", ylabel="energy fraction E_k", ylim=(0, 1.02))
    left.set_title(f"Cumulative spectral energy, {VIEW_TITLES[view]}")
    left.legend(fontsize=7)
    _plot_vs_rank(right, runs, view, "auc90", "AUC-90 (components, mean over layers)")
    right.set_title("AUC-90 vs rank")
    return _save(fig, path)


# ---------------------------------------------------------------- training (a study)


def plot_metrics_vs_rank(
    panels: Sequence[tuple[str, Mapping[str, Mapping[int, Sequence[float]]], float | None]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Paper Fig. 2/3: a test metric vs r, one panel per (ylabel, {group: {r: per-seed values}},
    base-model value or None); mean ± std over seeds, the base model as a dashed line (named
    in the panel's title instead when it is more than twice the largest value)."""
    return _save(metrics_figure(panels, title), path)


def metrics_figure(panels, title: str = ""):
    """The matplotlib Figure that `plot_metrics_vs_rank` saves."""
    fig, axes = _figure(len(panels), width=5.2, height=3.8)
    for ax, (ylabel, groups, base) in zip(axes, panels, strict=True):
        ranks = sorted({r for by_r in groups.values() for r in by_r if by_r[r]})
        for i, (group, by_r) in enumerate(groups.items()):
            rs = [r for r in sorted(by_r) if by_r[r]]
            if rs:
                ax.errorbar(
                    rs,
                    [np.mean(by_r[r]) for r in rs],
                    yerr=[np.std(by_r[r]) for r in rs],
                    marker="o",
                    capsize=3,
                    color=f"C{i % 10}",
                    label=group,
                )
        values = [v for by_r in groups.values() for vs in by_r.values() for v in vs]
        if base is not None and values and base <= 2 * max(values):
            ax.axhline(base, color="grey", ls="--", lw=1, label="base model")
        elif base is not None:  # a line far off would squash the adapters' differences flat
            ax.set_title(f"base model: {base:.3g} (off the scale)", fontsize=8)
        if ranks:
            ax.set_xscale("log", base=2)
            ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="rank r", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_learning_curves(runs: Sequence[Any], path: str | Path, title: str = "") -> Path:
    """Validation loss vs step, one panel per (variant, rank) searched, one line per learning
    rate. `runs` are `nora.study.results.TrainedRun`s (anything with `.variant`, `.r`, `.lr`
    and `.curve()`)."""
    panels: dict[tuple[str, int], list[Any]] = {}
    for run in runs:
        panels.setdefault((run.variant, run.r), []).append(run)
    keys = sorted(panels)
    ncols = min(4, len(keys))  # wrap: 8 panels in one row are unreadable
    fig, axes = _figure(ncols, width=4.2, height=3.4, nrows=-(-len(keys) // ncols))
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    for ax, key in zip(axes, keys, strict=False):
        finals = {}
        for i, run in enumerate(sorted(panels[key], key=lambda r: r.lr)):
            steps, loss = run.curve()
            if steps:
                ax.plot(steps, loss, marker=".", color=f"C{i % 10}", label=f"lr {run.lr:.3g}")
                finals[run.lr] = loss[-1]
        if finals:  # the best final validation loss, bold
            best = min(finals, key=finals.get)
            for line in ax.get_lines():
                if line.get_label() == f"lr {best:.3g}":
                    line.set_linewidth(2.6)
        ys = [y for line in ax.get_lines() for y in line.get_ydata()]
        if ys and min(ys) > 0 and max(ys) / min(ys) > 4:  # a diverged rate would flatten the rest
            ax.set_yscale("log")
        ax.set(title=f"{key[0]} r={key[1]}", xlabel="step", ylabel="validation loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
