"""The demo pipeline end to end on a tiny local model (the real one runs the embedded default):
its numbers are the training runs' and the samples' numbers, and its table is its JSON."""

from __future__ import annotations

import json
import statistics

import pytest
from conftest import make_tokenizer, tiny_llama
from transformers import AutoModelForCausalLM

from nora.data import batches, build_splits
from nora.evaluate import perplexity
from nora.study.demo import DemoConfig, run_demo


def parse_table(lines: list[str]) -> dict[str, list[str]]:
    """The printed table: model name -> its other columns, as printed."""
    text = "\n".join(lines).splitlines()
    head = next(i for i, line in enumerate(text) if line.startswith("model") and "PPL" in line)
    rows = {}
    for line in text[head + 2 :]:  # after the header and its rule
        if not line.strip():
            break
        name, cells = line[:16].strip(), line[16:].split()
        rows[name] = cells
    return rows


def test_demo_runs_and_writes_table_plot_and_results(tmp_path):
    model_dir = tmp_path / "model"
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64, layers=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"),
        model=str(model_dir),
        data="logistic-map",
        max_steps=3,
        batch_size=4,
        n_train=8,
        n_eval=4,
        n_accuracy=2,
        max_new_tokens=4,
        max_len=300,
        top_layers=1,
        lr=1e-2,
    )
    lines: list[str] = []
    results = run_demo(cfg, progress=False, log=lines.append)
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == ["base", "majority answer", "lora r16", "nora r16"]
    out = tmp_path / "demo"
    # base perplexity: recomputed here on the same held-out split
    _, eval_set, _ = build_splits(tok, "logistic-map", 8, 4, 300, 0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    assert rows["base"]["ppl"] == pytest.approx(
        perplexity(base, batches(eval_set, tok.pad_token_id, 4)).ppl, rel=1e-6
    )
    # each adapter's numbers are its training run's (summary.json)
    for method in ("lora", "nora"):
        summary = json.loads((out / method / "summary.json").read_text())
        row = rows[f"{method} r16"]
        # the table scores every model with one scorer (per-example NLL); the summary holds the
        # training loop's own evaluation of the same held-out split: equal up to summation order
        assert row["ppl"] == pytest.approx(summary["eval_ppl"], rel=1e-5)
        assert row["train_time_s"] == summary["train_time_s"]
        assert row["trainable_params"] == summary["trainable_params"] > 0
    assert rows["lora r16"]["trainable_params"] == rows["nora r16"]["trainable_params"]
    # accuracy: the mean score of the answers it wrote out (all n_accuracy of them)
    for name, file in [("base", "base"), ("lora r16", "lora"), ("nora r16", "nora")]:
        samples = [json.loads(line) for line in (out / f"samples_{file}.jsonl").open()]
        assert len(samples) == 2 and all(s["score"] in (0.0, 1.0) for s in samples)
        assert rows[name]["accuracy"] == statistics.mean(s["score"] for s in samples)
    # the prior: each family's most common training answer, scored on the same problems
    from nora.data import load_examples, majority_prior

    held = load_examples("logistic-map", 4 + 8, 0)
    prior = majority_prior(held[4:], held[:2])
    assert rows["majority answer"]["accuracy"] == statistics.mean(prior)
    assert rows["nora r16"]["acc_vs_prior"]["estimate"] == pytest.approx(
        rows["nora r16"]["accuracy"] - statistics.mean(prior)
    )
    # the JSON holds these rows, and the printed table shows the JSON's numbers
    assert json.loads((out / "demo_results.json").read_text())["rows"] == results["rows"]
    table = parse_table(lines)
    assert list(table) == list(rows)
    for name, row in rows.items():
        params, ppl, acc = table[name][:3]
        assert int(params.replace(",", "")) == row["trainable_params"]
        assert (
            ppl == "-" if row["ppl"] is None else float(ppl) == pytest.approx(row["ppl"], abs=5e-4)
        )
        assert float(acc.rstrip("%")) == pytest.approx(100 * row["accuracy"], abs=0.05)
    assert (out / "loss_curves.png").stat().st_size > 5000
