"""`nora train` under `accelerate launch` with 2 processes (gloo on CPU), data parallel and
FSDP2-sharded: the same adapter as one process with the same global batch, checkpoints written
once, resume under 2 processes; under FSDP also a 4-bit base, and the adapter loads in one.

On a machine without GPUs, `accelerate launch --multi_gpu --num_processes 2` starts 2 CPU
processes through torchrun (gloo); `--cpu --num_processes 2` starts only one unless mpirun is
set up (accelerate's multi-CPU path), see docs/training-stack.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import nora
from nora.cli import app

pytestmark = pytest.mark.slow  # five 2-process launches: about 7 minutes on 2 shared cores

ARGS = [
    "train", "--method", "nora", "--r", "4", "--dropout", "0", "--lr", "1e-2",
    "--data", "logistic-map", "--max-len", "300", "--n-train", "16", "--n-eval", "4",
    "--max-steps", "3", "--grad-accum", "2", "--save-every", "1",
]  # fmt: skip


FSDP = ["--use_fsdp", "--fsdp_version", "2"]  # instead of --multi_gpu
TENSORBOARD = ["--report-to", "tensorboard"]


def launch(args: list[str], mode: list[str] = ["--multi_gpu"]) -> str:  # noqa: B006
    """`accelerate launch` 2 processes running `python -m nora.cli <args>`; returns stdout."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(nora.__file__).parents[1]),  # this checkout's nora
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    cmd = [*accelerate, *mode, "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nora.cli", *args]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def steps(folder: Path) -> list[dict]:
    recs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "loss" in r]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def train_one(args: list[str], out: Path) -> Path:
    """The same run in this process (one process, batch 4)."""
    result = CliRunner().invoke(
        app, [*args, "--batch-size", "4", "--output-dir", str(out)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def one(model_dir, tmp_path_factory) -> Path:
    return train_one([*ARGS, "--model", str(model_dir)], tmp_path_factory.mktemp("one"))


def assert_same_run(one: Path, two: Path) -> None:
    """The 2-process run trained the 1-process adapter, step by step."""
    assert_same(adapter(one), adapter(two))
    # each step's loss and token counts are over the global batch, as with one process
    for a, b in zip(steps(one), steps(two), strict=True):
        assert (a["tokens"], a["supervised_tokens"]) == (b["tokens"], b["supervised_tokens"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


@pytest.mark.parametrize("mode", [["--multi_gpu"], FSDP], ids=["ddp", "fsdp"])
def test_two_processes_train_the_one_process_adapter_and_resume(mode, one, model_dir, tmp_path):
    two = tmp_path / "two"
    common = [*ARGS, "--model", str(model_dir)]
    out = launch([*common, "--batch-size", "2", "--output-dir", str(two)], mode)
    assert out.count('"final_train_loss"') == 1  # the summary is printed by one process
    assert_same_run(one, two)
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"]  # written once each, no temp folders left
    card = (two / "adapter" / "README.md").read_text()  # the model card counts every process
    assert "| examples per step | 8 |" in card and "| optimizer steps | 3 |" in card  # 2×2×2

    # resume under 2 processes from step 2: the same adapter again
    first = adapter(two)
    shutil.rmtree(two / "checkpoints" / "step-000003")
    shutil.rmtree(two / "adapter")
    out = launch([*common, "--batch-size", "2", "--output-dir", str(two)], mode)
    assert out.count("resuming from") == 1 and "step-000002" in out
    assert_same(first, adapter(two))


def test_fsdp_over_a_4bit_base_and_the_adapter_loads_in_one_process(model_dir, tmp_path):
    """Over a 4-bit base (its packed weights sharded too), with a tracker: the 1-process
    adapter, saved whole, which loads in one process over the same base."""
    from nora.models import load_base_model
    from nora.quantize import quantize_base

    common = [*ARGS, "--model", str(model_dir), "--load-in-4bit", "--max-steps", "2"]
    ref = train_one(common, tmp_path / "one")
    two = tmp_path / "two"
    out = launch([*common, "--batch-size", "2", "--output-dir", str(two), *TENSORBOARD], FSDP)
    assert out.count('"final_train_loss"') == 1
    assert_same_run(ref, two)
    events = list((two / "logs").rglob("events.out.tfevents.*"))  # ...<host>.<pid>.<n>
    assert events and len({f.name.split(".")[-2] for f in events}) == 1  # the main process
    logits = []
    for folder in (ref, two):
        base, _ = load_base_model(str(model_dir))
        model = nora.load_adapter(quantize_base(base, bits=4), folder / "adapter")
        logits.append(model(torch.arange(12)[None]).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
