"""The demo pipeline end to end on a tiny local model (the real one runs the embedded default)."""

from __future__ import annotations

import json

from conftest import make_tokenizer, tiny_llama

from nora.demo import DemoConfig, format_table, run_demo


def test_demo_runs_and_writes_table_plot_and_results(tmp_path):
    model_dir = tmp_path / "model"
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64, layers=3).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = DemoConfig(
        out_dir=str(tmp_path / "demo"),
        model=str(model_dir),
        data="logistic-map",
        steps=3,
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
    names = [r["name"] for r in results["rows"]]
    assert names == ["base", "lora r16", "nora r16"]
    assert all(r["ppl"] > 0 and r["accuracy"] is not None for r in results["rows"])
    lora, nora_ = results["rows"][1:]
    assert lora["trainable_params"] == nora_["trainable_params"] > 0  # same budget at equal rank
    out = tmp_path / "demo"
    assert (out / "loss_curves.png").stat().st_size > 5000
    assert json.loads((out / "demo_results.json").read_text())["rows"] == results["rows"]
    assert format_table(results["rows"]) in "\n".join(lines)
    assert (out / "samples_nora.jsonl").read_text().count("\n") == 2
