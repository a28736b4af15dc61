"""Typed records at the JSON boundary: committed results read back and write the same JSON."""

import json
import subprocess
from pathlib import Path

import pytest

from nora.analysis import SpectralSummary

ROOT = Path(__file__).resolve().parents[1]


def _aggregates(d):
    if isinstance(d, dict):
        if "aggregate" in d:
            yield d["aggregate"]
        for v in d.values():
            yield from _aggregates(v)


FILES = subprocess.run(
    ["git", "grep", "-l", '"aggregate"', "--", "results"],
    cwd=ROOT,
    capture_output=True,
    text=True,
).stdout.split()[:10]


@pytest.mark.parametrize("path", FILES)
def test_spectral_summary_round_trips_committed_results(path):
    aggs = list(_aggregates(json.loads((ROOT / path).read_text())))
    assert aggs
    for agg in aggs:
        s = SpectralSummary.from_dict(agg)
        assert s.to_dict() == agg
        assert json.dumps(s.to_dict()) == json.dumps(agg)  # same layout, key order and types
        assert s.latent.effective_rank.mean == agg["latent"]["effective_rank"]["mean"]
