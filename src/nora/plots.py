"""Moved to `nora.study.plots`; this module keeps the old import path working
(`nora.analysis.analyze_adapter` draws with `plot_run`)."""

from nora.study.plots import (  # noqa: F401
    VIEWS,
    plot_cumulative,
    plot_cumulative_energy,
    plot_effective_rank_vs_rank,
    plot_layers,
    plot_run,
    plot_spectra_comparison,
    plot_spectrum,
)
