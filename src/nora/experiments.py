"""Moved to `nora.study.sweep` (the study code lives apart from the library core); this
module keeps the old import path working."""

from nora.study.sweep import (  # noqa: F401
    PRESETS,
    TABLE2_ROWS,
    SweepConfig,
    SweepError,
    machine_info,
    measure_efficiency,
    probe_logistic,
    run_sweep,
)
