"""core/paired.py: paired differences and Student t intervals, checked by hand and against scipy."""
from __future__ import annotations

import math

import pytest
from scipy import stats

from core.paired import paired_difference, t_cdf, t_quantile


def test_paired_difference_by_hand():
    # differences by seed: 0.02, 0.00, 0.01 -> mean 0.01, sample std sqrt((1e-4 + 1e-4 + 0) / 2) = 0.01,
    # t_{0.975, 2} = 4.302653, half width 4.302653 * 0.01 / sqrt(3) = 0.0248414
    d = paired_difference({0: 0.97, 1: 0.96, 2: 0.98, 7: 0.5}, {0: 0.95, 1: 0.96, 2: 0.97, 9: 0.1})
    assert d.n == 3 and d.keys == (0, 1, 2)  # seeds 7 and 9 have no partner
    assert d.mean == pytest.approx(0.01) and d.std == pytest.approx(0.01)
    assert d.ci_low == pytest.approx(0.01 - 0.0248414, abs=1e-7)
    assert d.ci_high == pytest.approx(0.01 + 0.0248414, abs=1e-7)
    assert not d.significant


def test_a_consistent_difference_is_significant():
    # differences 0.05, 0.06, 0.04, 0.05: mean 0.05, std sqrt(0.0002 / 3) = 0.0081650,
    # t_{0.975, 3} = 3.1824463, half 3.1824463 * 0.00816497 / 2 = 0.0129923
    d = paired_difference({s: 0.9 for s in range(4)}, {0: 0.85, 1: 0.84, 2: 0.86, 3: 0.85})
    assert d.std == pytest.approx(math.sqrt(0.0002 / 3))
    assert d.ci_low == pytest.approx(0.05 - 0.0129923, abs=1e-7) and d.significant


def test_too_few_pairs_give_no_interval():
    one = paired_difference({0: 1.0}, {0: 0.5, 1: 0.2})
    assert (one.mean, one.std, one.n, one.ci_low, one.ci_high, one.significant) == (0.5, None, 1, None, None, False)
    none = paired_difference({0: 1.0}, {1: 0.5})
    assert (none.mean, none.n) == (None, 0)
    with pytest.raises(ValueError, match="confidence must be in"):
        paired_difference({}, {}, confidence=1.5)


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 12, 29, 60, 250])
def test_student_t_matches_scipy(df):
    for p in (0.9, 0.95, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)
    for t in (-3.0, -0.4, 0.0, 0.7, 2.5):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)
