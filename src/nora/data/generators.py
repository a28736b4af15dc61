"""Offline generators: `math` and `reasoning-mix` (reasoning-gym), `logistic-map` (ours).

Each is deterministic by seed and *prefix-stable*: example i does not depend on `n`, so
asking for more examples only appends (this is what keeps the held-out split fixed).

- `math`: reasoning-gym `gsm_symbolic` (GSM8K templates with fresh numbers). The response is
  the generator's step-by-step solution (`metadata["answer_cot"]`) whose last line is
  `#### <answer>` (GSM8K's own convention); the user turn asks for that line.
- `reasoning-mix`: round-robin over `MIX_TASKS` (example i is from task i mod 6, by default). These
  generators give no worked solution, so the response is the bare answer.
- `logistic-map`: iterate x_{n+1} = r·x_n·(1−x_n); the response is one `xk = 0.1234` line per
  step; see `logistic_steps` for the rounding rule.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Mapping, Sequence

from nora.data.core import DataError, Example, Loaded

MIX_TASKS = (
    "basic_arithmetic",  # "Calculate 5 - 3 - 6."
    "chain_sum",  # "4 - 1 - 7 ="
    "leg_counting",  # word problem: legs of a list of animals
    "family_relationships",  # relational reasoning over a short story
    "syllogism",  # Yes/No logical entailment
    "letter_counting",  # count a letter in a text span
)
MATH_HINT = ' Reason step by step, then write the final answer on the last line as "#### <answer>".'

# reasoning-gym seeds item i with Random(seed + i), so seeds s and s+1 would give the same
# items shifted by one place; spreading user seeds this far apart keeps them disjoint.
_SEED_SPREAD = 1_000_003


def _rg_seed(seed: int, k: int = 0) -> int:
    return seed * _SEED_SPREAD + k


def _need_n(name: str, n: int | None) -> int:
    if n is None:
        raise DataError(f"{name!r} is a generator: pass n (how many examples)")
    return n


def _rg_dataset(task: str, size: int, seed: int, **config):
    import reasoning_gym  # imported here: it costs ~0.7 s and only generators need it

    try:
        return reasoning_gym.create_dataset(task, size=max(size, 1), seed=seed, **config)
    except (ValueError, TypeError, AssertionError) as e:  # unknown task, bad config option
        raise DataError(f"reasoning-gym task {task!r}: {e}") from e


def gsm_response(entry: dict) -> str:
    """The worked solution with its final line normalised to `#### <answer>`.

    Some templates write `#### 15.0` for the answer "15"; the gold `answer` string wins.
    """
    cot = entry["metadata"].get("answer_cot")
    if not cot:
        return f"#### {entry['answer']}"
    steps = re.sub(r"\n?####[^\n]*\s*$", "", cot.rstrip())
    return f"{steps}\n#### {entry['answer']}"


def load_math(n: int | None = None, seed: int = 0) -> Loaded:
    """GSM8K-style word problems from reasoning-gym `gsm_symbolic`, with worked solutions."""
    n = _need_n("math", n)
    ds = _rg_dataset("gsm_symbolic", n, _rg_seed(seed))
    out = []
    for i in range(n):
        entry = ds[i]
        user = {"role": "user", "content": entry["question"] + MATH_HINT}
        meta = {"source": "math", "task": "gsm_symbolic", "index": i, "entry": entry}
        out.append(Example([user], gsm_response(entry), entry["answer"], meta))
    return Loaded(out)


def load_reasoning_mix(
    n: int | None = None, seed: int = 0, tasks: Sequence[str] | Mapping[str, dict] = MIX_TASKS
) -> Loaded:
    """A fixed round-robin mixture of short-answer reasoning-gym families.

    `tasks` is a list of reasoning-gym names (their default configs), or a mapping
    name -> config options, e.g. `{"basic_arithmetic": {"max_digits": 2}}`.
    """
    n = _need_n("reasoning-mix", n)
    options = dict(tasks) if isinstance(tasks, Mapping) else dict.fromkeys(tasks, {})
    tasks = list(options)
    per_task = math.ceil(n / len(tasks))
    datasets = [
        _rg_dataset(t, per_task, _rg_seed(seed, k), **options[t]) for k, t in enumerate(tasks)
    ]
    out = []
    for i in range(n):
        k, j = i % len(tasks), i // len(tasks)
        entry = datasets[k][j]
        user = {"role": "user", "content": entry["question"]}
        meta = {"source": "reasoning-mix", "task": tasks[k], "index": i, "entry": entry}
        out.append(Example([user], str(entry["answer"]), str(entry["answer"]), meta))
    return Loaded(out)


def logistic_steps(r: float, x0: float, n: int) -> list[float]:
    """x_1..x_n of x_{k+1} = r·x_k·(1−x_k), each rounded to 4 decimals *before* the next step.

    Using the rounded value is deliberate: the response text shows only 4 digits, so a model
    can reproduce every step from the previous line alone. (`round` rounds the exact binary
    value, which is what `float(f"{x:.4f}")` of the printed text gives back.)
    """
    xs, x = [], x0
    for _ in range(n):
        x = round(r * x * (1 - x), 4)
        xs.append(x)
    return xs


def load_logistic_map(
    n: int | None = None,
    seed: int = 0,
    r_range: tuple[float, float] = (2.5, 4.0),
    steps: tuple[int, int] = (5, 8),
) -> Loaded:
    """Iterate the logistic map: r in [r_range) on a 0.01 grid, x0 in (0, 1) on a 1e-4 grid,
    steps in [steps[0], steps[1]] (inclusive)."""
    n = _need_n("logistic-map", n)
    out = []
    for i in range(n):
        rng = random.Random(f"logistic-map:{seed}:{i}")  # str seeds are stable across runs
        r = rng.randrange(round(r_range[0] * 100), round(r_range[1] * 100)) / 100
        x0 = rng.randint(1, 9999) / 10000
        k = rng.randint(*steps)
        xs = logistic_steps(r, x0, k)
        prompt = (
            f"Iterate the logistic map x_(n+1) = r * x_n * (1 - x_n) with r = {r:.2f}, "
            f"starting from x0 = {x0:.4f}, for {k} steps. Round every value to 4 decimal "
            f'places and use the rounded value in the next step. Write each step as "x1 = ...".'
        )
        response = "\n".join(f"x{j} = {x:.4f}" for j, x in enumerate(xs, 1))
        meta = {"source": "logistic-map", "index": i, "r": r, "x0": x0, "steps": k}
        out.append(Example([{"role": "user", "content": prompt}], response, f"{xs[-1]:.4f}", meta))
    return Loaded(out)
