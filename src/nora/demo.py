"""Moved to `nora.study.demo`; this module keeps the old import path working."""

from nora.study.demo import DemoConfig, format_table, plot_losses, run_demo  # noqa: F401
