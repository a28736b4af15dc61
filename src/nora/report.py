"""Moved to `nora.study.report`; this module keeps the old import path working."""

from nora.study.report import build_report, collect  # noqa: F401
