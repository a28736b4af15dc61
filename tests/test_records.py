"""Typed records at the JSON boundary: committed results read back and write the same JSON."""

import json
import subprocess
from pathlib import Path

import pytest

from nora.analysis import SpectralSummary
from nora.study.results import SweepRun, TrainedRun

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


def _committed(pattern: str, keep) -> list[str]:
    """Committed `results/` files matching a git pathspec, filtered by `keep(path)`, at most 8
    (spread over the list: their shapes differ by run kind and era)."""
    files = subprocess.run(
        ["git", "ls-files", "--", pattern], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    files = [f for f in files if keep(f)]
    return files[:: max(1, len(files) // 8)][:8]


def _is_sweep_run(path: str) -> bool:
    parts = Path(path).parts  # runs/<dataset>/<variant>/r*/s*, ablations/…/s*, lr/…/lr*
    return parts[-2].startswith(("s", "lr")) and "probe" not in parts and "base" not in parts


# (record, committed files in its layout, a field the JSON holds under the same name)
RECORDS = [
    (SweepRun, _committed("results/*result.json", _is_sweep_run), "ppl"),
    (TrainedRun, _committed("results/*val.json", lambda f: True), "val_nll"),
]
CASES = [(rec, path, key) for rec, files, key in RECORDS for path in files]


@pytest.mark.parametrize("record, path, key", CASES, ids=[c[1] for c in CASES])
def test_run_records_round_trip_committed_results(record, path, key):
    d = json.loads((ROOT / path).read_text())
    rec = record.from_dict(d)
    assert rec.to_dict() == d
    # same values and types (a twin's copy written before cpu_s existed orders its keys apart)
    assert json.dumps(rec.to_dict(), sort_keys=True) == json.dumps(d, sort_keys=True)
    assert getattr(rec, key) == d[key]


def test_run_records_cover_both_layouts():
    assert all(files for _, files, _ in RECORDS)


def test_trained_run_cost_is_cpu_time_else_wall_time():
    d = json.loads((ROOT / RECORDS[1][1][0]).read_text())
    with_cpu = TrainedRun.from_dict({**d, "wall_s": 9.0, "cpu_s": 4.0})
    without = TrainedRun.from_dict({k: v for k, v in {**d, "wall_s": 9.0}.items() if k != "cpu_s"})
    assert (with_cpu.cost_s, without.cost_s) == (4.0, 9.0)
    assert "cpu_s" not in without.to_dict() and "folder" not in with_cpu.to_dict()
