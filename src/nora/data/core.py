"""The shared types of `nora.data`: `Example`, `DataStats`, `DataError`, `Loaded`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple


class DataError(ValueError):
    """A data source cannot be used; the message names the source and, where one is at fault,
    the line or record number."""


@dataclass
class Example:
    """One supervised chat example.

    `messages` are the turns *before* the answer (optional system, user, and for multi-turn
    sources earlier assistant turns), as `{"role", "content"}` dicts; `response` is the
    assistant answer the loss is computed on; `answer` is the gold final answer where the
    source has one (for accuracy scoring); `meta` says where the example came from.
    """

    messages: list[dict]
    response: str
    answer: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataStats:
    """What happened between the source and the token lists (see `build_splits`)."""

    loaded: int = 0  # examples taken from the source (eval + train)
    skipped_bad_records: int = 0  # source records missing required fields
    dropped_too_long: int = 0  # prompt alone >= max_len
    truncated: int = 0  # response cut to fit max_len
    kept: int = 0  # tokenized examples returned (eval + train)
    tokens: int = 0  # total input_ids over kept examples
    response_tokens: int = 0  # supervised (label != -100) tokens over kept examples


class Loaded(NamedTuple):
    """What a registry loader returns: the examples plus the bad-record report."""

    examples: list[Example]
    skipped: int = 0  # records skipped for missing/invalid fields
    first_bad: str | None = None  # "line 7: no 'response'" for the first skipped record
