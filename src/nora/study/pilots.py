"""Study v2's pilot table: in which setting does LoRA's quality depend on its rank?

    python -m nora.study.pilots /work/sweep-out/pilot-logistic /work/sweep-out/pilot-distill

Each pilot folder is a study (`nora sweep pilot-…`) of one variant at a low and a high rank,
each rank's learning rate searched, two or more seeds. Per pilot the table gives each rank's
chosen rate and test metric (mean over seeds, and each seed), the change from the low to the
high rank with its hierarchical-bootstrap interval (`stats.paired_difference`), and the seed
spread (the largest difference between two seeds of one rank). A setting "shows a rank
effect" when that interval excludes 0 and the change is more than twice the seed spread.
The metric is the test KL to the teacher for a distillation pilot, the test NLL otherwise
(lower is better for both).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from nora.study.stats import Interval, PerExample, paired_difference


@dataclass
class RankCell:
    r: int
    lr: float
    per_seed: dict[int, float]  # seed -> test metric
    runs: dict[int, PerExample]  # seed -> per-example scores

    @property
    def mean(self) -> float:
        return sum(self.per_seed.values()) / len(self.per_seed)

    @property
    def spread(self) -> float:
        v = list(self.per_seed.values())
        return max(v) - min(v) if len(v) > 1 else float("nan")


@dataclass
class Pilot:
    name: str
    dataset: str
    metric: str  # "kl" or "nll": the cells' test_kl or test_nll, and the interval's
    cells: list[RankCell]
    change: Interval | None  # high rank − low rank
    cpu_h: float
    teacher: dict | None

    @property
    def spread(self) -> float:
        return max((c.spread for c in self.cells if c.spread == c.spread), default=float("nan"))

    @property
    def shows_rank_effect(self) -> bool:
        iv = self.change
        return bool(iv and iv.excludes_zero and abs(iv.estimate) > 2 * self.spread)


def load_pilot(folder: str | Path) -> Pilot:
    """A pilot folder's finished runs at each searched rank's chosen rate."""
    folder = Path(folder)
    info = json.loads((folder / "study.json").read_text())["config"]
    (dataset,) = info["datasets"]
    (variant,) = info["variants"]
    distill = bool(info.get("distill"))
    # the change is in the cells' own unit, so that it compares with their seed spread
    key, metric = ("test_kl", "kl") if distill else ("test_nll", "nll")
    choices = (
        json.loads((folder / "lr_choices.json").read_text())
        if (folder / "lr_choices.json").is_file()
        else {"k": {}, "searches": []}
    )
    best = {s["r"]: s["best_lr"] for s in choices["searches"] if s["variant"] == variant}
    cells = []
    for r in sorted(best):
        lr_dir = folder / "runs" / dataset / variant / f"r{r}" / f"lr{best[r]:.3g}"
        per_seed, runs = {}, {}
        for t in sorted(lr_dir.glob("s*/test.json")):
            d = json.loads(t.read_text())
            per_seed[d["seed"]] = d[key]
            runs[d["seed"]] = PerExample.from_dict(d["per_example"], d.get("per_example_kl"))
        if per_seed:
            cells.append(RankCell(r, best[r], per_seed, runs))
    change = None
    if len(cells) >= 2:
        lo, hi = cells[0], cells[-1]
        shared = sorted(set(lo.runs) & set(hi.runs))
        change = paired_difference(
            [hi.runs[s] for s in shared], [lo.runs[s] for s in shared], metric
        )
    cpu = sum(
        json.loads(f.read_text()).get("cpu_s", 0.0)
        for f in folder.glob("runs/**/*.json")
        if f.name in ("val.json", "test.json")
    )
    teacher = None
    tj = folder / "teachers" / dataset / "teacher.json"
    if tj.is_file():
        teacher = json.loads(tj.read_text())
        cpu += teacher.get("cpu_s", 0.0)
    return Pilot(folder.name, dataset, metric, cells, change, cpu / 3600, teacher)


def pilot_table(pilots: list[Pilot]) -> str:
    """The pilots as one markdown table, then one line per teacher."""
    lines = [
        "| pilot | metric | rank: chosen rate, test metric (mean; per seed) "
        "| high − low rank [95% CI, seeds+examples] | seed spread | rank effect? | CPU h |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in pilots:
        what = "test KL to teacher (nats/position)" if p.metric == "kl" else "test NLL (nats/token)"
        d = 5 if p.metric == "kl" else 4  # decimals: 3 significant digits of a KL ~ 0.001
        ranks = "<br>".join(
            f"r={c.r}: lr {c.lr:g}, {c.mean:.{d}f} ("
            + ", ".join(f"s{s} {v:.{d}f}" for s, v in sorted(c.per_seed.items()))
            + ")"
            for c in p.cells
        )
        iv = p.change
        if iv is None:
            change, effect = "not yet run", "-"
        else:
            change = iv.fmt(d)
            effect = "yes" if p.shows_rank_effect else "no"
        spread = f"{p.spread:.{d}f}" if p.spread == p.spread else "-"
        row = f"| {p.name} ({p.dataset}) | {what} | {ranks or '-'} | {change} | {spread} "
        lines.append(row + f"| {effect} | {p.cpu_h:.2f} |")
    lines += [f"\n{p.name}'s teacher: {teacher_summary(p.teacher)}" for p in pilots if p.teacher]
    return "\n".join(lines)


def teacher_summary(t: dict) -> str:
    """How a distillation teacher (its `teacher.json`) was made and how far it is from the
    base: the sentence the pilot table and a study report's header print."""
    ranks = [d["effective_rank"] for d in t.get("delta", {}).values()]
    r90 = [d["rank90"] for d in t.get("delta", {}).values()]
    random = (
        f", then each ΔW replaced by a seeded Gaussian matrix of {t['delta_scale']:g}× "
        "its Frobenius norm"
        if t.get("delta_kind") == "random"
        else ""
    )
    return (
        f"{t['steps']} steps at lr {t['lr']:g} on every weight of {len(t['modules'])} "
        f"modules{random}; validation NLL {t['val_nll_base']:.4f} (base) → "
        f"{t['val_nll_teacher']:.4f} (teacher); KL(teacher ‖ base) {t['val_kl_base']:.4f} "
        f"nats/position; ΔW effective rank {min(ranks):.0f}–{max(ranks):.0f}, 90 % of its "
        f"energy in {min(r90)}–{max(r90)} singular values."
    )


def main(argv: list[str] | None = None) -> None:
    folders = (argv if argv is not None else sys.argv[1:]) or []
    if not folders:
        raise SystemExit("usage: python -m nora.study.pilots PILOT_FOLDER [PILOT_FOLDER ...]")
    print(pilot_table([load_pilot(f) for f in folders]))


if __name__ == "__main__":
    main()
