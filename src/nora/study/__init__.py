"""The study: sweeps over methods × ranks × seeds, the report, its figures, and the demo.

Apart from the library core (`nora.adapters`, `inject`, `train`, `analysis`, ...): nothing
in the core imports this package.
"""
