"""CLI tests: every subcommand on a tiny local model folder (demo on a tiny stand-in for the
embedded default, serve in a subprocess); user errors exit 2, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest
import yaml
from conftest import make_tokenizer, tiny_llama
from typer.testing import CliRunner

from nora.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_methods_lists_the_registry():
    code, out = run("methods")
    assert code == 0
    for name in ("lora", "nora", "nolora", "aurora", "loran"):
        assert name in out


def test_params_on_the_meta_device(model_dir):
    code, out = run("params", "--model", model_dir, "--method", "nora", "--r", 4)
    assert code == 0
    assert "q_proj" in out and f"{2 * 4 * (64 + 64) + 2 * 4 * (64 + 32):,}" in out


def test_train_eval_inspect_end_to_end(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--model", model_dir, "--data", "logistic-map", "--max-len", 300]
    code, out = run(
        "train",
        "--method",
        "nora",
        "--r",
        4,
        *common,
        "--n-train",
        16,
        "--n-eval",
        4,
        "--steps",
        3,
        "--batch-size",
        4,
        "--output-dir",
        run_dir,
    )
    assert code == 0, out
    assert json.loads(out[out.index("{") :])["steps"] == 3
    code, out = run("inspect", run_dir / "adapter")
    assert code == 0 and '"method": "nora"' in out and "tensors" in out
    code, out = run("eval", "--adapter", run_dir / "adapter", *common, "--n-eval", 4)
    assert code == 0, out
    assert json.loads(out[out.index("{") :])["tokens"] > 0
    # rerunning the same command resumes (here: already finished) instead of starting over
    code, out = run(
        "train",
        "--method",
        "nora",
        "--r",
        4,
        *common,
        "--n-train",
        16,
        "--n-eval",
        4,
        "--steps",
        3,
        "--batch-size",
        4,
        "--output-dir",
        run_dir,
    )
    assert code == 0 and "resuming from" in out
    # analyze: the printed numbers are the ones written to analysis.json
    code, out = run(
        "analyze",
        run_dir / "adapter",
        *common,
        "--n-eval",
        4,
        "--max-tokens",
        64,
        "--out",
        tmp_path / "an",
    )
    assert code == 0, out
    written = json.loads((tmp_path / "an" / "analysis.json").read_text())
    assert written["plots"] and all(
        (tmp_path / "an" / p).is_file() for p in written["plots"].values()
    )
    agg = written["aggregate"]
    for view in ("latent", "output", "weight"):
        er, auc = agg[view]["effective_rank"]["mean"], agg[view]["auc90"]["mean"]
        assert f"{view:<7} effective rank {er:8.2f}   AUC-90 {auc:7.1f} of r=4" in out
    # serve: a real server process answers with the trained adapter
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    shutil.copytree(run_dir / "adapter", adapters / "mine")
    with served(model_dir, adapters) as url:
        body = {"model": "mine", "prompt": "x1 = 0.5", "max_tokens": 3, "temperature": 0}
        req = urllib.request.Request(
            f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
    assert answer["model"] == "mine" and answer["usage"]["prompt_tokens"] > 0
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")


@contextlib.contextmanager
def served(model_dir, adapters):
    """`nora serve` in a subprocess on a free port; yields its URL once uvicorn says it runs."""
    code = "from nora.cli import main; main()"
    args = ["serve", "--base", str(model_dir), "--adapters", str(adapters), "--port", "0"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args], stderr=subprocess.PIPE, text=True, env=os.environ
    )
    try:
        for line in proc.stderr:  # blocks until the next log line: no polling
            m = re.search(r"running on (http://\S+)", line, re.I)
            if m:
                break
        else:
            raise AssertionError(f"nora serve exited with {proc.wait()} before serving")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
        yield m.group(1)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "args,msg",
    [
        (["params", "--method", "nope"], "unknown method 'nope'"),
        (["params", "--r", "0"], "r must be a positive int"),
        (["params", "--layers", "a-b"], "--layers must look like"),
        (["inspect", "/nonexistent/adapter"], "not an adapter folder"),
        (["eval", "--model", "/nonexistent/model"], "no such model folder"),
        # refused at start-up, before the model loads (the base named here does not exist)
        (["serve", "--base", "/nonexistent/m", "--request-timeout", "0"], "request_timeout must"),
        (["serve", "--base", "/nonexistent/m", "--max-batch", "0"], "max_batch must be an int"),
        (["serve", "--base", "/nonexistent/m", "--grace", "-1"], "grace must be >= 0"),
    ],
)
def test_user_errors_are_one_line(args, msg, model_dir):
    if args[0] == "params" and "--model" not in args:
        args = [*args, "--model", str(model_dir)]
    code, out = run(*args)
    assert code == 2
    assert msg in out and "Traceback" not in out


def test_train_with_unknown_dataset(model_dir, tmp_path):
    code, out = run("train", "--model", model_dir, "--data", "nope", "--output-dir", tmp_path)
    assert code == 2 and "nope" in out and "Traceback" not in out


def test_sweep_then_report(model_dir, tmp_path):
    spec = tmp_path / "sweep.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dir),
                "datasets": ["logistic-map"],
                "top_layers": 1,
                "train": {
                    "max_steps": 2,
                    "batch_size": 4,
                    "n_train": 8,
                    "n_eval": 4,
                    "max_len": 300,
                },
                "variants": {"nora": {"method": "nora"}},
                "ranks": [2],
                "seeds": [0],
            }
        )
    )
    code, out = run("sweep", spec, "--out", tmp_path / "sw")
    assert code == 0, out
    result = json.loads((tmp_path / "sw/runs/logistic-map/nora/r2/s0/result.json").read_text())
    code, out = run("report", tmp_path / "sw")
    assert code == 0 and f"written: {tmp_path / 'sw' / 'report.md'}" in out
    assert f"| nora | {result['ppl']:.3f} (n=1) |" in (tmp_path / "sw" / "report.md").read_text()


def test_demo_quick_on_a_stand_in_default(tmp_path, monkeypatch):
    """`nora demo` has no --model: it runs the embedded default, whose converted copy lives in
    $NORA_CACHE. A tiny model saved there (as the conversion would) stands in for it."""
    from nora.models import _CACHE_NAME, save_cache

    tok = make_tokenizer()
    save_cache(tiny_llama(vocab=len(tok), hidden=64), tok, tmp_path / "cache" / _CACHE_NAME)
    monkeypatch.setenv("NORA_CACHE", str(tmp_path / "cache"))
    code, out = run("demo", "--quick", "--r", 2, "--out-dir", tmp_path / "demo")
    assert code == 0, out
    rows = json.loads((tmp_path / "demo" / "demo_results.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["base", "majority answer", "lora r2", "nora r2"]
    assert f"{rows[3]['ppl']:.3f}" in out  # the table was printed
