"""`--report-to tensorboard`: loss, lr, grad norm, tokens/s and eval PPL per step, and at the
end the spectral summary (effective rank per adapted layer) and the loss-curve figure; read
back from the event file, offline."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer, tiny_llama
from typer.testing import CliRunner

from nora.cli import app

pytest.importorskip("tensorboard")


def read_events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    acc = EventAccumulator(str(files[0].parent), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_tensorboard_holds_the_training_scalars_spectral_summary_and_loss_curve(tmp_path):
    model = tmp_path / "model"
    tok = make_tokenizer()
    tiny_llama(vocab=len(tok), hidden=64).save_pretrained(model)
    tok.save_pretrained(model)
    run = tmp_path / "run"
    args = ["train", "--model", model, "--data", "logistic-map", "--max-len", 300,
            "--n-train", 8, "--n-eval", 4, "--max-steps", 4, "--batch-size", 4,
            "--eval-every", 2, "--method", "nora", "--r", 4, "--report-to", "tensorboard",
            "--output-dir", run]  # fmt: skip
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    acc = read_events(run / "logs")
    tags = acc.Tags()["scalars"]
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if "loss" in r]
    for tag, key in [("train/loss", "loss"), ("train/lr", "lr"),
                     ("train/grad_norm", "grad_norm"), ("train/tok_per_s", "tok_per_s")]:  # fmt: skip
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in train_steps]
        assert [e.value for e in events] == pytest.approx([r[key] for r in train_steps], rel=1e-5)
    evals = [r for r in steps if "eval_ppl" in r]
    assert [e.step for e in acc.Scalars("eval/ppl")] == [2, 4]
    assert [e.value for e in acc.Scalars("eval/ppl")] == pytest.approx(
        [r["eval_ppl"] for r in evals], rel=1e-5
    )
    # the spectral summary: one effective rank per adapted layer (2 layers × q, v), and the mean
    per_layer = [t for t in tags if t.startswith("spectral/effective_rank/model.")]
    assert len(per_layer) == 4
    ranks = [acc.Scalars(t)[0].value for t in per_layer]
    assert all(1.0 <= er <= 4.0 for er in ranks)  # 1 <= ER <= r
    mean = acc.Scalars("spectral/effective_rank/mean")[0].value
    assert mean == pytest.approx(sum(ranks) / len(ranks), rel=1e-5)
    assert "loss_curve" in acc.Tags()["images"]
    assert acc.Images("loss_curve")[0].step == 4


def test_a_tracker_that_is_not_installed_is_a_clear_error(tmp_path):
    from accelerate.utils import is_mlflow_available

    if is_mlflow_available():
        pytest.skip("mlflow is installed here")
    args = ["train", "--report-to", "mlflow", "--output-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "needs the mlflow package" in result.output
    assert not (tmp_path / "run").exists()
