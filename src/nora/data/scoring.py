"""Accuracy of a model completion against an example's gold answer.

`extract_final_answer` takes, in order of preference: the last `<answer>…</answer>`, the rest
of the line after the last `####`, the text after the last "the answer is", else the last
non-empty line. `score_answer` then scores with the generator's own scorer for
reasoning-gym examples (`math`, `reasoning-mix`), a 4-decimal comparison for `logistic-map`,
and a normalised exact match otherwise. `probe_logistic` is the paper's Table 1 probe of a
logistic-map completion: how many iterations it gets right, and its state collapse.
"""

from __future__ import annotations

import functools
import re

from nora.data.core import DataError, Example
from nora.data.generators import logistic_steps

_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.S)
_ANSWER_IS = re.compile(r"answer is:?\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")
_ITERATE = re.compile(r"x\d+\s*=\s*(-?\d+(?:\.\d+)?)")  # a logistic-map line: "x3 = 0.1234"


def extract_final_answer(text: str) -> str | None:
    """The final answer a completion states, or None for an empty completion."""
    tags = _TAG.findall(text)
    if tags:
        return tags[-1].strip()
    if "####" in text:
        rest = text.rsplit("####", 1)[1].strip()
        return rest.splitlines()[0].strip() if rest else None
    said = _ANSWER_IS.findall(text)
    if said:
        return said[-1].strip().rstrip(".").strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


@functools.cache
def _rg_scorer(task: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(task)


def score_answer(example: Example, completion: str, partial: bool = False) -> float:
    """Score `completion` for `example`: 1.0 correct, 0.0 wrong.

    reasoning-gym scorers give small rewards for a wrong answer in the right form
    (`gsm_symbolic` returns 0.01 for any wrong number) or partial credit; that is a
    reinforcement-learning reward, not accuracy, so by default anything below full marks is
    0.0. `partial=True` returns the scorer's raw value.
    """
    found = extract_final_answer(completion)
    task = example.meta.get("task")
    if task and "entry" in example.meta:
        if found is not None:
            found = _THOUSANDS.sub("", found)  # "1,234" -> "1234"; gsm's scorer reads "1"
        raw = float(_rg_scorer(task)(found, example.meta["entry"]))
        return raw if partial else float(raw >= 1.0)
    if example.answer is None:
        raise DataError("this example has no gold answer to score against")
    if found is None:
        return 0.0
    if example.meta.get("source") == "logistic-map":
        numbers = _NUMBER.findall(found)  # the last line is "x6 = 0.1234"
        return float(bool(numbers) and f"{float(numbers[-1]):.4f}" == example.answer)
    return float(_normalise(found) == _normalise(example.answer))


def _normalise(s: str) -> str:
    s = _THOUSANDS.sub("", s.strip().rstrip(".").strip().lower())
    try:
        return repr(float(s))  # "42", "42.0" and "+42" are the same number
    except ValueError:
        return " ".join(s.split())


def family(example: Example) -> str:
    """The family an example's answers are drawn from: its reasoning-gym task, else its source."""
    return str(example.meta.get("task") or example.meta.get("source") or "all")


def majority_answers(train: list[Example]) -> dict[str, str]:
    """Per family, the most common gold answer in `train` (ties: the one seen first)."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for e in train:
        if e.answer is not None:
            counts.setdefault(family(e), Counter())[e.answer] += 1
    return {f: c.most_common(1)[0][0] for f, c in counts.items()}


def majority_prior(train: list[Example], test: list[Example]) -> list[float]:
    """The answer-prior baseline: per test problem, the score (the source's own scorer) of
    answering its family's most common training answer; 0 for a family never seen in training.
    A model whose pass@1 is not above this has learned the answer format and the prior, no more.
    """
    majority = majority_answers(train)
    return [score_answer(e, majority[family(e)]) if family(e) in majority else 0.0 for e in test]


def probe_logistic(completion: str, r: float, x0: float, steps: int) -> dict:
    """The paper's Table 1 probe of a logistic-map completion: how many iterations x1, x2, …
    are right (to the 4 printed decimals) before the first wrong one, and its "state
    collapse", the steps that repeat the previous value where the true one changes. Checked
    against the same rounded-at-each-step recurrence the data uses (`logistic_steps`)."""
    truth = logistic_steps(r, x0, steps)
    got = [float(v) for v in _ITERATE.findall(completion)]
    correct = 0
    for g, t in zip(got, truth, strict=False):
        if abs(g - t) > 5e-5:
            break
        correct += 1
    collapse = sum(
        1
        for i in range(1, min(len(got), len(truth)))
        if got[i] == got[i - 1] and truth[i] != truth[i - 1]
    )
    return {
        "correct_steps": correct,
        "steps": steps,
        "all_correct": correct == steps,
        "collapse": collapse,
        "n_values": len(got),
    }
