"""CLI smoke tests: every subcommand on a tiny local model folder; user errors exit 2, no traceback."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer, tiny_llama
from typer.testing import CliRunner

from nora.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama + tokenizer saved in Hugging Face layout, as a user's local model folder."""
    path = tmp_path_factory.mktemp("tiny-model")
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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


@pytest.mark.parametrize(
    "args,msg",
    [
        (["params", "--method", "nope"], "unknown method 'nope'"),
        (["params", "--r", "0"], "r must be a positive int"),
        (["params", "--layers", "a-b"], "--layers must look like"),
        (["inspect", "/nonexistent/adapter"], "not an adapter folder"),
        (["eval", "--model", "/nonexistent/model"], "no such model folder"),
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
