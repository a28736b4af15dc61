"""An offline lm-evaluation-harness task from nora's own held-out problems (no hub).

    python benchmarks/lmeval_local.py --out lmeval-tasks          # writes the YAML + JSONL
    nora eval --tasks nora_syllogism --include-path lmeval-tasks --limit 100
    nora eval --adapter RUN/adapter --tasks nora_syllogism --include-path lmeval-tasks --limit 100

`nora_syllogism`: reasoning-mix's syllogism problems (Yes/No entailment), scored by lm-eval as
multiple choice (log-likelihood of " Yes" vs " No" after the question and "Answer:"), so a
model that answers in prose is not penalised for its format. The problems are the first
`--n` syllogisms of reasoning-mix's seeded order, which `nora train --data reasoning-mix`
holds out as its evaluation split when `--n-eval` covers them (they come first), so they are
not training examples of such a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nora.data import load_examples


def write_task(out: Path, n: int, first: int) -> int:
    """Write nora_syllogism.{yaml,jsonl} into `out` from reasoning-mix's first `first`
    examples (the held-out ones); returns the number of problems written (at most `n`)."""
    out.mkdir(parents=True, exist_ok=True)
    held = load_examples("reasoning-mix", first, 0)
    docs = [
        {
            "question": e.messages[-1]["content"],
            "choices": ["Yes", "No"],
            "label": ["Yes", "No"].index(e.answer),
        }
        for e in held
        if e.meta.get("task") == "syllogism" and e.answer in ("Yes", "No")
    ][:n]
    data = out / "nora_syllogism.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (out / "nora_syllogism.yaml").write_text(
        "task: nora_syllogism\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    return len(docs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("lmeval-tasks"))
    ap.add_argument("--n", type=int, default=100, help="problems at most")
    ap.add_argument("--first", type=int, default=600, help="held-out examples to draw from")
    a = ap.parse_args()
    k = write_task(a.out, a.n, a.first)
    print(f"wrote {k} problems: {a.out / 'nora_syllogism.yaml'}")


if __name__ == "__main__":
    main()
