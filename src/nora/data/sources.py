"""Loaders for real datasets: SlimOrca and MathInstruct (a local copy or the Hub), and
user files.

With `path=` they read a local file in the dataset's own schema (no network). Without it they
call `datasets.load_dataset(<hub id>, split=...)`, which needs network; when that fails the
error says to pass a local file instead.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nora.data.core import DataError, Example, Loaded
from nora.data.files import BadRecord, from_instruction, from_sharegpt, load_file

SLIMORCA_HUB = "Open-Orca/SlimOrca"
MATHINSTRUCT_HUB = "TIGER-Lab/MathInstruct"


def load_hub(
    name: str,
    hub_id: str,
    convert: Callable[[dict], Example],
    n: int | None,
    seed: int,
    split: str = "train",
    shuffle: bool = True,
) -> Loaded:
    """`n` converted records of a Hub dataset, in a seeded order that does not depend on `n`."""
    try:
        import datasets

        ds = datasets.load_dataset(hub_id, split=split)
    except Exception as e:  # offline, missing dataset, auth: all end the same way for the user
        raise DataError(
            f"could not load {hub_id!r} from the Hugging Face Hub ({type(e).__name__}); "
            f"without network pass a local file in its schema: "
            f"load_examples({name!r}, path='data.jsonl')"
        ) from e
    if shuffle:
        ds = ds.shuffle(seed=seed)
    examples, skipped, first_bad = [], 0, None
    for i, rec in enumerate(ds):
        if n is not None and len(examples) >= n:
            break
        try:
            ex = convert(rec)
        except BadRecord as e:
            skipped += 1
            first_bad = first_bad or f"record {i + 1}: {e}"
            continue
        ex.meta.update(source=hub_id, where=f"record {i + 1}")
        examples.append(ex)
    if not examples:
        raise DataError(f"{hub_id}: no usable record; first bad record at {first_bad}")
    return Loaded(examples, skipped, first_bad)


def load_slimorca(
    n: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
    split: str = "train",
    shuffle: bool = True,
) -> Loaded:
    """Open-Orca/SlimOrca: ShareGPT `conversations`; the last `gpt` turn is the response."""
    if path is not None:
        return load_file(path, n, seed, schema="conversations", shuffle=shuffle)
    return load_hub("slimorca", SLIMORCA_HUB, from_sharegpt, n, seed, split, shuffle)


def load_mathinstruct(
    n: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
    split: str = "train",
    shuffle: bool = True,
) -> Loaded:
    """TIGER-Lab/MathInstruct: `instruction` -> `output`; gold answer from "The answer is X"."""
    if path is not None:
        return load_file(path, n, seed, schema="instruction", shuffle=shuffle)
    return load_hub("mathinstruct", MATHINSTRUCT_HUB, from_instruction, n, seed, split, shuffle)


def load_jsonl(
    n: int | None = None,
    seed: int = 0,
    path: str | Path | None = None,
    schema: str | None = None,
    shuffle: bool = True,
) -> Loaded:
    """A user file (.jsonl/.json/.parquet) in any known schema, detected unless given."""
    if path is None:
        raise DataError("the 'jsonl' source needs path=<file>")
    return load_file(path, n, seed, schema=schema, shuffle=shuffle)
