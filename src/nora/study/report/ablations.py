"""One dataset's Table 2 (the paper's ablations, against NoRA) and the siblings (against
NoRA and LoRA α=32)."""

from __future__ import annotations

from collections.abc import Sequence

from nora.study.compare import (
    comparison_table,
    family,
    metrics,
    pair,
    primary,
)
from nora.study.report.common import (
    SIBLINGS,
    TABLE2,
    ranks_of,
    same_adapter,
    twin_notes,
    variant_name,
)
from nora.study.results import StudyResults


def _against(res: StudyResults, d: str, variants: Sequence[str], refs: Sequence[str]) -> list[str]:
    """Each of `variants` (those the config has) against each reference variant at every rank
    where both have cells: one family."""
    c = res.config
    pairs = [
        pair(res, d, (v, r), (ref, r), (variant_name(v), variant_name(ref)), f"r={r}")
        for v in variants
        for ref in refs
        if ref in c["variants"]
        for r in ranks_of(c, v)
        if r in ranks_of(c, ref)
        and res.cell(d, v, r)
        and not same_adapter(res, v, r)
        and not same_adapter(res, ref, r)
    ]
    return [
        *twin_notes(res, d, list(variants)),
        *comparison_table(family(pairs, metrics(res))),
        "",
    ]


def table2(res: StudyResults, d: str) -> list[str]:
    """The paper's Table 2: each ablation against NoRA at the same rank."""
    variants = [v for v in TABLE2 if v in res.config["variants"]]
    if not variants:
        return []
    return [
        f"### Table 2: ablations against NoRA ({primary(res).label}; Holm over this table)",
        "",
        *_against(res, d, variants, ["nora"]),
    ]


def siblings(res: StudyResults, d: str) -> list[str]:
    """NoLoRA, AuroRA and LoRAN against NoRA and LoRA α=32 at each rank."""
    variants = [v for v in SIBLINGS if v in res.config["variants"]]
    if not variants:
        return []
    return [
        f"### Siblings: {', '.join(map(variant_name, variants))} against NoRA and LoRA α=32 "
        "(Holm over this table)",
        "",
        *_against(res, d, variants, ["nora", "lora"]),
    ]
