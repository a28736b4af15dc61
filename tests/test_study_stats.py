"""The study's statistics: the hierarchical bootstrap sees seed variance that the examples-only
interval misses, agrees with it when seeds do not vary, and Holm's adjustment on known values."""

from __future__ import annotations

import numpy as np
import pytest

from nora.study.stats import PerExample, holm, paired_difference


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
