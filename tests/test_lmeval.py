"""nora.lmeval: lm-evaluation-harness on an adapted model, offline (a task defined in a local
YAML over local JSONL), its numbers checked against a direct scoring of the same examples."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_tokenizer, randomize, save_model_dir, tiny_llama

import nora

pytest.importorskip("lm_eval")
from nora.lmeval import LMEvalError, run_tasks, write_results  # noqa: E402

DOCS = [
    {
        "question": f"Q{i}: 2 + {i} =",
        "choices": [str(i + 2), str(i + 3), str(i + 1)],
        "label": i % 3,
    }
    for i in range(6)
]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, monkeypatch_module):
    d = tmp_path_factory.mktemp("tasks")
    (d / "toy.jsonl").write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    (d / "toy.yaml").write_text(
        "task: nora_toy\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'toy.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return d


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_OFFLINE", "1")  # nothing from the hub
    yield mp
    mp.undo()


def direct_loglikelihoods(model, tok, doc) -> list[float]:
    """Σ log p(" " + choice | question) per choice, by one forward pass each (lm-eval's split:
    the context's tokens, then the rest of the whole string's)."""
    out = []
    for choice in doc["choices"]:
        ctx = tok(doc["question"], add_special_tokens=False).input_ids
        whole = tok(doc["question"] + " " + choice, add_special_tokens=False).input_ids
        ids = torch.tensor([whole])  # (1, T)
        with torch.no_grad():
            logp = model(ids).logits.log_softmax(-1)[0]  # (T, V)
        cont = range(len(ctx), len(whole))
        out.append(sum(logp[t - 1, whole[t]].item() for t in cont))
    return out


def _lm_eval_view(model, tok, task_dir):
    res = run_tasks(model, tok, ["nora_toy"], include_path=task_dir, log_samples=True)
    samples = sorted(res["samples"]["nora_toy"], key=lambda s: s["doc_id"])
    lls = [[r[0] for r in s["filtered_resps"]] for s in samples]
    return res, lls, [s["acc"] for s in samples]


def test_lm_eval_scores_the_adapted_model_as_a_direct_scoring_does(task_dir, tmp_path):
    tok = make_tokenizer()
    base = tiny_llama(vocab=len(tok))
    res0, lls0, acc0 = _lm_eval_view(base, tok, task_dir)
    model = nora.inject(tiny_llama(vocab=len(tok)), nora.AdapterConfig(method="nora", r=4))
    randomize(model, seed=3)
    res1, lls1, acc1 = _lm_eval_view(model, tok, task_dir)
    for m, lls, acc in ((base, lls0, acc0), (model, lls1, acc1)):
        direct = [direct_loglikelihoods(m, tok, d) for d in DOCS]
        assert torch.tensor(lls) == pytest.approx(torch.tensor(direct), abs=1e-4)
        ours = [
            float(max(range(3), key=ll.__getitem__) == d["label"])
            for ll, d in zip(direct, DOCS, strict=True)
        ]
        assert acc == ours
    assert (
        torch.tensor(lls1) - torch.tensor(lls0)
    ).abs().max() > 1e-2  # the adapter changes what lm-eval scores
    assert res1["results"]["nora_toy"]["acc,none"] == pytest.approx(sum(acc1) / len(DOCS))
    path = write_results(res1, tmp_path)
    assert json.loads(path.read_text())["results"]["nora_toy"]["acc,none"] == sum(acc1) / len(DOCS)


def test_unknown_task_is_named(task_dir):
    tok = make_tokenizer()
    with pytest.raises(LMEvalError, match="nora_no_such_task"):
        run_tasks(tiny_llama(vocab=len(tok)), tok, ["nora_no_such_task"], include_path=task_dir)


def test_nora_eval_tasks_writes_results_beside_the_adapter(task_dir, tmp_path):
    from typer.testing import CliRunner

    from nora.cli import app

    model_dir = save_model_dir(tmp_path / "model")
    from nora.models import load_base_model

    base = load_base_model(str(model_dir))[0]
    nora.inject(base, nora.AdapterConfig(method="nora", r=4))
    randomize(base)
    nora.save_adapter(base, tmp_path / "adapter")
    args = ["eval", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter")]
    args += ["--tasks", "nora_toy", "--include-path", str(task_dir), "--limit", "4"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "nora_toy" in r.output and "acc" in r.output  # lm-eval's table
    written = json.loads((tmp_path / "adapter" / "lm_eval_results.json").read_text())
    acc = written["results"]["nora_toy"]["acc,none"]
    assert acc in {0.0, 0.25, 0.5, 0.75, 1.0}  # 4 docs
    card = (tmp_path / "adapter" / "README.md").read_text()  # the model card, refreshed
    assert f"| nora_toy | acc | {acc:.4g} |" in card and "limit 4" in card
    # lm-eval's own command line, with nora's PEFT types registered: the same number
    model_args = f"pretrained={model_dir},peft={tmp_path / 'adapter'}"
    cmd = [sys.executable, "-m", "nora.lmeval", "--model", "hf", "--model_args", model_args]
    cmd += ["--tasks", "nora_toy", "--include_path", str(task_dir), "--limit", "4"]
    cmd += ["--device", "cpu", "--output_path", str(tmp_path / "stock")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (stock,) = (tmp_path / "stock").rglob("results_*.json")
    assert json.loads(stock.read_text())["results"]["nora_toy"]["acc,none"] == acc
