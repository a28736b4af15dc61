"""The benchmark suite's code runs end to end on a tiny model (timings are not asserted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from conftest import tiny_llama

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("nora_bench_suite", SUITE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_sections_run_and_render():
    suite = _suite()
    model = tiny_llama()
    train = suite.bench_train(model, "tiny", [4], reps=1, batch=2, seq=8, methods=["lora", "nora"])
    names = {x["variant"] for x in train["rows"]}
    assert {"nora:nora", "nora:nora (plain autograd)", "peft:lora", "full fine-tune"} <= names
    assert all(x["step_s"] > 0 and x["memory_mb"] > 0 for x in train["rows"])
    assert not [n for n, _ in model.named_modules() if "adapter" in n or "lora" in n]  # undone
    fast = suite.bench_fastpaths([4], reps=1, n=16)
    nora_row = next(x for x in fast["fused"] if x["method"] == "nora")
    assert nora_row["fused_saved_kb"] < nora_row["plain_saved_kb"]
    assert len(fast["shared"]) == 3
    res = {
        "date": "d",
        "commit": "c",
        "threads": 1,
        "command": "python benchmarks/suite.py",
        "machine": {"cpu": "cpu", "cores": 1, "torch": "t"},
        "train_tiny": train,
        "fastpaths": fast,
    }
    text = suite.markdown(res)
    assert "plain autograd" in text and "shared shrink" in text
