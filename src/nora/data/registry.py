"""`DATASETS` (name -> loader) and `load_examples`, which resolves a name or a file path.

A loader is `loader(n=None, seed=0, **options) -> Loaded`; its options are its keyword
arguments (e.g. `path=`, `split=`, `shuffle=`, `tasks=`).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from pathlib import Path

from nora.data.core import DataError, Example, Loaded
from nora.data.files import SUFFIXES
from nora.data.generators import load_logistic_map, load_math, load_reasoning_mix
from nora.data.sources import load_jsonl, load_mathinstruct, load_slimorca

DATASETS: dict[str, Callable[..., Loaded]] = {
    "slimorca": load_slimorca,
    "mathinstruct": load_mathinstruct,
    "math": load_math,
    "reasoning-mix": load_reasoning_mix,
    "logistic-map": load_logistic_map,
    "jsonl": load_jsonl,
}


def _resolve(source: str, kw: dict) -> tuple[Callable[..., Loaded], dict]:
    if source in DATASETS:
        return DATASETS[source], kw
    path = Path(source)
    if path.suffix.lower() in SUFFIXES or path.exists() or "/" in source:
        return load_jsonl, {**kw, "path": source}
    raise DataError(
        f"unknown dataset {source!r}; known: {', '.join(DATASETS)}, "
        f"or a path to a {'/'.join(SUFFIXES)} file"
    )


def load(source: str, n: int | None = None, seed: int = 0, **kw) -> Loaded:
    """`load_examples` plus the bad-record count (what `build_splits` needs for its stats)."""
    if n is not None and n < 1:
        raise DataError(f"n must be >= 1 (got {n})")
    loader, kw = _resolve(source, kw)
    allowed = [p for p in inspect.signature(loader).parameters if p not in ("n", "seed")]
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise DataError(f"{source!r} takes no option {unknown}; its options: {allowed}")
    loaded = loader(n=n, seed=seed, **kw)
    if not loaded.examples:
        raise DataError(f"{source!r} gave no examples")
    if loaded.skipped:
        total = len(loaded.examples) + loaded.skipped
        warnings.warn(
            f"{source}: skipped {loaded.skipped} bad record(s) (first: {loaded.first_bad}); "
            f"kept {len(loaded.examples)} of the {total} read",
            stacklevel=3,
        )
    return loaded


def load_examples(source: str, n: int | None = None, seed: int = 0, **kw) -> list[Example]:
    """Examples from a registry name (`DATASETS`) or a .jsonl/.json/.parquet path.

    Order is seeded and independent of `n`: the first k are the same for any n >= k.
    """
    return load(source, n, seed, **kw).examples
