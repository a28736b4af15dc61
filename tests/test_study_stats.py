"""The study's statistics: the hierarchical bootstrap sees seed variance that the examples-only
interval misses, agrees with it when seeds do not vary, Holm's adjustment on known values, and
rank_correlation on known cases and against a draw-by-draw reference."""

from __future__ import annotations

import numpy as np
import pytest

from nora.study.stats import PerExample, holm, paired_difference, rank_correlation


def run(nll, kl=None):
    """Per-example scores, one token per example; the KL is the NLL unless given."""
    nll = np.asarray(nll, float)
    ones = np.ones_like(nll)
    return PerExample(nll, ones, np.zeros(0), nll if kl is None else np.asarray(kl, float), ones)


@pytest.fixture(scope="module")
def noise():
    return np.random.default_rng(0).normal(0, 0.01, 400)  # the same small per-example noise


def test_seed_variance_widens_the_interval(noise):
    # A − B per seed: +0.3, −0.2, +0.25 (the seeds disagree); within a seed the examples agree
    base = 2.0 + noise
    b = [run(base) for _ in range(3)]
    a = [run(base + d) for d in (0.3, -0.2, 0.25)]
    examples = paired_difference(a, b, "kl", over="examples")
    both = paired_difference(a, b, "kl")
    assert examples.estimate == both.estimate == pytest.approx(0.35 / 3)
    assert examples.per_seed == pytest.approx((0.3, -0.2, 0.25))
    assert examples.excludes_zero and examples.p_value < 0.01  # v1's interval: "a difference"
    assert not both.excludes_zero and both.p_value > 0.05  # with seed variance: none
    assert both.over == "seeds+examples" and examples.over == "examples"


def test_without_seed_variance_both_intervals_agree(noise):
    rng = np.random.default_rng(1)
    a = [run(2.1 + rng.normal(0, 0.2, 400)) for _ in range(3)]
    b = [run(x.nll - 0.1 + 0.0 * noise) for x in a]  # every seed: exactly +0.1
    e, h = paired_difference(a, b, "kl", over="examples"), paired_difference(a, b, "kl")
    assert e.low == pytest.approx(0.1) and h.high == pytest.approx(0.1)
    assert h.per_seed == pytest.approx((0.1, 0.1, 0.1))


def test_kl_and_ppl_are_token_weighted_ratios():
    a, b = run([1.0, 3.0], kl=[0.2, 0.4]), run([1.0, 1.0], kl=[0.1, 0.1])
    assert paired_difference([a], [b], "kl").estimate == pytest.approx(0.3 - 0.1)
    assert paired_difference([a], [b], "ppl").estimate == pytest.approx(np.exp(2) - np.exp(1))
    plain = PerExample(np.ones(1), np.ones(1), np.zeros(0))
    with pytest.raises(ValueError, match="not distilled"):
        paired_difference([plain], [plain], "kl")
    with pytest.raises(ValueError, match="over must be"):
        paired_difference([a], [b], "ppl", over="seeds")


def test_the_probes_steps_are_a_mean_per_problem_and_absent_without_a_probe():
    def probed(steps):  # pass@1 all wrong; the probe's counts per problem
        one = np.ones(1)
        return PerExample(one, one, np.zeros(len(steps)), steps=np.asarray(steps, float))

    a = [probed([3, 5, 8, 0]), probed([4, 4, 8, 0])]
    b = [probed([1, 5, 6, 0]), probed([1, 4, 6, 0])]
    iv = paired_difference(a, b, "steps")
    assert iv.per_seed == pytest.approx((1.0, 1.25))  # (2 + 0 + 2 + 0) / 4, (3 + 0 + 2 + 0) / 4
    assert iv.estimate == pytest.approx(1.125) and 0 <= iv.low <= 1.125 <= iv.high <= 3
    d = {"nll": [1.0], "tokens": [1.0], "correct": [0.0], "correct_steps": [3, 5]}
    assert PerExample.from_dict(d).steps.tolist() == [3.0, 5.0]
    plain = PerExample.from_dict({**d, "correct_steps": []})  # not the logistic map
    assert plain.steps is None and paired_difference([plain], [plain], "steps") is None
    with pytest.raises(ValueError, match="'accuracy' or 'steps'"):
        paired_difference(a, b, "collapse")


@pytest.mark.parametrize(
    "p, want",
    [
        ([0.01, 0.04, 0.03], [0.03, 0.06, 0.06]),
        ([0.5, 0.001], [0.5, 0.002]),
        ([0.4, 0.4, 0.9], [1.0, 1.0, 1.0]),
        ([], []),
    ],
)
def test_holm(p, want):
    assert holm(p) == pytest.approx(want)


# rank_correlation on known cases: (x, y, groups, check on the interval)
_RNG = np.random.default_rng(5)
_RANKS = np.repeat([4, 16, 64, 128], 3)  # 4 ranks x 3 seeds
_ER = np.log2(_RANKS) + _RNG.normal(0, 0.3, 12)  # grows with the rank
_PPL = 3.0 - 0.1 * np.log2(_RANKS) + _RNG.normal(0, 0.01, 12)  # falls with it, noise unrelated
CORRELATIONS = [
    ("monotone", [1, 2, 3, 4, 5], [2, 4, 8, 16, 32], None, lambda iv: iv.low == iv.high == 1.0),
    ("reversed", [1, 2, 3, 4], [9, 7, 5, 1], None, lambda iv: iv.estimate == -1.0),
    # average ranks (0.5, 0.5, 2, 3) and (0, 1.5, 1.5, 3): Pearson of those = 3.75 / 4.5
    ("ties", [1, 1, 2, 3], [1, 2, 2, 3], None, lambda iv: abs(iv.estimate - 5 / 6) < 1e-12),
    # pooled over ranks, ER "predicts" PPL only because both follow the rank ...
    ("pooled", _ER, _PPL, None, lambda iv: iv.high < -0.5 and iv.p_value < 0.01),
    # ... within each rank it does not: the interval contains 0
    ("within rank", _ER, _PPL, _RANKS, lambda iv: iv.low < 0 < iv.high),
]


@pytest.mark.parametrize(
    "x, y, groups, ok", [c[1:] for c in CORRELATIONS], ids=[c[0] for c in CORRELATIONS]
)
def test_rank_correlation_known_cases(x, y, groups, ok):
    iv = rank_correlation(list(x), list(y), groups=None if groups is None else list(groups))
    assert ok(iv), iv
    assert iv.low <= iv.estimate <= iv.high


def test_rank_correlation_is_spearmans_rho_and_refuses_bad_input():
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = _RNG.normal(size=30), _RNG.normal(size=30)
    assert rank_correlation(x, y + x).estimate == pytest.approx(scipy_stats.spearmanr(x, y + x)[0])
    with pytest.raises(ValueError, match="equal-length"):
        rank_correlation([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="one group per pair"):
        rank_correlation([1, 2, 3], [1, 2, 3], groups=[0, 1])


def _reference_rho(x, y, groups, n_boot, seed):
    """rank_correlation's interval as a loop: one resample (within each group, groups in
    sorted order) and scipy's average ranks per draw; what the vectorised one must equal."""
    rankdata = pytest.importorskip("scipy.stats").rankdata
    rng = np.random.default_rng(seed)

    def rho(x, y, g):
        if g is None:
            return np.corrcoef(rankdata(x), rankdata(y))[0, 1]
        rx, ry = np.empty(len(x)), np.empty(len(y))
        for k in np.unique(g):
            m = g == k
            rx[m], ry[m] = rankdata(x[m]) - (m.sum() + 1) / 2, rankdata(y[m]) - (m.sum() + 1) / 2
        return np.corrcoef(rx, ry)[0, 1]

    boots = []
    for _ in range(n_boot):
        if groups is None:
            idx = rng.integers(0, len(x), len(x))
        else:
            idx = np.concatenate(
                [
                    rng.choice(np.flatnonzero(groups == k), (groups == k).sum())
                    for k in np.unique(groups)
                ]
            )
        with np.errstate(invalid="ignore", divide="ignore"):
            boots.append(rho(x[idx], y[idx], None if groups is None else groups[idx]))
    b = np.asarray([v for v in boots if v == v])
    low, high = np.percentile(b, [2.5, 97.5])
    return rho(x, y, groups), low, high, min(1.0, 2 * min((b <= 0).mean(), (b >= 0).mean()))


@pytest.mark.parametrize("groups", [None, "unequal"], ids=["pooled", "within groups"])
def test_rank_correlation_equals_the_draw_by_draw_bootstrap(groups):
    x = np.round(_ER, 0)  # ties within and across ranks
    g = None if groups is None else np.array([2, 0, 1, 0, 2, 2, 1, 0, 0, 2, 1, 2])  # 4, 3, 5
    iv = rank_correlation(list(x), list(_PPL), None if g is None else list(g), n_boot=300, seed=3)
    want = _reference_rho(x, _PPL, g, 300, 3)
    assert (iv.estimate, iv.low, iv.high, iv.p_value) == pytest.approx(want, abs=1e-12)


def test_rank_correlation_of_a_constant_has_no_interval():
    iv = rank_correlation([1, 2, 3, 4], [5, 5, 5, 5])
    assert np.isnan(iv.estimate) and np.isnan(iv.low) and np.isnan(iv.high) and iv.p_value == 1
