"""Study runs written in the layout of PEFT's `method_comparison` results.

PEFT's benchmark (`method_comparison/MetaMathQA/results/<method>--<model>-<name>.json`)
stores one JSON per run with three parts: `run_info` (when, how long, the train config and
the PEFT config), `train_info` (memory, time, parameter counts, file size, status, and
`metrics`: one record per evaluation with "train loss", "valid …" and a last record with the
"test …" values) and `meta_info` (model, datasets, package versions, system). We fill the
same keys from a study run's files; values PEFT measures on a GPU that a CPU run does not
have (accelerator memory) are null.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from nora.study.results import StudyResults, TestRun, TrainedRun


def _metrics(run: TrainedRun, test: TestRun, batch_size: int) -> list[dict]:
    recs = [json.loads(x) for x in (run.folder / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, dict] = {}
    for r in recs:  # a resumed run repeats the steps after its checkpoint: last wins
        by_step.setdefault(r["step"], {}).update(r)
    out = []
    for step, r in sorted(by_step.items()):
        if "eval_loss" not in r:
            continue
        out.append(
            {
                "step": step,
                "valid loss": r["eval_loss"],
                "valid perplexity": r["eval_ppl"],
                "train loss": r.get("loss"),
                "train samples": step * batch_size,
                "elapsed time": r.get("elapsed_s"),
                "tokens / sec": r.get("tok_per_s"),
            }
        )
    tokens = sum(r.get("tokens", 0) for r in by_step.values())
    out.append(
        {
            "step": run.steps,
            "test accuracy": test.accuracy,
            "test loss": test.per_example.nll.sum() / test.per_example.tokens.sum(),
            "test perplexity": test.test_ppl,
            "train loss": by_step.get(run.steps, {}).get("loss"),
            "train samples": run.steps * batch_size,
            "train total tokens": tokens,
        }
    )
    return out


def run_record(res: StudyResults, test: TestRun) -> dict | None:
    """One run in PEFT's layout; None if its training stage is missing."""
    run = next(
        (
            t
            for t in res.trained
            if (t.dataset, t.variant, t.r, t.lr, t.seed)
            == (test.dataset, test.variant, test.r, test.lr, test.seed)
        ),
        None,
    )
    if run is None:
        return None
    cfg = json.loads((run.folder / "train_config.json").read_text())
    adapter_cfg = run.folder / "adapter" / "adapter_config.json"
    if not adapter_cfg.is_file():  # an exported copy keeps it beside the run's other files
        adapter_cfg = run.folder / "adapter_config.json"
    weights = run.folder / "adapter" / "adapter_model.safetensors"
    m = res.machine
    return {
        "run_info": {
            "created_at": None,
            "total_time": run.wall_s + test.wall_s,
            "experiment_name": f"{test.variant}/{res.config['model']}-{test.dataset}"
            f"-rank{test.r}-lr{test.lr:g}-seed{test.seed}",
            "peft_branch": None,
            "train_config": {
                **cfg,
                "optimizer_type": "AdamW",
                "lr_scheduler": "cosine",
                "generation_kwargs": {
                    "max_new_tokens": res.config["max_new_tokens"].get(test.dataset, 256),
                    "do_sample": False,
                },
            },
            "peft_config": json.loads(adapter_cfg.read_text()) if adapter_cfg.is_file() else None,
            "error_msg": "",
        },
        "train_info": {
            "accelerator_memory_reserved_avg": None,
            "accelerator_memory_max": None,
            "accelerator_memory_reserved_99th": None,
            "train_time": run.train_time_s,
            "file_size": weights.stat().st_size if weights.is_file() else None,
            "num_trainable_params": run.trainable_params,
            "num_total_params": None,
            "status": "success",
            "metrics": _metrics(run, test, cfg["batch_size"]),
        },
        "meta_info": {
            "model_info": {"name": res.config["model"]},
            "dataset_info": {test.dataset: {"source": "reasoning-gym generator (offline)"}},
            "package_info": {"torch-version": m.get("torch"), "nora-version": m.get("nora")},
            "system_info": {"system": platform.system(), "processor": m.get("cpu")},
        },
    }


def write_peft_results(res: StudyResults, out: Path) -> int:
    """Write every finished run as `out/<variant>--<dataset>-r<r>-s<seed>.json`; the count."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for test in res.tested:
        rec = run_record(res, test)
        if rec is not None:
            name = f"{test.variant}--{test.dataset}-r{test.r}-lr{test.lr:g}-s{test.seed}.json"
            (out / name).write_text(json.dumps(rec, indent=1))
            n += 1
    return n
