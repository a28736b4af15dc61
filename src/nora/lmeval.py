"""Standard benchmarks through EleutherAI's lm-evaluation-harness (0.4.x, `pip install
nora-adapters[eval]`), on a base model with a nora adapter of any method loaded.

    results = run_tasks(model, tokenizer, ["gsm8k", "arc_easy"], limit=50)   # lm-eval's dict
    print(format_table(results))                                            # lm-eval's table

`nora eval --tasks gsm8k,arc_easy --adapter runs/a/adapter` does the same and writes lm-eval's
results JSON beside the adapter. lm-eval's own command loads adapters with stock PEFT, which
knows nora's `peft_type`s only once `nora.peft` is imported; lm-eval has no plugin hook for
that, so `python -m nora.lmeval ARGS` is lm-eval's own CLI (`lm_eval ARGS`, every argument the
same) with `nora.peft` imported first:

    python -m nora.lmeval --model hf --model_args pretrained=BASE,peft=NORA_FOLDER --tasks arc_easy

(A `lora` adapter is a plain PEFT LoRA folder: stock `lm_eval` loads it as it is.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn


class LMEvalError(ValueError):
    """lm-eval is missing or a task is unknown; the message says which and what to do."""


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise LMEvalError(
            f"lm-evaluation-harness is not installed ({e}): pip install 'nora-adapters[eval]'"
        ) from None
    return lm_eval, HFLM, TaskManager


def run_tasks(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_path: str | Path | None = None,
    log_samples: bool = False,
) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` over an `HFLM` that wraps `model` as it is (adapters
    included, in eval mode). `include_path`: a folder of your own task YAMLs. Returns lm-eval's
    results dict (its `results`, `configs`, `versions`, …; `samples` with `log_samples`)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise LMEvalError(f"unknown lm-eval task(s) {unknown}: `lm_eval --tasks list` lists them")
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=0,  # stderr by bootstrap costs minutes on CPU; lm-eval skips it at 0
        )
    finally:
        model.train(was_training)
    return out


def format_table(results: dict[str, Any]) -> str:
    """lm-eval's own markdown table of a results dict."""
    from lm_eval.utils import make_table

    return make_table(results)


def write_results(results: dict[str, Any], out_dir: str | Path) -> Path:
    """lm-eval's results JSON (samples left out) as out_dir/lm_eval_results.json."""
    from nora.checkpoint import write_json

    keep = {k: v for k, v in results.items() if k != "samples"}
    path = Path(out_dir) / "lm_eval_results.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, keep, default=str)
    return path


def main() -> None:
    """lm-eval's CLI with nora's PEFT types registered (see the module docstring)."""
    from lm_eval.__main__ import cli_evaluate

    import nora.peft  # noqa: F401  registers NORA, NOLORA, … with PEFT

    cli_evaluate()


if __name__ == "__main__":
    main()
