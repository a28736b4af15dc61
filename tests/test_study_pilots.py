"""The pilot table reads a pilot's folders: the chosen rate per rank, the seeds, the change from
low to high rank with a seed-aware interval, and the rank-effect call (fake folders, no model)."""

from __future__ import annotations

import json

import numpy as np

from nora.study.pilots import load_pilot, pilot_table


def write_pilot(root, name, shift, distill, teacher_meta=None):
    out = root / name
    cfg = {"datasets": ["reasoning-mix"], "variants": {"lora": {}}, "distill": distill}
    (out / "runs").mkdir(parents=True)
    (out / "study.json").write_text(json.dumps({"config": cfg}))
    searches = [
        {"variant": "lora", "r": 4, "best_lr": 0.01},
        {"variant": "lora", "r": 128, "best_lr": 0.1},
    ]
    (out / "lr_choices.json").write_text(json.dumps({"k": {}, "searches": searches}))
    rng = np.random.default_rng(0)
    for r, lr, d in ((4, 0.01, 0.0), (128, 0.1, shift)):
        for seed in (0, 1):
            kl = (0.5 + d + 0.001 * seed + rng.normal(0, 0.01, 50)).tolist()
            per = {"nll": kl, "tokens": [1] * 50, "correct": []}
            test = {
                "seed": seed,
                "test_nll": float(np.mean(kl)),
                "per_example": per,
                "cpu_s": 1800.0,
            }
            if distill:
                test |= {
                    "test_kl": float(np.mean(kl)),
                    "per_example_kl": {"kl": kl, "positions": [1] * 50},
                }
            f = out / f"runs/reasoning-mix/lora/r{r}/lr{lr:.3g}/s{seed}/test.json"
            f.parent.mkdir(parents=True)
            f.write_text(json.dumps(test))
    if distill:
        t = out / "teachers/reasoning-mix/teacher.json"
        t.parent.mkdir(parents=True)
        delta = {
            "m.q": {"effective_rank": 300.0, "rank90": 250},
            "m.v": {"effective_rank": 120.0, "rank90": 90},
        }
        meta = {"steps": 480, "lr": 1e-4, "modules": ["m.q", "m.v"], "val_nll_base": 1.0}
        meta |= teacher_meta or {}
        t.write_text(
            json.dumps(
                meta | {"val_nll_teacher": 0.5, "val_kl_base": 0.3, "delta": delta, "cpu_s": 3600}
            )
        )
    return out


def test_a_rank_effect_is_called_only_when_it_beats_the_seeds(tmp_path):
    big = load_pilot(write_pilot(tmp_path, "pilot-distill", -0.1, {"steps": 480}))
    none = load_pilot(write_pilot(tmp_path, "pilot-logistic", 0.0, {}))
    assert [c.r for c in big.cells] == [4, 128] and big.cells[1].lr == 0.1
    assert big.metric == "kl" and none.metric == "nll"
    assert big.change.estimate < -0.09 and big.change.excludes_zero and big.shows_rank_effect
    assert not none.shows_rank_effect
    assert big.cpu_h == 4 * 0.5 + 1.0  # four runs' test stages + the teacher
    table = pilot_table([big, none])
    assert "| pilot-distill (reasoning-mix) | test KL to teacher" in table
    assert "| yes |" in table and "| no |" in table
    assert "ΔW effective rank 120–300" in table and "Gaussian" not in table
    rnd = write_pilot(
        tmp_path,
        "pilot-distill-random",
        -0.1,
        {"delta": "random"},
        {"delta_kind": "random", "delta_scale": 19.0},
    )
    assert (
        "modules, then each ΔW replaced by a seeded Gaussian matrix of 19× its Frobenius norm"
        in pilot_table([load_pilot(rnd)])
    )


def test_a_label_pilots_change_is_in_nll_the_unit_of_its_seed_spread(tmp_path):
    p = load_pilot(write_pilot(tmp_path, "pilot-logistic", -0.05, {}))
    # per-example NLL 0.5 -> 0.45 (one token each): the change is -0.05 nats, where PPL would
    # say exp(0.45) - exp(0.5) = -0.08 and be compared with a spread in nats
    assert abs(p.change.estimate + 0.05) < 0.005
    assert abs(p.spread - 0.001) < 0.005
    assert "test NLL (nats/token)" in pilot_table([p]) and "(PPL)" not in pilot_table([p])
