"""The method registry: `METHODS[name]` is the adapter class; one file per method."""

from nora.adapters import aurora, lora, loran, nolora, nora  # noqa: F401  (registers them)
from nora.adapters.base import (
    METHODS,
    ActivationAdapter,
    Adapter,
    AdapterLinear,
    AdapterWrapper,
    NotMergeableError,
    Packed,
    ParallelAdapter,
    Stack,
    register,
)

__all__ = [
    "METHODS",
    "ActivationAdapter",
    "Adapter",
    "AdapterLinear",
    "AdapterWrapper",
    "NotMergeableError",
    "Packed",
    "ParallelAdapter",
    "Stack",
    "register",
]
