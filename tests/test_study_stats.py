"""Exact McNemar and the paired bootstrap against hand-computed values."""

import math

import pytest

from routed_lora.study.stats import discordant, mcnemar_exact, paired_bootstrap


def _pairs(n10, n01, n11=0, n00=0):
    a = [1] * n10 + [0] * n01 + [1] * n11 + [0] * n00
    b = [0] * n10 + [1] * n01 + [1] * n11 + [0] * n00
    return a, b


@pytest.mark.parametrize("n10,n01,p", [
    (0, 5, 2 / 32),  # 2 * P(X <= 0), X ~ Bin(5, 1/2)
    (1, 9, 2 * (1 + 10) / 1024),  # 2 * (C(10,0) + C(10,1)) / 2^10 = 0.021484375
    (8, 2, 2 * (1 + 10 + 45) / 1024),  # symmetric in the two systems: 0.109375
    (3, 3, 1.0),  # 2 * 42/64 > 1: capped
    (0, 0, 1.0),  # no discordant pair
    (0, 1, 1.0),
    (0, 20, 2 / 2 ** 20),
])
def test_mcnemar_exact_hand_values(n10, n01, p):
    a, b = _pairs(n10, n01, n11=7, n00=4)  # concordant pairs do not matter
    r = mcnemar_exact(a, b)
    assert (r["n10"], r["n01"]) == (n10, n01)
    assert r["p"] == pytest.approx(p, rel=1e-12)


def test_mcnemar_refuses_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        discordant([1, 0], [1])
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_exact([0.5], [1])


def test_paired_bootstrap_matches_the_exact_resampling_distribution():
    # d = [1, 0, 0]: a resample's mean is k/3 with k ~ Bin(3, 1/3): P = 8/27, 12/27, 6/27, 1/27, so the 2.5%
    # quantile is 0 and the 97.5% one is 1 (P(mean <= 2/3) = 26/27 < 0.975); the bootstrap mean is 1/3
    r = paired_bootstrap([0, 0, 0], [1, 0, 0], n_boot=40000, seed=1)
    assert r["diff"] == pytest.approx(1 / 3)
    assert r["lo"] == 0.0 and r["hi"] == 1.0
    # 90%: the 95% quantile is 2/3 (P(mean <= 1/3) = 20/27 = 0.74 < 0.95 <= 26/27)
    r = paired_bootstrap([0, 0, 0], [1, 0, 0], n_boot=40000, seed=1, level=0.9)
    assert r["hi"] == pytest.approx(2 / 3)


def test_paired_bootstrap_width_follows_the_standard_error():
    # 100 pairs, d = +1 on 30, -1 on 10, 0 on 60: mean 0.2, sd of d = sqrt(0.4 - 0.04) = 0.6, se = 0.06
    a, b = _pairs(10, 30, n11=30, n00=30)
    r = paired_bootstrap(a, b, n_boot=20000, seed=0)
    assert r["diff"] == pytest.approx(0.2)
    assert (r["hi"] - r["lo"]) == pytest.approx(2 * 1.96 * 0.06, rel=0.08)
    assert r["lo"] < 0.2 < r["hi"]
    assert paired_bootstrap(a, b, n_boot=2000, seed=3) == paired_bootstrap(a, b, n_boot=2000, seed=3)
    with pytest.raises(ValueError, match="no questions"):
        paired_bootstrap([], [])
    assert math.isfinite(r["lo"])
